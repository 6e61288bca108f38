"""Asynchronous loads, partial chunks and load-or-recompute inside real vLLM (CPU build).

Like tests/integration/test_vllm.py (whose helpers run each engine in its own subprocess; this
file is also the script it runs), with a real ``redis-server`` as the only kvlayer tier, so every
hit loads in the background (vLLM's async path). Two engine processes:
  baseline - no connector: the reference greedy tokens of every prompt;
  async    - kvlayer on Redis, a KV cache of 16 blocks of 128 tokens (vLLM preempts under load):
             async and sync loads of the same prompt; a partial chunk saved by one prompt and
             loaded by a longer one; Redis made slower than recompute (the connector's test-only
             per-tier delay) until its hits are declined; a request aborted while its load is in
             flight; Redis stopped with SIGSTOP while a request's load is in flight and another
             request decodes (the decode keeps producing a token every step, the load is
             abandoned at its deadline and recomputed; a request arriving meanwhile, whose lookup
             Redis cannot answer, is a miss after the lookup deadline); preemption with async loads.
Counters and tokens are asserted, never speeds.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_vllm import CHUNK, MAX_TOKENS, _engine, _gen, _revive, make_prompts, run_scenario

pytestmark = pytest.mark.vllm

DEADLINE_S = 1.5  # the load deadline in this engine
DECODE_TOKENS = 700  # the request that keeps decoding while another request's load hangs (fits the 16 blocks)
# Paces the steps while a load or lookup hangs: a fast machine took ~2 ms a step and the decoder
# spent all its tokens during the first 1.5 s stall, leaving none to show the second one.
STEP_PACE_S = 0.01
COMPARE = 100  # tokens of long decodes compared with solo decoding (see PRESSURE_COMPARE in test_vllm)


# ============================================================================ engine side (script)
def prompts() -> dict[str, list[int]]:
    p = make_prompts()
    more = make_prompts_extra()
    return {"long": p["long"], "tail": p["tail"], "tail_more": p["tail"] + more["extend"], "exact": p["exact"],
            "noise": p["noise"], "abort": p["abort"], "decoder": more["decoder"],
            **{f"pressure{i}": p[f"pressure{i}"] for i in range(3)}}


def make_prompts_extra() -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    from tests.fixtures.tiny_model import sample_text, tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())
    return {"extend": tok(sample_text(400, seed=40))["input_ids"][:300],
            "decoder": tok(sample_text(400, seed=41))["input_ids"][:300]}


LENGTHS = {"decoder": DECODE_TOKENS, "pressure0": 150, "pressure1": 150, "pressure2": 150}


def scenario_baseline(args: dict[str, Any]) -> dict[str, Any]:
    llm = _engine(None)
    return {"tokens": {n: _gen(llm, [p], max_tokens=min(LENGTHS.get(n, MAX_TOKENS), COMPARE + 50))[0]
                       for n, p in prompts().items()}}


def _snap(conn: Any) -> dict[str, Any]:
    s = conn.stats()
    return {"c": dict(s["connector"]), "reqs": s["scheduler_requests"], "inflight": s.get("inflight_loads", 0),
            "leases": s["store"]["store"]["leases"], "pinned": s["store"]["store"]["pinned_keys"]}


def _counters(conn: Any) -> dict[str, Any]:
    """The connector's counters alone: unlike ``stats()`` they never ask the (maybe stopped) tiers."""
    return {"c": {**conn.scheduler.counters.as_dict(), **conn.pair.worker.counters.as_dict()},
            "inflight": conn.pair.worker.inflight()}


def _with(side: Any, **changes: Any) -> None:
    """Change a connector half's options in place (the test switches modes inside one engine)."""
    side.options = side.options.model_copy(update=changes)


def _drive(eng: Any, until: Any, limit_s: float = 120.0, toks: dict[str, list[int]] | None = None
           ) -> dict[str, list[int]]:
    """Step the engine until ``until(tokens so far)``; returns (and updates ``toks`` with) each
    request's tokens."""
    toks = {} if toks is None else toks
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for o in eng.step():
            toks[o.request_id] = list(o.outputs[0].token_ids)
        if until(toks):
            return toks
    raise AssertionError(f"engine did not get there in {limit_s}s: {[(k, len(v)) for k, v in toks.items()]}")


