"""The ``remote`` tier: a kvlayer cache server (``kvlayer serve``) reached over gRPC.

The tier ships already-encoded blobs; the server verifies and stores them as they are. A dead or
slow server must cost the engine little: every call has a short deadline and a failure raises
``TierError``, which the store's breaker for this tier turns into a miss and a window in which
the tier is skipped (``retry_*`` of its TierConfig); gRPC reconnects the channel underneath.
Refusals by the server (too big, busy) are dropped writes, not failures.

Options (``TierConfig.options`` / ``KVLayerConfig`` fields): ``auth_token``, ``tenant``,
``timeout_s`` (control calls and reads, default 1 s), ``put_timeout_s`` (writes, default 5 s: they
run in the background, and a write whose process was descheduled for a few seconds on a busy host
is late, not failed; failing it would drop it and skip the tier), ``channels`` (TCP connections a
big batch is split across, in parallel, like the Redis tier's connections; default 4),
``frame_bytes``, ``durable`` (acknowledge puts only once on the server's disk), ``tls_ca``,
``max_backoff_s`` (the channels' reconnect backoff cap, default 2 s), ``batch_keys``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from pydantic import Field, field_validator

from kvlayer.codec.base import Buffer
from kvlayer.config import TierConfig
from kvlayer.errors import ConfigError, TierError
from kvlayer.rpc.client import DEFAULT_FRAME_BYTES, KVLayerClient
from kvlayer.storage.base import Tier, TierOptions, TierStats
from kvlayer.units import parse_size

log = logging.getLogger(__name__)
T = TypeVar("T")


class RemoteTier(Tier):
    kind = "remote"

    def __init__(self, url: str, name: str = "remote", *, auth_token: str | None = None, tenant: str | None = None,
                 timeout_s: float = 1.0, channels: int = 4, frame_bytes: int = DEFAULT_FRAME_BYTES,
                 durable: bool = False, tls_ca: str | None = None, max_backoff_s: float = 2.0,
                 batch_keys: int = 64, put_timeout_s: float = 5.0) -> None:
        super().__init__(name, 0)
        self.url = url
        self.durable = durable
        self.batch_keys = max(1, int(batch_keys))
        self.client = KVLayerClient(url, token=auth_token, tenant=tenant, timeout_s=timeout_s, channels=channels,
                                    frame_bytes=frame_bytes, tls_ca=tls_ca, max_backoff_s=max_backoff_s,
                                    put_timeout_s=put_timeout_s)
        self._lock = threading.Lock()
        self._server_stats: tuple[float, Any] = (0.0, None)
        self.channels = max(1, int(channels))
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ failure handling
    def _call(self, op: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, turning gRPC errors and malformed replies into ``TierError``."""
        try:
            return fn()
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            detail = e.details() if hasattr(e, "details") else str(e)
            raise TierError(f"remote tier {self.url}: {op} failed: {code.name if code else '?'}: {detail}") from None
        except ValueError as e:  # malformed stream from the server
            raise TierError(f"remote tier {self.url}: {op}: {e}") from None

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """Slices of a batch: one per channel (big batches move in parallel), none over batch_keys."""
        if n == 0:
            return []
        k = max(min(self.channels, n), -(-n // self.batch_keys))
        size = -(-n // k)
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    def _run(self, op: str, jobs: list[Callable[[], T]]) -> list[T]:
        if len(jobs) <= 1:
            return [self._call(op, j) for j in jobs]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.channels, thread_name_prefix="kvlayer-remote")
        futs = [self._pool.submit(self._call, op, j) for j in jobs]
        return [f.result() for f in futs]

    # ------------------------------------------------------------------ Tier API
    def get(self, key: str) -> Buffer | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        ks = list(keys)
        parts = self._run("get", [functools.partial(self.client.get, ks[a:b]) for a, b in self._spans(len(ks))])
        out: list[Buffer | None] = [b for part in parts for b in part]
        hits = [b for b in out if b is not None]
        self.count(hits=len(hits), misses=len(out) - len(hits), bytes_read=sum(memoryview(b).nbytes for b in hits))
        return out

    def put(self, key: str, blob: Buffer) -> bool:
        return self.put_many([(key, blob)])[0]

    def _put_part(self, part: list[tuple[str, Buffer]]) -> list[bool]:
        try:
            return self._call("put", functools.partial(self.client.put, part, durable=self.durable))
        except TierError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            log.info("%s", e)  # the server refused (too big / busy): a dropped write, not an outage
            return [False] * len(part)

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        items = list(items)
        jobs = [functools.partial(self._put_part, items[a:b]) for a, b in self._spans(len(items))]
        if len(jobs) <= 1:
            parts = [j() for j in jobs]
        else:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=self.channels, thread_name_prefix="kvlayer-remote")
            parts = [f.result() for f in [self._pool.submit(j) for j in jobs]]
        out = [s for part in parts for s in part]
        ok = [b for (_, b), s in zip(items, out, strict=True) if s]
        self.count(puts=len(ok), bytes_written=sum(memoryview(b).nbytes for b in ok),
                   dropped_writes=len(items) - len(ok))
        return out

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        ks = list(keys)
        parts = self._run("exists", [functools.partial(self.client.exists, ks[a:b])
                                     for a, b in self._spans(len(ks))])
        return [x for part in parts for x in part]

    def contains(self, key: str) -> bool:
        return self.exists_many([key])[0]

    def delete(self, key: str) -> bool:
        return self.delete_many([key]) > 0

    def delete_many(self, keys: Iterable[str]) -> int:
        ks = list(keys)
        return sum(self._call("evict", functools.partial(self.client.evict, keys=ks[a:b])) for a, b in self._spans(len(ks)))

    def keys(self) -> list[str]:
        return self._call("keys", lambda: self.client.keys())

    def clear(self) -> None:
        self._call("clear", lambda: self.client.clear())

    def _remote_stats(self) -> Any:
        t, s = self._server_stats
        if s is None or time.monotonic() - t > 1.0:
            s = self._call("stats", lambda: self.client.stats())
            self._server_stats = (time.monotonic(), s)
        return s

    def used_bytes(self) -> int:
        s = self._remote_stats()
        return int(s.tiers[0].used_bytes) if s.tiers else 0

    def stats(self) -> TierStats:
        """Client-side counters; used bytes and keys as the server reports them (when reachable)."""
        with self._stats_lock:
            st = TierStats(**self._stats.as_dict())  # type: ignore[arg-type]
        try:
            s = self._remote_stats()
            st.used_bytes = int(sum(t.used_bytes for t in s.tiers if t.kind == "memory"))
            st.num_keys = int(s.tenant_keys)
        except TierError:
            pass
        return st

    def healthy(self) -> bool:
        try:
            return self._call("health", lambda: self.client.health()).status == 1
        except TierError:
            return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.client.close()

    def __repr__(self) -> str:
        return f"RemoteTier(name={self.name!r}, url={self.url!r})"


class Options(TierOptions):
    auth_token: str | None = None
    tenant: str | None = None
    timeout_s: float = Field(default=1.0, gt=0)
    put_timeout_s: float = Field(default=5.0, gt=0)
    channels: int = Field(default=4, ge=1)
    frame_bytes: int = Field(default=DEFAULT_FRAME_BYTES, ge=1)
    durable: bool = False
    tls_ca: str | None = None
    max_backoff_s: float = Field(default=2.0, ge=0)
    batch_keys: int = Field(default=64, ge=1)

    @field_validator("frame_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)


def build(cfg: TierConfig, options: Options) -> Tier:
    if not cfg.url:
        raise ConfigError(f"tier {cfg.name!r} of kind 'remote' needs a url such as grpc://127.0.0.1:7070")
    return RemoteTier(cfg.url, cfg.name, **options.model_dump())
