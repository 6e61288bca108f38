"""CPU memory tier: blobs in a dict with a hard byte budget and LRU eviction."""

from __future__ import annotations

from kvlayer.codec.base import Buffer
from kvlayer.config import TierConfig
from kvlayer.storage.base import Tier, TierOptions
from kvlayer.storage.lru import LocalTier


class MemoryTier(LocalTier):
    """Holds blobs as writable buffers so decoders can view them without a copy.

    Budget accounting counts blob bytes; the process holds at most the budget plus per-key
    bookkeeping (~200 bytes a key).
    """

    kind = "memory"

    def __init__(self, name: str = "cpu", capacity_bytes: int = 4 << 30) -> None:
        super().__init__(name, capacity_bytes)
        self._data: dict[str, Buffer] = {}


    def get(self, key: str) -> Buffer | None:
        with self._lru.lock:
            blob = self._data.get(key)
            if blob is not None:
                self._lru.touch(key)
        if blob is None:
            self.count(misses=1)
            return None
        self.count(hits=1, bytes_read=len(blob))
        return blob

    def put(self, key: str, blob: Buffer) -> bool:
        size = memoryview(blob).nbytes
        if memoryview(blob).readonly:
            blob = bytearray(blob)  # keep a writable copy so decoders can view it without copying
        evicted: list[tuple[str, Buffer]] = []
        with self._lru.lock:
            victims = self._lru.reserve(size, self._pinned, exclude=key)
            if victims is None:
                self.count(dropped_writes=1)
                return False
            for v in victims:
                self._lru.remove(v)
                evicted.append((v, self._data.pop(v)))
            self._data[key] = blob
            self._lru.add(key, size)
        self.count(puts=1, bytes_written=size, evictions=len(evicted))
        g = self.guard
        if g is not None and evicted:
            g.on_evicted_keys(self, [k for k, _ in evicted])
            for k, b in evicted:
                g.on_evict(self, k, b)
        return True

    def delete(self, key: str) -> bool:
        with self._lru.lock:
            self._data.pop(key, None)
            return self._lru.remove(key) is not None


    def clear(self) -> None:
        with self._lru.lock:
            for k in self._lru.keys():
                self._lru.remove(k)
            self._data.clear()


class Options(TierOptions):
    """A memory tier takes no options (its budget is the tier's ``capacity``)."""


def build(cfg: TierConfig, options: Options) -> Tier:
    return MemoryTier(cfg.name, cfg.capacity or (4 << 30))
