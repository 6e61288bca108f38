"""``kv_role`` in the vLLM connector's two halves, driven as vLLM drives them (the helpers of
test_vllm_scheduler.py / test_vllm_worker.py: real vLLM request and scheduler-output dataclasses,
a real ``KVCache``; no engine). The whole hand-off through real engines and ``kvlayer serve`` is
tests/integration/test_vllm_pd.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from kvlayer.connectors.vllm.metadata import ConnectorMeta, LoadOp, SaveOp  # noqa: E402
from kvlayer.connectors.vllm.roles import parse_role  # noqa: E402

from kvlayer.errors import ConfigError  # noqa: E402
from kvlayer.keys import chain_hash, partial_key  # noqa: E402
from tests.unit import test_vllm_scheduler as sched  # noqa: E402
from tests.unit.test_vllm_scheduler import BS, CHUNK, SPEC, blocks, new_step, request, side, store, tokens  # noqa: E402
from tests.unit.test_vllm_worker import step, until, worker  # noqa: E402

cache, disk_cache = sched.cache, sched.disk_cache  # their fixtures
N = 2 * CHUNK + 20  # two full chunks and a 20-token tail (2 blocks of 16)


def test_roles_are_checked():
    assert parse_role(None) == "kv_both" and parse_role("kv_producer") == "kv_producer"
    with pytest.raises(ConfigError, match="kv_role"):
        parse_role("kv_sender")


def test_producer_never_looks_up_saves_its_prompt_to_the_token_and_announces_it(cache):
    s = side(cache)
    s.role = "kv_producer"
    prompt = tokens(N, 1)
    keys = store(cache, prompt, 2)  # stored already: a producer still computes (it never loads)
    req = request("p", prompt)
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    b = blocks(10)
    meta = s.build_connector_meta(new_step(req, b, 0, N))
    tail = partial_key(cache.namespace, chain_hash(chain_hash(b"", prompt[:CHUNK]), prompt[CHUNK:2 * CHUNK]),
                       prompt[2 * CHUNK:])
    assert meta.saves == [SaveOp("p", keys[0], b[0:4]), SaveOp("p", keys[1], b[4:8]),
                          SaveOp("p", tail, b[8:10], tokens=20)]
    assert s.finish(req, b) == (True, {"kvlayer_pd": {"tokens": N}})  # blocks kept until the saves land
    assert s.build_connector_meta(new_step(request("q", tokens(5, 2)), [1], 0, 5)).sends == ["p"]
    assert s.num_requests() == 0 and s.counters.handed_off == 1


def test_consumer_waits_for_the_handoff_loads_all_but_the_last_token_and_never_saves(disk_cache):
    s = side(disk_cache, pd_poll_s=0.001, load_or_recompute=True)
    s.role = "kv_consumer"
    prompt = tokens(N, 3)
    req = request("c", prompt, params={"kvlayer_pd": {"tokens": N}})
    assert s.get_num_new_matched_tokens(req, 0) == (None, False)  # the producer's save has not landed
    keys = store(disk_cache, prompt, 2)
    assert s.get_num_new_matched_tokens(req, 0)[0] is None  # the tail is still missing
    tail = partial_key(disk_cache.namespace, chain_hash(chain_hash(b"", prompt[:CHUNK]), prompt[CHUNK:2 * CHUNK]),
                       prompt[2 * CHUNK:])
    disk_cache.store_chunks([tail], [torch.ones(SPEC.chunk_shape(20))])
    deadline = time.monotonic() + 10
    while (got := s.get_num_new_matched_tokens(req, 0))[0] is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert got == (N - 1, True)
    assert s.counters.handoffs == 1 and s.counters.handoff_waits == 1 and s.counters.handoff_timeouts == 0
    b = blocks(10)
    s.update_state_after_alloc(req, _blocks(b), N - 1)
    meta = s.build_connector_meta(new_step(req, b, 0, 0))
    assert [op.keys for op in meta.loads] == [[*keys, tail]] and meta.loads[0].sizes == [CHUNK, CHUNK, 20]
    meta = s.build_connector_meta(new_step(req, b, N - 1, 1))
    assert meta.saves == []  # a consumer never saves


def test_handoff_that_never_lands_is_computed_after_pd_wait_s(disk_cache):
    s = side(disk_cache, pd_poll_s=0.001, pd_wait_s=0.05)
    s.role = "kv_consumer"
    prompt = tokens(N, 4)
    store(disk_cache, prompt, 1)  # the producer died after its first chunk
    req = request("gone", prompt, params={"kvlayer_pd": {"tokens": N}})
    deadline = time.monotonic() + 10
    while (got := s.get_num_new_matched_tokens(req, 0))[0] is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert got == (CHUNK, True)  # what is there loads, the rest is computed
    assert s.counters.handoff_timeouts == 1


def _blocks(ids: list[int]) -> Any:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    return KVCacheBlocks(blocks=([KVCacheBlock(i) for i in ids],))


def test_producer_worker_trims_its_tail_and_reports_the_request_once_written(cache):
    w = worker(cache)
    w.role, w.saves.durable = "kv_producer", True
    assert w.adapter is not None
    data = torch.randn(SPEC.chunk_shape(2 * BS), generator=torch.Generator().manual_seed(5))
    w.adapter.scatter([6, 7], data)
    key = "c" * 64
    sending, _, _ = step(w, saves=(SaveOp("p", key, [6, 7], tokens=20),))
    assert sending == set()  # not finished yet
    meta = ConnectorMeta(sends=["p"])
    w.save(meta)
    deadline = time.monotonic() + 10
    while not (sending := w.get_finished(set())[0] or set()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sending == {"p"} and step(w)[0] == set()  # once
    got = cache.retrieve_chunks([key])[0]
    assert got is not None and torch.equal(got, data[:, :, :20])


def test_consumer_worker_loads_a_tail_that_ends_inside_its_last_block(cache):
    w = worker(cache)
    assert w.adapter is not None
    data = torch.randn(SPEC.chunk_shape(20), generator=torch.Generator().manual_seed(6))
    cache.store_chunks(["d" * 64], [data])
    recving, errors = until(w, "c", LoadOp("c", ["d" * 64], [[3, 9]], [0], None, [20], ["cpu"], background=True))
    assert recving == {"c"} and errors == set()
    got = w.adapter.gather([3, 9])
    assert torch.equal(got[:, :, :20], data) and not got[:, :, 20:].any()
