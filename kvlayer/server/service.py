"""The gRPC servicer: ``kvlayer.v1.KVLayer`` over a ``BlobStore``.

Tenancy: every key a client names is stored as ``<tenant prefix><key>`` (the prefix is 16 hex
chars of a SHA-256 of the tenant name), so one tenant's keys can never address another's chunks;
leases and documents belong to their tenant too (``kvlayer.server.tenants``).

Decoding: grpcio hands every handler the request's raw bytes; the handler authenticates first and
decodes after, so a request without a valid token costs a metadata check and nothing else, and a
message that does not parse is answered INVALID_ARGUMENT by our code. (grpcio's own deserializer
path, taken when a message class is registered, answers an unparsable message INTERNAL and never
finishes the call: the HTTP/2 stream stays open, ~18 KiB each stays allocated, and once
``grpc.max_concurrent_streams`` of them pile up on one connection every later call on it is
refused with UNAVAILABLE. ``tests/integration/test_server_fuzz.py`` drives that path.)

Limits: a blob larger than ``max_blob_bytes`` or a request moving more than
``max_request_bytes`` is refused with RESOURCE_EXHAUSTED; the bytes of blobs being received are
reserved from a shared in-flight budget first (so memory stays bounded however many clients
upload at once), and a request that cannot get its reservation in time is refused the same way.
Pins and documents are charged to the tenant quota; keys and tokens per request are capped.
INTERNAL means a bug of ours and is logged with its trace.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from kvlayer.codec.header import verify
from kvlayer.errors import CorruptBlobError
from kvlayer.events import StoreEvent, only_prefix
from kvlayer.keys import chunk_bounds, document_keys, prefix_keys
from kvlayer.rpc import wire
from kvlayer.rpc._gen import kvlayer_pb2 as pb
from kvlayer.rpc._gen import kvlayer_pb2_grpc as pb_grpc
from kvlayer.server.memory import ByteBudget, rss
from kvlayer.server.metrics import ServerMetrics
from kvlayer.server.tenants import QuotaExceeded, TenantLimits, TenantRegistry
from kvlayer.storage.blobstore import BlobStore

log = logging.getLogger(__name__)
#: Every TierStats field of the wire format, filled from the store's per-tier stats by name.
_TIER_FIELDS = tuple(f.name for f in pb.TierStats.DESCRIPTOR.fields)

SERVER_VERSION = "kvlayer.v1/0.1.0"
KEY_RE = re.compile(r"^[0-9a-f]{16,112}$")
TENANT_RE = re.compile(r"^[A-Za-z0-9_.:@/-]{1,128}$")
TENANT_HEADER = "x-kvlayer-tenant"
DEFAULT_TENANT = "default"
_SERVICE = pb.DESCRIPTOR.services_by_name["KVLayer"]


def tenant_prefix(tenant: str) -> str:
    return hashlib.sha256(b"kvlayer-tenant\x00" + tenant.encode("utf-8")).hexdigest()[:16]


def client_key(stored: str) -> str:
    """The client's key of a stored key (``tenant_prefix`` + key): what its blob is bound to."""
    return stored[16:]


class Abort(Exception):
    """Raised inside a handler to end the RPC with a status code and a clear message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Limits:
    max_blob_bytes: int = 256 << 20
    max_request_bytes: int = 2 << 30
    inflight_bytes: int = 256 << 20
    inflight_wait_s: float = 10.0
    frame_bytes: int = 1 << 20
    max_keys: int = 100_000  # keys named by one request
    max_tokens: int = 1 << 20  # tokens of one TokenPrefix (the keys of 4096 chunks of 256)
    max_chunk_size: int = 1 << 16
    max_message_bytes: int = 4 << 20  # what the gRPC server accepts and sends (responses are cut to fit)
    max_watchers: int = 8  # WatchEvents streams at once (each holds a handler thread)
    watch_max_keys: int = 100_000  # keys queued per WatchEvents stream the client does not read
    tenants: TenantLimits = field(default_factory=TenantLimits)


@dataclass
class Caller:
    tenant: str
    prefix: str
    admin: bool


@dataclass
class Auth:
    """No tokens = open server (bind to loopback!). ``token`` grants any tenant (admin);
    ``tenant_tokens`` maps a tenant to a token that grants only that tenant."""

    token: str | None = None
    tenant_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.token) or bool(self.tenant_tokens)


@contextlib.contextmanager
def _rpc_scope(servicer: KVLayerServicer, name: str, context: grpc.ServicerContext) -> Iterator[None]:
    """Status mapping and metrics around one handler's body (unary or streaming)."""
    t0 = time.perf_counter()
    code = grpc.StatusCode.OK
    servicer.metrics.active.inc()
    try:
        yield
    except Abort as e:
        code = e.code
        context.abort(e.code, e.message)
    except QuotaExceeded as e:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        context.abort(code, str(e))
    except grpc.RpcError:  # the client went away / cancelled mid-stream; grpc knows, nothing to report
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as e:
        code = grpc.StatusCode.INTERNAL
        servicer._unexpected(name, e, context)
    finally:
        servicer.metrics.active.dec()
        servicer._observe(name, code, t0)


