"""The vLLM connector's worker side (``WorkerSide``) without an engine: background loads (done,
failed, past their deadline, of requests that finished meanwhile), what ``get_finished`` and the
load errors report to vLLM, pins, and saves that leave the step.

Real: a ``KVCache`` with a CPU tier, paged KV tensors in the flash-attention layout
(``[blocks, heads, block_size, 2 * head_dim]`` per layer) and the connector's own layout adapter
for it; vLLM's calls are made by the test in vLLM's order (``bind`` -> ``start_load_kv`` ->
``wait_for_save`` -> ``get_finished`` -> load errors). The same paths inside a real engine are in
tests/integration/test_vllm_async.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from kvlayer.connectors.vllm.config import ConnectorOptions  # noqa: E402
from kvlayer.connectors.vllm.layout import make_adapter, table_layout  # noqa: E402
from kvlayer.connectors.vllm.metadata import ConnectorMeta, LoadOp, SaveOp  # noqa: E402
from kvlayer.connectors.vllm.worker import WorkerSide  # noqa: E402

from kvlayer import KVCache, KVSpec  # noqa: E402

BS, CHUNK, BLOCKS = 16, 64, 32
BPC = CHUNK // BS
SPEC = KVSpec(model="unit-worker", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")


@pytest.fixture
def cache() -> Any:
    c = KVCache(SPEC, chunk_size=CHUNK, cpu_bytes="16MiB")
    yield c
    c.close()


def worker(cache: KVCache, **options: Any) -> WorkerSide:
    w = WorkerSide(cache, block_size=BS, num_blocks=BLOCKS, layer_names=["l0", "l1"],
                   options=ConnectorOptions(**options))
    kv = [torch.zeros(BLOCKS, SPEC.num_kv_heads, BS, 2 * SPEC.head_dim) for _ in range(SPEC.num_layers)]
    layout = table_layout("FLASH_ATTN", kv[0], num_blocks=BLOCKS, block_size=BS, num_heads=SPEC.num_kv_heads,
                          head_dim=SPEC.head_dim)
    w.adapter = make_adapter(kv, layout)
    return w


def chunks(cache: KVCache, n: int, seed: int) -> tuple[list[str], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    keys = [f"{seed:04x}{i:060x}" for i in range(n)]
    data = [torch.randn(SPEC.chunk_shape(CHUNK), generator=g) for _ in range(n)]
    cache.store_chunks(keys, data)
    return keys, data


def op(req: str, keys: list[str], first_block: int, lease: str | None = None, *, tier: str = "cpu") -> LoadOp:
    blocks = [list(range(first_block + i * BPC, first_block + (i + 1) * BPC)) for i in range(len(keys))]
    return LoadOp(req, keys, blocks, [0] * len(keys), lease, [CHUNK] * len(keys), [tier] * len(keys), background=True)


def step(w: WorkerSide, *loads: LoadOp, saves: tuple[SaveOp, ...] = (), finished: frozenset[str] = frozenset(),
         tokens: int = 0) -> tuple[set[str], set[str], set[int]]:
    """One engine step as vLLM drives the worker: (finished_sending, finished_recving, failed blocks)."""
    meta = ConnectorMeta(list(loads), list(saves), step_tokens=tokens)
    w.begin_step(meta)
    w.start_load(meta)
    w.save(meta)
    sending, recving = w.get_finished(set(finished))
    return sending or set(), recving or set(), w.take_load_errors()


def until(w: WorkerSide, req: str, *loads: LoadOp, timeout: float = 20.0) -> tuple[set[str], set[int]]:
    """Step (the first step carrying ``loads``) until ``req`` is reported in finished_recving;
    returns (recving, failed blocks) of that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, recving, errors = step(w, *loads)
        loads = ()
        if req in recving:
            return recving, errors
        time.sleep(0.01)
    raise AssertionError("the worker never reported the load")


def leases(cache: KVCache) -> int:
    return int(cache.stats()["store"]["leases"])


def test_background_load_fills_the_blocks_and_is_reported_once(cache):
    w = worker(cache)
    keys, data = chunks(cache, 2, 1)
    lease = cache.pin(keys=keys)
    recving, errors = until(w, "r", op("r", keys, 4, lease))
    assert recving == {"r"} and errors == set()
    assert torch.equal(w.adapter.gather(list(range(4, 8))), data[0])  # type: ignore[union-attr]
    assert torch.equal(w.adapter.gather(list(range(8, 12))), data[1])  # type: ignore[union-attr]
    assert step(w)[1] == set()  # reported exactly once: vLLM asserts on a second report
    assert w.inflight() == 0 and leases(cache) == 0
    report = w.take_worker_meta()
    assert report is not None and [(t, n) for t, n, _ in report.loads] == [("cpu", 2)]
    assert w.counters.async_loads == 1 and w.counters.loaded_chunks == 2


