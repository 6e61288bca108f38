"""The vLLM connector's scheduler side (``SchedulerSide``) driven step by step, without an engine:
which chunks it claims and loads into which blocks, which it saves from which blocks, and that
preempted, aborted and finished requests leave no state and no pin behind.

Real: vLLM's own ``Request``, ``SamplingParams``, ``KVCacheBlock``/``KVCacheBlocks``,
``SchedulerOutput``, ``NewRequestData`` and ``CachedRequestData`` dataclasses, and a real
``KVCache`` with a CPU tier. Played by the test instead of vLLM's scheduler: the order of the
calls (``get_num_new_matched_tokens`` -> ``update_state_after_alloc`` -> ``build_connector_meta``,
as ``vllm/v1/core/sched/scheduler.py`` makes them), the block ids (distinct, non-contiguous, so a
wrong offset shows) and the token counts of each step; a BlockPool and a model are not needed to
test this arithmetic. The whole path through a real engine is in tests/integration/test_vllm.py.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from kvlayer.connectors.vllm.config import ConnectorOptions  # noqa: E402
from kvlayer.connectors.vllm.estimate import DecayedFit, Estimates  # noqa: E402
from kvlayer.connectors.vllm.metadata import ConnectorMeta, KVLayerWorkerMeta, LoadOp, SaveOp  # noqa: E402
from kvlayer.connectors.vllm.scheduler import SchedulerSide, partial_key  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from kvlayer import KVCache, KVSpec  # noqa: E402
from kvlayer.keys import bind, chain_hash  # noqa: E402

BS, CHUNK = 16, 64  # vLLM block size, kvlayer chunk size
BPC = CHUNK // BS  # blocks per chunk
SPEC = KVSpec(model="unit-scheduler", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")


@pytest.fixture
def cache() -> Any:
    c = KVCache(SPEC, chunk_size=CHUNK, cpu_bytes="16MiB")
    yield c
    c.close()


def side(cache: KVCache, *, remote: bool = False, **options: Any) -> SchedulerSide:
    # a disk tier is looked up on a thread: wait for it, so every ask gets its answer here
    return SchedulerSide(cache, ConnectorOptions(**{"lookup_wait_s": 60.0, **options}), block_size=BS,
                         remote_worker=remote)


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30_000, (n,), generator=g).tolist()


def request(rid: str, prompt: list[int], *, salt: str | None = None, params: dict | None = None) -> Request:
    extra = {"kv_transfer_params": params} if params else None
    return Request(rid, prompt, SamplingParams(max_tokens=16, extra_args=extra), None, cache_salt=salt)


def blocks(n: int, base: int = 100) -> list[int]:
    """``n`` distinct block ids, 3 apart."""
    return [base + 3 * i for i in range(n)]


def store(cache: KVCache, prompt: list[int], n_chunks: int) -> list[str]:
    keys = cache.keys(prompt, full_only=True)[:n_chunks]
    cache.store_chunks(keys, [torch.full(SPEC.chunk_shape(CHUNK), float(i)) for i in range(n_chunks)])
    return keys


def alloc(s: SchedulerSide, req: Request, block_ids: list[int], external: int) -> None:
    s.update_state_after_alloc(req, KVCacheBlocks(blocks=([KVCacheBlock(b) for b in block_ids],)), external)


def new_step(req: Request, block_ids: list[int], computed: int, scheduled: int, **more: Any) -> SchedulerOutput:
    """A step that schedules ``req`` for the first time (``computed`` = local + external hit)."""
    so = SchedulerOutput.make_empty()
    nr = NewRequestData.from_request(req, (list(block_ids),))
    nr.num_computed_tokens = computed
    so.scheduled_new_reqs = [nr]
    so.num_scheduled_tokens = {req.request_id: scheduled}
    so.total_num_scheduled_tokens = scheduled
    for k, v in more.items():
        setattr(so, k, v)
    return so


def cached_step(*items: tuple[str, list[int] | None, int, int], resumed: frozenset[str] = frozenset(),
                **more: Any) -> SchedulerOutput:
    """A step over running (or resumed) requests: (req_id, new block ids, computed, scheduled)."""
    so = SchedulerOutput.make_empty()
    so.scheduled_cached_reqs = CachedRequestData(
        req_ids=[i[0] for i in items], resumed_req_ids=set(resumed), new_token_ids=[[] for _ in items],
        all_token_ids={}, new_block_ids=[(list(i[1]),) if i[1] is not None else None for i in items],
        num_computed_tokens=[i[2] for i in items], num_output_tokens=[0 for _ in items])
    so.num_scheduled_tokens = {i[0]: i[3] for i in items}
    so.total_num_scheduled_tokens = sum(i[3] for i in items)
    for k, v in more.items():
        setattr(so, k, v)
    return so


def leases(cache: KVCache) -> int:
    return int(cache.stats()["store"]["leases"])


def chunks_of(b: list[int], first: int, stop: int | None = None) -> list[list[int]]:
    """Block ids of chunks ``first`` .. ``stop`` (exclusive) of a request holding blocks ``b``."""
    stop = len(b) // BPC if stop is None else stop
    return [b[c * BPC:(c + 1) * BPC] for c in range(first, stop)]


# ------------------------------------------------------------------ cold: saves
def test_cold_prompt_saves_each_full_chunk_from_its_own_blocks(cache):
    s = side(cache)
    prompt = tokens(3 * CHUNK + 10, 1)
    req = request("cold", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    b = blocks(13)  # ceil(202 / 16)
    alloc(s, req, b, 0)
    meta = s.build_connector_meta(new_step(req, b, 0, len(prompt)))
    keys = cache.keys(prompt, full_only=True)
    assert meta.loads == []
    assert meta.saves == [SaveOp("cold", keys[c], b[c * BPC:(c + 1) * BPC]) for c in range(3)]  # not the tail
    assert s.counters.as_dict() == {**dict.fromkeys(s.counters.as_dict(), 0), "lookups": 1}
    # a decode step saves nothing more (prompt only by default)
    assert s.build_connector_meta(cached_step(("cold", None, len(prompt), 1))).saves == []


def test_chunked_prefill_saves_each_chunk_once_its_tokens_are_computed(cache):
    s = side(cache)
    prompt = tokens(3 * CHUNK + 8, 2)
    req = request("chunked", prompt)
    s.get_num_new_matched_tokens(req, 0)
    b = blocks(13)
    alloc(s, req, b[:8], 0)  # vLLM allocates blocks for the 120 tokens of this step only
    keys = cache.keys(prompt, full_only=True)
    m1 = s.build_connector_meta(new_step(req, b[:8], 0, 120))
    # chunk 1's blocks exist, but its tokens 120..127 are not computed yet
    assert m1.saves == [SaveOp("chunked", keys[0], b[0:4])]
    m2 = s.build_connector_meta(cached_step(("chunked", b[8:], 120, 80)))  # the rest of the prompt
    assert m2.saves == [SaveOp("chunked", keys[1], b[4:8]), SaveOp("chunked", keys[2], b[8:12])]
    assert s.build_connector_meta(cached_step(("chunked", None, 200, 1))).saves == []


def test_save_generated_saves_chunks_that_answers_complete(cache):
    prompt = tokens(CHUNK + 56, 3)
    for save_generated in (False, True):
        s = side(cache, save_generated=save_generated)
        req = request(f"gen-{save_generated}", prompt)
        s.get_num_new_matched_tokens(req, 0)
        b = blocks(8)
        alloc(s, req, b, 0)
        m = s.build_connector_meta(new_step(req, b, 0, len(prompt)))
        # prompt only: the prompt's partial chunk (3 whole blocks of its 56-token tail) is saved at once
        assert [op.blocks for op in m.saves] == [b[0:4]] + [b[4:7]] * (not save_generated)
        req.append_output_token_ids(tokens(9, 4))  # 129 tokens: the second chunk is complete
        m = s.build_connector_meta(cached_step((req.request_id, [400], 128, 1)))
        key = cache.keys(list(req.all_token_ids)[:2 * CHUNK], full_only=True)[1]
        assert m.saves == [SaveOp(req.request_id, key, b[4:8])][:int(save_generated)]
        s.request_finished(req)
        cache.clear()


# ------------------------------------------------------------------ warm: claims and loads
@pytest.mark.parametrize("local_hit, first_chunk, skips", [(0, 0, [0, 0, 0]), (32, 0, [2, 0, 0]), (80, 1, [1, 0])])
def test_hit_loads_each_chunk_into_its_blocks_after_vllms_own_prefix_hit(cache, local_hit, first_chunk, skips):
    s = side(cache)
    prompt = tokens(3 * CHUNK + 10, 5)
    keys = store(cache, prompt, 3)
    req = request("warm", prompt)
    claim = 3 * CHUNK - local_hit  # vLLM's own cache holds the first local_hit tokens (block aligned)
    assert s.get_num_new_matched_tokens(req, local_hit) == (claim, False)
    b = blocks(13)
    alloc(s, req, b, claim)
    assert s.hit_sources(req, claim) == {"cpu": claim}
    assert leases(cache) == 1  # the claimed chunks are pinned until the worker has loaded them
    meta = s.build_connector_meta(new_step(req, b, 3 * CHUNK, 10))
    lease = meta.loads[0].lease
    n = 3 - first_chunk
    assert lease and meta.loads == [LoadOp("warm", keys[first_chunk:], chunks_of(b, first_chunk, 3), skips, lease,
                                           [CHUNK] * n, ["cpu"] * n, background=False)]
    assert meta.saves == []  # every full chunk is already stored
    assert s.counters.hit_tokens == claim and s.counters.hit_requests == 1
    # the plan is emitted once; the next step loads nothing again
    assert s.build_connector_meta(cached_step(("warm", None, len(prompt), 1))).loads == []
    s.request_finished(req)
    assert s.num_requests() == 0 and leases(cache) == 0


def test_prompt_of_whole_chunks_claims_all_but_its_last_token(cache):
    s = side(cache)
    prompt = tokens(2 * CHUNK, 6)
    keys = store(cache, prompt, 2)
    req = request("exact", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (2 * CHUNK - 1, False)  # vLLM must compute one token
    b = blocks(8)
    alloc(s, req, b, 2 * CHUNK - 1)
    meta = s.build_connector_meta(new_step(req, b, 2 * CHUNK - 1, 1))
    # the claim ends inside the last block: that block is loaded whole, vLLM rewrites its last slot
    assert [(op.keys, op.blocks, op.skips) for op in meta.loads] == [(keys, chunks_of(b, 0), [0, 0])]


def test_only_the_leading_run_of_stored_chunks_is_claimed(cache):
    s = side(cache)
    prompt = tokens(4 * CHUNK, 7)
    keys = cache.keys(prompt, full_only=True)
    cache.store_chunks([keys[0], keys[2]], [torch.zeros(SPEC.chunk_shape(CHUNK))] * 2)  # chunk 1 missing
    assert s.get_num_new_matched_tokens(request("gap", prompt), 0) == (CHUNK, False)


def test_hits_shorter_than_min_hit_tokens_are_not_claimed(cache):
    prompt = tokens(CHUNK + 40, 8)
    store(cache, prompt, 1)
    assert side(cache, min_hit_tokens=100).get_num_new_matched_tokens(request("short", prompt), 0) == (0, False)
    assert side(cache, min_hit_tokens=64).get_num_new_matched_tokens(request("short", prompt), 0) == (CHUNK, False)


def test_opted_out_and_salted_requests_never_share(cache):
    s = side(cache)
    prompt = tokens(2 * CHUNK + 5, 9)
    store(cache, prompt, 2)
    skip = request("skip", prompt, params={"kvlayer_skip": True})
    assert s.get_num_new_matched_tokens(skip, 0) == (0, False)
    b = blocks(9)
    alloc(s, skip, b, 0)
    m = s.build_connector_meta(new_step(skip, b, 0, len(prompt)))
    assert m.loads == [] and m.saves == []  # no load, no save
    salted = request("salted", prompt, salt="tenant-a")
    assert s.get_num_new_matched_tokens(salted, 0) == (0, False)  # other keys: the unsalted chunks are no hit
    alloc(s, salted, b, 0)
    saves = s.build_connector_meta(new_step(salted, b, 0, len(prompt))).saves
    assert len(saves) == 2 and not {op.key for op in saves} & set(cache.keys(prompt, full_only=True))


# ------------------------------------------------------------------ preemption, aborts
def test_preempted_request_drops_its_plan_and_pin_then_loads_into_its_new_blocks(cache):
    s = side(cache)
    prompt = tokens(2 * CHUNK + 22, 10)
    keys = store(cache, prompt, 2)
    req = request("pre", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, False)
    old = blocks(10)
    alloc(s, req, old, 2 * CHUNK)
    s.build_connector_meta(new_step(req, old, 2 * CHUNK, 22))
    # the next step preempts it (not scheduled again): state and pin are gone
    m = s.build_connector_meta(cached_step(preempted_req_ids={"pre"}))
    assert m == ConnectorMeta() and s.num_requests() == 0 and leases(cache) == 0
    assert s.counters.preemptions == 1
    # resumed later from scratch (vLLM reset its computed tokens): a fresh lookup, new blocks
    assert s.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, False)
    new = blocks(10, base=500)
    alloc(s, req, new, 2 * CHUNK)
    m = s.build_connector_meta(cached_step(("pre", new, 2 * CHUNK, 22), resumed=frozenset({"pre"})))
    assert [(op.keys, op.blocks) for op in m.loads] == [(keys, chunks_of(new, 0, 2))]
    assert leases(cache) == 1


def test_request_preempted_and_readmitted_in_one_step_keeps_only_its_fresh_plan(cache):
    s = side(cache)
    prompt = tokens(2 * CHUNK + 22, 11)
    keys = store(cache, prompt, 2)
    req = request("again", prompt)
    s.get_num_new_matched_tokens(req, 0)
    old = blocks(10)
    alloc(s, req, old, 2 * CHUNK)
    s.build_connector_meta(new_step(req, old, 2 * CHUNK, 22))
    # in one schedule() call vLLM preempts it and admits it again: a new lookup and new blocks
    assert s.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, False)
    new = blocks(10, base=700)
    alloc(s, req, new, 2 * CHUNK)
    assert leases(cache) == 1  # the old plan's pin was released when the new one was made
    m = s.build_connector_meta(cached_step(("again", new, 2 * CHUNK, 22), resumed=frozenset({"again"}),
                                           preempted_req_ids={"again"}))
    assert [(op.keys, op.blocks) for op in m.loads] == [(keys, chunks_of(new, 0, 2))]
    assert s.num_requests() == 1 and s.counters.preemptions == 1


def test_aborted_requests_leave_no_state_or_pin(cache):
    s = side(cache)
    prompt = tokens(2 * CHUNK + 7, 12)
    store(cache, prompt, 2)
    waiting = request("waiting", prompt)  # planned, never scheduled
    s.get_num_new_matched_tokens(waiting, 0)
    alloc(s, waiting, blocks(9), 2 * CHUNK)
    running = request("running", prompt)  # loaded, then finished between two steps
    s.get_num_new_matched_tokens(running, 0)
    b = blocks(9, base=300)
    alloc(s, running, b, 2 * CHUNK)
    s.build_connector_meta(new_step(running, b, 2 * CHUNK, 7))
    assert s.num_requests() == 2 and leases(cache) == 2
    s.request_finished(waiting)  # vLLM calls it for aborted requests too
    assert s.num_requests() == 1 and leases(cache) == 1
    assert s.build_connector_meta(cached_step(finished_req_ids={"running"})) == ConnectorMeta()
    assert s.num_requests() == 0 and leases(cache) == 0
    s.request_finished(running)  # a second notice is harmless
    assert s.num_requests() == 0


# ------------------------------------------------------------------ worker in another process
def test_remote_worker_reports_make_and_unmake_hits(cache):
    s = side(cache, remote=True)
    prompt = tokens(2 * CHUNK + 3, 13)
    keys = cache.keys(prompt, full_only=True)
    assert s.get_num_new_matched_tokens(request("r1", prompt), 0) == (0, False)
    s.on_worker_meta(KVLayerWorkerMeta(stored=keys))  # the worker's CPU tier holds them
    req = request("r2", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, False)
    alloc(s, req, blocks(9), 2 * CHUNK)
    assert s.hit_sources(req, 2 * CHUNK) == {"worker": 2 * CHUNK}
    s.on_worker_meta(KVLayerWorkerMeta(missing=[keys[1]]))  # a failed load: stop claiming it
    assert s.get_num_new_matched_tokens(request("r3", prompt), 0) == (CHUNK, False)


# ------------------------------------------------------------------ async loads
@pytest.fixture
def disk_cache(tmp_path: Any) -> Any:
    """A store whose only tier is a disk: its hits load in the background."""
    c = KVCache(SPEC, chunk_size=CHUNK, cpu_bytes=0, disk_path=str(tmp_path / "disk"))
    yield c
    c.close()


def test_disk_hit_loads_in_the_background_while_the_request_waits(disk_cache):
    s = side(disk_cache)
    prompt = tokens(2 * CHUNK + 10, 20)
    keys = store(disk_cache, prompt, 2)
    req = request("bg", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (2 * CHUNK, True)  # async: the batch keeps running
    b = blocks(9)
    alloc(s, req, b[:8], 2 * CHUNK)  # vLLM allocates blocks for the loaded tokens only
    assert s.hit_sources(req, 2 * CHUNK) == {"disk": 2 * CHUNK} and leases(disk_cache) == 1
    # vLLM does not schedule a request while it waits for its KV: the plan leaves with the next step anyway
    meta = s.build_connector_meta(SchedulerOutput.make_empty())
    assert meta.loads == [LoadOp("bg", keys, chunks_of(b, 0, 2), [0, 0], meta.loads[0].lease, [CHUNK, CHUNK],
                                 ["disk", "disk"], background=True)]
    assert s.counters.async_hits == 1
    # loaded: vLLM allocates the rest (no new claim) and schedules it as a new request
    alloc(s, req, b, 0)
    meta = s.build_connector_meta(new_step(req, b, 2 * CHUNK, 10))
    assert meta.loads == [] and meta.saves == []  # nothing loaded twice; every full chunk is stored
    s.request_finished(req)
    assert s.num_requests() == 0 and leases(disk_cache) == 0


@pytest.mark.parametrize("mode, tier, want", [("auto", "cpu", False), ("auto", "disk", True),
                                               ("always", "cpu", True), ("never", "disk", False)])
def test_async_loads_option_picks_the_path(cache, disk_cache, mode, tier, want):
    c = cache if tier == "cpu" else disk_cache
    prompt = tokens(CHUNK + 3, 21)
    store(c, prompt, 1)
    assert side(c, async_loads=mode).get_num_new_matched_tokens(request("m", prompt), 0) == (CHUNK, want)


def test_request_aborted_during_its_async_load_leaves_no_state_or_pin(disk_cache):
    s = side(disk_cache)
    prompt = tokens(2 * CHUNK + 10, 22)
    store(disk_cache, prompt, 2)
    req = request("gone", prompt)
    s.get_num_new_matched_tokens(req, 0)
    alloc(s, req, blocks(8), 2 * CHUNK)
    assert len(s.build_connector_meta(SchedulerOutput.make_empty()).loads) == 1
    s.request_finished(req)  # aborted while waiting; the worker hears of it from finished_req_ids
    assert s.num_requests() == 0 and leases(disk_cache) == 0
    # an async plan dropped before it reached the worker still reaches it, as a failed load, so
    # vLLM (which keeps the request's blocks until the load is reported) is not left waiting
    other = request("early", prompt)
    s.get_num_new_matched_tokens(other, 0)
    b = blocks(8, base=300)
    alloc(s, other, b, 2 * CHUNK)
    s.request_finished(other)
    meta = s.build_connector_meta(SchedulerOutput.make_empty())
    assert meta.loads == [LoadOp("early", [], [b], [0], background=True)]
    assert s.num_requests() == 0 and leases(disk_cache) == 0


def test_failed_allocation_bookkeeping_still_reports_an_async_claim(disk_cache):
    s = side(disk_cache)
    prompt = tokens(CHUNK + 10, 23)
    store(disk_cache, prompt, 1)
    req = request("broken", prompt)
    s.get_num_new_matched_tokens(req, 0)
    b = blocks(4)
    alloc(s, req, b, CHUNK)
    s.abandon_claim(req, CHUNK)  # what the connector does when update_state_after_alloc raised
    meta = s.build_connector_meta(SchedulerOutput.make_empty())
    assert meta.loads == [LoadOp("broken", [], [b], [0], background=True)] and leases(disk_cache) == 0


# ------------------------------------------------------------------ partial chunks
def test_partial_chunk_is_saved_at_block_granularity_and_claimed_by_a_longer_prompt(cache):
    s = side(cache)
    first = tokens(CHUNK + 3 * BS + 5, 24)  # one chunk, three whole blocks, 5 tokens
    req = request("turn1", first)
    s.get_num_new_matched_tokens(req, 0)
    b = blocks(8)
    alloc(s, req, b, 0)
    meta = s.build_connector_meta(new_step(req, b, 0, len(first)))
    full = cache.keys(first, full_only=True)
    pkey = partial_key(cache.namespace, chain_hash(b"", first[:CHUNK]), first[CHUNK:CHUNK + 3 * BS])
    assert meta.saves == [SaveOp("turn1", full[0], b[0:4]), SaveOp("turn1", pkey, b[4:7])]
    cache.store_chunks([full[0], pkey], [torch.zeros(SPEC.chunk_shape(CHUNK)), torch.ones(SPEC.chunk_shape(3 * BS))])
    s.request_finished(req)
    # the next turn extends it: chunk 1 is now whole in the prompt, but only its partial is stored
    second = first + tokens(CHUNK, 25)
    req2 = request("turn2", second)
    assert s.get_num_new_matched_tokens(req2, 0) == (CHUNK + 3 * BS, False)
    b2 = blocks(13, base=500)
    alloc(s, req2, b2, CHUNK + 3 * BS)
    assert s.hit_sources(req2, CHUNK + 3 * BS) == {"cpu": CHUNK + 3 * BS}
    meta = s.build_connector_meta(new_step(req2, b2, CHUNK + 3 * BS, len(second) - CHUNK - 3 * BS))
    assert [(op.keys, op.blocks, op.sizes) for op in meta.loads] == [([full[0], pkey], [b2[0:4], b2[4:7]],
                                                                        [CHUNK, 3 * BS])]
    assert s.counters.partial_hits == 1
    # the chunk that was partial is whole now and saved as such (and the new tail's partial too)
    keys2 = cache.keys(second, full_only=True)
    p2 = partial_key(cache.namespace, chain_hash(chain_hash(b"", second[:CHUNK]), second[CHUNK:2 * CHUNK]),
                     second[2 * CHUNK:2 * CHUNK + 3 * BS])
    assert meta.saves == [SaveOp("turn2", keys2[1], b2[4:8]), SaveOp("turn2", p2, b2[8:11])]


def test_partial_probe_is_one_locate_of_at_most_blocks_per_chunk_minus_one_keys(cache):
    s = side(cache)
    calls: list[int] = []
    real = cache.locate
    cache.locate = lambda keys: calls.append(len(keys)) or real(keys)  # count the store's calls
    prompt = tokens(2 * CHUNK + 3 * BS + 1, 26)
    s.get_num_new_matched_tokens(request("probe", prompt), 0)
    assert calls == [2, BPC - 1]  # the full chunks, then the partial candidates of chunk 0 (the run's end)


def test_partial_and_full_chunk_of_the_same_tokens_never_share_a_key(cache):
    ns = cache.namespace
    t = tokens(CHUNK, 27)
    assert partial_key(ns, b"", t) != bind(ns, chain_hash(b"", t))  # the same tokens as a whole chunk
    # kvlayer.keys binds a partial chain link like a full one: chunk 1 of CHUNK - 8 tokens hashes
    # sha256(d_0 || tokens), exactly the bytes of a first chunk whose first 8 "token ids" spell d_0.
    head, tail = tokens(CHUNK, 28), tokens(CHUNK - 8, 29)
    d0 = chain_hash(b"", head)
    crafted = list(np.frombuffer(d0, dtype="<u4").astype(np.int64)) + tail
    assert bind(ns, chain_hash(d0, tail)) == cache.keys(crafted, full_only=True)[0]  # the keys module's partial
    assert partial_key(ns, d0, tail) != cache.keys(crafted, full_only=True)[0]  # the connector's never is
    assert len({partial_key(ns, p, tail[:n]) for p in (b"", d0) for n in (BS, 2 * BS)}) == 4


def test_finished_request_keeps_its_blocks_until_its_last_partial_chunk_is_gathered(cache):
    s = side(cache, save_generated=True)
    prompt = tokens(CHUNK + 20, 30)
    req = request("fin", prompt)
    s.get_num_new_matched_tokens(req, 0)
    b = blocks(7)
    alloc(s, req, b, 0)
    s.build_connector_meta(new_step(req, b, 0, len(prompt)))
    req.append_output_token_ids(tokens(40, 31))  # 124 tokens, 123 computed: chunk 1 holds 3 whole blocks
    req.num_computed_tokens = len(prompt) + 39
    assert s.request_finished(req, b[:8]) is True  # vLLM keeps the blocks until get_finished reports it
    assert s.num_requests() == 0 and leases(cache) == 0
    meta = s.build_connector_meta(SchedulerOutput.make_empty())
    all_tokens = list(req.all_token_ids)
    key = partial_key(cache.namespace, chain_hash(b"", all_tokens[:CHUNK]), all_tokens[CHUNK:CHUNK + 3 * BS])
    assert meta.saves == [SaveOp("fin", key, b[4:7], finished=True)]
    # a request that never ran a step (aborted while loading) has nothing to save and keeps nothing
    idle = request("idle", prompt)
    s.get_num_new_matched_tokens(idle, 0)
    assert s.request_finished(idle, b) is False


# ------------------------------------------------------------------ load or recompute
def feed(s: SchedulerSide, *, tier: str, per_chunk_s: float, latency_s: float = 0.0) -> None:
    """What the worker reports: timed reads of ``tier`` and timed forward passes (a step costs
    5 ms plus 20 us per token plus 1 ns per unit of attention work)."""
    loads = [(tier, n, latency_s + per_chunk_s * n) for n in (1, 2, 3, 4)]
    steps = [(n, float(n * (n / 2)), 0.005 + 2e-5 * n + 1e-9 * n * n / 2) for n in (16, 64, 128, 256, 512, 1, 1, 1, 1, 8)]
    s.on_worker_meta(KVLayerWorkerMeta(loads=loads, steps=steps))


def test_hits_from_a_tier_slower_than_recompute_are_declined(disk_cache):
    prompt = tokens(2 * CHUNK + 5, 32)
    store(disk_cache, prompt, 2)
    slow = side(disk_cache)
    feed(slow, tier="disk", per_chunk_s=0.5)  # recomputing 64 tokens costs ~1.3 ms here
    assert slow.get_num_new_matched_tokens(request("slow", prompt), 0) == (0, False)
    assert slow.counters.declined_hits == 1 and slow.counters.declined_tokens == 2 * CHUNK
    fast = side(disk_cache)
    feed(fast, tier="disk", per_chunk_s=1e-5)
    assert fast.get_num_new_matched_tokens(request("fast", prompt), 0) == (2 * CHUNK, True)
    assert fast.counters.declined_hits == 0
    off = side(disk_cache, load_or_recompute=False)
    feed(off, tier="disk", per_chunk_s=0.5)
    assert off.get_num_new_matched_tokens(request("off", prompt), 0) == (2 * CHUNK, True)


def test_a_declined_tier_is_loaded_again_once_its_estimate_is_stale(disk_cache):
    prompt = tokens(CHUNK + 5, 33)
    store(disk_cache, prompt, 1)
    s = side(disk_cache, estimate_refresh_s=1e-9)  # every estimate is stale at once
    feed(s, tier="disk", per_chunk_s=0.5)
    assert s.get_num_new_matched_tokens(request("probe", prompt), 0) == (CHUNK, True)
    assert s.counters.probe_hits == 1 and s.counters.declined_hits == 0


def test_no_estimate_yet_claims_everything(disk_cache):
    prompt = tokens(CHUNK + 5, 34)
    store(disk_cache, prompt, 1)
    s = side(disk_cache)
    s.on_worker_meta(KVLayerWorkerMeta(loads=[("disk", 1, 10.0)]))  # a slow tier, but no prefill timing yet
    assert s.get_num_new_matched_tokens(request("new", prompt), 0) == (CHUNK, True)


def test_best_claim_stops_where_a_slower_tier_begins():
    est = Estimates()
    for n in (1, 2, 3):
        est.add_load("cpu", n, 1e-4 * n)
        est.add_load("redis", n, 1.0 * n)
    for n in (16, 64, 128, 256, 512, 1, 1, 1, 1, 8):
        est.add_step(n, n * n / 2, 0.005 + 2e-5 * n)
    bounds = [(0, 64), (64, 128), (128, 192)]
    claim = est.best_claim(["cpu", "cpu", "redis"], bounds)
    assert claim.chunks == 2 and claim.load_s is not None and claim.recompute_s is not None
    assert claim.load_s < claim.recompute_s
    assert est.best_claim(["redis"] * 3, bounds).chunks == 0


def test_decayed_fit_recovers_a_linear_cost_and_follows_a_change():
    fit = DecayedFit(2, decay=0.8)
    for n in (1, 2, 3, 4, 5, 6):
        fit.add((1.0, n), 0.01 + 0.002 * n)
    w = fit.solve()
    assert w is not None and abs(w[0] - 0.01) < 1e-9 and abs(w[1] - 0.002) < 1e-9
    for _ in range(60):  # the tier became slow: old samples fade out
        for n in (1, 2, 3):
            fit.add((1.0, n), 0.5 * n)
    w = fit.solve()
    assert w is not None and abs(w[1] - 0.5) < 1e-3
    assert DecayedFit(3, min_samples=8).solve() is None


# ------------------------------------------------------------------ worker reports, one process
def test_queued_saves_reported_by_the_worker_are_hits_until_they_land(cache):
    s = side(cache)
    prompt = tokens(CHUNK + 3, 35)
    keys = cache.keys(prompt, full_only=True)
    s.on_worker_meta(KVLayerWorkerMeta(stored=keys))  # queued for saving, not in the store yet
    req = request("queued", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (CHUNK, False)  # loaded now: the worker waits for its save
    alloc(s, req, blocks(5), CHUNK)
    assert s.hit_sources(req, CHUNK) == {"worker": CHUNK}
    s.on_worker_meta(KVLayerWorkerMeta(landed=keys))  # written (here: dropped by the tier): the store answers
    assert s.get_num_new_matched_tokens(request("landed", prompt), 0) == (0, False)


def test_request_whose_async_load_failed_is_recomputed_without_a_new_lookup(disk_cache):
    s = side(disk_cache)
    prompt = tokens(2 * CHUNK + 10, 36)
    store(disk_cache, prompt, 2)
    req = request("failed", prompt)
    s.get_num_new_matched_tokens(req, 0)
    alloc(s, req, blocks(8), 2 * CHUNK)
    s.build_connector_meta(SchedulerOutput.make_empty())
    lookups = s.counters.lookups
    # the worker reported every block failed: vLLM resets the request and asks again
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert s.counters.lookups == lookups and s.counters.failed_async_retries == 1 and leases(disk_cache) == 0
    b = blocks(9, base=600)
    alloc(s, req, b, 0)
    meta = s.build_connector_meta(new_step(req, b, 0, len(prompt)))
    assert meta.loads == [] and meta.saves == []  # recomputed; its chunks are still stored


def test_a_tier_that_does_not_answer_costs_vllm_a_retry_not_a_stall_then_a_miss(disk_cache):
    prompt = tokens(CHUNK + 5, 37)
    store(disk_cache, prompt, 1)
    gate = threading.Event()
    real = disk_cache.locate
    disk_cache.locate = lambda keys: gate.wait(30) and real(keys)  # a tier that hangs until released
    s = side(disk_cache, lookup_wait_s=0.0, lookup_deadline_s=30.0)
    req = request("hung", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # "ask again later": the batch runs on
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # still one lookup in flight
    gate.set()
    deadline = time.monotonic() + 30
    answer = s.get_num_new_matched_tokens(req, 0)
    while answer == (None, False) and time.monotonic() < deadline:
        answer = s.get_num_new_matched_tokens(req, 0)
    assert answer == (CHUNK, True) and s.counters.lookups == 1
    # past its deadline a lookup is a miss, counted
    gate.clear()
    late = side(disk_cache, lookup_wait_s=0.0, lookup_deadline_s=1e-6)
    other = request("late", prompt)
    assert late.get_num_new_matched_tokens(other, 0) == (0, False)
    assert late.counters.lookup_timeouts == 1 and late.num_requests() == 1
    gate.set()
