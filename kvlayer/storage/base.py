"""The one Tier interface every storage level implements (memory, disk, redis, remote).

A tier stores opaque, self-checking blobs (see ``kvlayer.codec``) under hex content keys. Tiers
never see tensors and never decode; the tiered store encodes with each tier's codec. Batch
methods exist because every remote tier is latency-bound: implementations override them with a
real batch (pipeline, stream); the defaults loop over the single-key methods.

Contract: methods may raise ``TierError`` (or any exception) on I/O failure; tiers keep no failure
policy of their own: the blob store's per-tier breaker turns failures into misses / dropped writes.
``get`` returns None for a missing key, never a partial blob.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from kvlayer.codec.base import Buffer
from kvlayer.errors import CorruptBlobError

T = TypeVar("T")


class TierOptions(BaseModel):
    """The typed ``options`` of one tier kind (each tier module's ``Options``): unknown names and
    bad values are rejected when the tier is built, as a ``ConfigError`` naming them."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TierStats:
    name: str
    kind: str
    capacity_bytes: int
    used_bytes: int = 0
    num_keys: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    errors: int = 0
    corrupt: int = 0
    misplaced: int = 0
    dropped_writes: int = 0

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


class Tier(ABC):
    """A byte-budgeted key -> blob store."""

    kind: str = "tier"

    def __init__(self, name: str, capacity_bytes: int) -> None:
        self.name = name
        self.capacity_bytes = int(capacity_bytes)
        self._stats = TierStats(name=name, kind=self.kind, capacity_bytes=self.capacity_bytes)
        self._stats_lock = threading.Lock()

    # --- single-key primitives -------------------------------------------------------------
    @abstractmethod
    def get(self, key: str) -> Buffer | None:
        """The blob stored under ``key``, or None."""

    @abstractmethod
    def put(self, key: str, blob: Buffer) -> bool:
        """Store ``blob``; False when it cannot fit (e.g. larger than the budget or all pinned)."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""

    @abstractmethod
    def contains(self, key: str) -> bool:
        """Existence check that moves no value."""

    @abstractmethod
    def keys(self) -> list[str]:
        """All keys currently stored (a snapshot)."""

    @abstractmethod
    def used_bytes(self) -> int: ...

    # --- batches (override for real batching) -----------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        return [self.get(k) for k in keys]

    def get_opened(self, keys: Sequence[str], open_: Callable[[str, Buffer], T],
                   ) -> list[tuple[Buffer, T | CorruptBlobError] | None]:
        """``get_many``, each hit passed through ``open_(key, blob)`` (the store's checksum check
        and decode): (blob, what it returned, or the ``CorruptBlobError`` it raised), None for a
        miss. A tier that reads on threads runs ``open_`` there, while the bytes are still in
        cache and next to the other reads; an ``open_`` failure is never the tier's."""
        out: list[tuple[Buffer, T | CorruptBlobError] | None] = []
        for k, b in zip(keys, self.get_many(keys), strict=True):
            out.append(None if b is None else (b, opened(open_, k, b)))
        return out

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        return [self.put(k, b) for k, b in items]

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def delete_many(self, keys: Iterable[str]) -> int:
        return sum(1 for k in keys if self.delete(k))

    # --- eviction control --------------------------------------------------------------------
    def set_eviction_guard(self, guard: EvictionGuard | None) -> None:
        """Tiers that evict consult ``guard`` before dropping a key (pins) and report drops."""
        self._guard = guard

    @property
    def guard(self) -> EvictionGuard | None:
        return getattr(self, "_guard", None)

    # --- lifecycle -----------------------------------------------------------------------------
    def clear(self) -> None:
        self.delete_many(self.keys())

    def flush(self) -> None:  # noqa: B027 - an optional hook: most tiers buffer nothing
        """Wait for pending writes, if the tier buffers any."""

    def close(self) -> None:
        self.flush()

    def healthy(self) -> bool:
        return True

    def counters(self) -> TierStats:
        """The in-process counters only: never touches the backend, so it works while it is down."""
        with self._stats_lock:
            return TierStats(**asdict(self._stats))

    def stats(self) -> TierStats:
        s = self.counters()
        s.used_bytes = self.used_bytes()
        s.num_keys = len(self.keys())
        return s

    def count(self, **deltas: int) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                setattr(self._stats, k, getattr(self._stats, k) + v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, capacity={self.capacity_bytes})"


def opened(open_: Callable[[str, Buffer], T], key: str, blob: Buffer) -> T | CorruptBlobError:
    """``open_(key, blob)``, or the ``CorruptBlobError`` it raised (returned, not raised)."""
    try:
        return open_(key, blob)
    except CorruptBlobError as e:
        return e


class EvictionGuard(ABC):
    """Implemented by the tiered store: pins veto eviction, evicted blobs may be demoted."""

    @abstractmethod
    def is_pinned(self, key: str) -> bool: ...

    def wants_evicted(self, tier: Tier) -> bool:
        """Whether ``on_evict`` needs the evicted blob (a disk tier must read it back to hand it
        over, which is wasted I/O when nothing below takes demotions)."""
        return True

    def on_evicted_keys(self, tier: Tier, keys: Sequence[str]) -> None:  # noqa: B027 - optional: only events need it
        """Called with every batch of keys ``tier`` evicted under pressure (demoted or not)."""

    @abstractmethod
    def on_evict(self, tier: Tier, key: str, blob: Buffer) -> None:
        """Called after ``key`` left ``tier`` under pressure; the store may demote it."""