def scenario_async(args: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kvlayer.testing import RedisServer

    P = prompts()
    r: dict[str, Any] = {"tokens": {}, "stats": {}}
    tok, st = r["tokens"], r["stats"]
    redis = RedisServer().start()
    stopped = False
    try:
        kv = {"kv_connector": "KVLayerConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
              "kv_role": "kv_both",
              "kv_connector_extra_config": {"chunk_size": CHUNK, "cpu_bytes": 0, "redis_url": redis.url,
                                            "load_deadline_s": DEADLINE_S, "lookup_deadline_s": DEADLINE_S,
                                            "load_or_recompute": False}}
        llm = _engine(kv, num_gpu_blocks_override=17, max_num_seqs=3)
        from kvlayer.connectors.vllm import connector_of

        conn = connector_of(llm)
        sched, worker = conn.scheduler, conn.pair.worker
        eng = llm.llm_engine

        def warm(name: str, max_tokens: int = MAX_TOKENS) -> list[int]:
            return _gen(llm, [P[name]], max_tokens=max_tokens)[0]

        # -- async and sync loads of the same prompt
        tok["cold_long"] = warm("long")
        conn.flush()
        st["cold"] = _snap(conn)
        tok["async_long"] = warm("long")
        st["async"] = _snap(conn)
        _with(sched, async_loads="never")
        tok["sync_long"] = warm("long")
        st["sync"] = _snap(conn)
        _with(sched, async_loads="auto")

        # -- a partial chunk saved by one prompt, loaded by a longer one
        tok["tail"] = warm("tail")
        conn.flush()
        st["partial_before"] = _snap(conn)
        tok["tail_more"] = warm("tail_more")
        st["partial_after"] = _snap(conn)
        tail = P["tail"]
        full_keys = conn.cache.keys(P["tail_more"], full_only=True)
        from kvlayer.connectors.vllm.scheduler import partial_key

        from kvlayer.keys import token_chain

        chain = token_chain(tail, CHUNK, full_only=True)
        pkey = partial_key(conn.cache.namespace, chain[-1], tail[4 * CHUNK:4 * CHUNK + 128])
        r["partial"] = {"stored": conn.cache.locate([pkey])[0], "is_a_full_key": pkey in full_keys}

        # -- Redis slower than recompute: its hits get declined
        tok["exact_cold"] = warm("exact")
        conn.flush()
        _with(sched, load_or_recompute=True)
        worker.delays["redis"] = 0.3  # per chunk: 1.2 s for this prompt's 4 chunks
        st["slow_before"] = _snap(conn)
        tok["exact_slow"] = []
        for _ in range(6):
            tok["exact_slow"].append(warm("exact"))
            if _snap(conn)["c"]["declined_hits"] > st["slow_before"]["c"]["declined_hits"]:
                break
        st["slow_after"] = _snap(conn)
        worker.delays.clear()
        _with(sched, load_or_recompute=False)

        # -- a request aborted while its load is in flight
        warm("abort")
        conn.flush()
        llm.reset_prefix_cache()
        worker.delays["redis"] = 0.5  # 1.5 s before its read starts: still in flight when aborted
        _with(worker, load_deadline_s=30.0)
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        st["abort_before"] = _snap(conn)
        eng.add_request("aborted", TokensPrompt(prompt_token_ids=P["abort"]), sp)
        eng.step()
        st["abort_inflight"] = _snap(conn)
        eng.abort_request(["aborted"])
        _drive(eng, lambda _t: not eng.has_unfinished_requests() and _snap(conn)["inflight"] == 0)
        st["abort_after"] = _snap(conn)
        _with(worker, load_deadline_s=DEADLINE_S)
        deadline = time.monotonic() + 30
        while _snap(conn)["c"]["late_loads"] == st["abort_before"]["c"]["late_loads"] and time.monotonic() < deadline:
            time.sleep(0.05)  # its read comes back after the abort and is discarded
        worker.delays.clear()
        st["abort_late"] = _snap(conn)

        # -- Redis stopped while a load is in flight and another request decodes
        warm("noise")
        conn.flush()
        llm.reset_prefix_cache()
        long_sp = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True)
        eng.add_request("decoder", TokensPrompt(prompt_token_ids=P["decoder"]), long_sp)
        toks = _drive(eng, lambda t: len(t.get("decoder", [])) >= 3)
        worker.delays["redis"] = 0.1  # the read starts after the stop below
        eng.add_request("stalled", TokensPrompt(prompt_token_ids=P["noise"]), sp)
        st["stall_before"] = _counters(conn)
        for o in eng.step():  # schedules "stalled": its load is claimed and handed to a loader thread
            toks[o.request_id] = list(o.outputs[0].token_ids)
        os.kill(redis.pid, signal.SIGSTOP)
        stopped = True
        steps_while_loading = gained = 0
        while worker.inflight() > 0:
            time.sleep(STEP_PACE_S)
            before = len(toks.get("decoder", []))
            for o in eng.step():
                toks[o.request_id] = list(o.outputs[0].token_ids)
            if before < DECODE_TOKENS:  # count the steps in which the decoder was still running
                steps_while_loading += 1
                gained += len(toks.get("decoder", [])) - before
        st["stall_abandoned"] = _counters(conn)
        # a request arriving while Redis is still stopped: its lookup cannot be answered either
        eng.add_request("unanswered", TokensPrompt(prompt_token_ids=P["long"]), sp)
        lookup_steps = lookup_gained = 0
        limit = time.monotonic() + 60
        while sched.counters.lookup_timeouts == st["stall_abandoned"]["c"]["lookup_timeouts"]:
            assert time.monotonic() < limit, "the lookup never timed out"
            time.sleep(STEP_PACE_S)
            before = len(toks.get("decoder", []))
            for o in eng.step():
                toks[o.request_id] = list(o.outputs[0].token_ids)
            if before < DECODE_TOKENS:
                lookup_steps += 1
                lookup_gained += len(toks.get("decoder", [])) - before
        st["stall_unanswered"] = _counters(conn)
        _drive(eng, lambda t: min(len(t.get("stalled", [])), len(t.get("unanswered", []))) >= MAX_TOKENS, toks=toks)
        eng.abort_request(["decoder"])
        _drive(eng, lambda _t: not eng.has_unfinished_requests())
        os.kill(redis.pid, signal.SIGCONT)
        stopped = False
        worker.delays.clear()
        deadline = time.monotonic() + 30
        while worker.counters.late_loads == st["abort_late"]["c"]["late_loads"] and time.monotonic() < deadline:
            time.sleep(0.05)  # the stuck read returns (timeout or answer) and is discarded
        _revive(conn.cache)
        tok["stalled"] = toks["stalled"]
        tok["unanswered"] = toks["unanswered"]
        tok["decoder"] = toks["decoder"][:COMPARE]
        r["stall"] = {"decoder_tokens_while_loading": gained, "steps_while_loading": steps_while_loading,
                      "decoder_tokens_while_looking_up": lookup_gained, "steps_while_looking_up": lookup_steps}
        st["stall_after"] = _snap(conn)

        # -- preemption with async loads (16 blocks: three 900-token prompts cannot all decode)
        _gen(llm, [P[f"pressure{i}"] for i in range(3)], max_tokens=1)
        conn.flush()
        st["pressure_before"] = _snap(conn)
        tok["pressure"] = [t[:COMPARE] for t in _gen(llm, [P[f"pressure{i}"] for i in range(3)], max_tokens=150)]
        conn.flush()
        st["pressure_after"] = _snap(conn)
        return r
    finally:
        if stopped:
            os.kill(redis.pid, signal.SIGCONT)
        redis.cleanup()


