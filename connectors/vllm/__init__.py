"""kvlayer's vLLM v1 KV connector: ``"kv_connector": "KVLayerConnector",
"kv_connector_module_path": "kvlayer.connectors.vllm"``."""

from __future__ import annotations

from typing import Any

from .connector import LIVE, KVLayerConnector
from .stats import COUNTERS


def connector_stats() -> dict[str, Any]:
    """Counters of this process's connectors plus the store's own stats (when one is live)."""
    out: dict[str, Any] = {"connector": COUNTERS.as_dict(), "scheduler_requests": 0, "layout": None}
    for c in LIVE:
        if c.scheduler is not None:
            out["scheduler_requests"] += c.scheduler.num_requests()
        if c.worker is not None and c.worker.adapter is not None:
            out["layout"] = c.worker.adapter.layout.describe()
            out["load_seconds"] = c.worker.load_seconds
            out["save_seconds"] = c.worker.save_seconds
        out["store"] = c.cache.stats()
    return out


__all__ = ["COUNTERS", "LIVE", "KVLayerConnector", "connector_stats"]
