"""The one failure policy: a circuit breaker per tier, owned by the blob store.

Tiers only raise; the store asks the tier's breaker before every call and tells it how the call
went. After a failure the breaker stays open (the tier is skipped: reads miss, writes drop) for
``after_s``; each further failure in a row multiplies the window by ``multiplier`` up to ``max_s``;
one success closes it again. In the spirit of redis-py's ``backoff`` / ``multidb.circuit``: the
policy is a small object handed to the caller, not code inside every client.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """How long a failing tier is skipped: ``after_s`` after the first failure, times
    ``multiplier`` per failure in a row, at most ``max_s`` (None: ``after_s``, a flat window)."""

    after_s: float = 5.0
    max_s: float | None = None
    multiplier: float = 2.0

    def next_window(self, previous: float) -> float:
        """The window after a failure that follows one of ``previous`` seconds (0: the first)."""
        cap = self.after_s if self.max_s is None else self.max_s
        return min(cap, self.after_s if previous <= 0 else previous * self.multiplier)


class Breaker:
    """Closed (calls go through) until a failure; then open for the policy's window."""

    def __init__(self, policy: RetryPolicy | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self.failures = 0  # in a row
        self._window = 0.0
        self._open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether a call may go to the tier now."""
        return time.monotonic() >= self._open_until

    def failure(self) -> float:
        """Record a failed call; returns how long the tier is now skipped."""
        with self._lock:
            self.failures += 1
            self._window = self.policy.next_window(self._window)
            self._open_until = time.monotonic() + self._window
            return self._window

    def success(self) -> int:
        """Record a successful call; returns the failures in a row it ends (0: none)."""
        if not self.failures:  # the common case, lock-free
            return 0
        with self._lock:
            n, self.failures, self._window = self.failures, 0, 0.0
            return n

    def reset(self) -> None:
        """Close the breaker now (tests, operators)."""
        with self._lock:
            self.failures, self._window, self._open_until = 0, 0.0, 0.0
