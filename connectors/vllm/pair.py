"""The scheduler-side and worker-side connector of one vLLM engine, when both live in one process.

vLLM builds one connector object per role (the scheduler side in the engine core, the worker side
in each worker) and gives neither a reference to the other. In single-process mode ("uni"
executor, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) both halves must share one KVCache: the lookup then
sees exactly what the worker stored, and pins taken by the scheduler protect the worker's loads.
So they meet here, under their engine's ``kv_transfer_config.engine_id`` (vLLM gives every engine
its own, also per data-parallel rank). Counters, guards and request state stay per connector.

When the worker is another process (the OpenAI server, TP > 1), each process holds only its own
half; the scheduler learns what the worker stored from the worker metadata vLLM sends back every
step (``SchedulerSide.on_worker_meta``), and the worker's counters stay in the worker's process.
"""

from __future__ import annotations

import threading
from typing import Any

from kvlayer.config import KVLayerConfig
from kvlayer.engine import KVCache
from kvlayer.spec import KVSpec

from .scheduler import SchedulerSide
from .worker import WorkerSide


class ConnectorPair:
    """One engine's KVCache and the connector halves of this process that use it."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self.users = 0

    @property
    def has_local_worker(self) -> bool:
        """Whether a worker-side connector of this process writes into ``cache`` (vLLM's "uni"
        executor); False when the worker is another process. vLLM builds the worker first."""
        return self.worker is not None

    def stats(self) -> dict[str, Any]:
        """Counters of the halves in this process plus the store's own stats."""
        out: dict[str, Any] = {"connector": {}, "scheduler_requests": 0, "layout": None, "failures": {}}
        for side in (self.scheduler, self.worker):
            if side is not None:
                out["connector"].update(side.counters.as_dict())
                for op, n in side.guard.errors().items():
                    out["failures"][op] = out["failures"].get(op, 0) + n
        if self.scheduler is not None:
            out["scheduler_requests"] = self.scheduler.num_requests()
        w = self.worker
        if w is not None and w.adapter is not None:
            out["layout"] = w.adapter.layout.describe()
            out["load_seconds"] = w.load_seconds
            out["save_seconds"] = w.save_seconds
        if w is not None:
            out["inflight_loads"] = w.inflight()  # background loads not yet reported to vLLM
            out["queued_save_bytes"] = w.saves.pending_bytes
        out["store"] = self.cache.stats()
        return out


_lock = threading.Lock()
_pairs: dict[str, ConnectorPair] = {}


def join(engine_id: str, spec: KVSpec, config: KVLayerConfig) -> ConnectorPair:
    """The pair of ``engine_id`` (its KVCache made on first use); ``leave`` when done."""
    key = f"{engine_id}|{spec.namespace()}|{config.model_dump_json()}"
    with _lock:
        pair = _pairs.get(key)
        if pair is None:
            pair = _pairs[key] = ConnectorPair(KVCache(spec, config))
        pair.users += 1
        return pair


def leave(pair: ConnectorPair) -> None:
    """Drop one user; the last one closes the KVCache."""
    with _lock:
        pair.users -= 1
        if pair.users > 0:
            return
        for k, p in list(_pairs.items()):
            if p is pair:
                del _pairs[k]
    pair.cache.close()
