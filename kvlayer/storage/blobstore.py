"""The blob store: ordered tiers (hot -> cold) of self-checking blobs, pins, background writes.

It moves bytes and never looks inside them; what the bytes of each level mean is a ``Formats``
object (the default: every level holds the same blob, as ``kvlayer serve`` keeps its clients'
blobs; ``kvlayer.storage.hierarchy`` gives each level its own codec).

- ``locate``/``lookup`` find where each key lives without moving data (existence checks only).
- ``get_many`` reads the hottest tier holding each key, opens the blob (``Formats.open``: a
  corrupt blob, or one encoded for another key, is deleted and read as a miss) and promotes hits
  from lower tiers to the hottest.
- ``put`` writes the hottest tier (with ``durable``, every tier down to the first disk tier)
  synchronously; lower tiers get the blob write-through, from one background writer with a
  bounded byte budget, or when the hotter tier evicts it (``on_demotion``). The writer drains up to
  ``WRITE_BATCH_JOBS`` / ``WRITE_BATCH_BYTES`` of queued writes at a time and hands each lower
  tier one ``put_many``, so remote tiers pipeline.
- What each tier gains and loses is published to ``events`` (``kvlayer.events.EventHub``):
  stored (put, promoted, written below), removed (evicted, deleted, corrupt, cleared), cleared.
- Every tier call goes through the tier's ``Breaker``: a call that raises opens it, the tier is
  skipped while it is open, and its operations count as misses / dropped writes. Nothing a tier
  does can raise into the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypedDict, TypeVar

from kvlayer.codec.base import Buffer
from kvlayer.codec.header import check_key, verify
from kvlayer.errors import ConfigError, CorruptBlobError, MisplacedBlobError
from kvlayer.events import EventHub, EventKind
from kvlayer.storage.base import EvictionGuard, Tier
from kvlayer.storage.breaker import Breaker, RetryPolicy
from kvlayer.storage.lru import LocalTier
from kvlayer.storage.pins import PinRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")

WritePolicy = Literal["write_through", "on_demotion"]
WRITE_BATCH_JOBS = 64
WRITE_BATCH_BYTES = 64 << 20


@dataclass
class Level:
    tier: Tier
    breaker: Breaker

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
    #: valid blobs read under a key they were not encoded for (moved or copied), deleted
    misplaced: int = 0
    tier_errors: int = 0
    queued_writes: int = 0
    dropped_writes: int = 0
    demotions: int = 0
    hits_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass
class Payload:
    """What a write to another level starts from: ``blob`` in level ``src``'s format and/or
    ``data`` the layer above can encode again (a chunk tensor); the store never looks inside
    ``data``. ``nbytes`` is what it costs in the write queue."""

    blob: Buffer | None
    src: int
    nbytes: int
    data: Any = None


class Formats:
    """What the bytes in each level mean. This default: every level holds the same blob (the
    server keeps its clients' blobs byte for byte). Every read checks that the blob was encoded
    for its key (40 header bytes); blobs from lower levels are verified whole (header and
    checksum) before they are served or promoted, the hottest level's checksum is the caller's to
    verify (the codecs check on decode). Blobs encoded without a key pass: whoever reads them
    under a key refuses them.

    ``key_of``: the key a blob stored under a store key was encoded for (the server stores
    ``<tenant prefix><client key>`` and strips the prefix); the identity by default."""

    def __init__(self, key_of: Callable[[str], str] | None = None) -> None:
        self.key_of = key_of or (lambda key: key)

    def open(self, blob: Buffer, level: int, key: str) -> Any:
        """The value ``get_many`` returns for ``blob`` read from ``level`` under ``key``; raises
        ``CorruptBlobError`` (``MisplacedBlobError``: encoded for another key) for a blob that
        must be deleted and read as a miss."""
        if level > 0:
            verify(blob, self.key_of(key), unbound_ok=True)
        else:
            check_key(blob, self.key_of(key), unbound_ok=True)
        return blob

    def blob_for(self, payload: Payload, level: int, key: str) -> Buffer | None:
        """The blob ``level`` stores under ``key`` for ``payload``; None if there is none (a
        corrupt source)."""
        return payload.blob


class StoreOptions(TypedDict, total=False):
    """``BlobStore``'s keyword arguments, for the stores built over one."""

    write_policy: WritePolicy
    write_queue_bytes: int
    promote_on_hit: bool
    retry_after_s: float
    retry: Sequence[RetryPolicy] | None


@dataclass
class _Job:
    levels: tuple[int, ...]
    key: str
    payload: Payload


class BlobStore(EvictionGuard):
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        formats: Formats | None = None,
        write_policy: WritePolicy = "write_through",
        write_queue_bytes: int = 256 << 20,
        promote_on_hit: bool = True,
        retry_after_s: float = 5.0,
        retry: Sequence[RetryPolicy] | None = None,
    ) -> None:
        """``retry``: each tier's breaker policy; without it every tier is skipped for a flat
        ``retry_after_s`` after a failure."""
        if not tiers:
            raise ConfigError("a tiered store needs at least one tier")
        if retry is not None and len(retry) != len(tiers):
            raise ConfigError(f"{len(retry)} retry policies given for {len(tiers)} tiers")
        policies = list(retry) if retry is not None else [RetryPolicy(retry_after_s)] * len(tiers)
        self.levels = [Level(t, Breaker(p)) for t, p in zip(tiers, policies, strict=True)]
        self.formats = formats or Formats()
        self.write_policy = write_policy
        self.promote_on_hit = promote_on_hit
        self.pins = PinRegistry()
        self.counters = StoreCounters()
        self.events = EventHub()
        self._clock = threading.Lock()
        for lv in self.levels:
            lv.tier.set_eviction_guard(self)
        # Durable puts are written synchronously down to (and including) the first disk tier.
        self.disk_level = next((i for i, lv in enumerate(self.levels) if lv.tier.kind == "disk"), None)
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

    def _safe(self, lv: Level, op: str, fn: Callable[[], T], default: T) -> T:
        if not lv.breaker.allow():
            return default
        try:
            out = fn()
        except Exception as e:  # any tier failure becomes a miss / dropped write
            window = lv.breaker.failure()
            lv.tier.count(errors=1)
            self._count(tier_errors=1)
            log.warning("tier %s: %s failed (%s: %s); skipping it for %.2fs", lv.name, op, type(e).__name__, e, window)
            return default
        n = lv.breaker.success()
        if n:
            log.info("tier %s is back after %d failures", lv.name, n)
        return out

    def _emit(self, kind: EventKind, lv: Level, keys: Sequence[str], reason: str) -> None:
        if self.events.active:
            self.events.publish(kind, lv.name, lv.tier.kind, keys, reason)

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

    def on_evicted_keys(self, tier: Tier, keys: Sequence[str]) -> None:
        if self.events.active:
            self.events.publish("removed", tier.name, tier.kind, keys, "evicted")

    def on_evict(self, tier: Tier, key: str, blob: Buffer) -> None:
        idx = self._demotes_from(tier)
        if idx is None:
            return
        # An evicted chunk may exist nowhere else: wait for queue room like any write (the put's
        # own block flag), never on the writer thread itself (it would wait for itself).
        block = threading.current_thread() is not self._worker and getattr(self._tls, "block", False)
        if self._enqueue(_Job((idx + 1,), key, Payload(blob, idx, memoryview(blob).nbytes)), block=block):
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
            found = self._safe(lv, "exists", partial(lv.tier.exists_many, sub), [False] * len(sub))
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

    def get_many(self, keys: Sequence[str], *, promote: bool | None = None) -> list[tuple[Any, int] | None]:
        """(``Formats.open`` of the blob, level index) from the hottest tier holding each key, or
        None. Corrupt blobs are deleted and the next tier is tried."""
        promote = self.promote_on_hit if promote is None else promote
        out: list[tuple[Any, int] | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for depth, lv in enumerate(self.levels):
            if not todo:
                break
            sub = [keys[i] for i in todo]
            nothing: list[tuple[Buffer, Any] | None] = [None] * len(sub)
            hits = self._safe(lv, "get", partial(lv.tier.get_opened, sub, partial(self._open, depth)), nothing)
            rest = []
            for i, hit in zip(todo, hits, strict=True):
                if hit is None:
                    rest.append(i)
                    continue
                blob, value = hit
                if isinstance(value, CorruptBlobError):
                    what = "misplaced" if isinstance(value, MisplacedBlobError) else "corrupt"
                    log.warning("tier %s: %s blob %s (%s); deleted", lv.name, what, keys[i][:16], value)
                    lv.tier.count(**{what: 1})
                    self._count(**{what: 1})
                    if self._safe(lv, "delete", partial(lv.tier.delete, keys[i]), False):
                        self._emit("removed", lv, [keys[i]], "corrupt")
                    rest.append(i)
                    continue
                out[i] = (value, depth)
                with self._clock:
                    self.counters.hits_by_tier[lv.name] = self.counters.hits_by_tier.get(lv.name, 0) + 1
                if depth > 0 and promote:
                    self._promote(keys[i], Payload(blob, depth, memoryview(blob).nbytes, value))
            todo = rest
        self._count(hits=len(keys) - len(todo), misses=len(todo))
        return out

    def _open(self, level: int, key: str, blob: Buffer) -> Any:
        return self.formats.open(blob, level, key)

    def get_blob(self, key: str, *, promote: bool | None = None) -> tuple[Buffer, str] | None:
        """(blob, tier name) of ``key`` (the server's read; the default ``Formats`` opens a blob
        as itself)."""
        hit = self.get_many([key], promote=promote)[0]
        return None if hit is None else (hit[0], self.levels[hit[1]].name)

    def _promote(self, key: str, payload: Payload) -> None:
        top = self.levels[0]
        new = self.formats.blob_for(payload, 0, key)
        if new is not None and self._safe(top, "put", partial(top.tier.put, key, new), False):
            self._count(promotions=1)
            self._emit("stored", top, [key], "promoted")

    # ------------------------------------------------------------------ write path
    def put(self, key: str, blob: Buffer, *, block: bool = True, durable: bool = False,
            payload: Callable[[], Payload] | None = None) -> bool:
        """Store ``blob`` (in the hottest level's format) in the hottest tier, or with ``durable``
        in every tier down to the first disk tier; lower tiers get it in the background (with
        ``block=False`` a full write queue drops, and counts, instead of waiting). ``payload``
        builds what the queued write carries when it is not ``blob`` itself (called only if
        something is queued). Returns whether the last tier written synchronously took it."""
        return self.put_many([(key, blob, payload)], block=block, durable=durable)[0]

    def put_many(self, items: Sequence[tuple[str, Buffer, Callable[[], Payload] | None]], *, block: bool = True,
                 durable: bool = False) -> list[bool]:
        """``put`` of several (key, blob, payload) at once: the hottest tier gets one ``put_many``
        (a remote tier pipelines it instead of paying a round trip per blob)."""
        if not items:
            return []
        self._tls.block = block
        try:
            top = self.levels[0]
            oks = self._safe(top, "put", partial(top.tier.put_many, [(k, b) for k, b, _ in items]),
                             [False] * len(items))
        finally:
            self._tls.block = False
        self._emit("stored", top, [k for (k, _, _), ok in zip(items, oks, strict=True) if ok], "put")
        return [self._put_below(k, b, p, ok, block=block, durable=durable)
                for (k, b, p), ok in zip(items, oks, strict=True)]

    def _put_below(self, key: str, blob: Buffer, payload: Callable[[], Payload] | None, ok: bool, *,
                   block: bool, durable: bool) -> bool:
        """The rest of a put once the hottest tier answered ``ok``: the durable levels, then the
        background writer."""
        last = self.disk_level if durable and self.disk_level is not None else 0
        queued: Payload | None = None

        def source() -> Payload:
            nonlocal queued
            if queued is None:
                queued = payload() if payload is not None else Payload(blob, 0, memoryview(blob).nbytes)
            return queued

        for i in range(1, last + 1):
            lv = self.levels[i]
            b = self.formats.blob_for(source(), i, key)
            ok = b is not None and self._safe(lv, "put", partial(lv.tier.put, key, b), False)
            if ok:
                self._emit("stored", lv, [key], "put")
        below = len(self.levels) - (last + 1)
        if below > 0 and self.write_policy == "write_through":
            self._enqueue(_Job(tuple(range(last + 1, len(self.levels))), key, source()), block=block)
        elif below > 0 and not ok:
            # The last tier written refused it (full of pins / too big): demote right away.
            self._enqueue(_Job((last + 1,), key, source()), block=block)
        return ok

    def put_blob(self, key: str, blob: Buffer, *, durable: bool = False) -> bool:
        """The server's put of a verified client blob: True once it is stored or queued for a
        lower tier; with ``durable``, only once it is in the disk tier (a file renamed into place,
        fsynced if the tier was built with fsync)."""
        ok = self.put(key, blob, durable=durable)
        if durable and self.disk_level is not None:
            return ok
        return ok or len(self.levels) > 1

    def _enqueue(self, job: _Job, *, block: bool) -> bool:
        nbytes = job.payload.nbytes
        with self._q_cv:
            if self._closed:
                return False
            while self._q_bytes + nbytes > self._q_limit and self._q_bytes > 0:
                if not block:
                    self._count(dropped_writes=1)
                    return False
                self._q_cv.wait(timeout=1.0)
            self._q.append(job)
            self._q_bytes += nbytes
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
                size = batch[0].payload.nbytes
                while (self._q and len(batch) < WRITE_BATCH_JOBS
                       and size + self._q[0].payload.nbytes <= WRITE_BATCH_BYTES):
                    batch.append(self._q.popleft())
                    size += batch[-1].payload.nbytes
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
        skip: set[int] = set()  # jobs without a blob (corrupt source): dropped once, not per tier
        for idx in sorted({i for job in batch for i in job.levels}):
            lv = self.levels[idx]
            jobs = [j for j, job in enumerate(batch) if idx in job.levels and j not in skip]
            if not lv.breaker.allow():
                self._count(dropped_writes=len(jobs))
                lv.tier.count(dropped_writes=len(jobs))
                continue
            items: dict[str, Buffer] = {}  # a key queued twice is written once (the newest)
            for j in jobs:
                blob = self.formats.blob_for(batch[j].payload, idx, batch[j].key)
                if blob is None:
                    skip.add(j)
                    self._count(dropped_writes=1)
                else:
                    items[batch[j].key] = blob
            if not items:
                continue
            oks = self._safe(lv, "put", partial(lv.tier.put_many, list(items.items())),
                             [False] * len(items))
            self._count(dropped_writes=sum(not ok for ok in oks))
            self._emit("stored", lv, [k for k, ok in zip(items, oks, strict=True) if ok], "written")

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
            # with subscribers, ask first which keys each tier has: only those are reported removed
            had = (self._safe(lv, "exists", partial(lv.tier.exists_many, targets), [False] * len(targets))
                   if self.events.active else [])
            self._safe(lv, "delete", partial(lv.tier.delete_many, targets), 0)
            self._emit("removed", lv, [k for k, h in zip(targets, had, strict=False) if h], "deleted")
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
                    self._q_bytes -= job.payload.nbytes
                else:
                    kept.append(job)
            self._q = kept
            self._q_cv.notify_all()
            deadline = time.monotonic() + 30.0  # a hung tier must not hang delete() forever
            while self._inflight_keys & keys and time.monotonic() < deadline:
                self._q_cv.wait(timeout=1.0)

    def keys_with_prefix(self, prefix: str) -> set[str]:
        out: set[str] = set()
        for lv in self.levels:
            ks: list[str] = self._safe(lv, "keys", lv.tier.keys, [])
            out.update(k for k in ks if k.startswith(prefix))
        return out

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix`` from every tier, pinned or not."""
        self.flush(timeout=30)
        keys = self.keys_with_prefix(prefix)
        return self.delete(sorted(keys), force=True) if keys else 0

    def clear(self) -> None:
        self.flush()
        self.pins.clear()
        for lv in self.levels:
            # a tier that indexes its keys in memory reports each one; others say "cleared"
            keys = lv.tier.keys() if self.events.active and isinstance(lv.tier, LocalTier) else None
            if not self._safe(lv, "clear", partial(_cleared, lv.tier), False):
                continue
            if keys is not None:
                self._emit("removed", lv, keys, "cleared")
            else:
                self._emit("cleared", lv, [], "cleared")

    def hits_by_tier(self) -> dict[str, int]:
        """Reads served by each tier since start (in-process counters only: cheap, any time)."""
        with self._clock:
            return dict(self.counters.hits_by_tier)

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
            d["available"] = lv.breaker.allow()
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


def _cleared(tier: Tier) -> bool:
    tier.clear()
    return True
