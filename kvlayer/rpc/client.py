"""A thin, typed client of the kvlayer cache server (used by the ``remote`` tier and the CLI).

Raises ``grpc.RpcError`` as the server answers it; callers that must never fail (the remote
tier) translate. Channels reconnect on their own with a short capped backoff; several channels
(``channels=N``) use separate TCP connections for parallel big transfers.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np

from kvlayer.codec.base import Buffer
from kvlayer.events import StoreEvent
from kvlayer.rpc import wire
from kvlayer.rpc._gen import kvlayer_pb2 as pb
from kvlayer.rpc._gen import kvlayer_pb2_grpc as pb_grpc

DEFAULT_FRAME_BYTES = 1 << 20
TENANT_HEADER = "x-kvlayer-tenant"


def parse_url(url: str) -> tuple[str, bool]:
    """``grpc://h:p`` / ``h:p`` -> (target, tls=False); ``grpcs://h:p`` -> (target, True);
    ``unix:///path/to.sock`` -> a Unix domain socket (same host, no TCP stack)."""
    u = url.strip()
    if u.startswith("unix://"):
        return "unix:/" + u[len("unix://"):].lstrip("/"), False
    if u.startswith("unix:"):
        return u, False
    for scheme, tls in (("grpcs://", True), ("grpc://", False), ("kvlayer://", False), ("http://", False),
                        ("https://", True)):
        if u.startswith(scheme):
            return u[len(scheme):].rstrip("/"), tls
    if "://" in u:
        raise ValueError(f"server url {url!r}: use grpc://host:port, grpcs://host:port, host:port or unix:///path")
    return u.rstrip("/"), False


def _target_msg(keys: Sequence[str] | None = None, tokens: Sequence[int] | None = None, namespace: bytes | None = None,
                chunk_size: int = 0, doc_id: str | None = None, full_only: bool = False) -> pb.Target:
    given = sum(x is not None for x in (keys, tokens, doc_id))
    if given != 1:
        raise ValueError("give exactly one of keys=, tokens= (with namespace=) or doc_id=")
    if keys is not None:
        return pb.Target(keys=pb.KeyList(keys=list(keys)))
    if tokens is not None:
        if namespace is None or len(namespace) != 32:
            raise ValueError("tokens= needs namespace= (the 32-byte KVSpec namespace digest)")
        return pb.Target(prefix=pb.TokenPrefix(namespace=namespace, tokens=[int(t) for t in tokens],
                                               chunk_size=chunk_size, full_only=full_only))
    return pb.Target(doc_id=str(doc_id))


