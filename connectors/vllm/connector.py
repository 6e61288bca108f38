"""KVLayerConnector: kvlayer as a vLLM v1 KV connector.

    --kv-transfer-config '{"kv_connector":"KVLayerConnector",
        "kv_connector_module_path":"kvlayer.connectors.vllm","kv_role":"kv_both",
        "kv_connector_extra_config":{"chunk_size":256,"cpu_bytes":"4GiB","disk_path":"/var/cache/kv"}}'

vLLM builds one instance per role: the scheduler side decides (lookup, pins, per-request state),
the worker side copies blocks. Configuration errors fail at start-up with a clear message; at run
time nothing raises into the engine: store failures become misses, recomputes or dropped saves.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvlayer.engine import KVCache

from . import store
from .config import build_spec, check_chunk_size, parse_extra_config
from .metadata import ConnectorMeta
from .scheduler import SchedulerSide
from .stats import COUNTERS
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext

log = logging.getLogger("kvlayer.vllm")

_SOURCES = {"memory": CacheHitSource.HOST, "disk": CacheHitSource.DISK}

#: Live connectors of this process (tests and the demo read their state).
LIVE: list[KVLayerConnector] = []


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:
        return 0


class KVLayerConnector(KVConnectorBase_V1):
    """vLLM v1 connector backed by a kvlayer ``KVCache``."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self.config, self.options = parse_extra_config(dict(ktc.kv_connector_extra_config or {}))
        self.block_size = int(vllm_config.cache_config.block_size)
        check_chunk_size(self.config.chunk_size, self.block_size)
        if self.options.recompute_on_load_failure and getattr(ktc, "kv_load_failure_policy", None) == "fail":
            # A kvlayer miss at load time must cost a recompute, never a failed request.
            try:
                ktc.kv_load_failure_policy = "recompute"
            except Exception:  # frozen config: keep vLLM's policy
                log.warning("kvlayer: set kv_load_failure_policy='recompute' so failed loads are recomputed")
        tp_rank = _tp_rank() if role == KVConnectorRole.WORKER else 0
        self.spec = build_spec(vllm_config, kv_cache_config, self.options, tp_rank=tp_rank)
        self._is_worker = role == KVConnectorRole.WORKER
        self.cache: KVCache = store.acquire(self.spec, self.config, worker=self._is_worker)
        self.counters = COUNTERS
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            remote = not store.has_local_worker(self.cache)
            self.scheduler = SchedulerSide(self.cache, self.options, self.counters, block_size=self.block_size,
                                           remote_worker=remote)
            if remote:
                log.info("kvlayer: vLLM's worker runs in another process; hits are tracked from its reports")
        else:
            layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
            self.worker = WorkerSide(self.cache, self.counters, block_size=self.block_size,
                                     num_blocks=int(kv_cache_config.num_blocks), layer_names=layer_names)
        self._closed = False
        LIVE.append(self)
        log.info("kvlayer connector (%s): chunk %d tokens, tiers %s, namespace %s", role.name, self.config.chunk_size,
                 [t.name for t in self.config.tier_configs()], self.cache.namespace.hex()[:12])

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never a lost hand-off

    # ============================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        ctx = self._vllm_config.compilation_config.static_forward_context
        first = next(iter(kv_caches))
        layer = ctx.get(first)
        backend = type(getattr(layer, "impl", None)).__name__
        try:
            self.worker.register(kv_caches, ctx, backend)
        except Exception as e:
            # Unknown layout: serve without kvlayer rather than corrupt the cache.
            log.error("kvlayer: cannot map the %s KV cache layout (%s); the connector stays inactive", backend, e)
            self.worker.adapter = None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self.worker is not None and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, ConnectorMeta):
                self.worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete in start_load_kv, before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole chunks are saved after the step, in wait_for_save

    def wait_for_save(self) -> None:
        if self.worker is not None and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, ConnectorMeta):
                self.worker.save(meta)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> Any:
        return self.worker.take_worker_meta() if self.worker is not None else None

    def shutdown(self) -> None:
        self.close()

    # ============================================================== scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.scheduler is None:
            return 0, False
        try:
            return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        except Exception as e:
            log.warning("kvlayer: lookup failed (%s: %s); treating as a miss", type(e).__name__, e)
            return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self.scheduler is not None:
            self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        if self.scheduler is None or num_external_tokens <= 0:
            return {}
        out: dict[CacheHitSource, int] = {}
        by_tier = self.scheduler.hit_sources(request, num_external_tokens)
        kinds = {t.name: t.kind for t in self.config.tier_configs()}
        for name, n in by_tier.items():
            src = _SOURCES.get(kinds.get(name, ""), CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[src] = out.get(src, 0) + n
        if sum(out.values()) != num_external_tokens:
            return {CacheHitSource.HOST: num_external_tokens}
        return out

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMeta:
        if self.scheduler is None:
            return ConnectorMeta()
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        if self.scheduler is not None:
            try:
                self.scheduler.on_worker_meta(getattr(connector_output, "kv_connector_worker_meta", None))
            except Exception as e:
                log.warning("kvlayer: ignoring worker report (%s: %s)", type(e).__name__, e)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self.scheduler is not None:
            self.scheduler.request_finished(request)
        return False, None

    def reset_cache(self) -> bool | None:
        """``LLM.reset_prefix_cache(reset_connector=True)``: empty kvlayer's store too."""
        try:
            self.cache.clear()
            if self.scheduler is not None and self.scheduler.remote is not None:
                # the worker's own store lives in another process and is not cleared from here
                self.scheduler.remote.clear()
            return True
        except Exception as e:
            log.warning("kvlayer: reset failed: %s", e)
            return False

    # ============================================================== lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.scheduler is not None:
            self.scheduler.reset()
        if self.worker is not None:
            self.worker.close()
        store.release(self.cache, worker=self._is_worker)
        if self in LIVE:
            LIVE.remove(self)
