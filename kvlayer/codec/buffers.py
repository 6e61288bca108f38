"""Recycled blob buffers, so that storing a chunk costs one copy and not one page fault per 4 KiB.

A fresh multi-MiB allocation is fresh pages from the kernel, and faulting them in costs more
than the copy that fills them (measured on SmolLM2-shaped 5.6 MiB chunks: 1 GB/s into fresh
memory, 9 GB/s into memory touched before; ``benchmarks/store.py``). Buffers are handed out as
numpy views; when the last reader of a blob lets go (every tensor, memoryview or array made from
it), a weakref finalizer puts the buffer back, so the memory of an evicted, replaced or
written-out chunk, already faulted in, holds the next one. A buffer is never reused while anything
can still read it. Exact sizes only (a model's chunks all have one size); at most ``cap`` bytes
sit idle (``KVLAYER_BLOB_POOL_BYTES``, default 256 MiB, 0 disables), so RSS stays near the tiers'
budgets. 256 MiB holds one retrieve batch of 8k tokens of a small model (SmolLM2-135M: 32 chunks,
189 MB) or 8 chunks of an 8B one: with 128 MiB a third of such a batch read from disk landed in
fresh pages every time (4.3 vs 6.7 GB/s warm, ``benchmarks/peers.py``).
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np

from kvlayer.errors import ConfigError
from kvlayer.units import parse_size

#: smaller buffers come from malloc's own free lists: not worth pooling
MIN_POOLED = 64 << 10
#: pooled buffers start on a page and span whole pages: the kernel copies a file into memory 1.35x
#: slower when the destination is not aligned like the page cache source (malloc's large blocks
#: start 16 bytes in: 0.21 vs 0.155 CPU s/GB for a warm read on the test box); whole pages also
#: let blobs a few header bytes apart share buffers (and would suit O_DIRECT reads)
PAGE = 4096


def empty(nbytes: int, align: int = 64) -> np.ndarray:
    """``np.empty(nbytes, uint8)`` starting on an ``align``-byte boundary."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = -raw.ctypes.data % align
    return raw[off:off + nbytes]


def pages(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages: what a pooled buffer of ``nbytes`` really holds."""
    return -(-nbytes // PAGE) * PAGE


class BufferPool:
    def __init__(self, cap_bytes: int) -> None:
        self.cap = max(0, cap_bytes)
        self._free: dict[int, list[np.ndarray]] = {}
        self._idle = 0
        self._lock = threading.Lock()
        self.reused = 0
        self.allocated = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` (contents undefined, like ``np.empty``). From
        ``MIN_POOLED`` up it starts on a page and lies in ``pages(nbytes)`` bytes of its own."""
        if nbytes < MIN_POOLED or self.cap == 0:
            return empty(nbytes, PAGE if nbytes >= MIN_POOLED else 64)
        size = pages(nbytes)  # blobs a few bytes apart (header lengths) share buffers
        buf = None
        with self._lock:
            free = self._free.get(size)
            if free:
                buf = free.pop()
                self._idle -= size
                self.reused += 1
            else:
                self.allocated += 1
        if buf is None:
            buf = empty(size, PAGE)
        view = buf[:nbytes]  # its own object: it lives exactly as long as something can read the blob
        fin = weakref.finalize(view, self._give, buf)
        fin.atexit = False
        return view

    def _give(self, buf: np.ndarray) -> None:
        n = buf.nbytes
        with self._lock:
            if self._idle + n <= self.cap:
                self._free.setdefault(n, []).append(buf)
                self._idle += n

    @property
    def idle_bytes(self) -> int:
        return self._idle

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._idle = 0


def _cap_from_env() -> int:
    raw = os.environ.get("KVLAYER_BLOB_POOL_BYTES", "")
    if not raw:
        return 256 << 20
    try:
        return parse_size(raw)
    except ValueError as e:
        raise ConfigError(f"KVLAYER_BLOB_POOL_BYTES: {e}") from None


POOL = BufferPool(_cap_from_env())
