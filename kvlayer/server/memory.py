"""How ``kvlayer serve`` keeps its resident size near baseline + ``--cpu-bytes``: the split of the
budget, byte budgets that request buffers are reserved from, and the guard that hands freed heap
back to the OS. Process facts (RSS) are read here, so the app and the servicer share one source."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvlayer.errors import ConfigError
from kvlayer.malloc import tune_for_blobs


def rss() -> int:
    """This process's resident set size in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


#: What one open client connection may hold in the server (gRPC's transport state and buffers):
#: ~17 KiB idle (measured: 2000 idle connections, RSS +32.7 MiB), doubled for buffers in use.
CONNECTION_BYTES = 32 << 10


@dataclass
class Budget:
    """How ``--cpu-bytes`` is spent. ``frames`` is not allocated up front: it is the room left
    for what handler threads and gRPC hold transiently (a request or frame being received,
    decoded or built per thread, transport buffers), which the other parts cannot count.
    ``metadata`` is the quota of pins, leases and documents (``kvlayer.server.tenants``);
    ``connections`` pays for ``max_connections`` open client connections."""

    memory_tier: int
    write_queue: int
    inflight: int
    frames: int = 0
    metadata: int = 0
    connections: int = 0

    @property
    def total(self) -> int:
        return self.memory_tier + self.write_queue + self.inflight + self.frames + self.metadata + self.connections

    @property
    def max_connections(self) -> int:
        return max(1, self.connections // CONNECTION_BYTES)


def split_budget(cpu_bytes: int, inflight: int | None, queue: int | None, lower_tiers: bool,
                 workers: int = 16, frame_bytes: int = 1 << 20, metadata: int | None = None,
                 max_connections: int | None = None) -> Budget:
    """Raises ``ConfigError`` when the parts leave no room for the CPU tier. Connections, unless
    ``max_connections`` is given: 1/32 of the budget (2-64 MiB: 64-2048 connections)."""

    def part(v: int | None, share: int, lo: int, hi: int) -> int:
        return v if v is not None else max(lo, min(hi, cpu_bytes // share))

    conns = None if max_connections is None else max(1, max_connections) * CONNECTION_BYTES
    if cpu_bytes == 0:  # no CPU tier: buffers only (64 MiB each, 16 MiB of metadata, unless given)
        return Budget(0, (queue or 64 << 20) if lower_tiers else 0, inflight or 64 << 20,
                      metadata=16 << 20 if metadata is None else metadata,
                      connections=4 << 20 if conns is None else conns)
    inf = part(inflight, 8, 8 << 20, 512 << 20)
    q = part(queue, 8, 8 << 20, 512 << 20) if lower_tiers else 0
    meta = part(metadata, 16, 4 << 20, 256 << 20)
    conn = part(conns, 32, 2 << 20, 64 << 20)
    frames = min(workers * 2 * frame_bytes, cpu_bytes // 4)
    mem = cpu_bytes - inf - q - frames - meta - conn
    if mem <= 0:
        raise ConfigError(f"--cpu-bytes {cpu_bytes} leaves no room for the CPU tier after in-flight ({inf}), "
                          f"write queue ({q}), frame ({frames}), metadata ({meta}) and connection ({conn}) buffers; "
                          "raise it or lower --inflight-bytes, --write-queue-bytes, --metadata-bytes, --workers, "
                          "--max-connections")
    return Budget(mem, q, inf, frames, meta, conn)


class ByteBudget:
    """A counting semaphore over bytes: request buffers are reserved before they are allocated."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.used = 0
        self._cv = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        if n > self.limit:
            return False
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.used + n > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


class MemoryGuard(threading.Thread):
    """Keeps the resident size near baseline + budget: glibc recycles freed blob memory inside
    its heap (fast: no page faults on reuse) but neither free heap space nor holes between live
    blobs go back to the OS; when RSS passes baseline + 80% of the budget, ``malloc_trim(0)``
    gives every free page back."""

    def __init__(self, budget: int, interval_s: float = 0.05) -> None:
        super().__init__(name="kvlayer-memguard", daemon=True)
        self.budget = budget
        self.interval_s = interval_s
        self.trims = 0
        self.baseline = rss()
        self._stop = threading.Event()
        # Blobs up to 32 MiB come from the heap and freed ones are reused at once (no mmap, munmap
        # and page faults per blob: half the CPU of a Put); heap memory is not handed back on free
        # but by this guard, when RSS says so. 16 handler threads share 4 arenas.
        self._trim: Any = tune_for_blobs(arena_max=4)

    def run(self) -> None:
        if self._trim is None or self.baseline <= 0:
            return
        limit = self.baseline + int(0.8 * self.budget)
        while not self._stop.wait(self.interval_s):
            if rss() > limit:
                self._trim(0)
                self.trims += 1

    def stop(self) -> None:
        self._stop.set()
