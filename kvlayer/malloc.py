"""glibc malloc settings for processes that move many multi-MiB blobs.

By default glibc serves large allocations with a fresh ``mmap`` each and unmaps them on free, so
every blob that arrives from Redis or a socket lands in fresh pages, and faulting those in costs
more than the copy (1 MiB Redis GETs: 1.0 s of client CPU per GB by default, 0.47 tuned;
``benchmarks/redis_tier.py --malloc-tuning``). Tuned, blobs up to 32 MiB come from the heap and
freed ones are reused at once; the price is that up to 256 MiB of freed heap may stay resident
until ``malloc_trim``. ``kvlayer serve`` always tunes (its memory guard trims when RSS passes the
budget); an engine process opts in with ``malloc_tuning: true`` (``KVLAYER_MALLOC_TUNING=1``),
since the setting is process-wide.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Callable

log = logging.getLogger("kvlayer")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # the most glibc allows
TRIM_THRESHOLD = 256 << 20


def tune_for_blobs(arena_max: int | None = None) -> Callable[[int], int] | None:
    """Apply the settings (glibc on Linux only; idempotent). Returns ``malloc_trim`` so the caller
    can hand memory back when it wants, or None where nothing was changed."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = True
        if arena_max is not None:
            ok &= bool(libc.mallopt(_M_ARENA_MAX, arena_max))
        ok &= bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        ok &= bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    if not ok:
        log.warning("mallopt refused a setting; malloc left partly at its defaults")
    return trim
