"""Pins as counted leases: each ``pin`` returns a lease id; a key stays pinned while any live
lease covers it. Leases may expire (TTL), so a client that dies cannot leak a pin forever, and
releasing a lease twice is a no-op, so counts never go negative."""

from __future__ import annotations

import math
import numbers
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from kvlayer.errors import UsageError


def check_ttl(ttl_s: float | None) -> float | None:
    """``ttl_s`` if it is a lease lifetime (a finite number of seconds > 0), None for no expiry
    (None or 0); anything else raises ``UsageError`` naming ``ttl_s``: a NaN lease never expired
    and a negative one had expired before it was made."""
    if ttl_s is None:
        return None
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, numbers.Real):
        raise UsageError(f"ttl_s must be a number of seconds or None, got {type(ttl_s).__name__} {ttl_s!r}")
    if not math.isfinite(ttl_s) or ttl_s < 0:
        raise UsageError(f"ttl_s must be a finite number of seconds >= 0 (0 or None: no expiry), got {ttl_s}")
    return float(ttl_s) if ttl_s else None


@dataclass
class Lease:
    lease_id: str
    keys: tuple[str, ...]
    expires_at: float | None
    label: str = ""


class PinRegistry:
    def __init__(self, clock: type[time.monotonic] | None = None) -> None:  # type: ignore[valid-type]
        self._leases: dict[str, Lease] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._next_expiry: float | None = None

    def pin(self, keys: Iterable[str], ttl_s: float | None = None, label: str = "") -> str:
        """A new lease on ``keys``; ``ttl_s``: seconds until it expires (None or 0: never)."""
        ttl = check_ttl(ttl_s)
        exp = None if ttl is None else time.monotonic() + ttl
        lease_id = uuid.uuid4().hex
        ks = tuple(keys)  # once: an iterator read twice pinned nothing
        with self._lock:
            self._leases[lease_id] = Lease(lease_id, ks, exp, label)
            self._counts.update(set(ks))
            if exp is not None and (self._next_expiry is None or exp < self._next_expiry):
                self._next_expiry = exp
        return lease_id

    def unpin(self, lease_id: str) -> bool:
        with self._lock:
            return self._drop(lease_id)

    def _drop(self, lease_id: str) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        for k in set(lease.keys):
            self._counts[k] -= 1
            if self._counts[k] <= 0:
                del self._counts[k]
        return True

    def unpin_label(self, label: str) -> int:
        with self._lock:
            ids = [i for i, le in self._leases.items() if le.label == label]
            for i in ids:
                self._drop(i)
        return len(ids)

    def _expire(self) -> None:
        now = time.monotonic()
        if self._next_expiry is None or now < self._next_expiry:
            return
        nxt = None
        for i, le in list(self._leases.items()):
            if le.expires_at is None:
                continue
            if le.expires_at <= now:
                self._drop(i)
            elif nxt is None or le.expires_at < nxt:
                nxt = le.expires_at
        self._next_expiry = nxt

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            self._expire()
            return self._counts.get(key, 0) > 0

    def pinned_keys(self) -> set[str]:
        with self._lock:
            self._expire()
            return set(self._counts)

    def leases(self) -> list[Lease]:
        with self._lock:
            self._expire()
            return list(self._leases.values())

    def clear(self) -> None:
        with self._lock:
            self._leases.clear()
            self._counts.clear()
            self._next_expiry = None
