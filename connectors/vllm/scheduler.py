"""Scheduler-side state: what to load for a request, how, and what to save after each step.

Per request we keep the chained chunk keys of its tokens, its block ids, how many leading chunks
are already in the store or queued, and at most one load plan. A load plan holds a pin lease on
its chunks from allocation until the worker has loaded them, so an eviction cannot turn a claimed
hit into a failed load. Every piece of state is dropped when the request finishes, is aborted or
is preempted (a preempted request is looked up afresh when it resumes).

A lookup claims the leading run of stored full chunks, then at most one partial chunk (the tokens
after them, at vLLM block granularity: one extra ``locate`` of at most ``blocks_per_chunk - 1``
keys). It claims only as much as loads faster than it recomputes (``estimate.py``), and loads in
the background (vLLM's async path) unless every claimed chunk is in process memory.

``kv_role`` (``roles.py``): a producer saves and never looks up; a consumer looks up (waiting
for a producer's hand-off, and for its token-granular prompt tail) and never saves.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from kvlayer.engine import KVCache
from kvlayer.keys import bind, chain_hash, partial_key

from ..core import FailureGuard
from .config import ConnectorOptions
from .estimate import Estimates, step_attention
from .metadata import ConnectorMeta, LoadOp, SaveOp
from .roles import Role, RoleCounters, handoff_params, handoff_tokens

log = logging.getLogger("kvlayer.vllm")

#: Tier name of chunks only the worker's report vouches for (queued saves; in multi-process mode
#: the worker's own CPU tier): loaded synchronously.
WORKER = "worker"
#: How long an ask for a request waiting on a producer's hand-off may block while the engine has
#: nothing else to run (its loop would otherwise spin on the cores the producer needs).
IDLE_NAP_S = 0.005


@dataclass
class LoadPlan:
    first_chunk: int
    keys: list[str]
    start_token: int  # first token to load (block aligned: vLLM's own prefix hit ends here)
    end_token: int  # exclusive; at most len(prompt) - 1, may end inside a block
    tiers: list[str]
    lease: str | None = None
    sizes: list[int] = field(default_factory=list)  # tokens of each chunk (the last may be partial)
    background: bool = False
    emitted: bool = False


@dataclass
class Lookup:
    """A lookup running on the lookup threads: (leading full-chunk tiers, partial chunk or None)."""

    future: Future[tuple[list[str], tuple[str, str, int] | None]]
    started: float


@dataclass
class ReqState:
    req_id: str
    request: Any
    keys: list[str] = field(default_factory=list)  # full chunks of the tokens seen so far
    chain: list[bytes] = field(default_factory=list)  # d_i of each full chunk (kvlayer.keys.token_chain)
    namespace: bytes = b""  # what keys are bound to: the cache's namespace, salted per request
    stored_chunks: int = 0  # leading chunks that are in the store or queued for saving
    block_ids: list[int] = field(default_factory=list)
    hit_tokens: int = 0
    hit_keys: list[str] = field(default_factory=list)  # claimed chunks, the last maybe partial
    hit_tiers: list[str] = field(default_factory=list)
    hit_sizes: list[int] = field(default_factory=list)
    hit_async: bool = False
    load: LoadPlan | None = None
    lookup: Lookup | None = None
    partial_saved: bool = False
    asked: bool = False  # a lookup was started for this request
    # kv_consumer: prompt tokens a producer announced (0: no hand-off), until when to wait for
    # them and when to ask the store again
    handoff: int = 0
    handoff_deadline: float = 0.0
    next_poll: float = 0.0
    waited: bool = False
    saved_tokens: int = 0  # kv_producer: prompt tokens whose saves were planned
    # multimodal / LoRA / embeddings, or a request that opted out with
    # SamplingParams(extra_args={"kv_transfer_params": {"kvlayer_skip": True}}): never load or save
    skip: bool = False


class SchedulerSide:
    """The scheduler-side connector's state and decisions; vLLM's calls arrive through
    ``KVLayerConnector``, which guards them (nothing here needs to catch for the engine's sake,
    except where a lost async plan would leave a request waiting forever)."""

    def __init__(self, cache: KVCache, options: ConnectorOptions, *, block_size: int, remote_worker: bool = False,
                 guard: FailureGuard | None = None, role: Role = "kv_both") -> None:
        self.cache = cache
        self.options = options
        self.role = role
        self.counters = RoleCounters()
        self.guard = guard or FailureGuard(log, "vLLM scheduler")
        self.block_size = block_size
        self.chunk_size = cache.chunk_size
        self.blocks_per_chunk = self.chunk_size // block_size
        self.estimates = Estimates(refresh_s=options.estimate_refresh_s)
        self._kinds = {t.name: t.kind for t in cache.config.tier_configs()}
        # Lookups of tiers outside this process run on threads, so that a hung tier costs the
        # engine at most ``lookup_wait_s`` per request, never its socket timeout.
        self._inline_lookups = all(k == "memory" for k in self._kinds.values())
        self._lookups: ThreadPoolExecutor | None = None
        self._reqs: dict[str, ReqState] = {}
        self._lock = threading.Lock()
        self._async_new: list[str] = []  # async plans made this step (their requests are not scheduled)
        self._orphans: list[LoadOp] = []  # async loads that cannot run: the worker reports them failed
        self._finish_saves: list[SaveOp] = []  # saves of finished requests whose blocks vLLM keeps for us
        self._finish_sends: list[str] = []  # finished producer requests: blocks kept until their saves land
        self._idle = False  # the last step scheduled no tokens
        # Keys the worker reported: queued saves not yet in the store (the store answers for them once
        # they land) or, with the worker in another process, what its own store holds (invisible
        # from here). Bounded; a stale entry costs one recompute.
        self.remote_worker = remote_worker
        self.index: OrderedDict[str, None] = OrderedDict()
        self._index_lock = threading.Lock()
        chunk_bytes = max(1, cache.spec.bytes_per_token() * self.chunk_size)
        budget = sum(t.capacity for t in cache.config.tier_configs() if t.kind in ("memory", "disk"))
        self._index_cap = max(4096, budget // chunk_bytes)

    # ------------------------------------------------------------------ worker reports
    def on_worker_meta(self, meta: Any) -> None:
        if meta is None:
            return
        for tier, chunks, seconds in getattr(meta, "loads", ()):
            self.estimates.add_load(tier, chunks, seconds)
        for tokens, attention, seconds in getattr(meta, "steps", ()):
            self.estimates.add_step(tokens, attention, seconds)
        with self._index_lock:
            for k in getattr(meta, "missing", ()):
                self.index.pop(k, None)
            for k in getattr(meta, "stored", ()):
                self.index[k] = None
                self.index.move_to_end(k)
            if not self.remote_worker:  # one shared store: it answers for what has landed
                for k in getattr(meta, "landed", ()):
                    self.index.pop(k, None)
            while len(self.index) > self._index_cap:
                self.index.popitem(last=False)

    def _where(self, keys: list[str]) -> list[str | None]:
        """Per key, the tier the worker can load it from (None = nowhere). Any thread."""
        if not keys:
            return []
        where = self.cache.locate(keys)
        with self._index_lock:
            return [w if w is not None or k not in self.index else WORKER for k, w in zip(keys, where, strict=True)]

    def _leading(self, keys: list[str]) -> list[str]:
        """Tier names of the leading run of keys the worker can load."""
        out: list[str] = []
        for w in self._where(keys):
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

    def _extend_keys(self, st: ReqState, tokens: Sequence[int]) -> None:
        """Extend the chained keys over every full chunk of ``tokens`` (incremental)."""
        c = self.chunk_size
        while (len(st.keys) + 1) * c <= len(tokens):
            i = len(st.keys)
            st.chain.append(chain_hash(st.chain[-1] if st.chain else b"", tokens[i * c:(i + 1) * c]))
            st.keys.append(bind(st.namespace, st.chain[-1]))

    def _partial_key(self, st: ReqState, chunk: int, tokens: Sequence[int]) -> str:
        return partial_key(st.namespace, st.chain[chunk - 1] if chunk > 0 else b"", tokens)

    def _state(self, request: Any) -> ReqState:
        st = self._reqs.get(request.request_id)
        if st is None or st.request is not request:
            st = ReqState(request.request_id, request, namespace=self._seed(request))
            params = getattr(request, "kv_transfer_params", None) or {}
            st.skip = bool(getattr(request, "mm_features", None) or getattr(request, "lora_request", None)
                           or getattr(request, "prompt_embeds", None) is not None
                           or (isinstance(params, dict) and params.get("kvlayer_skip")))
            if self.role == "kv_consumer":
                st.handoff = handoff_tokens(request)
            self._reqs[request.request_id] = st
        return st

    # ------------------------------------------------------------------ vLLM hooks
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        with self._lock:
            st = self._state(request)
            if st.skip or self.role == "kv_producer":
                return 0, False  # a producer never loads (its saves skip what the store holds)
            if st.load is not None and st.load.background and st.load.emitted:
                # vLLM asks again only after this request's background load failed (or was abandoned
                # at its deadline): recompute, without asking a tier that just failed it
                self._release_load(st)
                self.counters.add(failed_async_retries=1)
                return 0, False
            prompt = list(request.prompt_token_ids or [])
            self._extend_keys(st, prompt)
            full = len(prompt) // self.chunk_size
            keys, chain = st.keys[:full], list(st.chain[:full])
            if self._inline_lookups:  # process memory answers at once
                return self._claim(st, self._find(keys, chain, st.namespace, prompt), num_computed_tokens, len(prompt))
            first_ask = not st.asked
            nap = 0.0
            if st.lookup is None:
                now = time.monotonic()
                if first_ask and st.handoff:
                    st.handoff_deadline = now + self.options.pd_wait_s
                    self.counters.add(handoffs=1)
                if now < st.next_poll:  # waiting for a hand-off: not time to ask the store again yet
                    nap = min(st.next_poll - now, IDLE_NAP_S) if self._idle else 0.0
                else:
                    if self._lookups is None:
                        self._lookups = ThreadPoolExecutor(2, thread_name_prefix="kvlayer-lookup")
                    st.asked = True
                    st.lookup = Lookup(self._lookups.submit(self._find, keys, chain, st.namespace, prompt), now)
            job = st.lookup
        if job is None:
            if nap:
                time.sleep(nap)
            return None, False
        wait = self.options.lookup_wait_s if first_ask else (IDLE_NAP_S if st.handoff and self._idle else 0.0)
        found = self._answer(job, wait)  # outside the lock
        with self._lock:
            if st.lookup is not job:
                return 0, False  # dropped meanwhile (finished, preempted)
            now = time.monotonic()
            if found is None:
                deadline = max(job.started + self.options.lookup_deadline_s, st.handoff_deadline)
                if now < deadline:
                    return None, False  # vLLM asks again next step; the batch runs meanwhile
                st.lookup = None
                self.counters.add(lookups=1, lookup_timeouts=1)
                return 0, False  # a tier that does not answer in time is a miss
            st.lookup = None
            if st.handoff and not self._handed_over(st, found, len(prompt)):
                if now < st.handoff_deadline:  # the producer's save has not landed yet: ask again
                    if not st.waited:
                        st.waited = True
                        self.counters.add(handoff_waits=1)
                    st.next_poll = now + self.options.pd_poll_s
                    return None, False
                log.warning("request %s: the prefill engine's hand-off of %d tokens is not complete after %.1f s "
                            "(found %d): computing the rest", st.req_id, st.handoff, self.options.pd_wait_s,
                            self._found_tokens(found))
                st.handoff = 0  # not coming (producer died, chunk evicted): compute what is missing
                self.counters.add(handoff_timeouts=1)
            elif st.handoff:
                log.debug("request %s: hand-off of %d tokens found (%d)", st.req_id, st.handoff,
                          self._found_tokens(found))
            return self._claim(st, found, num_computed_tokens, len(prompt))

    def _handed_over(self, st: ReqState, found: tuple[list[str], tuple[str, str, int] | None], prompt_len: int
                     ) -> bool:
        """Whether the store holds every prompt token the producer announced (but the last)."""
        return self._found_tokens(found) >= min(st.handoff, prompt_len - 1)

    def _found_tokens(self, found: tuple[list[str], tuple[str, str, int] | None]) -> int:
        return len(found[0]) * self.chunk_size + (found[1][2] if found[1] is not None else 0)

    def _answer(self, job: Lookup, wait_s: float) -> tuple[list[str], tuple[str, str, int] | None] | None:
        try:
            return job.future.result(timeout=wait_s)
        except FutureTimeout:
            return None
        except Exception as e:  # a lookup that raised is a miss
            self.guard.record("lookup", e, then="treated as a miss")
            return [], None

    def _find(self, keys: list[str], chain: list[bytes], namespace: bytes, prompt: list[int]
              ) -> tuple[list[str], tuple[str, str, int] | None]:
        """Where the leading run of full chunks is, and the longest stored partial chunk after it
        (one ``locate`` of at most ``blocks_per_chunk - 1`` keys). Any thread."""
        tiers = self._leading(keys)
        if not self.options.partial_chunks:
            return tiers, None
        bs, c, i = self.block_size, self.chunk_size, len(tiers)
        rest = len(prompt) - i * c
        sizes = [k * bs for k in range(min(self.blocks_per_chunk - 1, rest // bs), 0, -1)]
        if self.role == "kv_consumer" and 0 < rest < c and rest % bs:
            sizes.insert(0, rest)  # a producer's whole prompt tail (saved at token granularity)
        if not sizes:
            return tiers, None
        parent = chain[i - 1] if i > 0 else b""
        cands = [partial_key(namespace, parent, prompt[i * c:i * c + n]) for n in sizes]
        for n, key, tier in zip(sizes, cands, self._where(cands), strict=True):
            if tier is not None:
                return tiers, (key, tier, n)
        return tiers, None

    def _claim(self, st: ReqState, found: tuple[list[str], tuple[str, str, int] | None], num_computed_tokens: int,
               prompt_len: int) -> tuple[int, bool]:
        """vLLM's answer from a finished lookup: how many tokens to load, and whether async."""
        c = self.chunk_size
        tiers, part = list(found[0]), found[1]
        self.counters.add(lookups=1)
        st.stored_chunks = max(st.stored_chunks, len(tiers))
        keys, sizes = st.keys[:len(tiers)], [c] * len(tiers)
        if part is not None:
            keys.append(part[0])
            tiers.append(part[1])
            sizes.append(part[2])
        n = self._decide(st, tiers, sizes, num_computed_tokens, prompt_len)
        st.hit_keys, st.hit_tiers, st.hit_sizes = keys[:n], tiers[:n], sizes[:n]
        # Never claim the last prompt token (vLLM must compute at least one). The claim may end
        # inside a block: the worker loads that whole block and vLLM then overwrites the slots
        # of the tokens it computes itself.
        st.hit_tokens = min(sum(st.hit_sizes), prompt_len - 1)
        new = st.hit_tokens - num_computed_tokens
        if new <= 0 or new < self.options.min_hit_tokens:
            st.hit_async = False
            return 0, False
        first = num_computed_tokens // c
        mode = self.options.async_loads
        st.hit_async = mode == "always" or (mode == "auto" and any(
            self._kinds.get(t, "memory") != "memory" for t in st.hit_tiers[first:] if t != WORKER))
        return new, st.hit_async

    def _decide(self, st: ReqState, tiers: list[str], sizes: list[int], computed: int, prompt_len: int) -> int:
        """How many of the found chunks to claim: all, unless load-or-recompute says fewer."""
        c = self.chunk_size
        first = computed // c
        bounds = [(max(i * c, computed), min(i * c + sizes[i], prompt_len - 1)) for i in range(first, len(tiers))]
        if self.role == "kv_consumer" or not self.options.load_or_recompute or not bounds \
                or bounds[0][0] >= bounds[0][1]:
            return len(tiers)  # a decode engine loads what it can: recomputing there is what P/D avoids
        claim = self.estimates.best_claim(tiers[first:], bounds)
        fmt = "%.4f"
        est = (fmt % claim.load_s if claim.load_s is not None else "?",
               fmt % claim.recompute_s if claim.recompute_s is not None else "?")
        if claim.chunks < len(bounds):
            declined = bounds[-1][1] - (bounds[claim.chunks - 1][1] if claim.chunks else bounds[0][0])
            self.counters.add(declined_hits=1, declined_tokens=declined)
            log.debug("request %s: declined %d of %d chunks from %s: load %s s vs recompute %s s", st.req_id,
                      len(bounds) - claim.chunks, len(bounds), sorted(set(tiers[first:])), *est)
        else:
            if claim.probe:
                self.counters.add(probe_hits=1)
            log.debug("request %s: claims %d chunks from %s: load %s s vs recompute %s s%s", st.req_id, len(bounds),
                      sorted(set(tiers[first:])), *est, " (refreshing the estimate)" if claim.probe else "")
        return first + claim.chunks

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        with self._lock:
            st = self._state(request)
            try:
                st.block_ids = list(blocks.get_block_ids()[0])
            except (AttributeError, IndexError):
                pass
            if num_external_tokens <= 0 or st.skip:
                return  # also the second call after an async load, with the request's new blocks
            end = st.hit_tokens
            start = end - num_external_tokens
            if start < 0 or start % self.block_size or end > sum(st.hit_sizes):
                log.warning("request %s: unexpected external range [%d, %d); not loading", st.req_id, start, end)
                if st.hit_async:
                    self._orphan(st, max(0, start), end)
                return
            c = self.chunk_size
            first, last = start // c, -(-end // c)
            keys = st.hit_keys[first:last]
            self._release_load(st)
            lease = self.cache.pin(keys=keys, ttl_s=self.options.pin_ttl_s)
            st.load = LoadPlan(first, keys, start, end, st.hit_tiers[first:last], lease, st.hit_sizes[first:last],
                               st.hit_async)
            if st.hit_async:
                self._async_new.append(st.req_id)
            partial = int(st.hit_sizes[last - 1] < c)
            self.counters.add(hit_tokens=num_external_tokens, hit_requests=1, async_hits=int(st.hit_async),
                              partial_hits=partial)

    def abandon_claim(self, request: Any, num_external_tokens: int) -> None:
        """``update_state_after_alloc`` failed: an async claim must still be reported (as failed),
        or vLLM would wait for it forever."""
        with self._lock:
            st = self._reqs.get(request.request_id)
            if st is not None and st.hit_async and num_external_tokens > 0 and (st.load is None or not st.load.emitted):
                self._release_load(st)
                self._orphan(st, max(0, st.hit_tokens - num_external_tokens), st.hit_tokens)

    def _orphan(self, st: ReqState, start: int, end: int) -> None:
        """An async load that will not run: the worker reports its blocks failed and the request done."""
        bs = self.block_size
        blocks = st.block_ids[start // bs:-(-end // bs)]
        self._orphans.append(LoadOp(st.req_id, [], [blocks], [0], background=True))

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[str, int]:
        """Tokens of the planned load per tier name."""
        st = self._reqs.get(request.request_id)
        if st is None or st.load is None or num_external_tokens <= 0:
            return {}
        out: dict[str, int] = {}
        c, plan = self.chunk_size, st.load
        for i, tier in enumerate(plan.tiers):
            ci = plan.first_chunk + i
            n = min(plan.end_token, ci * c + plan.sizes[i]) - max(plan.start_token, ci * c)
            out[tier] = out.get(tier, 0) + max(0, n)
        return out

    def build_connector_meta(self, so: Any) -> ConnectorMeta:
        meta = ConnectorMeta()
        with self._lock:
            # First what must reach the worker whatever else fails: a lost async load or finished
            # save would leave a request waiting, or its blocks held, forever.
            for req_id in self._async_new:
                st = self._reqs.get(req_id)
                if st is not None and st.load is not None and not st.load.emitted:
                    self._emit_load(st, meta)
            meta.loads.extend(self._orphans)
            meta.saves.extend(self._finish_saves)
            meta.sends.extend(self._finish_sends)
            self._async_new, self._orphans, self._finish_saves, self._finish_sends = [], [], [], []
            try:
                self._plan_step(so, meta)
            except Exception as e:
                self.guard.record("planning the step", e, then="no saves this step")
            self._idle = meta.step_tokens == 0
        return meta

    def _plan_step(self, so: Any, meta: ConnectorMeta) -> None:
        num_sched = so.num_scheduled_tokens
        meta.step_tokens = int(getattr(so, "total_num_scheduled_tokens", 0) or 0)
        # A request preempted and re-admitted in the same step already has a fresh plan.
        for req_id in getattr(so, "preempted_req_ids", None) or ():
            self.counters.add(preemptions=1)
            if req_id not in num_sched:
                self._drop(req_id)
        for req_id in getattr(so, "finished_req_ids", None) or ():
            self._drop(req_id)
        for nr in so.scheduled_new_reqs:
            n = num_sched.get(nr.req_id, 0)
            meta.step_attention += step_attention(nr.num_computed_tokens, n)
            st = self._reqs.get(nr.req_id)
            if st is None or st.skip:
                continue
            st.block_ids = list(nr.block_ids[0]) if nr.block_ids else st.block_ids
            self._emit(st, meta, nr.num_computed_tokens + n)
        cr = so.scheduled_cached_reqs
        resumed: set[str] = getattr(cr, "resumed_req_ids", set()) or set()
        for i, req_id in enumerate(cr.req_ids):
            n = num_sched.get(req_id, 0)
            meta.step_attention += step_attention(cr.num_computed_tokens[i], n)
            st = self._reqs.get(req_id)
            if st is None or st.skip:
                continue
            nb = cr.new_block_ids[i]
            if nb is not None and len(nb) > 0:
                if req_id in resumed:
                    st.block_ids = list(nb[0])
                else:
                    st.block_ids.extend(nb[0])
            self._emit(st, meta, cr.num_computed_tokens[i] + n)

    def _emit_load(self, st: ReqState, meta: ConnectorMeta) -> None:
        plan = st.load
        assert plan is not None
        plan.emitted = True
        bpc, bs, c = self.blocks_per_chunk, self.block_size, self.chunk_size
        blocks: list[list[int]] = []
        skips: list[int] = []
        want = []
        for j, size in enumerate(plan.sizes):
            ci = plan.first_chunk + j
            stop = min(ci * bpc + -(-size // bs), -(-plan.end_token // bs))  # the last chunk may load only in part
            want.append(stop - ci * bpc)
            blocks.append(st.block_ids[ci * bpc:stop])
            skips.append(max(0, (plan.start_token - ci * c) // bs))
        if [len(b) for b in blocks] == want:
            meta.loads.append(LoadOp(st.req_id, plan.keys, blocks, skips, plan.lease, list(plan.sizes),
                                     list(plan.tiers), plan.background))
            return
        # cannot happen with vLLM's allocation; never load into the wrong blocks
        log.warning("request %s: missing blocks for its load; skipped", st.req_id)
        if plan.background:
            self._orphan(st, plan.start_token, plan.end_token)
            meta.loads.extend(self._orphans)
            self._orphans = []

    def _emit(self, st: ReqState, meta: ConnectorMeta, computed_after: int) -> None:
        bpc, bs, c = self.blocks_per_chunk, self.block_size, self.chunk_size
        if st.load is not None and not st.load.emitted:
            self._emit_load(st, meta)
        if self.role == "kv_consumer":
            return  # a consumer never saves
        producer = self.role == "kv_producer"
        generated = self.options.save_generated and not producer
        tokens = st.request.all_token_ids if generated else st.request.prompt_token_ids
        limit = min(computed_after, len(tokens or []))
        if limit // c > len(st.keys):
            self._extend_keys(st, list(tokens[:limit]))
        upto = min(limit // c, len(st.keys), len(st.block_ids) // bpc)
        for ci in range(st.stored_chunks, upto):
            meta.saves.append(SaveOp(st.req_id, st.keys[ci], st.block_ids[ci * bpc:(ci + 1) * bpc]))
        st.stored_chunks = max(st.stored_chunks, upto)
        if producer:
            st.saved_tokens = max(st.saved_tokens, upto * c)
            self._emit_tail(st, meta, list(tokens or []), limit)
            return
        # The prompt's last partial chunk, once its whole blocks are computed (with save_generated,
        # at the end instead: request_finished).
        if self.options.partial_chunks and not self.options.save_generated and not st.partial_saved:
            n = len(tokens or [])
            full = n // c
            k = min((n - full * c) // bs, len(st.block_ids) - full * bpc)
            if k >= 1 and limit >= full * c + k * bs and len(st.keys) >= full:
                st.partial_saved = True
                key = self._partial_key(st, full, list(tokens[full * c:full * c + k * bs]))
                if st.load is None or key not in st.load.keys:
                    meta.saves.append(SaveOp(st.req_id, key, st.block_ids[full * bpc:full * bpc + k]))
                    self.counters.add(partial_saves=1)

    def _emit_tail(self, st: ReqState, meta: ConnectorMeta, prompt: list[int], limit: int) -> None:
        """A producer's prompt tail after its full chunks, at token granularity (a consumer with
        the same prompt then computes only its last token), once all of it is computed."""
        bpc, bs, c = self.blocks_per_chunk, self.block_size, self.chunk_size
        n = len(prompt)
        full, rest = n // c, n % c
        if st.partial_saved or rest == 0 or limit < n or len(st.keys) < full:
            return
        blocks = st.block_ids[full * bpc:full * bpc + -(-rest // bs)]
        if len(blocks) * bs < rest:
            return
        st.partial_saved = True
        meta.saves.append(SaveOp(st.req_id, self._partial_key(st, full, prompt[full * c:]), blocks, tokens=rest))
        st.saved_tokens = n
        self.counters.add(partial_saves=1)

    def finish(self, request: Any, block_ids: Sequence[int] = ()) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's ``request_finished``: (keep the blocks until ``finished_sending``, the params the
        request's output carries). A producer keeps them until its saves are written and announces
        the saved tokens (``roles.handoff_params``)."""
        if self.role != "kv_producer":
            return self.request_finished(request, block_ids), None
        with self._lock:
            st = self._reqs.get(request.request_id)
            tokens = st.saved_tokens if st is not None and not st.skip else 0
            self._drop(request.request_id)
            if tokens <= 0:
                return False, None
            self._finish_sends.append(request.request_id)
            self.counters.add(handed_off=1)
            return True, handoff_params(tokens)

    def request_finished(self, request: Any, block_ids: Sequence[int] = ()) -> bool:
        """Drop the request's state. Returns True when vLLM must keep its blocks until the worker
        has gathered its last partial chunk (``save_generated``): reported in ``finished_sending``."""
        with self._lock:
            st = self._reqs.get(request.request_id)
            save = None
            if st is not None and not st.skip and self.options.save_generated and self.options.partial_chunks:
                save = self._finish_save(st, request, list(block_ids))
            self._drop(request.request_id)
            if save is None:
                return False
            # queued only once nothing can fail any more: True must reach vLLM with it
            self._finish_saves.append(save)
            self.counters.add(partial_saves=1)
            return True

    def _finish_save(self, st: ReqState, request: Any, block_ids: list[int]) -> SaveOp | None:
        if int(getattr(request, "num_output_tokens", 0) or 0) <= 0:
            return None  # never computed a step (e.g. aborted while its load was in flight)
        bpc, bs, c = self.blocks_per_chunk, self.block_size, self.chunk_size
        tokens = list(request.all_token_ids)
        done = min(int(request.num_computed_tokens), len(tokens))
        self._extend_keys(st, tokens[:done])
        full = done // c
        k = min((done - full * c) // bs, len(block_ids) - full * bpc)
        if k < 1 or len(st.keys) < full:
            return None
        key = self._partial_key(st, full, tokens[full * c:full * c + k * bs])
        return SaveOp(st.req_id, key, block_ids[full * bpc:full * bpc + k], finished=True)

    def _release_load(self, st: ReqState) -> None:
        if st.load is not None and st.load.lease:
            self.cache.unpin(st.load.lease)
        st.load = None

    def _drop(self, req_id: str) -> None:
        st = self._reqs.pop(req_id, None)
        if st is None:
            return
        if st.load is not None and st.load.background and not st.load.emitted:
            self._orphan(st, st.load.start_token, st.load.end_token)
        self._release_load(st)
        if req_id in self._async_new:
            self._async_new.remove(req_id)

    def num_requests(self) -> int:
        return len(self._reqs)

    def reset(self) -> None:
        with self._lock:
            for req_id in list(self._reqs):
                self._drop(req_id)
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)  # a hung tier must not hang shutdown
