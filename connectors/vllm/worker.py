"""Worker side: copy whole blocks between vLLM's paged cache and kvlayer chunks.

Loads run in ``start_load_kv`` (before the forward pass: the scheduler marks them synchronous);
a chunk that cannot be read (missing, corrupt, tier down) marks its blocks and every later block
of that request as failed, which vLLM then recomputes. Saves run in ``wait_for_save`` after the
forward pass: the hottest tier takes the chunk synchronously (a memcpy), slower tiers get it from
the store's bounded background writer, which drops and counts instead of blocking.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from kvlayer.engine import KVCache

from ..core import FailureGuard, LayoutError
from .layout import Adapter, Layout, make_adapter, probe_layout, table_layout
from .metadata import ConnectorMeta, KVLayerWorkerMeta, LoadOp
from .stats import WorkerCounters

log = logging.getLogger("kvlayer.vllm")


class WorkerSide:
    """The worker-side connector's state and copies; vLLM's calls arrive through
    ``KVLayerConnector``, which guards them."""

    def __init__(self, cache: KVCache, *, block_size: int, num_blocks: int, layer_names: list[str],
                 guard: FailureGuard | None = None) -> None:
        self.cache = cache
        self.counters = WorkerCounters()
        self.guard = guard or FailureGuard(log, "vLLM worker")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layer_names = layer_names
        self.adapter: Adapter | None = None
        self._errors: set[int] = set()
        self._stored: list[str] = []
        self._missing: list[str] = []
        self.load_seconds = 0.0
        self.save_seconds = 0.0
        # The hottest tier takes saves synchronously; when that is not process memory (e.g. only
        # Redis or a remote server is configured), saves go to one background thread instead,
        # with a byte bound: beyond it they are dropped and counted, never waited for.
        self._async_saves = not cache.top_tier_in_process
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvlayer-save") if self._async_saves else None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._pending_limit = int(cache.config.write_queue_bytes)

    # ------------------------------------------------------------------ setup
    def register(self, kv_caches: dict[str, torch.Tensor], forward_context: dict[str, Any], backend: str) -> Layout:
        names = [n for n in self.layer_names if n in kv_caches] or list(kv_caches)
        if len(names) != self.cache.spec.num_layers:
            raise LayoutError(f"vLLM registered {len(names)} KV layers, the spec has {self.cache.spec.num_layers}")
        caches = [kv_caches[n] for n in names]
        spec = self.cache.spec
        geom = dict(num_blocks=self.num_blocks, block_size=self.block_size, num_heads=spec.num_kv_heads,
                    head_dim=spec.head_dim)
        layer = forward_context.get(names[0])
        try:
            layout = probe_layout(layer, caches[0], **geom)
        except Exception as e:
            log.warning("kvlayer: probing the %s KV layout failed (%s: %s); trying the known-layout table",
                        backend, type(e).__name__, e)
            layout = table_layout(backend, caches[0], **geom)
        for kv in caches[1:]:
            if kv.shape != caches[0].shape or kv.stride() != caches[0].stride() or kv.dtype != caches[0].dtype:
                raise LayoutError("KV layers differ in shape/stride/dtype; one layout per model is supported")
        if caches[0].dtype != spec.torch_dtype:
            raise LayoutError(f"KV cache dtype {caches[0].dtype} != spec dtype {spec.torch_dtype}")
        self.adapter = make_adapter(caches, layout)
        log.info("kvlayer: %d KV layers, layout %s", len(caches), layout.describe())
        return layout

    # ------------------------------------------------------------------ load
    def start_load(self, meta: ConnectorMeta) -> None:
        if self.adapter is None or not meta.loads:
            return
        t0 = time.perf_counter()
        for op in meta.loads:
            self._load_guarded(op)
        self.load_seconds += time.perf_counter() - t0

    def _load_guarded(self, op: LoadOp) -> None:
        """Load one request's chunks; whatever fails is recomputed, and the pin always goes."""
        self.guard.call("load", lambda: self._load_one(op), None, then="its blocks are recomputed",
                        on_error=lambda _e: self._fail(op, 0))
        lease = op.lease
        if lease:
            self.guard.call("unpin", lambda: self.cache.unpin(lease), 0, then="the pin expires by its TTL")

    def _load_one(self, op: LoadOp) -> None:
        assert self.adapter is not None
        chunks = self.cache.retrieve_chunks(op.keys)
        c = self.cache.chunk_size
        for i, chunk in enumerate(chunks):
            if chunk is None or chunk.shape[2] != c:
                self._missing.extend(op.keys[i:])
                self._fail(op, i)
                return
            skip = op.skips[i]
            blocks = op.blocks[i][skip:]
            if blocks:
                bs = self.block_size
                self.adapter.scatter(blocks, chunk[:, :, skip * bs:(skip + len(blocks)) * bs])
            self.counters.add(loaded_chunks=1, loaded_tokens=len(blocks) * self.block_size)

    def _fail(self, op: LoadOp, first: int) -> None:
        bad = [b for i in range(first, len(op.blocks)) for b in op.blocks[i][op.skips[i]:]]
        self._errors.update(bad)
        self.counters.add(load_errors=len(op.blocks) - first, error_blocks=len(bad))

    def take_worker_meta(self) -> KVLayerWorkerMeta | None:
        if not self._stored and not self._missing:
            return None
        meta = KVLayerWorkerMeta(self._stored, self._missing)
        self._stored, self._missing = [], []
        return meta

    def take_load_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out

    # ------------------------------------------------------------------ save
    def save(self, meta: ConnectorMeta) -> None:
        if self.adapter is None or not meta.saves:
            return
        t0 = time.perf_counter()
        # a failed save is a future miss, nothing more
        self.guard.call("save", lambda: self._save(meta), None, then="a future miss",
                        on_error=lambda _e: self.counters.add(save_errors=1))
        self.save_seconds += time.perf_counter() - t0

    def _save(self, meta: ConnectorMeta) -> None:
        assert self.adapter is not None
        ops = meta.saves
        where = self.cache.locate([op.key for op in ops])
        keys, chunks, seen = [], [], set()
        for op, w in zip(ops, where, strict=True):
            if w is not None or op.key in seen:
                self.counters.add(skipped_saves=1)
                continue
            seen.add(op.key)
            keys.append(op.key)
            chunks.append(self.adapter.gather(op.blocks))
        if keys:
            self._store(keys, chunks)
        self._stored.extend(keys + [op.key for op, w in zip(ops, where, strict=True) if w is not None])

    def _store(self, keys: list[str], chunks: list[torch.Tensor]) -> None:
        if self._pool is None:
            self.cache.store_chunks(keys, chunks, block=False)
            self.counters.add(saved_chunks=len(keys))
            return
        nbytes = sum(c.numel() * c.element_size() for c in chunks)
        with self._pending_lock:
            if self._pending + nbytes > self._pending_limit and self._pending > 0:
                self.counters.add(dropped_saves=len(keys))
                return
            self._pending += nbytes

        def put() -> None:
            self.cache.store_chunks(keys, chunks, block=False)
            self.counters.add(saved_chunks=len(keys))

        def run() -> None:
            self.guard.call("background save", put, None, then="a future miss",
                            on_error=lambda _e: self.counters.add(save_errors=1))
            with self._pending_lock:
                self._pending -= nbytes

        self._pool.submit(run)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
