"""kvlayer inside real vLLM (CPU build): greedy tokens with kvlayer == tokens without it.

Each engine runs in its own subprocess (this file is also the script it runs: ``python
tests/integration/test_vllm.py <scenario> <args.json>``), single-process mode (scheduler and worker in one
PID), tiny random Llama from ``tests/fixtures/tiny_model.py``. Three engine processes in total:
  baseline  - no connector: the reference tokens for every prompt (vLLM prefix cache reset
              before every call, so each is a full prefill);
  main      - kvlayer with CPU + disk tiers: cold, warm from CPU, cached prefix + new tail, a
              batch sharing prefixes, an aborted request, stored KV replaced by noise (output
              must change), corrupted blobs and a raising tier (output must not change);
  restart   - a new process on the same disk directory (warm from disk) with a CPU tier too
              small for one chunk (full tier) and a KV cache so small that vLLM preempts
              requests: tokens identical, no request state and no pin left.
The fault injections (noise, corruption, a tier whose reads raise) act on the real store of
the running engine; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHUNK = 256
MAX_TOKENS = 12

pytestmark = pytest.mark.vllm


# ============================================================================ engine side (script)
def _kv_config(disk: str | None, **extra: Any) -> dict[str, Any]:
    # load_or_recompute off: these scenarios count loaded tokens; the decision is tested in test_vllm_async.py
    cfg: dict[str, Any] = {"chunk_size": CHUNK, "cpu_bytes": "256MiB", "load_or_recompute": False, **extra}
    if disk:
        cfg["disk_path"] = disk
    return {"kv_connector": "KVLayerConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": cfg}


def make_prompts() -> dict[str, list[int]]:
    """Token-id prompts (no tokenizer round trip): all deterministic."""
    from transformers import AutoTokenizer

    from tests.fixtures.tiny_model import sample_text, tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())

    def ids(seed: int, n: int) -> list[int]:
        out = tok(sample_text(n, seed=seed))["input_ids"]
        assert len(out) >= n, (len(out), n)
        return out[:n]

    long = ids(1, 1100)
    shared = ids(2, 600)
    p: dict[str, list[int]] = {
        "long": long,
        "tail": long[:1024] + ids(3, 200),
        "noise": ids(4, 800),
        "corrupt": ids(5, 700),
        "raise": ids(6, 650),
        "abort": ids(7, 900),
        "exact": ids(8, 1024),  # a whole number of chunks: the claim ends one token short
    }
    for i in range(6):
        p[f"batch{i}"] = shared[: 512 + 64 * (i % 3)] + ids(10 + i, 150 + 40 * i)
    for i in range(3):
        p[f"pressure{i}"] = ids(20 + i, 900)
    return p


# 16 usable blocks of 128 tokens: two 900-token prompts fill them (8 blocks each), and once their
# decode passes token 1024 each needs a 9th block: vLLM must preempt one of them.
PRESSURE_TOKENS = 150
#: Greedy tokens compared with the solo baseline under preemption. Batched decoding can drift from
#: solo decoding (matmul shapes change the rounding: in bf16 we measured drifts from token ~10 on,
#: with or without kvlayer); a wrong KV load shows at once, so compare a prefix.
PRESSURE_COMPARE = 100


def _engine(kv: dict[str, Any] | None, **kw: Any) -> Any:
    from vllm import LLM

    from tests.fixtures.tiny_model import tiny_model_dir

    # float32 (the tiny model's own dtype): batched and solo greedy decoding then agree far longer
    # than in bf16, where matmul shapes alone change the rounding; bf16 runs in the server and
    # demo tests and in tests/integration/test_vllm_layout.py.
    args: dict[str, Any] = dict(distributed_executor_backend="uni", enforce_eager=True, max_model_len=2048, seed=0,
                                dtype="float32")
    args.update(kw)
    if kv is not None:
        args["kv_transfer_config"] = kv
    return LLM(tiny_model_dir(), **args)


def _gen(llm: Any, prompts: list[list[int]], reset: bool = True, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if reset:
        llm.reset_prefix_cache()  # vLLM's own prefix cache: every hit must come from kvlayer
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _connector(llm: Any) -> Any:
    """The engine's scheduler-side connector; single-process mode, so its stats include the worker's."""
    from kvlayer.connectors.vllm import connector_of

    return connector_of(llm)


def _levels(cache: Any) -> list[Any]:
    """The store levels under the engine's KVCache, hot to cold. Fault injection only: the
    connector itself never reaches past ``KVCache``; this test does, to break real tiers."""
    return list(cache._store.levels)


def _revive(cache: Any) -> None:
    """Close every tier's circuit breaker again after an injected fault."""
    for lv in _levels(cache):
        lv.breaker.reset()


