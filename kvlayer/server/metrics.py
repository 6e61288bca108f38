"""Prometheus metrics of the cache server, in a registry of its own (so several servers or tests
in one process never collide). Tier figures are read from the store at scrape time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _TierCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        try:
            s = self._stats()
        except Exception as e:  # a scrape must never take the server down
            log.warning("metrics: cannot read store stats: %s", e)
            return
        gauges = {k: GaugeMetricFamily(f"kvlayer_tier_{k}", f"tier {k.replace('_', ' ')}", labels=["tier"])
                  for k in ("used_bytes", "capacity_bytes", "keys")}
        counters = {k: CounterMetricFamily(f"kvlayer_tier_{k}", f"tier {k.replace('_', ' ')}", labels=["tier"])
                    for k in ("hits", "misses", "evictions", "bytes_read", "bytes_written", "errors", "corrupt",
                              "misplaced", "dropped_writes")}
        for t in s.get("tiers", []):
            name = str(t.get("name"))
            gauges["used_bytes"].add_metric([name], float(t.get("used_bytes", 0)))
            gauges["capacity_bytes"].add_metric([name], float(t.get("capacity_bytes", 0)))
            gauges["keys"].add_metric([name], float(t.get("num_keys", 0)))
            for k, fam in counters.items():
                fam.add_metric([name], float(t.get(k, 0)))
        yield from gauges.values()
        yield from counters.values()
        st = s.get("store", {})
        q = GaugeMetricFamily("kvlayer_write_queue_bytes", "bytes queued for lower tiers")
        q.add_metric([], float(st.get("write_queue_bytes", 0)))
        yield q
        p = GaugeMetricFamily("kvlayer_pinned_keys", "keys covered by a live pin lease")
        p.add_metric([], float(st.get("pinned_keys", 0)))
        yield p


class ServerMetrics:
    def __init__(self, store_stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("kvlayer_server_requests", "RPCs by method and status code", ["rpc", "code"], registry=r)
        self.latency = Histogram("kvlayer_server_rpc_latency_seconds", "RPC latency by method", ["rpc"],
                                 buckets=_BUCKETS, registry=r)
        self.hits = Counter("kvlayer_server_hits", "chunks found by Get", registry=r)
        self.misses = Counter("kvlayer_server_misses", "chunks not found by Get", registry=r)
        self.bytes = Counter("kvlayer_server_bytes", "blob bytes received (in) and sent (out)", ["direction"], registry=r)
        self.inflight = Gauge("kvlayer_server_inflight_bytes", "request buffers held right now", registry=r)
        self.active = Gauge("kvlayer_server_active_rpcs", "RPCs in progress", registry=r)
        if store_stats is not None:
            r.register(_TierCollector(store_stats))
        self._http: Any = None

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (0 = not started)."""
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            log.warning("metrics endpoint %s:%d not started: %s", host, port, e)
            return 0
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