if __name__ == "__main__":
    from tests.integration.test_vllm import _script_main

    _script_main(globals())


# ============================================================================ pytest side
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pytest.importorskip("vllm")
    from kvlayer.testing import REDIS_SERVER
    from tests.fixtures.tiny_model import tiny_model_dir

    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed")
    tiny_model_dir()
    tmp = tmp_path_factory.mktemp("vllm-async")
    me = Path(__file__)
    yield {"baseline": run_scenario("baseline", tmp, script=me), "async": run_scenario("async", tmp, script=me)}


def _c(snap: dict[str, Any], key: str) -> int:
    return int(snap["c"][key])


def _delta(a: dict[str, Any], b: dict[str, Any], key: str) -> int:
    return _c(b, key) - _c(a, key)


def _clean(snap: dict[str, Any]) -> None:
    assert snap["reqs"] == 0 and snap["inflight"] == 0 and snap["leases"] == 0 and snap["pinned"] == 0, snap


def test_async_and_sync_loads_give_identical_tokens(runs):
    base, t, s = runs["baseline"]["tokens"], runs["async"]["tokens"], runs["async"]["stats"]
    assert t["cold_long"] == t["async_long"] == t["sync_long"] == base["long"]
    full = 1100 // CHUNK * CHUNK
    assert _delta(s["cold"], s["async"], "loaded_tokens") == full and _delta(s["cold"], s["async"], "async_loads") == 1
    assert _delta(s["async"], s["sync"], "loaded_tokens") == full and _delta(s["async"], s["sync"], "async_loads") == 0
    _clean(s["sync"])


