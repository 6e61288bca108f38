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

from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from kvlayer.connectors.vllm.config import ConnectorOptions  # noqa: E402
from kvlayer.connectors.vllm.metadata import ConnectorMeta, KVLayerWorkerMeta, LoadOp, SaveOp  # noqa: E402
from kvlayer.connectors.vllm.scheduler import SchedulerSide  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.v1.core.kv_cache_manager import KVCacheBlocks  # noqa: E402
from vllm.v1.core.kv_cache_utils import KVCacheBlock  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from kvlayer import KVCache, KVSpec  # noqa: E402

BS, CHUNK = 16, 64  # vLLM block size, kvlayer chunk size
BPC = CHUNK // BS  # blocks per chunk
SPEC = KVSpec(model="unit-scheduler", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")


@pytest.fixture
def cache() -> Any:
    c = KVCache(SPEC, chunk_size=CHUNK, cpu_bytes="16MiB")
    yield c
    c.close()


def side(cache: KVCache, *, remote: bool = False, **options: Any) -> SchedulerSide:
    return SchedulerSide(cache, ConnectorOptions(**options), block_size=BS, remote_worker=remote)


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
    assert s.counters.as_dict() == {"lookups": 1, "hit_requests": 0, "hit_tokens": 0, "preemptions": 0}
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
    for save_generated, want in ((False, 0), (True, 1)):
        s = side(cache, save_generated=save_generated)
        req = request(f"gen-{save_generated}", prompt)
        s.get_num_new_matched_tokens(req, 0)
        b = blocks(8)
        alloc(s, req, b, 0)
        m = s.build_connector_meta(new_step(req, b, 0, len(prompt)))
        assert [op.blocks for op in m.saves] == [b[0:4]]
        req.append_output_token_ids(tokens(9, 4))  # 129 tokens: the second chunk is complete
        m = s.build_connector_meta(cached_step((req.request_id, [400], 128, 1)))
        key = cache.keys(list(req.all_token_ids)[:2 * CHUNK], full_only=True)[1]
        assert m.saves == [SaveOp(req.request_id, key, b[4:8])][:want]
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
    assert lease and meta.loads == [LoadOp("warm", keys[first_chunk:], chunks_of(b, first_chunk, 3), skips, lease)]
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
    assert s.build_connector_meta(new_step(skip, b, 0, len(prompt))) == ConnectorMeta()  # no load, no save
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
