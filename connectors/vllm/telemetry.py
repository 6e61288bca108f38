"""What each connector half hands vLLM for its metrics and KV events (``metrics.py``,
``events.py``), kept per connector object.

Scheduler half: lookups, hits (per tier, from the load plan of each claim), declined hits; the
KV events the workers sent, until vLLM's publisher takes them. Worker half: loads, saves, their
timings, and its store's events (a bounded subscription, only while vLLM publishes KV events).
"""

from __future__ import annotations

import threading
from typing import Any

from kvlayer.engine import KVCache

from ..core import FailureGuard
from .events import KVLayerKVEvents, SchedulerEvents, WorkerEvents
from .metrics import SCHEDULER_KEYS, WORKER_KEYS, KVLayerConnectorStats, Reporter
from .scheduler import SchedulerSide
from .worker import WorkerSide

#: store events (keys) a worker keeps between two steps
EVENT_KEYS = 100_000


def events_enabled(vllm_config: Any) -> bool:
    cfg = getattr(vllm_config, "kv_events_config", None)
    return bool(cfg is not None and cfg.enable_kv_cache_events)


class SchedulerTelemetry:
    def __init__(self, sched: SchedulerSide, guard: FailureGuard) -> None:
        self.sched = sched
        self.guard = guard
        self.events = SchedulerEvents()
        self._lock = threading.Lock()
        self._hits: dict[str, int] = {}
        self._dropped = 0
        self.reporter = Reporter(sched.counters, SCHEDULER_KEYS, extra=self._extra)

    def hit_tokens(self) -> int:
        return self.sched.counters.hit_tokens

    def record_hits(self, request: Any, before: int) -> None:
        """After ``update_state_after_alloc``: the tokens it claimed, by the tier holding them."""
        gained = self.sched.counters.hit_tokens - before
        if gained <= 0:
            return
        tiers: dict[str, int] = self.guard.call("hit tiers", lambda: self.sched.hit_sources(request, gained), {})
        rest = gained - sum(tiers.values())
        if rest:  # the plan does not add up (should not happen): still count every token once
            tiers = {"unknown": gained} if rest < 0 else {**tiers, "unknown": tiers.get("unknown", 0) + rest}
        with self._lock:
            for tier, n in tiers.items():
                self._hits[tier] = self._hits.get(tier, 0) + n

    def _extra(self, out: KVLayerConnectorStats, delta: Any) -> None:
        with self._lock:
            hits, self._hits = self._hits, {}
        for tier, n in hits.items():
            out.add("hit_tokens", n, tier)
        dropped = self.events.dropped
        out.add("dropped_events", dropped - self._dropped)
        self._dropped = dropped

    def on_output(self, connector_output: Any) -> None:
        self.events.add(getattr(connector_output, "kv_cache_events", None))

    def stats(self) -> KVLayerConnectorStats | None:
        return self.reporter.report()


class WorkerTelemetry:
    def __init__(self, worker: WorkerSide, cache: KVCache, *, events: bool) -> None:
        self.worker = worker
        self.samples = worker.counters.samples
        self.bytes_per_token = cache.spec.bytes_per_token()
        self.events = WorkerEvents(cache.events, block_size=cache.chunk_size, max_keys=EVENT_KEYS) if events else None
        self._dropped = 0
        self.cache = cache
        self._reads = cache.hits_by_tier()
        self.reporter = Reporter(worker.counters, WORKER_KEYS, samples=self.samples, extra=self._extra)

    def on_worker_meta(self, meta: Any) -> None:
        """The reads the worker timed this step (its report to the scheduler) as load timings."""
        for tier, _chunks, seconds in getattr(meta, "loads", None) or ():
            self.samples.observe("load_seconds", seconds, tier)

    def _extra(self, out: KVLayerConnectorStats, delta: Any) -> None:
        out.add("loaded_bytes", delta.get("loaded_tokens", 0) * self.bytes_per_token)
        reads = self.cache.hits_by_tier()  # the worker side is the one reading chunks out of its store
        for tier, n in reads.items():
            out.add("tier_reads", n - self._reads.get(tier, 0), tier)
        self._reads = reads
        if self.events is not None:
            dropped = self.events.dropped
            out.add("dropped_events", dropped - self._dropped)
            self._dropped = dropped

    def stats(self) -> KVLayerConnectorStats | None:
        return self.reporter.report()

    def take_events(self) -> KVLayerKVEvents | None:
        return self.events.take() if self.events is not None else None

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