def test_partial_chunk_is_reused_with_identical_tokens_under_its_own_key(runs):
    base, t, s = runs["baseline"]["tokens"], runs["async"]["tokens"], runs["async"]["stats"]
    assert t["tail"] == base["tail"] and t["tail_more"] == base["tail_more"]
    before, after = s["partial_before"], s["partial_after"]
    # 1224 tokens: four chunks and one whole 128-token block; the longer prompt loads all of it
    assert _delta(before, after, "partial_hits") == 1
    assert _delta(before, after, "loaded_tokens") == 4 * CHUNK + 128
    assert runs["async"]["partial"] == {"stored": "redis", "is_a_full_key": False}


def test_tier_slower_than_recompute_gets_its_hits_declined(runs):
    base, t, s = runs["baseline"]["tokens"], runs["async"]["tokens"], runs["async"]["stats"]
    assert t["exact_cold"] == base["exact"] and all(x == base["exact"] for x in t["exact_slow"])
    before, after = s["slow_before"], s["slow_after"]
    assert _delta(before, after, "declined_hits") >= 1 and _delta(before, after, "declined_tokens") >= 3 * CHUNK
    # the declined request loaded nothing: every load counted came from the slow requests it claimed
    assert _delta(before, after, "hit_requests") == len(t["exact_slow"]) - 1


def test_request_aborted_during_its_async_load_leaves_no_pin_and_no_state(runs):
    s = runs["async"]["stats"]
    assert s["abort_inflight"]["inflight"] == 1 and s["abort_inflight"]["leases"] >= 1
    assert _delta(s["abort_before"], s["abort_after"], "cancelled_loads") == 1
    _clean(s["abort_after"])
    assert _delta(s["abort_before"], s["abort_late"], "late_loads") == 1  # its read came back and was dropped
    assert _delta(s["abort_before"], s["abort_late"], "loaded_tokens") == 0


def test_hung_redis_delays_no_other_request_and_is_recomputed_after_the_deadline(runs):
    base, t, r = runs["baseline"]["tokens"], runs["async"]["tokens"], runs["async"]
    s = r["stats"]
    # the load hung for the whole deadline, yet the decoding request got a token in every step
    assert r["stall"]["decoder_tokens_while_loading"] >= r["stall"]["steps_while_loading"] - 1
    assert r["stall"]["steps_while_loading"] >= 5
    assert _delta(s["stall_before"], s["stall_abandoned"], "abandoned_loads") == 1
    assert _delta(s["stall_before"], s["stall_after"], "failed_async_retries") == 1  # no second lookup on a hung tier
    assert t["stalled"] == base["noise"] and len(t["decoder"]) >= 20
    assert t["decoder"] == base["decoder"][:len(t["decoder"])]
    # a request whose lookup the stopped Redis cannot answer: a miss after lookup_deadline_s, the
    # decoder kept its token per step meanwhile, same tokens as without a cache
    assert _delta(s["stall_abandoned"], s["stall_unanswered"], "lookup_timeouts") == 1
    assert r["stall"]["decoder_tokens_while_looking_up"] >= r["stall"]["steps_while_looking_up"] - 1
    assert r["stall"]["steps_while_looking_up"] >= 3
    assert t["unanswered"] == base["long"]
    _clean(s["stall_after"])


def test_preempted_requests_with_async_loads_leave_no_pin_and_no_state(runs):
    base, t, s = runs["baseline"]["tokens"], runs["async"]["tokens"], runs["async"]["stats"]
    assert t["pressure"] == [base[f"pressure{i}"][:COMPARE] for i in range(3)]
    before, after = s["pressure_before"], s["pressure_after"]
    assert _delta(before, after, "preemptions") > 0, "16 blocks should have forced vLLM to preempt"
    assert _delta(before, after, "async_loads") >= 3
    _clean(after)
