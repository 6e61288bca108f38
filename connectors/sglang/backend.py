"""``KVLayerStore``: kvlayer's tiered store behind SGLang's HiCache (L3 storage backend).

Loaded by SGLang's own factory::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name":"kvlayer",
        "module_path":"kvlayer.connectors.sglang","class_name":"KVLayerStore","interface_v1":1,
        "cpu_bytes":"8GiB", "redis_url":"redis://..."}'

Everything in the extra config that is not SGLang's own (``backend_name``, ``module_path``,
``class_name``, ``interface_v1``, ...) is kvlayer configuration: any ``KVLayerConfig`` field, plus
``model`` / ``model_fingerprint`` (overrides the fingerprint, which by default is derived from
SGLang's model name/path, ``revision`` and the KV dtype by ``kvlayer.connectors.core.engine_spec``,
as for the vLLM connector) and ``config_file`` (a kvlayer YAML/TOML/JSON file; ``KVLAYER_*`` env
vars apply as usual, the extra config wins).

Why it is built this way:
- The store is created when SGLang registers the host pool, because only the pool knows layers,
  heads, head dim, dtype and page size. The KVSpec is built from those plus the model and TP
  shard, never from the pool layout: a page is stored as kvlayer's canonical chunk (see
  ``layout.py``), so the namespace, the keys and the bytes are the same for every layout, and
  lossless or quantized codecs apply per tier as configured.
- MLA KV is replicated on every TP rank: the spec uses tp_rank 0 of 1 so all ranks share one
  copy, and only SGLang's storage-writer rank writes (others answer "done", as SGLang's own
  backup skip does).
- Keys: see ``keys.py``. SGLang's page hashes carry no namespace; kvlayer binds each one to the
  model namespace (``kvlayer.keys.bind``). kvlayer's own prefix keys bind the very same token chain,
  so with the same model and SGLang's page size = kvlayer's ``chunk_size``, a page stock SGLang
  stores (it passes only page hashes) is a hit for the vLLM connector and the other way round,
  through any shared tier. Token ids, when a caller passes them in
  ``HiCacheStorageExtraInfo.extra_info["token_ids"]``, are only checked against the hashes; the
  keys are the same either way.
- Nothing raises into SGLang once attached (``kvlayer.connectors.core.FailureGuard``): a failing
  tier, a corrupt blob, a wrong-shaped chunk or a bug here turns into ``False`` entries / 0 hits /
  None and a counted error, logged once per burst. Bad
  configuration (unknown setting, unsupported pool dtype or layout) fails the attach instead,
  with the reason, because a silently disabled cache is worse than a clear start-up error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from kvlayer.config import KVLayerConfig
from kvlayer.engine import KVCache
from kvlayer.errors import ConfigError
from kvlayer.spec import KVSpec

from ..core import (
    AdapterOptions,
    Counters,
    FailureGuard,
    apply_log_level,
    engine_spec,
    split_extra_config,
    with_model_rope,
)
from .keys import KeyMapper
from .layout import PageIndexError, PageLayout

log = logging.getLogger("kvlayer.sglang")
T = TypeVar("T")

#: Extra-config keys that belong to SGLang (its factory and controller), not to kvlayer.
SGLANG_KEYS = frozenset({
    "backend_name", "module_path", "class_name", "interface_v1", "interface_v2",
    "prefetch_threshold", "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
    "hicache_storage_pass_prefix_keys", "tp_lcm_size",
})


class BackendOptions(AdapterOptions):
    """Extra-config keys this backend reads itself (``model_fingerprint`` as in the vLLM connector)."""

    #: Same as ``model_fingerprint`` (the older name).
    model: str | None = None
    #: Model revision, part of the default fingerprint (SGLang's config does not carry it).
    revision: str | None = None


@dataclass
class BackendCounters(Counters):
    get_pages: int = 0
    get_hits: int = 0
    set_pages: int = 0
    set_written: int = 0
    set_skipped_present: int = 0
    set_skipped_non_writer: int = 0  # MLA replicas: the writer rank stores the same bytes
    exists_calls: int = 0


_METRICS_KEEP = 4096


def _local_hf_config(model: str) -> Any:
    """The model's transformers config when it is on this machine (SGLang hands storage backends
    only the model's name or path), else None: without it keys are quantized as stored."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model, local_files_only=True)
        return getattr(cfg, "get_text_config", lambda: cfg)()
    except Exception as e:  # no config here: not an error, only no RoPE-aware key quantization
        log.debug("kvlayer: no local config for %s (%s); int codecs quantize keys as stored", model, e)
        return None


