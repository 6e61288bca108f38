"""The tiered store: ordered tiers (hot -> cold), a codec per tier, pins, background writes.

- ``lookup`` finds where each key lives without moving data (existence checks only).
- ``get`` reads from the hottest tier that has a key, verifies and decodes it, and promotes hits
  from lower tiers into the hottest one.
- ``put`` writes the hottest tier synchronously; lower tiers get the chunk either write-through
  (a background writer with a bounded byte budget) or when the hotter tier evicts it
  (``on_demotion``). The writer drains up to ``WRITE_BATCH_JOBS`` / ``WRITE_BATCH_BYTES`` of
  queued writes at a time and hands each lower tier one ``put_many``, so remote tiers pipeline.
- A tier that raises is skipped for ``retry_after_s`` and its operations count as misses / dropped
  writes: nothing a tier does can raise into the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from kvlayer.codec import Codec, decode
from kvlayer.codec.base import Buffer
from kvlayer.errors import CorruptBlobError
from kvlayer.storage.base import EvictionGuard, Tier
from kvlayer.storage.pins import PinRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")

WritePolicy = Literal["write_through", "on_demotion"]
WRITE_BATCH_JOBS = 64
WRITE_BATCH_BYTES = 64 << 20


@dataclass
class Level:
    tier: Tier
    codec: Codec
    down_until: float = 0.0
    failures: int = 0

    @property
    def name(self) -> str:
        return self.tier.name


@dataclass
class StoreCounters:
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    promotions: int = 0
    corrupt: int = 0
    tier_errors: int = 0
    queued_writes: int = 0
    dropped_writes: int = 0
    demotions: int = 0
    hits_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass
class _Job:
    levels: tuple[int, ...]
    key: str
    tensor: torch.Tensor | None
    blob: Buffer | None
    blob_codec: str | None
    nbytes: int


class TieredStore(EvictionGuard):
    def __init__(
        self,
        levels: Sequence[tuple[Tier, Codec]],
        *,
        write_policy: WritePolicy = "write_through",
        write_queue_bytes: int = 256 << 20,
        promote_on_hit: bool = True,
        retry_after_s: float = 5.0,
    ) -> None:
        if not levels:
            raise ValueError("a tiered store needs at least one tier")
        self.levels = [Level(t, c) for t, c in levels]
        self.write_policy = write_policy
        self.promote_on_hit = promote_on_hit
        self.retry_after_s = retry_after_s
        self.pins = PinRegistry()
        self.counters = StoreCounters()
        self._clock = threading.Lock()
        for lv in self.levels:
            lv.tier.set_eviction_guard(self)
        # background writer
        self._q: deque[_Job] = deque()
        self._q_bytes = 0
        self._q_limit = max(1, int(write_queue_bytes))
        self._q_cv = threading.Condition()
        self._inflight = 0
        self._inflight_keys: set[str] = set()
        # put()'s ``block`` flag, seen by on_evict() which runs inside the hot tier's put.
        self._tls = threading.local()
        self._closed = False
        self._worker: threading.Thread | None = None
        if len(self.levels) > 1:
            self._worker = threading.Thread(target=self._writer, name="kvlayer-writer", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ failure isolation
    def _count(self, **kw: int) -> None:
        with self._clock:
            for k, v in kw.items():
                setattr(self.counters, k, getattr(self.counters, k) + v)

    def _available(self, lv: Level) -> bool:
        return time.monotonic() >= lv.down_until

    def _safe(self, lv: Level, op: str, fn: Any, default: T) -> T:
        if not self._available(lv):
            return default
        try:
            out: T = fn()
            if lv.failures:
                log.info("tier %s is back after %d failures", lv.name, lv.failures)
                lv.failures = 0
            return out
        except Exception as e:  # any tier failure becomes a miss / dropped write
            lv.failures += 1
            lv.down_until = time.monotonic() + self.retry_after_s
            lv.tier.count(errors=1)
            self._count(tier_errors=1)
            log.warning("tier %s: %s failed (%s: %s); skipping it for %.1fs", lv.name, op, type(e).__name__, e,
                        self.retry_after_s)
            return default

    # ------------------------------------------------------------------ EvictionGuard
    def is_pinned(self, key: str) -> bool:
        return self.pins.is_pinned(key)

    def _demotes_from(self, tier: Tier) -> int | None:
        """Index of ``tier`` if its evictions are demoted to the next tier, else None."""
        if self.write_policy != "on_demotion":
            return None
        idx = next((i for i, lv in enumerate(self.levels) if lv.tier is tier), None)
        return idx if idx is not None and idx + 1 < len(self.levels) else None

    def wants_evicted(self, tier: Tier) -> bool:
        return self._demotes_from(tier) is not None

    def on_evict(self, tier: Tier, key: str, blob: Buffer) -> None:
        idx = self._demotes_from(tier)
        if idx is None:
            return
        # An evicted chunk may exist nowhere else: wait for queue room like any write (the put's
        # own block flag), never on the writer thread itself (it would wait for itself).
        block = threading.current_thread() is not self._worker and getattr(self._tls, "block", False)
        if self._enqueue(_Job((idx + 1,), key, None, blob, self.levels[idx].codec.name, memoryview(blob).nbytes),
                         block=block):
            self._count(demotions=1)

    # ------------------------------------------------------------------ read path
    def locate(self, keys: Sequence[str]) -> list[str | None]:
        """For every key, the name of the hottest tier holding it (None = nowhere)."""
        where: list[str | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for lv in self.levels:
            if not todo:
                break
            sub = [keys[i] for i in todo]
            found = self._safe(lv, "exists", lambda lv=lv, sub=sub: lv.tier.exists_many(sub), [False] * len(sub))
            rest = []
            for i, ok in zip(todo, found, strict=True):
                if ok:
                    where[i] = lv.name
                else:
                    rest.append(i)
            todo = rest
        return where

    def lookup(self, keys: Sequence[str]) -> list[str]:
        """Tier names of the leading run of keys that are stored somewhere."""
        self._count(lookups=1)
        out: list[str] = []
        for w in self.locate(keys):
            if w is None:
                break
            out.append(w)
        return out

    def get(self, keys: Sequence[str], *, promote: bool | None = None) -> list[torch.Tensor | None]:
        """Decoded chunks (None for misses). Corrupt blobs are deleted and read as misses."""
        promote = self.promote_on_hit if promote is None else promote
        out: list[torch.Tensor | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for depth, lv in enumerate(self.levels):
            if not todo:
                break
            sub = [keys[i] for i in todo]
            blobs = self._safe(lv, "get", lambda lv=lv, sub=sub: lv.tier.get_many(sub), [None] * len(sub))
            rest = []
            for i, blob in zip(todo, blobs, strict=True):
                if blob is None:
                    rest.append(i)
                    continue
                try:
                    out[i] = decode(blob)
                except CorruptBlobError as e:
                    log.warning("tier %s: corrupt blob %s (%s); deleted", lv.name, keys[i][:16], e)
                    lv.tier.count(corrupt=1)
                    self._count(corrupt=1)
                    self._safe(lv, "delete", lambda lv=lv, k=keys[i]: lv.tier.delete(k), False)
                    rest.append(i)
                    continue
                with self._clock:
                    self.counters.hits_by_tier[lv.name] = self.counters.hits_by_tier.get(lv.name, 0) + 1
                if depth > 0 and promote:
                    self._promote(keys[i], blob, lv, out[i])
            todo = rest
        self._count(hits=len(keys) - len(todo), misses=len(todo))
        return out

    def _promote(self, key: str, blob: Buffer, src: Level, tensor: torch.Tensor | None) -> None:
        top = self.levels[0]
        if top.codec.name == src.codec.name and top.codec.transform.params == src.codec.transform.params:
            new = blob
        elif tensor is not None:
            new = top.codec.encode(tensor)
        else:
            return
        if self._safe(top, "put", lambda: top.tier.put(key, new), False):
            self._count(promotions=1)

    # ------------------------------------------------------------------ write path
    def put(self, keys: Sequence[str], tensors: Sequence[torch.Tensor], *, block: bool = True) -> int:
        """Store chunks; returns how many the hottest tier accepted. Lower tiers are written in the
        background; with ``block=False`` a full write queue drops (and counts) instead of waiting."""
        if len(keys) != len(tensors):
            raise ValueError("keys and tensors differ in length")
        top = self.levels[0]
        self._tls.block = block
        try:
            return self._put(top, keys, tensors, block)
        finally:
            self._tls.block = False

    def _put(self, top: Level, keys: Sequence[str], tensors: Sequence[torch.Tensor], block: bool) -> int:
        stored = 0
        for key, t in zip(keys, tensors, strict=True):
            blob = top.codec.encode(t)
            ok = self._safe(top, "put", lambda key=key, blob=blob: top.tier.put(key, blob), False)
            stored += ok
            if len(self.levels) > 1 and self.write_policy == "write_through":
                self._enqueue(self._job(tuple(range(1, len(self.levels))), key, t, blob), block=block)
            elif len(self.levels) > 1 and not ok:
                # The hot tier refused it (full of pins / too big): demote right away.
                self._enqueue(self._job((1,), key, t, blob), block=block)
        return stored

    def _job(self, levels: tuple[int, ...], key: str, tensor: torch.Tensor, blob: Buffer) -> _Job:
        """A background write that owns its data: the caller may reuse ``tensor`` as soon as
        ``put`` returns (engines recycle staging buffers), so queueing the tensor itself let the
        lower tiers store whatever the buffer held later. The hot tier's blob is an independent
        copy; it is exact when that codec is lossless, else the tensor is cloned."""
        top = self.levels[0].codec
        if top.lossless:
            return _Job(levels, key, None, blob, top.name, memoryview(blob).nbytes)
        return _Job(levels, key, tensor.detach().clone(), None, None, tensor.numel() * tensor.element_size())

    def _enqueue(self, job: _Job, *, block: bool) -> bool:
        with self._q_cv:
            if self._closed:
                return False
            while self._q_bytes + job.nbytes > self._q_limit and self._q_bytes > 0:
                if not block:
                    self._count(dropped_writes=1)
                    return False
                self._q_cv.wait(timeout=1.0)
            self._q.append(job)
            self._q_bytes += job.nbytes
            self._count(queued_writes=1)
            self._q_cv.notify_all()
        return True

    def _writer(self) -> None:
        while True:
            with self._q_cv:
                while not self._q and not self._closed:
                    self._q_cv.wait()
                if not self._q and self._closed:
                    return
                batch = [self._q.popleft()]
                size = batch[0].nbytes
                while self._q and len(batch) < WRITE_BATCH_JOBS and size + self._q[0].nbytes <= WRITE_BATCH_BYTES:
                    batch.append(self._q.popleft())
                    size += batch[-1].nbytes
                self._inflight += len(batch)
                self._inflight_keys.update(job.key for job in batch)
            try:
                self._run_batch(batch)
            except Exception:  # never let the writer die
                log.exception("background write of %d chunk(s) failed", len(batch))
            finally:
                with self._q_cv:
                    self._inflight -= len(batch)
                    self._inflight_keys.difference_update(job.key for job in batch)
                    self._q_bytes -= size
                    self._q_cv.notify_all()

    def _run_batch(self, batch: list[_Job]) -> None:
        """One ``put_many`` per lower tier for every job in ``batch`` that targets it."""
        tensors: dict[int, torch.Tensor] = {}  # decoded once per job, shared by its tiers
        skip: set[int] = set()  # jobs whose blob turned out corrupt: dropped once, not per tier
        for idx in sorted({i for job in batch for i in job.levels}):
            lv = self.levels[idx]
            jobs = [j for j, job in enumerate(batch) if idx in job.levels and j not in skip]
            if not self._available(lv):
                self._count(dropped_writes=len(jobs))
                lv.tier.count(dropped_writes=len(jobs))
                continue
            items: dict[str, Buffer] = {}  # a key queued twice is written once (the newest)
            for j in jobs:
                blob = self._blob_for(batch[j], lv, tensors, j)
                if blob is None:
                    skip.add(j)
                    self._count(dropped_writes=1)
                else:
                    items[batch[j].key] = blob
            if not items:
                continue
            oks = self._safe(lv, "put", lambda lv=lv, items=items: lv.tier.put_many(list(items.items())),
                             [False] * len(items))
            self._count(dropped_writes=sum(not ok for ok in oks))

    @staticmethod
    def _blob_for(job: _Job, lv: Level, tensors: dict[int, torch.Tensor], j: int) -> Buffer | None:
        """``job``'s chunk encoded for ``lv`` (its queued blob when the codec matches); None if
        the queued blob is corrupt."""
        if job.blob is not None and job.blob_codec == lv.codec.name:
            return job.blob
        tensor = job.tensor if job.tensor is not None else tensors.get(j)
        if tensor is None:
            try:
                tensor = tensors[j] = decode(job.blob)  # type: ignore[arg-type]
            except CorruptBlobError:
                return None
        return lv.codec.encode(tensor)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued background write has finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._q_cv:
            while self._q or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._q_cv.wait(timeout=left if left is not None else 1.0)
        for lv in self.levels:
            self._safe(lv, "flush", lv.tier.flush, None)
        return True

    # ------------------------------------------------------------------ management
    def delete(self, keys: Sequence[str], *, force: bool = False) -> int:
        """Remove keys from every tier; pinned keys are kept unless ``force``. Returns keys removed."""
        targets = list(dict.fromkeys(k for k in keys if force or not self.pins.is_pinned(k)))
        if not targets:
            return 0
        self._cancel_writes(set(targets))
        # Tiers only count what they removed, so "removed" = stored somewhere before the deletes.
        stored = sum(w is not None for w in self.locate(targets))
        for lv in self.levels:
            self._safe(lv, "delete", lambda lv=lv: lv.tier.delete_many(targets), 0)
        return stored

    def _cancel_writes(self, keys: set[str]) -> None:
        """Drop queued background writes of ``keys`` and wait out one in flight, so a deleted key
        cannot reappear in a lower tier afterwards."""
        if not keys:
            return
        with self._q_cv:
            kept: deque[_Job] = deque()
            for job in self._q:
                if job.key in keys:
                    self._q_bytes -= job.nbytes
                else:
                    kept.append(job)
            self._q = kept
            self._q_cv.notify_all()
            deadline = time.monotonic() + 30.0  # a hung tier must not hang delete() forever
            while self._inflight_keys & keys and time.monotonic() < deadline:
                self._q_cv.wait(timeout=1.0)

    def clear(self) -> None:
        self.flush()
        self.pins.clear()
        for lv in self.levels:
            self._safe(lv, "clear", lv.tier.clear, None)

    def stats(self) -> dict[str, Any]:
        with self._clock:
            c = dict(self.counters.__dict__)
            c["hits_by_tier"] = dict(self.counters.hits_by_tier)
        tiers = []
        for lv in self.levels:
            s = self._safe(lv, "stats", lv.tier.stats, None)
            # A tier that is down or failing still shows its counters (its errors matter most
            # now); its sizes read 0 (unknown) and "available" is False.
            d: dict[str, Any] = dict((s if s is not None else lv.tier.counters()).as_dict())
            d["codec"] = lv.codec.name
            d["available"] = self._available(lv)
            tiers.append(d)
        with self._q_cv:
            c["write_queue_bytes"] = self._q_bytes
        c["pinned_keys"] = len(self.pins.pinned_keys())
        c["leases"] = len(self.pins.leases())
        return {"store": c, "tiers": tiers}

    def close(self) -> None:
        self.flush(timeout=30)
        with self._q_cv:
            self._closed = True
            self._q_cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=5)
        for lv in self.levels:
            self._safe(lv, "close", lv.tier.close, None)
