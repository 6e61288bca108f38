"""Byte-budgeted LRU bookkeeping shared by the tiers that evict locally (memory, disk).

It only tracks sizes and order; each tier keeps its own values. Eviction skips keys the guard
reports as pinned, so a budget full of pins makes ``reserve`` fail instead of dropping a pin.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from kvlayer.storage.base import Tier


class LRUIndex:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.lock = threading.RLock()

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[str]:
        with self.lock:
            return list(self._sizes)

    def touch(self, key: str) -> None:
        if key in self._sizes:
            self._sizes.move_to_end(key)

    def add(self, key: str, size: int) -> None:
        """Record ``key`` (after ``reserve`` made room); replaces an old size."""
        old = self._sizes.pop(key, None)
        if old is not None:
            self.used -= old
        self._sizes[key] = size
        self.used += size

    def remove(self, key: str) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used -= size
        return size

    def reserve(self, size: int, is_pinned: Callable[[str], bool], exclude: str | None = None) -> list[str] | None:
        """Pick LRU victims so that ``size`` more bytes fit; None if impossible. Does not remove
        them: the caller drops the values and calls ``remove`` for each victim."""
        if size > self.capacity:
            return None
        need = self.used + size - self.capacity
        if exclude is not None and exclude in self._sizes:
            need -= self._sizes[exclude]
        victims: list[str] = []
        if need <= 0:
            return victims
        for k, s in self._sizes.items():
            if k == exclude or is_pinned(k):
                continue
            victims.append(k)
            need -= s
            if need <= 0:
                return victims
        return None


class LocalTier(Tier):
    """A tier this process owns and evicts itself (memory, disk): an ``LRUIndex`` over its keys,
    with pins (via the store's guard) vetoing eviction."""

    def __init__(self, name: str, capacity_bytes: int) -> None:
        super().__init__(name, capacity_bytes)
        self._lru = LRUIndex(self.capacity_bytes)

    def _pinned(self, key: str) -> bool:
        g = self.guard
        return g is not None and g.is_pinned(key)

    def contains(self, key: str) -> bool:
        return key in self._lru

    def keys(self) -> list[str]:
        return self._lru.keys()

    def used_bytes(self) -> int:
        return self._lru.used
