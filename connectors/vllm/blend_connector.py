"""KVLayerBlendConnector: kvlayer's vLLM connector plus CacheBlend (documents at any position).

    --kv-transfer-config '{"kv_connector":"KVLayerBlendConnector",
        "kv_connector_module_path":"kvlayer.connectors.vllm","kv_role":"kv_both",
        "kv_connector_extra_config":{"cpu_bytes":"4GiB","blend":{"enabled":true}}}'

Everything :class:`~.connector.KVLayerConnector` does (exact prefix loads and saves) stays as it
is; this subclass only routes blended requests (:class:`~.blend.BlendScheduler` claims them, the
prefix scheduler never sees them, so nothing blended is saved under prefix keys) and adds the
worker-side blend and document registration (:class:`~.blend.BlendWorker`) around the base
class's loads and saves. Every call is guarded: a blend failure is a recompute, never an error.
The serving model is reached through kvlayer's ``vllm.general_plugins`` entry point
(:mod:`.plugin`); see docs/blend_vllm.md.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .blend import BlendConnectorMeta, BlendOp, BlendScheduler, BlendWorker, DocOp
from .connector import KVLayerConnector
from .metadata import ConnectorMeta

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext

log = logging.getLogger("kvlayer.vllm")

#: an engine's connector pair (one KVCache) -> the blend sides of its halves in this process
_sides: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


class KVLayerBlendConnector(KVLayerConnector):
    """KVLayerConnector + CacheBlend; ``stats()["blend"]`` holds the blend counters."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.blend_scheduler: BlendScheduler | None = None
        self.blend_worker: BlendWorker | None = None
        opts = self.options.blend
        if role == KVConnectorRole.SCHEDULER:
            self.blend_scheduler = BlendScheduler(self.cache, opts, block_size=self.block_size)
        else:
            self.blend_worker = BlendWorker(self.cache, block_size=self.block_size, guard=self.guard)
        _sides.setdefault(self.pair, []).append(self.blend_scheduler or self.blend_worker)
        log.info("kvlayer blend (%s): %s", role.name, "on" if opts.enabled else "off (documents register only)")

    def stats(self) -> dict[str, Any]:
        """The base stats plus ``"blend"``: counters of both halves when vLLM runs them in this process."""
        out = super().stats()
        blend: dict[str, int] = {}
        for side in _sides.get(self.pair, []):
            for k, v in side.counters.as_dict().items():
                blend[k] = blend.get(k, 0) + v
        out["blend"] = blend
        return out

    # ============================================================== worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        super().register_kv_caches(kv_caches)
        bw, worker = self.blend_worker, self.worker
        if bw is None or worker is None:
            return
        ctx = self._vllm_config.compilation_config.static_forward_context
        self.guard.call("blend setup", lambda: bw.register(worker.adapter, [ctx[n] for n in kv_caches if n in ctx]),
                        None, then="blending off for this worker")

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        super().start_load_kv(forward_context, **kwargs)
        bw, meta = self.blend_worker, self._worker_meta()
        if bw is not None and meta is not None:
            self.guard.call("blend", lambda: bw.load(meta), None, then="the claimed blocks are recomputed")

    def wait_for_save(self) -> None:
        super().wait_for_save()
        bw, meta = self.blend_worker, self._worker_meta()
        if bw is not None and meta is not None:
            self.guard.call("register documents", lambda: bw.save(meta), None, then="documents not registered")

    def get_block_ids_with_load_errors(self) -> set[int]:
        out = set(super().get_block_ids_with_load_errors())
        if self.blend_worker is not None:
            out |= self.blend_worker.take_errors()
        return out

    # ============================================================== scheduler side
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        bs = self.blend_scheduler
        if bs is not None:
            claim = self.guard.call("blend lookup", lambda: bs.match(request, num_computed_tokens), None,
                                    then="not blended")
            if claim is not None:
                return claim, False
        return super().get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        bs = self.blend_scheduler
        if bs is not None and bs.owns(request):
            self.guard.call("blend alloc", lambda: bs.after_alloc(request, blocks, num_external_tokens), None)
            return
        super().update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        bs = self.blend_scheduler
        if bs is not None and num_external_tokens > 0 and bs.owns(request):
            return {CacheHitSource.HOST: num_external_tokens}
        return super().get_external_cache_hit_sources(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMeta:
        meta = super().build_connector_meta(scheduler_output)
        bs = self.blend_scheduler
        if bs is None:
            return meta
        none: tuple[list[DocOp], list[BlendOp]] = ([], [])
        docs, blends = self.guard.call("blend ops", lambda: bs.ops(scheduler_output), none,
                                       then="no blends or registrations this step")
        return BlendConnectorMeta.extend(meta, docs, blends)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        bs = self.blend_scheduler
        if bs is not None:
            self.guard.call("blend finished", lambda: bs.finished(request), None)
        return super().request_finished(request, block_ids)

    def close(self) -> None:
        sides = _sides.get(self.pair, [])
        for side in (self.blend_scheduler, self.blend_worker):
            if side in sides:
                sides.remove(side)
        super().close()
