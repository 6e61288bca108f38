"""Scheduler-side state: what to load for a request, what to save after each step.

Per request we keep the chained chunk keys of its tokens, its block ids, how many leading chunks
are already in the store or queued, and at most one load plan. A load plan holds a pin lease on
its chunks from allocation until the worker has loaded them, so an eviction cannot turn a claimed
hit into a failed load. Every piece of state is dropped when the request finishes, is aborted or
is preempted (a preempted request is looked up afresh when it resumes).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kvlayer.engine import KVCache
from kvlayer.keys import bind, chain_hash

from ..core import FailureGuard
from .config import ConnectorOptions
from .metadata import ConnectorMeta, LoadOp, SaveOp
from .stats import SchedulerCounters

log = logging.getLogger("kvlayer.vllm")


@dataclass
class LoadPlan:
    first_chunk: int
    keys: list[str]
    start_token: int  # first token to load (block aligned: vLLM's own prefix hit ends here)
    end_token: int  # exclusive; at most len(prompt) - 1, may end inside a block
    tiers: list[str]
    lease: str | None = None
    emitted: bool = False


@dataclass
class ReqState:
    req_id: str
    request: Any
    keys: list[str] = field(default_factory=list)  # full chunks of the tokens seen so far
    parent: bytes = b""  # d_i of the last full chunk (the token chain, kvlayer.keys.token_chain)
    namespace: bytes = b""  # what keys are bound to: the cache's namespace, salted per request
    stored_chunks: int = 0  # leading chunks that are in the store or queued for saving
    block_ids: list[int] = field(default_factory=list)
    hit_tokens: int = 0
    hit_tiers: list[str] = field(default_factory=list)
    load: LoadPlan | None = None
    # multimodal / LoRA / embeddings, or a request that opted out with
    # SamplingParams(extra_args={"kv_transfer_params": {"kvlayer_skip": True}}): never load or save
    skip: bool = False


class SchedulerSide:
    """The scheduler-side connector's state and decisions; vLLM's calls arrive through
    ``KVLayerConnector``, which guards them (nothing here needs to catch for the engine's sake)."""

    def __init__(self, cache: KVCache, options: ConnectorOptions, *, block_size: int, remote_worker: bool = False,
                 guard: FailureGuard | None = None) -> None:
        self.cache = cache
        self.options = options
        self.counters = SchedulerCounters()
        self.guard = guard or FailureGuard(log, "vLLM scheduler")
        self.block_size = block_size
        self.chunk_size = cache.chunk_size
        self.blocks_per_chunk = self.chunk_size // block_size
        self._reqs: dict[str, ReqState] = {}
        self._lock = threading.Lock()
        # Worker in another process: its CPU tier is invisible from here, so keep an index of
        # the keys it reports as stored (bounded; a stale entry costs one recompute).
        self.remote: OrderedDict[str, None] | None = None
        if remote_worker:
            self.remote = OrderedDict()
            chunk_bytes = max(1, cache.spec.bytes_per_token() * self.chunk_size)
            budget = sum(t.capacity for t in cache.config.tier_configs() if t.kind in ("memory", "disk"))
            self._remote_cap = max(4096, budget // chunk_bytes)

    def on_worker_meta(self, meta: Any) -> None:
        if self.remote is None or meta is None:
            return
        with self._lock:
            for k in getattr(meta, "missing", ()):
                self.remote.pop(k, None)
            for k in getattr(meta, "stored", ()):
                self.remote[k] = None
                self.remote.move_to_end(k)
            while len(self.remote) > self._remote_cap:
                self.remote.popitem(last=False)

    def _lookup(self, keys: list[str]) -> list[str]:
        """Tier names of the leading run of keys the worker can load."""
        if not keys:
            return []
        where = self.cache.locate(keys)
        out: list[str] = []
        for k, w in zip(keys, where, strict=True):
            if w is None and self.remote is not None and k in self.remote:
                w = "worker"
            if w is None:
                break
            out.append(w)
        return out

    # ------------------------------------------------------------------ keys
    def _seed(self, request: Any) -> bytes:
        salt = getattr(request, "cache_salt", None)
        if not salt:
            return self.cache.namespace
        return hashlib.sha256(self.cache.namespace + b"vllm-cache-salt:" + str(salt).encode()).digest()

    def _extend_keys(self, st: ReqState, tokens: list[int]) -> None:
        """Extend the chained keys over every full chunk of ``tokens`` (incremental)."""
        c = self.chunk_size
        while (len(st.keys) + 1) * c <= len(tokens):
            i = len(st.keys)
            st.parent = chain_hash(st.parent, tokens[i * c:(i + 1) * c])
            st.keys.append(bind(st.namespace, st.parent))

    def _state(self, request: Any) -> ReqState:
        st = self._reqs.get(request.request_id)
        if st is None or st.request is not request:
            st = ReqState(request.request_id, request, namespace=self._seed(request))
            params = getattr(request, "kv_transfer_params", None) or {}
            st.skip = bool(getattr(request, "mm_features", None) or getattr(request, "lora_request", None)
                           or getattr(request, "prompt_embeds", None) is not None
                           or (isinstance(params, dict) and params.get("kvlayer_skip")))
            self._reqs[request.request_id] = st
        return st

    # ------------------------------------------------------------------ vLLM hooks
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        with self._lock:
            st = self._state(request)
            if st.skip:
                return 0, False
            prompt = list(request.prompt_token_ids or [])
            self._extend_keys(st, prompt)
            full = len(prompt) // self.chunk_size
            tiers = self._lookup(st.keys[:full]) if full > 0 else []
            self.counters.add(lookups=1)
            st.hit_tiers = tiers
            # Never claim the last prompt token (vLLM must compute at least one). The claim may end
            # inside a block: the worker loads that whole block and vLLM then overwrites the slots
            # of the tokens it computes itself.
            st.hit_tokens = min(len(tiers) * self.chunk_size, len(prompt) - 1)
            st.stored_chunks = max(st.stored_chunks, len(tiers))
            new = st.hit_tokens - num_computed_tokens
            if new <= 0 or new < self.options.min_hit_tokens:
                return 0, False
            return new, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        with self._lock:
            st = self._state(request)
            try:
                st.block_ids = list(blocks.get_block_ids()[0])
            except (AttributeError, IndexError):
                pass
            if num_external_tokens <= 0 or st.skip:
                return
            end = st.hit_tokens
            start = end - num_external_tokens
            if start < 0 or start % self.block_size or end > len(st.keys) * self.chunk_size:
                log.warning("request %s: unexpected external range [%d, %d); not loading", st.req_id, start, end)
                return
            first, last = start // self.chunk_size, -(-end // self.chunk_size)
            keys = st.keys[first:last]
            self._release_load(st)
            lease = self.cache.pin(keys=keys, ttl_s=self.options.pin_ttl_s)
            st.load = LoadPlan(first, keys, start, end, st.hit_tiers[first:last], lease)
            self.counters.add(hit_tokens=num_external_tokens, hit_requests=1)

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[str, int]:
        """Tokens of the planned load per tier name."""
        st = self._reqs.get(request.request_id)
        if st is None or st.load is None or num_external_tokens <= 0:
            return {}
        out: dict[str, int] = {}
        c, plan = self.chunk_size, st.load
        for i, tier in enumerate(plan.tiers):
            ci = plan.first_chunk + i
            n = min(plan.end_token, (ci + 1) * c) - max(plan.start_token, ci * c)
            out[tier] = out.get(tier, 0) + max(0, n)
        return out

    def build_connector_meta(self, so: Any) -> ConnectorMeta:
        meta = ConnectorMeta()
        with self._lock:
            num_sched = so.num_scheduled_tokens
            # A request preempted and re-admitted in the same step already has a fresh plan.
            for req_id in getattr(so, "preempted_req_ids", None) or ():
                self.counters.add(preemptions=1)
                if req_id not in num_sched:
                    self._drop(req_id)
            for req_id in getattr(so, "finished_req_ids", None) or ():
                self._drop(req_id)
            for nr in so.scheduled_new_reqs:
                st = self._reqs.get(nr.req_id)
                if st is None or st.skip:
                    continue
                st.block_ids = list(nr.block_ids[0]) if nr.block_ids else st.block_ids
                self._emit(st, meta, nr.num_computed_tokens + num_sched.get(nr.req_id, 0))
            cr = so.scheduled_cached_reqs
            resumed: set[str] = getattr(cr, "resumed_req_ids", set()) or set()
            for i, req_id in enumerate(cr.req_ids):
                st = self._reqs.get(req_id)
                if st is None or st.skip:
                    continue
                nb = cr.new_block_ids[i]
                if nb is not None and len(nb) > 0:
                    if req_id in resumed:
                        st.block_ids = list(nb[0])
                    else:
                        st.block_ids.extend(nb[0])
                self._emit(st, meta, cr.num_computed_tokens[i] + num_sched.get(req_id, 0))
        return meta

    def _emit(self, st: ReqState, meta: ConnectorMeta, computed_after: int) -> None:
        bpc, bs, c = self.blocks_per_chunk, self.block_size, self.chunk_size
        plan = st.load
        if plan is not None and not plan.emitted:
            plan.emitted = True
            blocks: list[list[int]] = []
            skips: list[int] = []
            want = []
            for j in range(len(plan.keys)):
                ci = plan.first_chunk + j
                stop = min((ci + 1) * bpc, -(-plan.end_token // bs))  # the last chunk may load only in part
                want.append(stop - ci * bpc)
                blocks.append(st.block_ids[ci * bpc:stop])
                skips.append(max(0, (plan.start_token - ci * c) // bs))
            if [len(b) for b in blocks] == want:
                meta.loads.append(LoadOp(st.req_id, plan.keys, blocks, skips, plan.lease))
            else:  # cannot happen with vLLM's allocation; never load into the wrong blocks
                log.warning("request %s: missing blocks for its load; skipped", st.req_id)
        tokens = st.request.all_token_ids if self.options.save_generated else st.request.prompt_token_ids
        limit = min(computed_after, len(tokens or []))
        if limit // c > len(st.keys):
            self._extend_keys(st, list(tokens[:limit]))
        upto = min(limit // c, len(st.keys), len(st.block_ids) // bpc)
        for ci in range(st.stored_chunks, upto):
            meta.saves.append(SaveOp(st.req_id, st.keys[ci], st.block_ids[ci * bpc:(ci + 1) * bpc]))
        st.stored_chunks = max(st.stored_chunks, upto)

    def request_finished(self, request: Any) -> None:
        with self._lock:
            self._drop(request.request_id)

    def _release_load(self, st: ReqState) -> None:
        if st.load is not None and st.load.lease:
            self.cache.unpin(st.load.lease)
        st.load = None

    def _drop(self, req_id: str) -> None:
        st = self._reqs.pop(req_id, None)
        if st is not None:
            self._release_load(st)

    def num_requests(self) -> int:
        return len(self._reqs)

    def reset(self) -> None:
        with self._lock:
            for req_id in list(self._reqs):
                self._drop(req_id)