def _decoder(name: str) -> Callable[[Any], Any]:
    """Raw request bytes -> the RPC's request message; a message that does not parse is the
    client's error (INVALID_ARGUMENT), never ours. Client-streaming RPCs parse their own frames."""
    method = _SERVICE.methods_by_name[name]
    if method.client_streaming:
        return lambda raw: raw
    cls = getattr(pb, method.input_type.name)

    def decode(raw: Any) -> Any:
        if isinstance(raw, cls):  # called in-process with a message (tests)
            return raw
        try:
            return cls.FromString(raw)
        except (DecodeError, TypeError, ValueError) as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {cls.__name__}: {e}") from None

    return decode


def _rpc(name: str, *, streaming_response: bool = False,
         needs_auth: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Auth + tenant resolution, then decoding, status mapping and metrics around one handler."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        decode = _decoder(name)
        if streaming_response:
            @functools.wraps(fn)
            def gen_wrapper(self: KVLayerServicer, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with _rpc_scope(self, name, context):
                    caller = self._caller(context) if needs_auth else None
                    yield from fn(self, decode(request), context, caller)

            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(self: KVLayerServicer, request: Any, context: grpc.ServicerContext) -> Any:
            with _rpc_scope(self, name, context):
                caller = self._caller(context) if needs_auth else None
                return fn(self, decode(request), context, caller)
            return None  # unreachable in practice: a handled error aborts the RPC

        return wrapper

    return deco


class KVLayerServicer(pb_grpc.KVLayerServicer):
    def __init__(self, store: BlobStore, *, limits: Limits | None = None, auth: Auth | None = None,
                 durable: bool = False, metrics: ServerMetrics | None = None, docs_path: str | None = None) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.auth = auth or Auth()
        self.durable = durable
        self.metrics = metrics or ServerMetrics()
        self.budget = ByteBudget(self.limits.inflight_bytes)
        self.started = time.time()
        self.draining = False
        self.memory_guard: Any = None  # set by the app: RSS figures in Stats
        self.tenants = TenantRegistry(store.pins, self.limits.tenants, docs_path)
        self._ctr_lock = threading.Lock()
        self.counters: dict[str, int] = {"bytes_in": 0, "bytes_out": 0, "blobs_in": 0, "blobs_out": 0,
                                         "get_misses": 0, "rejected": 0, "watchers": 0}

    # ------------------------------------------------------------------ plumbing
    def _bump(self, **kw: int) -> None:
        with self._ctr_lock:
            for k, v in kw.items():
                self.counters[k] = self.counters.get(k, 0) + v

    def _observe(self, name: str, code: grpc.StatusCode, t0: float) -> None:
        cname = code.name
        self.metrics.requests.labels(name, cname).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
        if code != grpc.StatusCode.OK:
            self._bump(rejected=1)

    def _unexpected(self, name: str, e: Exception, context: grpc.ServicerContext) -> None:
        log.exception("%s failed", name)
        context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error ({type(e).__name__}: {e})")

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        md: dict[str, str | bytes] = {}
        for k, v in context.invocation_metadata():
            md[k] = v
        tenant = str(md.get(TENANT_HEADER) or DEFAULT_TENANT)
        if not TENANT_RE.match(tenant):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"bad tenant {tenant[:40]!r}: 1-128 chars of letters, digits and _.:@/-")
        admin = True
        if self.auth.enabled:
            raw = str(md.get("authorization") or "")
            token = raw[7:].strip() if raw.lower().startswith("bearer ") else raw.strip()
            tb = token.encode("utf-8")
            if self.auth.token and hmac.compare_digest(tb, self.auth.token.encode("utf-8")):
                admin = True
            else:
                owner = None
                for t, tok in self.auth.tenant_tokens.items():
                    if hmac.compare_digest(tb, tok.encode("utf-8")):
                        owner = t
                if owner is None:
                    raise Abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong auth token (send metadata 'authorization: Bearer <token>')")
                if md.get(TENANT_HEADER) and tenant != owner:
                    raise Abort(grpc.StatusCode.PERMISSION_DENIED, f"this token is for tenant {owner!r}, not {tenant!r}")
                tenant, admin = owner, False
        return Caller(tenant, tenant_prefix(tenant), admin)

    def _check_keys(self, keys: Sequence[str]) -> list[str]:
        if len(keys) > self.limits.max_keys:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{len(keys)} keys in one request; the limit is {self.limits.max_keys}")
        for k in keys:
            if not KEY_RE.match(k):
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad key {k[:80]!r}: expected 16-112 lowercase hex chars")
        return list(keys)

    def _target_keys(self, target: pb.Target, caller: Caller) -> tuple[list[str], str, list[tuple[int, int]] | None]:
        """(tenant-internal keys, doc id or "", chunk bounds for a token prefix)."""
        which = target.WhichOneof("what")
        if which == "keys":
            return [caller.prefix + k for k in self._check_keys(target.keys.keys)], "", None
        if which == "prefix":
            keys, bounds = self._prefix_keys(target.prefix)
            return [caller.prefix + k for k in keys], "", bounds
        if which == "doc_id":
            dkeys = self.tenants.document(caller.tenant, target.doc_id)
            if dkeys is None:
                raise Abort(grpc.StatusCode.NOT_FOUND, f"unknown document {target.doc_id[:80]!r}; register it first")
            return dkeys, target.doc_id, None
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "target must name keys, a token prefix or a document")

    def _prefix_keys(self, p: pb.TokenPrefix, *, document: bool = False) -> tuple[list[str], list[tuple[int, int]]]:
        lim = self.limits
        if len(p.namespace) != 32:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "namespace must be the 32-byte KVSpec namespace digest")
        cs = p.chunk_size or 256
        if cs > lim.max_chunk_size:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"chunk_size {cs} is above the server's limit {lim.max_chunk_size}")
        n = len(p.tokens)
        if n > lim.max_tokens or -(-n // cs) > lim.max_keys:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{n} tokens in one request; the limit is {lim.max_tokens} tokens and {lim.max_keys} chunks")
        toks = list(p.tokens)
        if document:
            keys = document_keys(bytes(p.namespace), toks, cs)
            return keys, chunk_bounds(len(toks), cs)
        keys = prefix_keys(bytes(p.namespace), toks, cs, full_only=p.full_only)
        return keys, chunk_bounds(len(toks), cs, full_only=p.full_only)

    # ------------------------------------------------------------------ health / stats
    @_rpc("Health", needs_auth=False)
    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext, caller: Caller | None) -> pb.HealthResponse:
        status = pb.HealthResponse.NOT_SERVING if self.draining else pb.HealthResponse.SERVING
        return pb.HealthResponse(status=status, version=SERVER_VERSION, uptime_s=time.time() - self.started,
                                 pid=os.getpid())

    def stats_dict(self) -> dict[str, Any]:
        s = self.store.stats()
        with self._ctr_lock:
            s["server"] = dict(self.counters)
        s["server"]["inflight_bytes"] = self.budget.used
        guard = self.memory_guard
        if guard is not None:
            s["server"]["rss_bytes"] = rss()
            s["server"]["rss_baseline_bytes"] = guard.baseline
            s["server"]["malloc_trims"] = guard.trims
        s["server"]["inflight_limit"] = self.budget.limit
        s["server"].update(self.tenants.usage())
        return s

    @_rpc("Stats")
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext, caller: Caller) -> pb.StatsResponse:
        s = self.stats_dict()
        resp = pb.StatsResponse(tenant=caller.tenant)
        for t in s["tiers"]:
            resp.tiers.append(pb.TierStats(**{f: t[f] for f in _TIER_FIELDS if t.get(f) is not None}))
        for k, v in {**s["store"], **s["server"]}.items():
            if isinstance(v, int | bool):
                resp.counters[k] = int(v)
        resp.counters["uptime_s"] = int(time.time() - self.started)
        resp.tenant_keys = len(self.store.keys_with_prefix(caller.prefix))
        return resp

    # ------------------------------------------------------------------ lookup / exists
    @_rpc("Lookup")
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext, caller: Caller) -> pb.LookupResponse:
        keys, _, bounds = self._target_keys(request.target, caller)
        tiers = self.store.lookup(keys)
        hit_tokens = bounds[len(tiers) - 1][1] if bounds and tiers else 0
        return pb.LookupResponse(hit_chunks=len(tiers), tiers=[t or "" for t in tiers], hit_tokens=hit_tokens,
                                 num_chunks=len(keys))

    @_rpc("Exists")
    def Exists(self, request: pb.ExistsRequest, context: grpc.ServicerContext, caller: Caller) -> pb.ExistsResponse:
        keys = [caller.prefix + k for k in self._check_keys(request.keys)]
        return pb.ExistsResponse(exists=[w is not None for w in self.store.locate(keys)])

    # ------------------------------------------------------------------ put / get
    @_rpc("Put")
    def Put(self, request_iterator: Iterator[pb.PutFrame], context: grpc.ServicerContext, caller: Caller) -> pb.PutResponse:
        lim = self.limits
        stored: list[bool] = []
        total = 0
        durable: bool | None = None
        key = ""
        buf: memoryview | None = None
        off = 0
        reserved = 0
        try:
            for raw in request_iterator:
                frame = self._put_frame(raw)
                if durable is None:
                    durable = self.durable or frame.durable
                if frame.key:
                    if buf is not None:
                        raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"blob {key[16:32]}... ended after {off} of {len(buf)} bytes")
                    self._check_keys([frame.key])
                    n = frame.total_len
                    if n == 0:
                        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame of a blob must carry total_len > 0")
                    if n > lim.max_blob_bytes:
                        raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"blob of {n} bytes exceeds the server's max blob size {lim.max_blob_bytes}")
                    if total + n > lim.max_request_bytes:
                        raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"request exceeds the server's max request size {lim.max_request_bytes} bytes")
                    if not self.budget.acquire(n, lim.inflight_wait_s):
                        raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"server busy: no room for {n} more bytes of in-flight uploads "
                                    f"(limit {self.budget.limit}); retry later")
                    reserved = n
                    self.metrics.inflight.inc(n)
                    key = caller.prefix + frame.key
                    buf = np.empty(n, dtype=np.uint8).data  # no zero-fill: every byte is written below
                    off = 0
                    total += n
                elif buf is None:
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "a blob must start with a frame carrying its key")
                data = frame.data
                if off + len(data) > len(buf):
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"blob {key[16:32]}... has more bytes than its total_len {len(buf)}")
                buf[off : off + len(data)] = data
                off += len(data)
                if off == len(buf):
                    try:
                        verify(buf, client_key(key), unbound_ok=True)  # a blob bound to another key is refused
                    except CorruptBlobError as e:
                        raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"blob {key[16:32]}... is not a valid kvlayer blob: {e}") from None
                    stored.append(self.store.put_blob(key, buf, durable=bool(durable)))
                    self.budget.release(reserved)
                    self.metrics.inflight.dec(reserved)
                    reserved = 0
                    buf = None
            if buf is not None:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"stream ended inside a blob ({off} of {len(buf)} bytes)")
        finally:
            if reserved:
                self.budget.release(reserved)
                self.metrics.inflight.dec(reserved)
        self._bump(bytes_in=total, blobs_in=len(stored))
        self.metrics.bytes.labels("in").inc(total)
        return pb.PutResponse(stored=stored, bytes=total)

    @staticmethod
    def _put_frame(raw: Any) -> wire.PutFrameView:
        if isinstance(raw, pb.PutFrame):
            return wire.PutFrameView(raw.key, raw.total_len, memoryview(raw.data), raw.durable)
        try:
            return wire.decode_put_frame(raw)
        except ValueError as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed PutFrame: {e}") from None

    @_rpc("Get", streaming_response=True)
    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext, caller: Caller) -> Iterator[bytes]:
        """Frames in protobuf wire format built by ``wire`` (one copy of the payload)."""
        keys = self._check_keys(request.keys)
        fb = self.limits.frame_bytes
        total = 0
        hits = 0
        for i, k in enumerate(keys):
            got = self.store.get_blob(caller.prefix + k, promote=True if request.promote else None)
            if got is None:
                yield wire.encode_get_frame(i, False, 0, b"")
                continue
            blob = memoryview(got[0]).cast("B")
            n = blob.nbytes
            total += n
            if total > self.limits.max_request_bytes:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"response exceeds the server's max request size {self.limits.max_request_bytes} bytes; "
                            "ask for fewer keys at a time")
            hits += 1
            for o in range(0, n, fb):
                yield wire.encode_get_frame(i, True, n if o == 0 else 0, blob[o : o + fb])
        self.metrics.hits.inc(hits)
        self.metrics.misses.inc(len(keys) - hits)
        self.metrics.bytes.labels("out").inc(total)
        self._bump(bytes_out=total, blobs_out=hits, get_misses=len(keys) - hits)

    # ------------------------------------------------------------------ pins / eviction
    @_rpc("Pin")
    def Pin(self, request: pb.PinRequest, context: grpc.ServicerContext, caller: Caller) -> pb.PinResponse:
        ttl = request.ttl_s
        if not math.isfinite(ttl) or ttl < 0:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"ttl_s must be a finite number of seconds >= 0 (0 = no "
                                                          f"expiry), not {ttl!r}")
        keys, doc, _ = self._target_keys(request.target, caller)
        lease = self.tenants.pin(caller.tenant, keys, ttl or None, doc_id=doc)
        return pb.PinResponse(lease_id=lease, num_keys=len(keys))

    @_rpc("Unpin")
    def Unpin(self, request: pb.UnpinRequest, context: grpc.ServicerContext, caller: Caller) -> pb.UnpinResponse:
        which = request.WhichOneof("what")
        if which == "doc_id":
            return pb.UnpinResponse(released=self.tenants.unpin_document(caller.tenant, request.doc_id))
        if which == "lease_id":
            return pb.UnpinResponse(released=self.tenants.unpin(caller.tenant, request.lease_id))
        raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "give a lease_id or a doc_id")

    @_rpc("Evict")
    def Evict(self, request: pb.EvictRequest, context: grpc.ServicerContext, caller: Caller) -> pb.EvictResponse:
        keys, _, _ = self._target_keys(request.target, caller)
        self.store.flush(timeout=10)  # a queued write-through must not resurrect an evicted chunk
        return pb.EvictResponse(removed=self.store.delete(keys, force=request.force))

    @_rpc("Clear")
    def Clear(self, request: pb.ClearRequest, context: grpc.ServicerContext, caller: Caller) -> pb.ClearResponse:
        if request.all_tenants:
            if not caller.admin:
                raise Abort(grpc.StatusCode.PERMISSION_DENIED, "clearing all tenants needs the admin token")
            n = len(self.store.keys_with_prefix(""))
            self.store.clear()
            self.tenants.clear_all()
            return pb.ClearResponse(removed=n)
        n = self.store.delete_prefix(caller.prefix)
        self.tenants.clear_tenant(caller.tenant)
        return pb.ClearResponse(removed=n)

    @_rpc("RegisterDocument")
    def RegisterDocument(self, request: pb.RegisterDocumentRequest, context: grpc.ServicerContext,
                         caller: Caller) -> pb.RegisterDocumentResponse:
        max_id = self.limits.tenants.max_doc_id_chars
        if not request.doc_id or len(request.doc_id) > max_id:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"doc_id must be 1-{max_id} characters")
        which = request.WhichOneof("what")
        if which == "keys":
            keys = self._check_keys(request.keys.keys)
        elif which == "tokens":
            keys, _ = self._prefix_keys(request.tokens, document=True)
        else:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "give the document's keys or tokens")
        self.tenants.register_document(caller.tenant, request.doc_id, [caller.prefix + k for k in keys])
        return pb.RegisterDocumentResponse(num_keys=len(keys))

    @_rpc("Keys")
    def Keys(self, request: pb.KeysRequest, context: grpc.ServicerContext, caller: Caller) -> pb.KeysResponse:
        """At most ``limit`` keys (0 = 1,000,000), and no more than fit in one message."""
        limit = request.limit or 1_000_000
        keys = sorted(self.store.keys_with_prefix(caller.prefix))
        plen = len(caller.prefix)
        room = self.limits.max_message_bytes - 1024
        out: list[str] = []
        for k in keys[:limit]:
            room -= len(k) - plen + 3  # tag, length, the key
            if room < 0:
                break
            out.append(k[plen:])
        return pb.KeysResponse(keys=out, truncated=len(out) < len(keys))

    # ------------------------------------------------------------------ events
    @_rpc("WatchEvents", streaming_response=True)
    def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.ServicerContext,
                    caller: Caller) -> Iterator[pb.StoreEvent]:
        """The store's events (``kvlayer.events``) for the caller's tenant, from a bounded queue of
        its own; a stream holds a handler thread, so at most ``max_watchers`` run at once."""
        if request.all_tenants and not caller.admin:
            raise Abort(grpc.StatusCode.PERMISSION_DENIED, "watching all tenants needs the admin token")
        lim = self.limits
        with self._ctr_lock:
            if self.counters["watchers"] >= lim.max_watchers:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{lim.max_watchers} event streams are open, the server's limit; retry later")
            self.counters["watchers"] += 1
        sub = self.store.events.subscribe(min(request.max_keys or lim.watch_max_keys, lim.watch_max_keys))
        try:
            context.add_callback(sub.wake)  # the client went away or its deadline passed: stop waiting
            prefix = "" if request.all_tenants else caller.prefix
            yield pb.StoreEvent(kind=pb.StoreEvent.SUBSCRIBED, ts=time.time())
            while context.is_active() and not self.draining:
                for ev in only_prefix(sub.wait(1.0, max_events=256), prefix):
                    yield _event_message(ev, sub.dropped)
        finally:
            sub.close()
            with self._ctr_lock:
                self.counters["watchers"] -= 1


