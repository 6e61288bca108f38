"""kvlayer in vLLM's own metrics: ``/metrics`` of the OpenAI server and the periodic
"KV Transfer metrics" log line.

vLLM's path: each step the worker-side connector returns ``get_kv_connector_stats()`` inside
``KVConnectorOutput``, the scheduler side adds its own and vLLM aggregates them
(``KVLayerConnectorStats.aggregate``), ships ``to_dict()`` to the front-end process, and there
``KVLayerPromMetrics.observe`` adds them to Prometheus series built by ``build_prom_metrics``
(labels ``model_name`` and ``engine`` as vLLM's own, plus ``tier`` where it says which tier).

What travels is the *change* of each connector's own counters (``stats.py``) since its last
report (``Reporter``) plus the timings observed meanwhile, so a series' total equals the sum of
the counters of every connector of that engine: per connector state, no process globals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from ..core import Counters
from .stats import Samples

COUNTERS = "counters"
HISTOGRAMS = "histograms"


@dataclass(frozen=True)
class Series:
    name: str  # Prometheus name (a counter's gets ``_total`` from prometheus_client)
    doc: str
    by_tier: bool = False


#: stats key -> counter series. The scheduler side counts lookups and hits, the worker side
#: copies and saves.
COUNTER_SERIES: dict[str, Series] = {
    "hit_tokens": Series("vllm:kvlayer_hit_tokens", "Prompt tokens loaded from kvlayer instead of computed, by the "
                         "tier that held them.", by_tier=True),
    "hit_requests": Series("vllm:kvlayer_hit_requests", "Requests that loaded part of their prompt from kvlayer."),
    "lookups": Series("vllm:kvlayer_lookups", "Prompt lookups in kvlayer."),
    "lookup_timeouts": Series("vllm:kvlayer_lookup_timeouts", "Lookups a tier did not answer in time (misses)."),
    "declined_hits": Series("vllm:kvlayer_declined_hits", "Lookups whose hit was not (fully) claimed because "
                            "recomputing was estimated faster than loading."),
    "declined_tokens": Series("vllm:kvlayer_declined_tokens", "Tokens of declined hits (recomputed)."),
    "loaded_chunks": Series("vllm:kvlayer_loaded_chunks", "Chunks copied from kvlayer into vLLM's KV cache."),
    "tier_reads": Series("vllm:kvlayer_tier_reads", "Chunks the worker's store read for loads, by the tier that "
                         "served each (the hottest holding it).", by_tier=True),
    "loaded_bytes": Series("vllm:kvlayer_loaded_bytes", "KV bytes copied from kvlayer into vLLM's KV cache."),
    "load_errors": Series("vllm:kvlayer_load_errors", "Chunks that failed to load (their blocks were recomputed)."),
    "saved_chunks": Series("vllm:kvlayer_saved_chunks", "Chunks saved to kvlayer."),
    "saved_bytes": Series("vllm:kvlayer_saved_bytes", "KV bytes saved to kvlayer (before encoding)."),
    "save_errors": Series("vllm:kvlayer_save_errors", "Saves that failed (a future miss)."),
    "dropped_saves": Series("vllm:kvlayer_dropped_saves", "Chunks not saved because the background save queue "
                            "was full (a future miss)."),
    "handoffs": Series("vllm:kvlayer_handoffs", "Requests that arrived with a prefill engine's hand-off "
                       "(kv_consumer)."),
    "handoff_waits": Series("vllm:kvlayer_handoff_waits", "Hand-offs whose KV had not landed at the first lookup: "
                            "the request waited for it (kv_consumer)."),
    "handoff_timeouts": Series("vllm:kvlayer_handoff_timeouts", "Hand-offs not complete after pd_wait_s: the "
                               "missing tokens were computed (kv_consumer)."),
    "handed_off": Series("vllm:kvlayer_handed_off", "Requests whose prompt this engine saved and announced "
                         "(kv_producer)."),
    "dropped_events": Series("vllm:kvlayer_dropped_events", "kvlayer KV events dropped because a bounded queue "
                             "was full (a router following them has lost sync)."),
}

#: stats key -> histogram series (seconds)
HISTOGRAM_SERIES: dict[str, Series] = {
    "load_seconds": Series("vllm:kvlayer_load_seconds", "Time to read one run of chunks from a tier for a load "
                           "(synchronous: one batch; background: a request's chunks from that tier).", by_tier=True),
    "save_seconds": Series("vllm:kvlayer_save_seconds", "Time to encode and store one step's chunks (background)."),
}

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SCHEDULER_KEYS = ("hit_requests", "lookups", "lookup_timeouts", "declined_hits", "declined_tokens", "handoffs",
                  "handoff_waits", "handoff_timeouts", "handed_off")
WORKER_KEYS = ("loaded_chunks", "load_errors", "saved_chunks", "saved_bytes", "save_errors", "dropped_saves")


@dataclass
class KVLayerConnectorStats(KVConnectorStats):
    """``data``: ``{"counters": {key: {tier or "": n}}, "histograms": {key: {tier or "": [s, ...]}}}``
    (plain strings and lists: it crosses processes as msgpack)."""

    def __post_init__(self) -> None:
        if COUNTERS not in self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {COUNTERS: {}, HISTOGRAMS: {}}

    def add(self, key: str, n: int | float, label: str = "") -> None:
        if n:
            row = self.data[COUNTERS].setdefault(key, {})
            row[label] = row.get(label, 0) + n

    def observe(self, key: str, values: list[float], label: str = "") -> None:
        if values:
            self.data[HISTOGRAMS].setdefault(key, {}).setdefault(label, []).extend(values)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other is self or other.is_empty():
            return self
        for key, row in other.data.get(COUNTERS, {}).items():
            for label, n in row.items():
                self.add(key, n, label)
        for key, row in other.data.get(HISTOGRAMS, {}).items():
            for label, values in row.items():
                self.observe(key, list(values), label)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for key, row in sorted(self.data[COUNTERS].items()):
            for label, n in sorted(row.items()):
                out[f"{key}[{label}]" if label else key] = n
        for key, row in sorted(self.data[HISTOGRAMS].items()):
            for label, values in sorted(row.items()):
                name = f"{key}[{label}]" if label else key
                out[f"{name}_count"] = len(values)
                out[f"{name}_avg_ms"] = round(1e3 * sum(values) / len(values), 3)
        return out

    def is_empty(self) -> bool:
        return not self.data.get(COUNTERS) and not self.data.get(HISTOGRAMS)

    def total(self, key: str) -> int | float:
        return sum(self.data[COUNTERS].get(key, {}).values())


class Reporter:
    """One connector's side of the stats: what its counters gained since the last report, plus
    the samples observed meanwhile. ``extra`` adds what the counters do not hold (per-tier hit
    tokens, bytes derived from tokens, dropped events)."""

    def __init__(self, counters: Counters, keys: tuple[str, ...], samples: Samples | None = None,
                 extra: Callable[[KVLayerConnectorStats, Mapping[str, int]], None] | None = None) -> None:
        self.counters = counters
        self.keys = keys
        self.samples = samples
        self.extra = extra
        self._last: dict[str, int] = {}

    def report(self) -> KVLayerConnectorStats | None:
        now = self.counters.as_dict()
        delta = {k: v - self._last.get(k, 0) for k, v in now.items()}
        self._last = now
        out = KVLayerConnectorStats()
        for k in self.keys:
            out.add(k, delta.get(k, 0))
        if self.samples is not None:
            for (name, label), values in self.samples.take().items():
                out.observe(name, values, label)
        if self.extra is not None:
            self.extra(out, delta)
        return None if out.is_empty() else out


class KVLayerPromMetrics(KVConnectorPromMetrics):
    """The kvlayer series, registered once per front-end process (vLLM builds this class there)."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._families: dict[str, Any] = {}
        self._children: dict[tuple[str, int, str], Any] = {}
        for key, s in COUNTER_SERIES.items():
            self._families[key] = self._counter_cls(name=s.name, documentation=s.doc,
                                                    labelnames=labelnames + (["tier"] if s.by_tier else []))
        for key, s in HISTOGRAM_SERIES.items():
            hist: Any = self._histogram_cls  # vLLM types the three classes as one TypeVar
            self._families[key] = hist(name=s.name, documentation=s.doc, buckets=list(BUCKETS),
                                       labelnames=labelnames + (["tier"] if s.by_tier else []))
        # every series exists (at 0) from the start, as vLLM's own do: dashboards and rates need it
        tiers = _tier_names(vllm_config)
        for engine_idx in per_engine_labelvalues:
            for key in self._families:
                series = COUNTER_SERIES.get(key) or HISTOGRAM_SERIES[key]
                for label in tiers if series.by_tier else [""]:
                    self._child(key, engine_idx, label)

    def _child(self, key: str, engine_idx: int, label: str) -> Any:
        ck = (key, engine_idx, label)
        child = self._children.get(ck)
        if child is None:
            series = COUNTER_SERIES.get(key) or HISTOGRAM_SERIES[key]
            values = list(self.per_engine_labelvalues[engine_idx]) + ([label or "unknown"] if series.by_tier else [])
            child = self._children[ck] = self._families[key].labels(*values)
        return child

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, row in (transfer_stats_data.get(COUNTERS) or {}).items():
            if key in COUNTER_SERIES:
                for label, n in row.items():
                    self._child(key, engine_idx, label).inc(n)
        for key, row in (transfer_stats_data.get(HISTOGRAMS) or {}).items():
            if key in HISTOGRAM_SERIES:
                for label, values in row.items():
                    child = self._child(key, engine_idx, label)
                    for v in values:
                        child.observe(v)


def _tier_names(vllm_config: Any) -> list[str]:
    """The tier names the connector's config gives (none if it cannot be read here)."""
    from .config import parse_extra_config

    try:
        cfg, _ = parse_extra_config(dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {}))
        return [t.name for t in cfg.tier_configs()]
    except Exception:
        return []