def _snap(conn: Any) -> dict[str, Any]:
    s = conn.stats()
    return {"c": dict(s["connector"]), "store": s["store"]["store"], "reqs": s["scheduler_requests"],
            "layout": s["layout"], "tiers": {t["name"]: t for t in s["store"]["tiers"]}}


def scenario_baseline(args: dict[str, Any]) -> dict[str, Any]:
    prompts = make_prompts()
    llm = _engine(None)
    out = {}
    for name, p in prompts.items():
        out[name] = _gen(llm, [p], max_tokens=PRESSURE_TOKENS if name.startswith("pressure") else MAX_TOKENS)[0]
    return {"tokens": out}


def scenario_main(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    P = make_prompts()
    llm = _engine(_kv_config(args["disk"]))
    conn = _connector(llm)
    cache = conn.cache
    r: dict[str, Any] = {"tokens": {}, "stats": {}}
    tok, st = r["tokens"], r["stats"]
    st["rope_theta"] = cache.config.rope_theta

    tok["cold_long"] = _gen(llm, [P["long"]])[0]
    conn.flush()  # saves run in the background: count them once they are done
    st["cold"] = _snap(conn)
    tok["warm_long"] = _gen(llm, [P["long"]])[0]
    st["warm"] = _snap(conn)
    tok["tail"] = _gen(llm, [P["tail"]])[0]
    st["tail"] = _snap(conn)
    tok["exact_cold"] = _gen(llm, [P["exact"]])[0]
    st["exact_cold"] = _snap(conn)
    tok["exact_warm"] = _gen(llm, [P["exact"]])[0]
    st["exact_warm"] = _snap(conn)

    batch = [P[f"batch{i}"] for i in range(6)]
    tok["batch_cold"] = _gen(llm, batch)
    st["batch_cold"] = _snap(conn)
    tok["batch_warm"] = _gen(llm, batch)
    st["batch_warm"] = _snap(conn)

    # Aborted requests: one mid-decode, one still waiting with a planned load.
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    _gen(llm, [P["abort"]])  # store its chunks so the next one is a hit
    llm.reset_prefix_cache()
    eng = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    eng.add_request("abort-running", TokensPrompt(prompt_token_ids=P["abort"]), sp)
    eng.step()
    eng.step()
    st["abort_mid"] = _snap(conn)
    eng.add_request("abort-waiting", TokensPrompt(prompt_token_ids=P["long"]), sp)
    eng.abort_request(["abort-running", "abort-waiting"])  # external ids
    for _ in range(20):
        if not eng.has_unfinished_requests():
            break
        eng.step()
    st["abort_after"] = _snap(conn)

    # Noise: replace the stored KV of a prompt; a real load must change the output.
    tok["noise_cold"] = _gen(llm, [P["noise"]])[0]
    conn.flush()
    keys = cache.keys(P["noise"], full_only=True)
    got = cache.retrieve_chunks(keys)
    assert all(c is not None for c in got)
    cache.evict(keys=keys, force=True)
    g = torch.Generator().manual_seed(0)
    noise = [(torch.randn(c.shape, generator=g) * 3).to(c.dtype) for c in got]
    cache.store_chunks(keys, noise, block=True)
    conn.flush()
    before = _snap(conn)
    tok["noise_warm"] = _gen(llm, [P["noise"]])[0]
    st["noise"] = {"before": before, "after": _snap(conn)}

    # Corruption: flip payload bytes of the disk copies -> checksum miss -> recompute. The CPU
    # tier keeps blobs unsealed (no checksum inside the process, kvlayer/storage), so its copies
    # are dropped first and the load reads the sealed disk copies.
    tok["corrupt_cold"] = _gen(llm, [P["corrupt"]])[0]
    conn.flush()
    keys = cache.keys(P["corrupt"], full_only=True)
    mem = _levels(cache)[0].tier
    for k in keys:
        mem.delete(k)
    for f in Path(args["disk"]).rglob("*.kvb"):
        if f.name[:-4] in keys:
            data = bytearray(f.read_bytes())
            data[-64:] = bytes(b ^ 0x5A for b in data[-64:])
            f.write_bytes(bytes(data))
    before = _snap(conn)
    tok["corrupt_warm"] = _gen(llm, [P["corrupt"]])[0]
    st["corrupt"] = {"before": before, "after": _snap(conn)}

    # A tier whose reads raise: lookups still succeed, every read fails -> recompute.
    tok["raise_cold"] = _gen(llm, [P["raise"]])[0]
    conn.flush()

    def boom(*a: Any, **k: Any) -> Any:
        raise OSError("injected tier failure")

    saved = []
    for lv in _levels(cache):
        saved.append((lv.tier, lv.tier.get_many, lv.tier.get, lv.tier.get_opened))
        lv.tier.get_many = boom
        lv.tier.get = boom
        lv.tier.get_opened = boom  # the read the store uses (the disk tier implements it itself)
    before = _snap(conn)
    tok["raise_warm"] = _gen(llm, [P["raise"]])[0]
    st["raise"] = {"before": before, "after": _snap(conn)}
    for tier, gm, gg, go in saved:
        tier.get_many, tier.get, tier.get_opened = gm, gg, go
    _revive(cache)

    conn.flush()
    st["final"] = _snap(conn)
    return r


def scenario_restart(args: dict[str, Any]) -> dict[str, Any]:
    """A new engine process on main's disk directory, with a 64 KiB CPU tier (smaller than one
    chunk: 2 layers x 2 x 256 x 2 heads x 32 x fp32 = 256 KiB, so every write to it fails and
    chunks only reach the disk tier) and a KV cache so small that vLLM must preempt."""
    P = make_prompts()
    llm = _engine(_kv_config(args["disk"], cpu_bytes="64KiB"), num_gpu_blocks_override=17, max_num_seqs=3)
    conn = _connector(llm)
    r: dict[str, Any] = {"tokens": {}, "stats": {"before": _snap(conn)}}
    r["tokens"]["long"] = _gen(llm, [P["long"]])[0]
    r["stats"]["after"] = _snap(conn)
    _gen(llm, [P[f"pressure{i}"] for i in range(3)], max_tokens=1)  # store the prompts' chunks
    conn.flush()
    r["tokens"]["pressure"] = _gen(llm, [P[f"pressure{i}"] for i in range(3)], max_tokens=PRESSURE_TOKENS)
    r["stats"]["pressure"] = _snap(conn)
    return r


def _script_main(scenarios: dict[str, Any] | None = None) -> None:
    """Run the scenario named on the command line (``scenario_<name>`` in ``scenarios``, default
    this module's) and write its result where its arguments say."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    scenario, arg_file = sys.argv[1], sys.argv[2]
    args = json.loads(Path(arg_file).read_text())
    result = (scenarios or globals())[f"scenario_{scenario}"](args)
    Path(args["out"]).write_text(json.dumps(result, default=str))
    sys.stdout.flush()
    os._exit(0)  # vLLM engines do not always shut down cleanly; the result is written


if __name__ == "__main__":
    _script_main()


# ============================================================================ pytest side
def engine_env() -> dict[str, str]:
    cache = REPO / ".cache" / "test"
    env = dict(os.environ)
    env.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "HF_HOME": str(cache / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TMPDIR": str(cache / "tmp"),
        "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    env.pop("KVLAYER_CONFIG", None)
    for k in [k for k in env if k.startswith("KVLAYER_") and k != "KVLAYER_EXT_CACHE"]:
        env.pop(k)
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def run_scenario(name: str, tmp: Path, timeout: int = 400, script: Path = Path(__file__), **args: Any) -> dict[str, Any]:
    """Run ``scenario_<name>`` of ``script`` (a test module that is also the engine's script) in
    its own engine process; returns what it wrote."""
    out = tmp / f"{name}.json"
    arg_file = tmp / f"{name}.args.json"
    arg_file.write_text(json.dumps({**args, "out": str(out)}))
    log = tmp / f"{name}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(script.resolve()), name, str(arg_file)],
                                stdout=fh, stderr=subprocess.STDOUT, env=engine_env(), cwd=str(REPO),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    if rc != 0 or not out.exists():
        tail = log.read_text()[-6000:]
        raise AssertionError(f"scenario {name} failed (rc={rc}); log tail:\n{tail}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pytest.importorskip("vllm")
    from tests.fixtures.tiny_model import tiny_model_dir

    tiny_model_dir()
    tmp = tmp_path_factory.mktemp("vllm")
    disk = REPO / ".cache" / "test" / f"vllm-disk-{os.getpid()}"
    import shutil

    shutil.rmtree(disk, ignore_errors=True)
    try:
        res = {"baseline": run_scenario("baseline", tmp)}
        res["main"] = run_scenario("main", tmp, disk=str(disk))
        res["restart"] = run_scenario("restart", tmp, disk=str(disk))
        yield res
    finally:
        shutil.rmtree(disk, ignore_errors=True)


def _c(snap: dict[str, Any], key: str) -> int:
    return int(snap["c"][key])


def test_layout_was_probed_from_the_cpu_backend(runs):
    layout = runs["main"]["stats"]["cold"]["layout"]
    # CPU backend: K transposed inside the page (token stride 1), V row-major (dim stride 1).
    assert layout.startswith("probe:CPUAttentionBackendImpl"), layout
    assert "K strided(base=0, t=1," in layout and ", d=1)" in layout.split("V ")[1], layout


def test_connector_hands_the_models_rope_base_to_the_codecs(runs):
    """The tiny Llama's config says rope_theta 10000 (transformers' default): the connector reads
    it from vLLM's model config, for the int codecs' RoPE-aware keys (docs/codecs.md)."""
    assert runs["main"]["stats"]["rope_theta"] == 10000.0


def test_cold_and_warm_cpu_identical_and_really_loaded(runs):
    base, main = runs["baseline"]["tokens"], runs["main"]
    assert main["tokens"]["cold_long"] == base["long"]
    assert main["tokens"]["warm_long"] == base["long"]
    cold, warm = main["stats"]["cold"], main["stats"]["warm"]
    assert _c(cold, "saved_chunks") == 1100 // CHUNK and _c(cold, "loaded_chunks") == 0
    assert _c(warm, "loaded_tokens") - _c(cold, "loaded_tokens") == (1100 // CHUNK) * CHUNK
    assert warm["store"]["hits_by_tier"].get("cpu", 0) >= 1100 // CHUNK


def test_cached_prefix_with_new_tail(runs):
    main = runs["main"]
    assert main["tokens"]["tail"] == runs["baseline"]["tokens"]["tail"]
    assert _c(main["stats"]["tail"], "loaded_tokens") - _c(main["stats"]["warm"], "loaded_tokens") == 1024


def test_prompt_of_whole_chunks_loads_all_but_its_last_token(runs):
    main, base = runs["main"], runs["baseline"]["tokens"]
    assert main["tokens"]["exact_cold"] == base["exact"] and main["tokens"]["exact_warm"] == base["exact"]
    cold, warm = main["stats"]["exact_cold"], main["stats"]["exact_warm"]
    # 1023 tokens claimed; the last block is loaded whole and vLLM recomputes its last slot
    assert _c(warm, "hit_tokens") - _c(cold, "hit_tokens") == 1023
    assert _c(warm, "loaded_tokens") - _c(cold, "loaded_tokens") == 1024


def test_batch_sharing_prefixes(runs):
    base = runs["baseline"]["tokens"]
    want = [base[f"batch{i}"] for i in range(6)]
    main = runs["main"]
    assert main["tokens"]["batch_cold"] == want
    assert main["tokens"]["batch_warm"] == want
    s0, s1 = main["stats"]["exact_warm"], main["stats"]["batch_cold"]
    # the shared 512-token prefix is stored once (others skip or hit), each tail chunk once
    assert _c(s1, "skipped_saves") - _c(s0, "skipped_saves") + _c(s1, "hit_requests") - _c(s0, "hit_requests") > 0
    s2 = main["stats"]["batch_warm"]
    # warm: the first request of the batch loads the shared prefix from kvlayer; the others may
    # then find it in vLLM's own prefix cache (same step), and load their own tail chunks
    assert _c(s2, "loaded_tokens") - _c(s1, "loaded_tokens") >= 2 * CHUNK
    assert _c(s2, "hit_requests") - _c(s1, "hit_requests") >= 2


def test_aborted_requests_leave_no_state_or_pin(runs):
    mid, after = runs["main"]["stats"]["abort_mid"], runs["main"]["stats"]["abort_after"]
    assert mid["reqs"] >= 1  # the running request had state ...
    assert after["reqs"] == 0  # ... and it is gone, as is the waiting one's
    assert after["store"]["leases"] == 0 and after["store"]["pinned_keys"] == 0


def test_noise_in_store_changes_output(runs):
    t, base = runs["main"]["tokens"], runs["baseline"]["tokens"]
    assert t["noise_cold"] == base["noise"]
    n = runs["main"]["stats"]["noise"]
    assert _c(n["after"], "loaded_tokens") - _c(n["before"], "loaded_tokens") == (800 // CHUNK) * CHUNK
    assert t["noise_warm"] != base["noise"], "a KV hit must really be used, not silently recomputed"


@pytest.mark.parametrize("fault", ["corrupt", "raise"])
def test_faulty_store_recomputes_identically(runs, fault):
    t, base = runs["main"]["tokens"], runs["baseline"]["tokens"]
    assert t[f"{fault}_cold"] == base[fault]
    assert t[f"{fault}_warm"] == base[fault]
    s = runs["main"]["stats"][fault]
    assert _c(s["after"], "load_errors") > _c(s["before"], "load_errors")
    assert _c(s["after"], "loaded_tokens") == _c(s["before"], "loaded_tokens")
    if fault == "corrupt":
        assert s["after"]["store"]["corrupt"] > s["before"]["store"]["corrupt"]
    else:
        assert s["after"]["store"]["tier_errors"] > s["before"]["store"]["tier_errors"]


def test_warm_from_disk_after_engine_restart_with_full_cpu_tier(runs):
    r = runs["restart"]
    assert r["tokens"]["long"] == runs["baseline"]["tokens"]["long"]
    before, after = r["stats"]["before"], r["stats"]["after"]
    assert before["tiers"]["disk"]["num_keys"] > 0
    assert after["store"]["hits_by_tier"].get("disk", 0) >= 1100 // CHUNK
    assert _c(after, "loaded_tokens") == (1100 // CHUNK) * CHUNK
    # the full CPU tier refused every chunk and nothing broke
    assert after["tiers"]["cpu"]["num_keys"] == 0 and after["tiers"]["cpu"]["dropped_writes"] > 0


def test_preempted_requests_leave_no_state_or_pin(runs):
    r, base = runs["restart"], runs["baseline"]["tokens"]
    got = r["tokens"]["pressure"]
    assert [len(t) for t in got] == [PRESSURE_TOKENS] * 3
    assert [t[:PRESSURE_COMPARE] for t in got] == [base[f"pressure{i}"][:PRESSURE_COMPARE] for i in range(3)]
    s = r["stats"]["pressure"]
    assert _c(s, "preemptions") > 0, "the small KV cache should have forced vLLM to preempt"
    assert _c(s, "loaded_tokens") > _c(r["stats"]["after"], "loaded_tokens")  # resumed requests loaded
    assert s["reqs"] == 0 and s["store"]["leases"] == 0 and s["store"]["pinned_keys"] == 0


def test_final_state_clean(runs):
    f = runs["main"]["stats"]["final"]
    assert f["reqs"] == 0 and f["store"]["leases"] == 0 and f["store"]["pinned_keys"] == 0
    assert _c(f, "save_errors") == 0
