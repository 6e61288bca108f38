"""KVLayerConnector: kvlayer as a vLLM v1 KV connector.

    --kv-transfer-config '{"kv_connector":"KVLayerConnector",
        "kv_connector_module_path":"kvlayer.connectors.vllm","kv_role":"kv_both",
        "kv_connector_extra_config":{"chunk_size":256,"cpu_bytes":"4GiB","disk_path":"/var/cache/kv"}}'

vLLM builds one instance per role: the scheduler side decides (lookup, pins, per-request state),
the worker side copies blocks; in one process the two share their engine's KVCache (``pair.py``).
Configuration errors fail at start-up with a clear message; at run time every call from vLLM goes
through the connector's ``FailureGuard`` (``kvlayer.connectors.core``), so nothing raises into the
engine: store failures become misses, recomputes or dropped saves.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvlayer.engine import KVCache

from ..core import FailureGuard, apply_log_level, with_model_rope
from . import pair as pairs
from .config import build_spec, check_chunk_size, parse_extra_config
from .metadata import ConnectorMeta
from .roles import parse_role
from .scheduler import SchedulerSide
from .telemetry import SchedulerTelemetry, WorkerTelemetry, events_enabled
from .worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
    from vllm.forward_context import ForwardContext

    from .events import KVLayerKVEvents

log = logging.getLogger("kvlayer.vllm")

_SOURCES = {"memory": CacheHitSource.HOST, "disk": CacheHitSource.DISK}


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:
        return 0


class KVLayerConnector(KVConnectorBase_V1):
    """vLLM v1 connector backed by a kvlayer ``KVCache``. ``stats()`` reports its counters."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self.config, self.options = parse_extra_config(dict(ktc.kv_connector_extra_config or {}))
        self.config = with_model_rope(self.config, getattr(vllm_config.model_config, "hf_text_config", None))
        apply_log_level(self.config)
        self.kv_role = parse_role(ktc.kv_role)  # prefill/decode disaggregation: roles.py
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
        self.guard = FailureGuard(log, f"vLLM {role.name.lower()}")
        self.pair = pairs.join(str(ktc.engine_id), self.spec, self.config)
        self.cache: KVCache = self.pair.cache
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self.sched_telemetry: SchedulerTelemetry | None = None  # vLLM's metrics and KV events (telemetry.py)
        self.worker_telemetry: WorkerTelemetry | None = None
        if role == KVConnectorRole.SCHEDULER:
            remote = not self.pair.has_local_worker
            self.scheduler = SchedulerSide(self.cache, self.options, block_size=self.block_size,
                                           remote_worker=remote, guard=self.guard, role=self.kv_role)
            self.pair.scheduler = self.scheduler
            self.sched_telemetry = SchedulerTelemetry(self.scheduler, self.guard)
            if remote:
                log.info("kvlayer: vLLM's worker runs in another process; hits are tracked from its reports")
        else:
            layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
            self.worker = WorkerSide(self.cache, block_size=self.block_size, num_blocks=int(kv_cache_config.num_blocks),
                                     layer_names=layer_names, guard=self.guard, options=self.options,
                                     role=self.kv_role)
            self.pair.worker = self.worker
            self.worker_telemetry = WorkerTelemetry(self.worker, self.cache, events=events_enabled(vllm_config))
        self._closed = False
        log.info("kvlayer connector (%s): chunk %d tokens, tiers %s, namespace %s", role.name, self.config.chunk_size,
                 self.cache.tier_names, self.cache.namespace.hex()[:12])

    def stats(self) -> dict[str, Any]:
        """Counters of this connector and, when vLLM runs both in this process, of its other half
        (scheduler / worker), plus the store's stats: ``{"connector": {...}, "store": {...}, ...}``."""
        return self.pair.stats()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every save queued so far is in the store (the worker of this process)."""
        worker = self.worker or self.pair.worker
        return worker.flush(timeout) if worker is not None else self.cache.flush(timeout)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a future miss, never a lost hand-off

    # ============================================================== worker side
    # Every call from vLLM goes through self.guard: kvlayer never raises into the engine.
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        worker = self.worker
        assert worker is not None
        ctx = self._vllm_config.compilation_config.static_forward_context
        first = next(iter(kv_caches))
        backend = type(getattr(ctx.get(first), "impl", None)).__name__

        def inactive(_e: Exception) -> None:
            worker.adapter = None

        # Unknown layout: serve without kvlayer rather than corrupt the cache.
        self.guard.call(f"mapping the {backend} KV cache layout", lambda: worker.register(kv_caches, ctx, backend),
                        None, then="the connector stays inactive", on_error=inactive, level=logging.ERROR)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        worker = self.worker
        if worker is not None and isinstance(connector_metadata, ConnectorMeta):
            self.guard.call("step timing", lambda: worker.begin_step(connector_metadata), None)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        worker, meta = self.worker, self._worker_meta()
        if worker is not None and meta is not None:
            self.guard.call("start_load_kv", lambda: worker.start_load(meta), None, then="its blocks are recomputed")

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # synchronous loads complete in start_load_kv (layer-wise measured slower: docs/vllm_layerwise.md)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole chunks are gathered after the step, in wait_for_save (docs/vllm_layerwise.md)

    def wait_for_save(self) -> None:
        worker, meta = self.worker, self._worker_meta()
        if worker is not None and meta is not None:
            self.guard.call("wait_for_save", lambda: worker.save(meta), None, then="a future miss")

    def _worker_meta(self) -> ConnectorMeta | None:
        if self.worker is None or not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, ConnectorMeta) else None

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        worker = self.worker
        if worker is None:
            return None, None
        nothing: tuple[set[str] | None, set[str] | None] = (None, None)
        return self.guard.call("get_finished", lambda: worker.get_finished(finished_req_ids), nothing)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> Any:
        meta = self.worker.take_worker_meta() if self.worker is not None else None
        if self.worker_telemetry is not None and meta is not None:
            self.worker_telemetry.on_worker_meta(meta)
        return meta

    # ============================================================== vLLM's metrics and KV events
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self.worker_telemetry or self.sched_telemetry
        return self.guard.call("stats", side.stats, None) if side is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        from .metrics import KVLayerConnectorStats

        return KVLayerConnectorStats(data=data) if data is not None else KVLayerConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics | None:
        from .metrics import KVLayerPromMetrics

        return KVLayerPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_kv_connector_kv_cache_events(self) -> KVLayerKVEvents | None:
        tel = self.worker_telemetry
        return self.guard.call("events", tel.take_events, None) if tel is not None else None

    def take_events(self) -> list[KVCacheEvent]:
        tel = self.sched_telemetry
        return tel.events.take() if tel is not None else []

    def shutdown(self) -> None:
        self.close()

    # ============================================================== scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        sched = self.scheduler
        if sched is None:
            return 0, False
        miss: tuple[int | None, bool] = (0, False)
        return self.guard.call("lookup", lambda: sched.get_num_new_matched_tokens(request, num_computed_tokens),
                               miss, then="treated as a miss")

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        sched, tel = self.scheduler, self.sched_telemetry
        if sched is not None:
            before = tel.hit_tokens() if tel is not None else 0
            self.guard.call("update_state_after_alloc",
                            lambda: sched.update_state_after_alloc(request, blocks, num_external_tokens), None,
                            then="nothing is loaded for the request",
                            on_error=lambda _e: sched.abandon_claim(request, num_external_tokens))
            if tel is not None:
                tel.record_hits(request, before)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        sched = self.scheduler
        if sched is None or num_external_tokens <= 0:
            return {}

        def sources() -> dict[CacheHitSource, int]:
            out: dict[CacheHitSource, int] = {}
            kinds = {t.name: t.kind for t in self.config.tier_configs()}
            for name, n in sched.hit_sources(request, num_external_tokens).items():
                src = _SOURCES.get(kinds.get(name, ""), CacheHitSource.EXTERNAL_UNSPECIFIED)
                out[src] = out.get(src, 0) + n
            if sum(out.values()) != num_external_tokens:
                return {CacheHitSource.HOST: num_external_tokens}
            return out

        return self.guard.call("hit sources", sources, {CacheHitSource.HOST: num_external_tokens})

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMeta:
        sched = self.scheduler
        if sched is None:
            return ConnectorMeta()
        return self.guard.call("build_connector_meta", lambda: sched.build_connector_meta(scheduler_output),
                               ConnectorMeta(), then="no loads or saves this step")

    def update_connector_output(self, connector_output: Any) -> None:
        sched = self.scheduler
        if sched is not None:
            report = getattr(connector_output, "kv_connector_worker_meta", None)
            self.guard.call("worker report", lambda: sched.on_worker_meta(report), None, then="report ignored")
        tel = self.sched_telemetry
        if tel is not None:
            self.guard.call("worker events", lambda: tel.on_output(connector_output), None, then="events lost")

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """True keeps the request's blocks until the worker has gathered its last partial chunk
        (``save_generated``), or, in a producer, until its saves are written (``roles.py``: its
        output then carries the hand-off params); ``get_finished`` reports it in ``finished_sending``."""
        sched = self.scheduler
        if sched is None:
            return False, None
        keep: tuple[bool, dict[str, Any] | None] = (False, None)
        return self.guard.call("request_finished", lambda: sched.finish(request, block_ids), keep)

    def reset_cache(self) -> bool | None:
        """``LLM.reset_prefix_cache(reset_connector=True)``: empty kvlayer's store too."""
        def reset() -> bool:
            self.cache.clear()
            if self.scheduler is not None:
                # the worker's own store may live in another process and is not cleared from here
                self.scheduler.index.clear()
            return True

        return self.guard.call("reset", reset, False, then="store kept")

    # ============================================================== lifecycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.scheduler is not None:
            self.scheduler.reset()
            self.pair.scheduler = None
        if self.worker_telemetry is not None:
            self.worker_telemetry.close()
        if self.worker is not None:
            self.worker.close()
            self.pair.worker = None
        pairs.leave(self.pair)
