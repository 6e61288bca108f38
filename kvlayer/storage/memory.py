"""CPU memory tier: blobs in a dict with a hard byte budget and LRU eviction."""

from __future__ import annotations

from pydantic import NonNegativeInt

from kvlayer.codec.base import Buffer
from kvlayer.config import TierConfig
from kvlayer.storage.base import Tier, TierOptions
from kvlayer.storage.lru import LocalTier


class MemoryTier(LocalTier):
    """Holds blobs as writable buffers so decoders can view them without a copy.

    Each key is charged its blob's bytes plus ``key_overhead`` and the key's length. An engine's
    CPU tier holds megabyte chunks its own engine made, so it charges blob bytes only (0). A
    server's tier takes blobs of any size from any client: charging blob bytes alone let a
    flood of 83-byte blobs grow ``kvlayer serve`` 247 MiB over a 64 MiB budget (866 bytes of RSS
    per key: dict, LRU order, key string, buffer object), so it charges ``SERVER_KEY_OVERHEAD``.
    """

    kind = "memory"
    SERVER_KEY_OVERHEAD = 768  # bytes per key, measured (above) and rounded up

    def __init__(self, name: str = "cpu", capacity_bytes: int = 4 << 30, key_overhead: int = 0) -> None:
        super().__init__(name, capacity_bytes)
        self._data: dict[str, Buffer] = {}
        self.key_overhead = key_overhead

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
        nbytes = memoryview(blob).nbytes
        size = nbytes + (self.key_overhead + len(key) if self.key_overhead else 0)
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
        self.count(puts=1, bytes_written=nbytes, evictions=len(evicted))
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
    """``key_overhead``: bytes charged per key on top of its blob (and its key's length): 0 for
    an engine's own chunks; ``kvlayer serve`` sets ``MemoryTier.SERVER_KEY_OVERHEAD``."""

    key_overhead: NonNegativeInt = 0


def build(cfg: TierConfig, options: Options) -> Tier:
    return MemoryTier(cfg.name, cfg.capacity or (4 << 30), key_overhead=options.key_overhead)
