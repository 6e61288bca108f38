"""Human-readable sizes (``"4GiB"``, ``"512MB"``), shared by the config and the codecs' buffer pool.

A leaf module: it imports nothing from kvlayer, so everything may use it.
"""

from __future__ import annotations

import math
import numbers
import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}


def parse_size(value: int | float | str) -> int:
    """``"4GiB"`` -> 4294967296; plain numbers are bytes (a fraction of a byte is dropped).

    Raises ValueError for anything else (negative, NaN, infinite, bools, unknown units), which the
    config turns into a ``ConfigError`` naming the setting."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | str):
        raise ValueError(f"a size must be a number of bytes or a string like '4GiB', got {type(value).__name__}")
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"a size must be a finite number of bytes, got {value}")
        if value < 0:
            raise ValueError(f"size must be >= 0, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse size {value!r}; use bytes or a unit: KiB, MiB, GiB, TiB, KB, MB, GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