class KVLayerClient:
    def __init__(self, url: str, *, token: str | None = None, tenant: str | None = None, timeout_s: float = 5.0,
                 channels: int = 1, frame_bytes: int = DEFAULT_FRAME_BYTES, tls_ca: str | None = None,
                 max_backoff_s: float = 2.0, per_key_timeout_s: float = 0.05, put_timeout_s: float | None = None
                 ) -> None:
        target, tls = parse_url(url)
        self.url = url
        self.target = target
        self.timeout_s = timeout_s
        self.per_key_timeout_s = per_key_timeout_s  # Get deadline: timeout_s + this per key asked for
        self.put_timeout_s = timeout_s if put_timeout_s is None else put_timeout_s  # Put: this + 1 s per 50 MB
        self.frame_bytes = int(frame_bytes)
        max_msg = max(4 << 20, self.frame_bytes + (64 << 10))
        backoff_ms = int(max_backoff_s * 1000)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_msg),
            ("grpc.max_send_message_length", max_msg),
            ("grpc.initial_reconnect_backoff_ms", min(100, backoff_ms)),
            ("grpc.min_reconnect_backoff_ms", min(100, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ("grpc.enable_retries", 0),
            ("grpc.use_local_subchannel_pool", 1),  # N channels = N connections
        ]
        creds = None
        if tls:
            root = open(tls_ca, "rb").read() if tls_ca else None
            creds = grpc.ssl_channel_credentials(root_certificates=root)
        self._channels = [grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)
                          for _ in range(max(1, channels))]
        self._stubs = [pb_grpc.KVLayerStub(ch) for ch in self._channels]
        # Data RPCs move raw frames (kvlayer.rpc.wire): one copy per side instead of two.
        self._gets = [ch.unary_stream("/kvlayer.v1.KVLayer/Get", request_serializer=pb.GetRequest.SerializeToString,
                                      response_deserializer=wire.identity) for ch in self._channels]
        self._puts = [ch.stream_unary("/kvlayer.v1.KVLayer/Put", request_serializer=wire.identity,
                                      response_deserializer=pb.PutResponse.FromString) for ch in self._channels]
        self._rr = itertools.cycle(range(len(self._stubs)))
        self._rr_lock = threading.Lock()
        md: list[tuple[str, str]] = []
        if token:
            md.append(("authorization", f"Bearer {token}"))
        if tenant:
            md.append((TENANT_HEADER, tenant))
        self.metadata = tuple(md)

    def _next(self) -> int:
        with self._rr_lock:
            return next(self._rr)

    @property
    def stub(self) -> pb_grpc.KVLayerStub:
        return self._stubs[self._next()]

    def _t(self, timeout: float | None) -> float:
        return self.timeout_s if timeout is None else timeout

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> KVLayerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ control
    def health(self, timeout: float | None = None, wait_for_ready: bool = False) -> pb.HealthResponse:
        return self.stub.Health(pb.HealthRequest(), timeout=self._t(timeout), metadata=self.metadata,
                                wait_for_ready=wait_for_ready)

    def stats(self, timeout: float | None = None) -> pb.StatsResponse:
        return self.stub.Stats(pb.StatsRequest(), timeout=self._t(timeout), metadata=self.metadata)

    def lookup(self, *, timeout: float | None = None, **target: Any) -> pb.LookupResponse:
        """``lookup(keys=[...])`` or ``lookup(tokens=[...], namespace=digest, chunk_size=256)``."""
        return self.stub.Lookup(pb.LookupRequest(target=_target_msg(**target)), timeout=self._t(timeout),
                                metadata=self.metadata)

    def exists(self, keys: Sequence[str], timeout: float | None = None) -> list[bool]:
        r = self.stub.Exists(pb.ExistsRequest(keys=list(keys)), timeout=self._t(timeout), metadata=self.metadata)
        return list(r.exists)

    def pin(self, *, ttl_s: float = 0.0, timeout: float | None = None, **target: Any) -> pb.PinResponse:
        return self.stub.Pin(pb.PinRequest(target=_target_msg(**target), ttl_s=ttl_s), timeout=self._t(timeout),
                             metadata=self.metadata)

    def unpin(self, lease_id: str | None = None, *, doc_id: str | None = None, timeout: float | None = None) -> int:
        if (lease_id is None) == (doc_id is None):
            raise ValueError("give a lease_id or doc_id=")
        req = pb.UnpinRequest(lease_id=lease_id) if lease_id is not None else pb.UnpinRequest(doc_id=doc_id)
        return int(self.stub.Unpin(req, timeout=self._t(timeout), metadata=self.metadata).released)

    def evict(self, *, force: bool = False, timeout: float | None = None, **target: Any) -> int:
        r = self.stub.Evict(pb.EvictRequest(target=_target_msg(**target), force=force), timeout=self._t(timeout),
                            metadata=self.metadata)
        return int(r.removed)

    def clear(self, *, all_tenants: bool = False, timeout: float | None = None) -> int:
        r = self.stub.Clear(pb.ClearRequest(all_tenants=all_tenants), timeout=self._t(timeout), metadata=self.metadata)
        return int(r.removed)

    def register_document(self, doc_id: str, *, keys: Sequence[str] | None = None, tokens: Sequence[int] | None = None,
                          namespace: bytes | None = None, chunk_size: int = 0, timeout: float | None = None) -> int:
        if (keys is None) == (tokens is None):
            raise ValueError("give keys= or tokens= (with namespace=)")
        if keys is not None:
            req = pb.RegisterDocumentRequest(doc_id=doc_id, keys=pb.KeyList(keys=list(keys)))
        else:
            req = pb.RegisterDocumentRequest(doc_id=doc_id, tokens=pb.TokenPrefix(
                namespace=namespace or b"", tokens=[int(t) for t in tokens or []], chunk_size=chunk_size))
        return int(self.stub.RegisterDocument(req, timeout=self._t(timeout), metadata=self.metadata).num_keys)

    def keys(self, limit: int = 0, timeout: float | None = None) -> list[str]:
        return list(self.stub.Keys(pb.KeysRequest(limit=limit), timeout=self._t(timeout), metadata=self.metadata).keys)

    def watch_events(self, *, max_keys: int = 0, all_tenants: bool = False, timeout: float | None = None) -> EventStream:
        """Follow what the server's tiers gain and lose. Returns once the subscription is live (every
        later change is in the stream, unless ``dropped`` grows); iterate it for ``StoreEvent``s,
        ``cancel()`` to stop. ``timeout``: the stream's whole life (None: until cancelled)."""
        call = self.stub.WatchEvents(pb.WatchEventsRequest(max_keys=max_keys, all_tenants=all_tenants),
                                     timeout=timeout, metadata=self.metadata)
        first = next(call)
        if first.kind != pb.StoreEvent.SUBSCRIBED:
            call.cancel()
            raise ValueError(f"server started the event stream with {pb.StoreEvent.Kind.Name(first.kind)}")
        return EventStream(call)


    # ------------------------------------------------------------------ data
    def _frames(self, items: Sequence[tuple[str, Buffer]], durable: bool) -> Iterator[bytes]:
        fb = self.frame_bytes
        first = True
        for key, blob in items:
            mv = memoryview(blob).cast("B")
            n = mv.nbytes
            for o in range(0, max(n, 1), fb):
                yield wire.encode_put_frame(key if o == 0 else "", n if o == 0 else 0, mv[o : o + fb], durable and first)
                first = False

    def put(self, items: Sequence[tuple[str, Buffer]], *, durable: bool = False, timeout: float | None = None) -> list[bool]:
        """Store blobs (already encoded); one stream for the batch. Returns per-blob acceptance."""
        if not items:
            return []
        if timeout is None:
            nbytes = sum(memoryview(b).nbytes for _, b in items)
            timeout = self.put_timeout_s + nbytes / 50e6  # a floor of 50 MB/s before we call it stuck
        r = self._puts[self._next()](self._frames(items, durable), timeout=timeout, metadata=self.metadata)
        return list(r.stored)

    def get(self, keys: Sequence[str], *, promote: bool = False, timeout: float | None = None) -> list[memoryview | None]:
        """Blobs for ``keys`` (None = miss) as writable buffers, assembled from the stream's frames."""
        if not keys:
            return []
        if timeout is None:
            timeout = self.timeout_s + self.per_key_timeout_s * len(keys)
        out: list[memoryview | None] = [None] * len(keys)
        fill = [0] * len(keys)
        buf: memoryview | None = None
        idx = -1
        call = self._gets[self._next()]
        for raw in call(pb.GetRequest(keys=list(keys), promote=promote), timeout=timeout, metadata=self.metadata):
            fr = wire.decode_get_frame(raw)
            if not fr.found:
                continue
            if fr.total_len:
                idx = fr.index
                if idx >= len(keys) or out[idx] is not None:
                    raise ValueError(f"server sent a bad frame index {idx}")
                # np.empty: no zero-fill pass (every byte is written), plain malloc
                buf = out[idx] = np.empty(fr.total_len, dtype=np.uint8).data
            elif buf is None or fr.index != idx:
                raise ValueError("server sent a data frame without a blob header")
            d = fr.data
            o = fill[idx]
            if o + len(d) > len(buf):
                raise ValueError("server sent more bytes than announced")
            buf[o : o + len(d)] = d
            fill[idx] = o + len(d)
        for i, b in enumerate(out):
            if b is not None and fill[i] != len(b):
                raise ValueError(f"blob {i} truncated: {fill[i]} of {len(b)} bytes")
        return out


_KINDS = {pb.StoreEvent.STORED: "stored", pb.StoreEvent.REMOVED: "removed", pb.StoreEvent.CLEARED: "cleared"}


class EventStream:
    """A live ``WatchEvents`` stream: iterating yields ``kvlayer.events.StoreEvent`` (keys as the
    caller names them); ``dropped`` is how many the server's bound has dropped so far."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.dropped = 0

    def __iter__(self) -> Iterator[StoreEvent]:
        for m in self._call:
            kind = _KINDS.get(m.kind)
            if kind is None:
                continue  # a kind this client does not know (a newer server)
            self.dropped = int(m.dropped)
            yield StoreEvent(int(m.seq), kind, m.tier, m.medium, tuple(m.keys), m.reason, float(m.ts))  # type: ignore[arg-type]

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
