"""Which pages of a file the page cache holds (``mincore(2)`` over a read-only mapping), so the
disk tier reads a cold file with ``O_DIRECT`` and a cached one from the cache. The standard
library has no ``mincore``; this calls libc's through ``ctypes`` (Linux and macOS)."""

from __future__ import annotations

import ctypes
import mmap
import os

_PAGE = mmap.PAGESIZE
_FAILED = ctypes.c_void_p(-1).value

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                           ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
except (OSError, AttributeError):  # pragma: no cover - no libc with these calls
    _libc = None


def available() -> bool:
    return _libc is not None


def resident_pages(fd: int, size: int) -> int:
    """Pages of the first ``size`` bytes of ``fd`` that are in the page cache (maps the file
    without touching it, so nothing is read). Raises ``OSError`` where that cannot be told."""
    if _libc is None or size <= 0:
        raise OSError("mincore is not available")
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    try:
        vec = (ctypes.c_ubyte * (-(-size // _PAGE)))()
        if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
        return len(vec) - bytes(vec).count(0)
    finally:
        _libc.munmap(ctypes.c_void_p(addr), size)