def test_missing_chunk_fails_its_blocks_and_every_later_one(cache):
    w = worker(cache)
    keys, _ = chunks(cache, 3, 2)
    cache.evict(keys=[keys[1]])
    _, errors = until(w, "r", op("r", keys, 0))  # reported done, with its failed blocks in the same pass
    assert errors == set(range(BPC, 3 * BPC))
    assert w.counters.load_errors == 2 and w.counters.loaded_chunks == 1


def test_load_past_its_deadline_is_abandoned_recomputed_and_its_late_read_discarded(cache):
    w = worker(cache, load_deadline_s=0.05, test_tier_delay_s={"cpu": 0.3})  # the read takes 0.6 s
    keys, _ = chunks(cache, 2, 3)
    lease = cache.pin(keys=keys)
    recving, errors = until(w, "slow", op("slow", keys, 0, lease))
    assert errors == set(range(0, 2 * BPC))  # vLLM recomputes every block of the load
    assert w.counters.abandoned_loads == 1 and w.inflight() == 0 and leases(cache) == 0
    deadline = time.monotonic() + 20
    while w.counters.late_loads == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.counters.late_loads == 1
    assert not w.adapter.gather(list(range(0, 2 * BPC))).any()  # type: ignore[union-attr]  # nothing written
    assert step(w)[1] == set()


def test_load_of_a_request_that_finished_meanwhile_is_dropped_without_errors(cache):
    w = worker(cache, test_tier_delay_s={"cpu": 0.3})
    keys, _ = chunks(cache, 1, 4)
    lease = cache.pin(keys=keys)
    step(w, op("aborted", keys, 0, lease))
    _, recving, errors = step(w, finished=frozenset({"aborted"}))  # vLLM frees its blocks once reported
    assert recving == {"aborted"} and errors == set()
    assert w.counters.cancelled_loads == 1 and w.inflight() == 0 and leases(cache) == 0


def test_inactive_connector_reports_background_loads_failed(cache):
    w = worker(cache)
    w.adapter = None  # the KV layout could not be mapped
    keys, _ = chunks(cache, 1, 5)
    _, recving, errors = step(w, op("r", keys, 0))
    assert recving == {"r"} and errors == set(range(0, BPC))
    # a synchronous load is refused the same way, never left as unwritten blocks
    sync = LoadOp("s", keys, [[20, 21, 22, 23]], [0], None, [CHUNK], ["cpu"])
    assert step(w, sync)[2] == {20, 21, 22, 23}


def test_saves_leave_the_step_and_finished_requests_get_their_blocks_back(cache):
    w = worker(cache)
    g = torch.Generator().manual_seed(6)
    for b in range(BLOCKS):  # fill the paged cache
        w.adapter.scatter([b], torch.randn(SPEC.chunk_shape(BS), generator=g))  # type: ignore[union-attr]
    want = w.adapter.gather([0, 1, 2, 3])  # type: ignore[union-attr]
    key, tail = "a" * 64, "b" * 64
    sending, _, _ = step(w, saves=(SaveOp("run", key, [0, 1, 2, 3]), SaveOp("done", tail, [4, 5], finished=True)))
    assert sending == {"done"}  # gathered in the step: vLLM may free the finished request's blocks
    assert w.flush(10)
    got = cache.retrieve_chunks([key, tail])
    assert got[0] is not None and torch.equal(got[0], want)
    assert got[1] is not None and got[1].shape[2] == 2 * BS
    report = w.take_worker_meta()
    assert report is not None and report.stored == [key, tail] and sorted(report.landed) == sorted([key, tail])
    assert w.counters.saved_chunks == 2 and w.counters.finished_saves == 1


def test_save_queue_is_bounded_and_drops_instead_of_waiting(cache):
    one = SPEC.bytes_per_token() * CHUNK
    small = KVCache(SPEC, chunk_size=CHUNK, cpu_bytes="16MiB", write_queue_bytes=one)
    try:
        w = worker(small)
        with w.saves._cond:  # the writer cannot retire its job while the test holds its lock
            assert w.saves.submit(["c" * 64], [torch.zeros(SPEC.chunk_shape(CHUNK))])
            assert not w.saves.submit(["d" * 64], [torch.zeros(SPEC.chunk_shape(CHUNK))])  # over the bound
        assert w.flush(10) and w.saves.pending_bytes == 0
        assert w.counters.dropped_saves == 1 and w.counters.saved_chunks == 1
        assert w.take_worker_meta().missing == ["d" * 64]  # type: ignore[union-attr]  # the scheduler forgets it
    finally:
        small.close()
