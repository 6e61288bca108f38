"""One KVCache per (spec, config) per process, shared by the scheduler-side and worker-side
connector objects when vLLM runs both in one process ("uni" executor): the lookup then sees
exactly what the worker stored, and pins taken by the scheduler protect the worker's loads.
When the worker is another process, the scheduler learns what it stored from the worker
metadata vLLM sends back every step (see ``SchedulerSide.on_worker_meta``)."""

from __future__ import annotations

import threading

from kvlayer.config import KVLayerConfig
from kvlayer.engine import KVCache
from kvlayer.spec import KVSpec

_lock = threading.Lock()
_caches: dict[str, tuple[KVCache, int]] = {}
_worker_held: dict[int, int] = {}  # id(cache) -> worker-side holders in this process


def _key(spec: KVSpec, config: KVLayerConfig) -> str:
    return spec.namespace() + "|" + config.model_dump_json()


def acquire(spec: KVSpec, config: KVLayerConfig, *, worker: bool = False) -> KVCache:
    k = _key(spec, config)
    with _lock:
        cache, refs = _caches.get(k, (None, 0))
        if cache is None:
            cache = KVCache(spec, config)
        _caches[k] = (cache, refs + 1)
        if worker:
            _worker_held[id(cache)] = _worker_held.get(id(cache), 0) + 1
        return cache


def has_local_worker(cache: KVCache) -> bool:
    """True when a worker-side connector of this process writes into ``cache`` (vLLM's "uni"
    executor); False when the worker is another process (multiprocess executor, TP > 1)."""
    with _lock:
        return _worker_held.get(id(cache), 0) > 0


def release(cache: KVCache, *, worker: bool = False) -> None:
    with _lock:
        if worker and _worker_held.get(id(cache), 0) > 0:
            _worker_held[id(cache)] -= 1
            if not _worker_held[id(cache)]:
                del _worker_held[id(cache)]
        for k, (c, refs) in list(_caches.items()):
            if c is cache:
                if refs <= 1:
                    del _caches[k]
                    c.close()
                else:
                    _caches[k] = (c, refs - 1)
                return


def active_caches() -> list[KVCache]:
    with _lock:
        return [c for c, _ in _caches.values()]
