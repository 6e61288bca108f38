"""What the store holds, as a stream of events: chunks stored into a tier, removed from it
(evicted, deleted, corrupt, cleared), or a whole tier cleared.

Routers that send each request to the engine already holding its prefix need to follow what the
engine's kvlayer tiers hold (the vLLM connector turns these events into vLLM's KV events) and
what a shared ``kvlayer serve`` holds (its ``WatchEvents`` stream). The blob store publishes to an
``EventHub``; every consumer subscribes with its own bounded queue, so a slow or absent consumer
costs at most its bound: when a queue is full the oldest events go and are counted as dropped
(a router that sees ``dropped`` grow has lost sync and should resync). With no subscriber,
publishing costs one attribute check.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

EventKind = Literal["stored", "removed", "cleared"]

#: keys a subscriber queue holds by default (an event weighs its keys, at least one)
DEFAULT_MAX_KEYS = 100_000


@dataclass(frozen=True)
class StoreEvent:
    """``keys`` entered (``stored``) or left (``removed``) tier ``tier`` (of kind ``medium``:
    memory, disk, redis, remote), or the whole tier was emptied (``cleared``, no keys). ``reason``
    says why: put, promoted, written (write-through or demotion), evicted, deleted, corrupt,
    cleared. ``seq`` grows by one per event published by one hub."""

    seq: int
    kind: EventKind
    tier: str
    medium: str
    keys: tuple[str, ...]
    reason: str
    ts: float

    @property
    def weight(self) -> int:
        return max(1, len(self.keys))


class Subscription:
    """One consumer's bounded FIFO of events. Full: the oldest events are dropped (``dropped``
    counts them). ``take`` drains without waiting; ``wait`` blocks until there is something, the
    timeout passes, or the subscription is closed."""

    def __init__(self, hub: EventHub, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self._hub = hub
        self.max_keys = max_keys
        self._q: deque[StoreEvent] = deque()
        self._weight = 0
        self._cond = threading.Condition()
        self.dropped = 0  # events lost to the bound
        self.closed = False

    def push(self, ev: StoreEvent) -> None:
        with self._cond:
            if self.closed:
                return
            self._q.append(ev)
            self._weight += ev.weight
            while self._weight > self.max_keys and len(self._q) > 1:
                old = self._q.popleft()
                self._weight -= old.weight
                self.dropped += 1
            self._cond.notify_all()

    def take(self, max_events: int | None = None) -> list[StoreEvent]:
        with self._cond:
            return self._take(max_events)

    def _take(self, max_events: int | None) -> list[StoreEvent]:
        n = len(self._q) if max_events is None else min(max_events, len(self._q))
        out = [self._q.popleft() for _ in range(n)]
        self._weight -= sum(e.weight for e in out)
        return out

    def wait(self, timeout: float | None, max_events: int | None = None) -> list[StoreEvent]:
        with self._cond:
            if not self._q and not self.closed:
                self._cond.wait(timeout)
            return self._take(max_events)

    def wake(self) -> None:
        """Wake a ``wait`` (e.g. its client went away) without closing."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._q.clear()
            self._weight = 0
            self._cond.notify_all()
        self._hub.unsubscribe(self)

    def __len__(self) -> int:
        with self._cond:
            return len(self._q)


class EventHub:
    """Fans events out to the subscriptions open now (none: nothing is built or kept)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: tuple[Subscription, ...] = ()
        self._seq = 0

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def subscribe(self, max_keys: int = DEFAULT_MAX_KEYS) -> Subscription:
        sub = Subscription(self, max_keys)
        with self._lock:
            self._subs = (*self._subs, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs = tuple(s for s in self._subs if s is not sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def publish(self, kind: EventKind, tier: str, medium: str, keys: Iterable[str], reason: str) -> None:
        if not self._subs:
            return
        ks = tuple(keys)
        if not ks and kind != "cleared":
            return
        # seq and delivery under one lock: every subscriber sees events in seq order
        with self._lock:
            self._seq += 1
            ev = StoreEvent(self._seq, kind, tier, medium, ks, reason, time.time())
            for s in self._subs:
                s.push(ev)


def only_prefix(events: Sequence[StoreEvent], prefix: str) -> list[StoreEvent]:
    """The events as a client under key ``prefix`` sees them (the server's tenants): keys without
    the prefix, other keys left out, events left with no keys dropped (``cleared`` is kept)."""
    if not prefix:
        return list(events)
    out: list[StoreEvent] = []
    n = len(prefix)
    for ev in events:
        if ev.kind == "cleared":
            out.append(ev)
            continue
        mine = tuple(k[n:] for k in ev.keys if k.startswith(prefix))
        if mine:
            out.append(replace(ev, keys=mine))
    return out