_KINDS = {"stored": pb.StoreEvent.STORED, "removed": pb.StoreEvent.REMOVED, "cleared": pb.StoreEvent.CLEARED}


def _event_message(ev: StoreEvent, dropped: int) -> pb.StoreEvent:
    return pb.StoreEvent(seq=ev.seq, kind=_KINDS[ev.kind], tier=ev.tier, medium=ev.medium, keys=list(ev.keys),
                         reason=ev.reason, ts=ev.ts, dropped=dropped)


def _serialize_frame(x: Any) -> bytes:
    return x if isinstance(x, bytes) else x.SerializeToString()


def add_to_server(servicer: KVLayerServicer, server: grpc.Server) -> None:
    """Register every RPC of the proto. Requests reach the handlers as raw bytes (no
    ``request_deserializer``): the handlers authenticate, then decode (``_decoder``). Get answers
    with raw frames built by ``wire``, the rest with the generated message classes."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in _SERVICE.methods:
        resp = getattr(pb, m.output_type.name)
        fn = getattr(servicer, m.name)
        if m.client_streaming and not m.server_streaming:
            handlers[m.name] = grpc.stream_unary_rpc_method_handler(fn, response_serializer=resp.SerializeToString)
        elif m.server_streaming and not m.client_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(fn, response_serializer=_serialize_frame)
        elif not m.client_streaming and not m.server_streaming:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(fn, response_serializer=resp.SerializeToString)
        else:  # pragma: no cover - a bidirectional RPC needs its own handler here
            raise NotImplementedError(m.name)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