class KVLayerStore(HiCacheStorage):
    """HiCache L3 backend over ``kvlayer.KVCache`` (interface_v1 zero-copy + legacy calls)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        extra = dict(storage_config.extra_config or {})
        self.interface_v1 = bool(extra.get("interface_v1", 0))
        config, options = split_extra_config(extra, BackendOptions, engine_keys=SGLANG_KEYS)
        apply_log_level(config)
        self.model_override: str | None = options.model or options.model_fingerprint or None
        self.model_name: str | None = storage_config.model_name
        if config.rope_theta is None and self.model_name:
            config = with_model_rope(config, _local_hf_config(self.model_name))
        self.config: KVLayerConfig = config
        self.revision: str | None = options.revision
        if not (self.model_override or self.model_name):
            raise ConfigError("kvlayer SGLang backend: no model fingerprint; set \"model\" in "
                              "--hicache-storage-backend-extra-config (or serve a named model)")
        self.is_writer = bool(getattr(storage_config, "is_storage_writer", True))
        self.cache: KVCache | None = None
        self.layout: PageLayout | None = None
        self.mapper: KeyMapper | None = None
        self.spec: KVSpec | None = None
        self._lock = threading.Lock()
        self._prefetch_pgs: deque[int] = deque(maxlen=_METRICS_KEEP)
        self._backup_pgs: deque[int] = deque(maxlen=_METRICS_KEEP)
        self._prefetch_bw: deque[float] = deque(maxlen=_METRICS_KEEP)
        self._backup_bw: deque[float] = deque(maxlen=_METRICS_KEEP)
        self.counters = BackendCounters()
        self.guard = FailureGuard(log, "SGLang backend")

    # ------------------------------------------------------------------ attach
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Build the layout adapter, the KVSpec and the store for this host pool."""
        super().register_mem_pool_host(mem_pool_host)
        layout = PageLayout(mem_pool_host)
        g = layout.geometry
        sc = self.storage_config
        extra: list[tuple[str, str]] = []
        if sc.pp_size > 1:
            extra.append(("pp", f"{sc.pp_rank}/{sc.pp_size}"))
        if getattr(sc, "attn_cp_size", 1) > 1:
            extra.append(("attn_cp", f"{sc.attn_cp_rank}/{sc.attn_cp_size}"))
        tp_rank, tp_size = (0, 1) if g.is_mla else (sc.tp_rank, sc.tp_size)
        spec = engine_spec(model=str(self.model_name), revision=self.revision, dtype=g.dtype, num_layers=g.num_layers,
                           num_kv_heads=g.num_kv_heads, head_dim=g.head_dim, tp_rank=tp_rank, tp_size=tp_size,
                           is_mla=g.is_mla, extra=extra, fingerprint=self.model_override)
        if "chunk_size" in (sc.extra_config or {}) and self.config.chunk_size != g.page_size:
            log.warning("kvlayer chunk_size %d != SGLang page size %d: one page is one chunk, using %d",
                        self.config.chunk_size, g.page_size, g.page_size)
        cache = KVCache(spec, self.config, chunk_size=g.page_size)
        with self._lock:
            if self.cache is not None:
                self.cache.close()
            self.layout, self.cache, self.spec = layout, cache, cache.spec
            self.mapper = KeyMapper(cache.namespace, g.page_size)
        log.info("kvlayer SGLang backend: %s pool, %s, namespace %s, tiers %s", g.layout, spec.chunk_shape(g.page_size),
                 cache.namespace.hex()[:12], cache.tier_names)

    @property
    def ready(self) -> bool:
        return self.cache is not None

    # ------------------------------------------------------------------ failure isolation
    def _guard(self, op: str, fn: Callable[[], T], default: T) -> T:
        """``fn()`` once a pool is attached; never raises into SGLang."""
        if self.cache is None:
            return default
        return self.guard.call(op, fn, default, then="answered as a miss")

    def _count(self, **kw: int) -> None:
        self.counters.add(**kw)

    def kv_keys(self, keys: Sequence[str], extra_info: Any = None) -> list[str]:
        """The kvlayer keys the pages of ``keys`` are stored under (see ``keys.py``)."""
        assert self.mapper is not None, "no host pool registered"
        return self.mapper.map(keys, extra_info)

    # ------------------------------------------------------------------ interface_v1 (zero-copy)
    def batch_exists(self, keys: list[str], extra_info: Any = None) -> int:
        """Number of consecutive stored pages from the first one."""
        def run() -> int:
            self._count(exists_calls=1)
            return self.cache.cached_run(self.kv_keys(keys, extra_info))  # type: ignore[union-attr]

        return self._guard("batch_exists", run, 0)

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        """Load pages straight into the host pool; a page that fails is left untouched."""
        def run() -> list[bool]:
            t0 = time.perf_counter()
            layout = self.layout
            assert layout is not None and self.cache is not None
            if layout.page_count(host_indices) != len(keys):
                raise PageIndexError(f"{host_indices.numel()} host indices for {len(keys)} pages of {layout.page_size}")
            chunks = self.cache.retrieve_chunks(self.kv_keys(keys, extra_info))
            ok = layout.write(host_indices, chunks)
            hits = sum(ok)
            self._count(get_pages=len(keys), get_hits=hits)
            self._record(self._prefetch_pgs, self._prefetch_bw, hits, t0)
            return ok

        return self._guard("batch_get_v1", run, [False] * len(keys))

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor, extra_info: Any = None) -> list[bool]:
        """Store pages read straight from the host pool; already stored pages are not rewritten."""
        if not self.is_writer:  # MLA replica: the writer rank stores the same bytes
            self._count(set_skipped_non_writer=len(keys))
            return [True] * len(keys)

        def run() -> list[bool]:
            t0 = time.perf_counter()
            layout, cache = self.layout, self.cache
            assert layout is not None and cache is not None
            n = layout.page_count(host_indices)
            if n != len(keys):
                raise PageIndexError(f"{host_indices.numel()} host indices for {len(keys)} pages of {layout.page_size}")
            kk = self.kv_keys(keys, extra_info)
            where = cache.locate(kk)
            todo = [i for i, w in enumerate(where) if w is None]
            ok = [w is not None for w in where]
            if todo:
                sub = host_indices.reshape(n, layout.page_size)[todo].reshape(-1)
                for i, chunk in zip(todo, layout.read(sub), strict=True):
                    ok[i] = cache.store_chunks([kk[i]], [chunk]) > 0
            written = sum(ok[i] for i in todo)
            self._count(set_pages=n, set_written=written, set_skipped_present=n - len(todo))
            self._record(self._backup_pgs, self._backup_bw, written, t0)
            return ok

        return self._guard("batch_set_v1", run, [False] * len(keys))

    # ------------------------------------------------------------------ v2 (hybrid models): not supported
    # Hybrid models (Mamba/SWA state, DSA indexer sidecars) use SGLang's multi-pool v2 calls. Their
    # extra pools have no canonical chunk form here yet, so these answer "nothing stored / not
    # written" instead of SGLang's NotImplementedError: L3 is then simply idle for such models.
    def batch_exists_v2(self, keys: list[str], pool_transfers: Any = None, extra_info: Any = None) -> Any:
        from sglang.srt.mem_cache.hicache_storage import PoolTransferResult

        return PoolTransferResult.empty()

    def batch_get_v2(self, transfers: Any, extra_info: Any = None) -> dict[str, list[bool]]:
        return {t.name: [False] * len(t.keys or []) for t in transfers or []}

    def batch_set_v2(self, transfers: Any, extra_info: Any = None) -> dict[str, list[bool]]:
        return {t.name: [False] * len(t.keys or []) for t in transfers or []}

    # ------------------------------------------------------------------ legacy (flat pages in pool order)
    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        """One page as SGLang's ``get_data_page(flat=True)`` would give it, into ``target_location``."""
        def run() -> torch.Tensor | None:
            assert self.layout is not None and self.cache is not None
            chunk = self.cache.retrieve_chunks(self.kv_keys([key]))[0]
            self._count(get_pages=1)
            if chunk is None or tuple(chunk.shape) != self.layout.chunk_shape:
                return None
            flat = self.layout.chunk_to_flat(chunk)
            self._count(get_hits=1)
            if isinstance(target_location, torch.Tensor):
                if target_location.numel() != flat.numel():
                    raise PageIndexError(f"target holds {target_location.numel()} elements, page has {flat.numel()}")
                target_location.view(-1).copy_(flat)
                return target_location
            return flat

        return self._guard("get", run, None)

    def batch_get(self, keys: list[str], target_locations: Any = None, target_sizes: Any = None) -> list[torch.Tensor | None]:
        targets = list(target_locations) if target_locations is not None else [None] * len(keys)
        return [self.get(k, t) for k, t in zip(keys, targets, strict=False)]

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        """Store one flat page in the pool's native order (``get_data_page(flat=True)``)."""
        if not self.is_writer:
            self._count(set_skipped_non_writer=1)
            return True

        def run() -> bool:
            assert self.layout is not None and self.cache is not None
            if not isinstance(value, torch.Tensor):
                raise PageIndexError(f"set needs a tensor page, got {type(value).__name__}")
            kk = self.kv_keys([key])
            self._count(set_pages=1)
            if self.cache.locate(kk)[0] is not None:
                self._count(set_skipped_present=1)
                return True
            stored = self.cache.store_chunks(kk, [self.layout.flat_to_chunk(value)]) > 0
            self._count(set_written=int(stored))
            return stored

        return self._guard("set", run, False)

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None, target_sizes: Any = None) -> bool:
        if values is None:
            return False
        return all([self.set(k, v) for k, v in zip(keys, values, strict=False)]) and len(values) == len(keys)

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # ------------------------------------------------------------------ management
    def clear(self) -> bool:
        """Remove every chunk from every tier of this store (shared tiers included)."""
        def run() -> bool:
            self.cache.clear()  # type: ignore[union-attr]
            return True

        return self._guard("clear", run, False)

    def _record(self, pgs: deque[int], bw: deque[float], pages: int, t0: float) -> None:
        if pages <= 0 or self.layout is None:
            return
        dt = max(time.perf_counter() - t0, 1e-9)
        g = self.layout.geometry
        nbytes = pages * g.page_size * g.num_layers * (1 if g.is_mla else 2) * g.num_kv_heads * g.head_dim \
            * torch.empty((), dtype=g.dtype).element_size()
        with self._lock:
            pgs.append(pages)
            bw.append(nbytes / dt / 1e9)

    def get_stats(self) -> Any:
        """SGLang's ``StorageMetrics`` since the previous call (pages per op, GB/s of KV per op)."""
        try:
            from sglang.srt.observability.metrics_collector import StorageMetrics
        except Exception:
            return None
        m = StorageMetrics()
        with self._lock:
            m.prefetch_pgs.extend(self._prefetch_pgs)
            m.backup_pgs.extend(self._backup_pgs)
            m.prefetch_bandwidth.extend(self._prefetch_bw)
            m.backup_bandwidth.extend(self._backup_bw)
            for d in (self._prefetch_pgs, self._backup_pgs, self._prefetch_bw, self._backup_bw):
                d.clear()
        return m

    def kvlayer_stats(self) -> dict[str, Any]:
        """kvlayer's own view: store and per-tier counters plus this backend's."""
        out: dict[str, Any] = {"backend": {"errors": self.guard.total, **self.counters.as_dict()}}
        if self.mapper is not None:
            out["backend"]["token_mapped_pages"] = self.mapper.token_mapped
            out["backend"]["token_rejected_pages"] = self.mapper.token_rejected
        if self.cache is not None:
            empty: dict[str, Any] = {}
            out.update(self._guard("stats", self.cache.stats, empty))
        return out

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for write-through copies to lower tiers (tests, shutdown)."""
        return self._guard("flush", lambda: self.cache.flush(timeout), False)  # type: ignore[union-attr]

    def close(self) -> None:
        with self._lock:
            cache, self.cache = self.cache, None
        if cache is not None:
            try:
                cache.close()
            except Exception as e:
                log.warning("kvlayer SGLang backend: close failed (%s: %s)", type(e).__name__, e)
