"""One KVCache per (spec, config) per process, shared by the scheduler-side and worker-side
connector objects when vLLM runs both in one process (the default for one device): the lookup
then sees exactly what the worker stored, and pins taken by the scheduler protect the worker's
loads."""

from __future__ import annotations

import threading

from kvlayer.config import KVLayerConfig
from kvlayer.engine import KVCache
from kvlayer.spec import KVSpec

_lock = threading.Lock()
_caches: dict[str, tuple[KVCache, int]] = {}


def _key(spec: KVSpec, config: KVLayerConfig) -> str:
    return spec.namespace() + "|" + config.model_dump_json()


def acquire(spec: KVSpec, config: KVLayerConfig) -> KVCache:
    k = _key(spec, config)
    with _lock:
        cache, refs = _caches.get(k, (None, 0))
        if cache is None:
            cache = KVCache(spec, config)
        _caches[k] = (cache, refs + 1)
        return cache


def release(cache: KVCache) -> None:
    with _lock:
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
