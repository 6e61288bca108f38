"""CacheBlend inside real vLLM (CPU build) through ``KVLayerBlendConnector``.

Like tests/integration/test_vllm.py, each engine runs in its own subprocess (this file is also
the script: ``python tests/integration/test_vllm_blend.py <scenario> <args.json>``), single-process
mode, the tiny random Llama from tests/fixtures/tiny_model.py in float32. Two engine processes:
  baseline - no connector: the reference greedy tokens and first-token log-probs;
  blend    - KVLayerBlendConnector, blend on, gate off unless a step turns it on: documents
             registered through ``LLM.generate``, blends at ratio 1.0 (must equal the baseline),
             reordered documents, a batch of two blended prompts, the default ratio (first-token
             log-probs compared with the reference runner over the Hugging Face model), vLLM's
             prefix cache after a blend, then the fallbacks: ``kvlayer_blend: false``, the gate,
             an evicted document, a corrupt document blob, a tier whose reads raise.
Nothing is mocked; faults act on the running engine's real store.
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
    sys.path.append(str(REPO))  # appended: the installed kvlayer (and its entry points) come first

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 10
TOPK = 20
#: Tolerance of the first token's log-probs through vLLM vs the reference runner at the default
#: ratio (max abs difference over vLLM's top 20, nats). Both run the same loop and selection on the
#: same float32 weights; they differ only in rounding: vLLM's fused QKV matmul and paged attention
#: for the last token, document KV computed by vLLM vs transformers. Measured 2.4e-6 (the same as
#: vLLM's full prefill vs transformers'), while the blend itself moves them by ~0.7 and a wrong
#: position or rotation by more: 1e-3 leaves room for a top-k selection tie broken the other way
#: on another CPU, and catches any real difference.
LOGPROB_TOL = 1e-3
#: Decode length under preemption (see scenario_preempt) and the tokens compared with solo runs:
#: batched decoding may drift from solo decoding by rounding (see PRESSURE_COMPARE in test_vllm.py).
PREEMPT_TOKENS = 150
PREEMPT_COMPARE = 100


# ============================================================================ engine side (script)
def make_prompts() -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    from tests.fixtures.tiny_model import sample_text, tiny_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model_dir())

    def ids(seed: int, n: int) -> list[int]:
        return list(tok(sample_text(n, seed=seed), add_special_tokens=False)["input_ids"][:n])

    pre, pre2 = ids(41, 40), ids(42, 56)
    doc_a, doc_b = ids(43, 300), ids(44, 260)
    q1, q2 = ids(45, 30), ids(46, 24)
    return {"pre": pre, "doc_a": doc_a, "doc_b": doc_b,
            "p1": pre + doc_a + doc_b + q1,  # doc_a right after the context it was computed after
            "p2": pre2 + doc_b + doc_a + q2,  # reordered, after another prefix
            "p3": pre + doc_b + doc_a + q2}  # (preemption only) the registered context, documents swapped


def _engine(kv: dict[str, Any] | None, **kw: Any) -> Any:
    from vllm import LLM

    from tests.fixtures.tiny_model import tiny_model_dir

    args: dict[str, Any] = dict(distributed_executor_backend="uni", enforce_eager=True, max_model_len=2048, seed=0,
                                dtype="float32", **kw)
    if kv is not None:
        args["kv_transfer_config"] = kv
    return LLM(tiny_model_dir(), **args)


def _gen(llm: Any, prompts: list[list[int]], params: dict[str, Any] | None = None, *, max_tokens: int = MAX_TOKENS,
         logprobs: int | None = None, reset: bool = True) -> list[dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if reset:
        llm.reset_prefix_cache()  # vLLM's own prefix cache; kvlayer's store is kept
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs,
                        extra_args={"kv_transfer_params": params} if params else None)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    res = []
    for o in outs:
        r: dict[str, Any] = {"tokens": list(o.outputs[0].token_ids), "cached": int(o.num_cached_tokens or 0)}
        if logprobs:
            r["logprobs"] = {int(t): float(lp.logprob) for t, lp in o.outputs[0].logprobs[0].items()}
        res.append(r)
    return res


def scenario_baseline(args: dict[str, Any]) -> dict[str, Any]:
    P = make_prompts()
    llm = _engine(None)
    return {k: _gen(llm, [P[k]], logprobs=TOPK)[0] for k in ("p1", "p2")}


def _reference_logprobs(P: dict[str, list[int]], ratio: float) -> dict[str, Any]:
    """The reference runner (transformers, same weights) blending p1 over the same documents."""
    import torch
    from transformers import AutoModelForCausalLM

    from kvlayer.blend import BlendConfig, Blender, scratch_cache
    from tests.fixtures.tiny_model import tiny_model_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    with scratch_cache(model, chunk_size=256) as cache:
        blender = Blender(model, cache, BlendConfig(gate=False))
        blender.add_document("a", P["doc_a"], context=P["pre"])
        blender.add_document("b", P["doc_b"])
        # vLLM's run has the exact first blocks of pre + doc_a cached (the registration computed
        # them): give the reference the same exact prefix
        head = P["pre"] + P["doc_a"]
        cache.store(head, blender.full_prefill(head).kv)
        out = blender.blend(P["p1"], recompute_ratio=ratio)
        full = blender.full_prefill(P["p1"])
    lp = torch.log_softmax(out.logits[-1].float(), -1)
    lp_full = torch.log_softmax(full.logits[-1].float(), -1)
    return {"logprobs": lp.tolist(), "full_logprobs": lp_full.tolist(), "mode": out.mode,
            "prefix": out.prefix_tokens, "recomputed": out.recomputed_tokens, "reused": out.reused_tokens}


def scenario_blend(args: dict[str, Any]) -> dict[str, Any]:
    from kvlayer.connectors.vllm import connector_of, models

    from kvlayer.blend.gate import CalibrationStore

    P = make_prompts()
    kv = {"kv_connector": "KVLayerBlendConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both",
          "kv_connector_extra_config": {"chunk_size": 256, "cpu_bytes": "256MiB", "disk_path": args["disk"],
                                        "blend": {"enabled": True, "gate": False}}}
    llm = _engine(kv)
    conn = connector_of(llm)
    cache = conn.cache
    r: dict[str, Any] = {"plugin_models": len(models._live), "out": {}, "blend": {}}
    out, st = r["out"], r["blend"]

    def snap(name: str) -> None:
        s = conn.stats()
        st[name] = {**s["blend"], "failures": sum(s["failures"].values())}

    # registration through LLM.generate (max_tokens=1)
    _gen(llm, [P["pre"] + P["doc_a"]], {"kvlayer_document": {"id": "a", "context_tokens": len(P["pre"])}},
         max_tokens=1)
    _gen(llm, [P["doc_b"]], {"kvlayer_document": {"id": "b", "context_tokens": 0}}, max_tokens=1)
    cache.flush()
    r["documents"] = sorted(d.doc_id for d in cache.documents())
    snap("registered")

    full = {"kvlayer_blend_ratio": 1.0}
    out["p1_r1"] = _gen(llm, [P["p1"]], full)[0]
    snap("p1_r1")
    out["p2_r1"] = _gen(llm, [P["p2"]], full)[0]
    out["batch_r1"] = _gen(llm, [P["p1"], P["p2"]], full)
    snap("batch_r1")

    # default ratio (0.15, gate off); then vLLM's prefix cache is NOT reset between requests
    out["p1_default"] = _gen(llm, [P["p1"]], logprobs=TOPK)[0]
    snap("p1_default")
    out["p1_default_again"] = _gen(llm, [P["p1"]], logprobs=TOPK, reset=False)[0]
    out["p1_off_after_blend"] = _gen(llm, [P["p1"]], {"kvlayer_blend": False}, reset=False)[0]
    snap("off")

    # the gate: on, no record -> refused; a record -> blended at its ratio
    calib = CalibrationStore(args["calibration"])
    bs = conn.blend_scheduler
    assert bs is not None
    bs.options = bs.options.model_copy(update={"gate": True})
    bs.calibration = calib
    out["gate_uncalibrated"] = _gen(llm, [P["p1"]])[0]
    snap("gate_uncalibrated")
    calib.put(cache.spec.model, {"status": "ok", "ratio": 0.2})
    out["gate_calibrated"] = _gen(llm, [P["p1"]])[0]
    snap("gate_calibrated")
    bs.options = bs.options.model_copy(update={"gate": False})

    # a document evicted before scheduling: prefix reuse + recompute
    cache.evict(doc_id="b", force=True)
    out["evicted"] = _gen(llm, [P["p1"]])[0]
    snap("evicted")
    _gen(llm, [P["doc_b"]], {"kvlayer_document": {"id": "b", "context_tokens": 0}}, max_tokens=1)
    cache.flush()

    # a corrupt document blob: found at scheduling, unreadable at load -> vLLM recomputes. Stored
    # afresh and corrupted before its first read (a blob already verified is not checked again)
    cache.evict(doc_id="a", force=True)
    _gen(llm, [P["pre"] + P["doc_a"]], {"kvlayer_document": {"id": "a", "context_tokens": len(P["pre"])}},
         max_tokens=1)
    cache.flush()
    # fault injection only (the connector never reaches past KVCache): the CPU tier trusts its own
    # blobs, so the copy is dropped there and the disk tier's file is corrupted
    levels = cache._store.levels
    keys = cache.document("a").keys
    levels[0].tier.delete_many(keys)
    hit = 0
    for f in Path(args["disk"]).rglob("*.kvb"):
        if f.name[:-4] in keys:
            data = bytearray(f.read_bytes())
            data[-64:] = bytes(b ^ 0x5A for b in data[-64:])
            f.write_bytes(bytes(data))
            hit += 1
    r["corrupted_files"] = hit
    out["corrupt"] = _gen(llm, [P["p2"]])[0]  # p1's head is an exact prefix by now (saved by "off")
    snap("corrupt")
    _gen(llm, [P["pre"] + P["doc_a"]], {"kvlayer_document": {"id": "a", "context_tokens": len(P["pre"])}},
         max_tokens=1)
    cache.flush()

    # a tier whose reads raise
    def boom(*a: Any, **k: Any) -> Any:
        raise OSError("injected tier failure")

    reads = ("get", "get_many", "get_opened")  # every read entry point a tier has
    saved = [(lv.tier, {m: getattr(lv.tier, m) for m in reads if hasattr(lv.tier, m)}) for lv in cache._store.levels]
    for tier, methods in saved:
        for m in methods:
            setattr(tier, m, boom)
    out["dead_tier"] = _gen(llm, [P["p2"]])[0]
    snap("dead_tier")
    for tier, methods in saved:
        for m, fn in methods.items():
            setattr(tier, m, fn)
    for lv in cache._store.levels:
        lv.breaker.reset()
    out["after_faults"] = _gen(llm, [P["p1"]], full)[0]
    snap("after_faults")
    r["reference"] = _reference_logprobs(P, 0.15)
    return r


def scenario_preempt(args: dict[str, Any]) -> dict[str, Any]:
    """Blended requests that vLLM preempts: a KV cache of 16 usable blocks of 128 tokens; three
    ~640-token prompts take 15 of them, and their decodes need 6 more, so vLLM must preempt. A
    resumed request is matched afresh and blended again (or, if its blocks are still in vLLM's
    prefix cache under the blend's salted hashes, reuses them): its tokens must be those of the
    same request run alone, and nothing of it may stay behind (pins, blend state)."""
    from kvlayer.connectors.vllm import connector_of

    P = make_prompts()
    kv = {"kv_connector": "KVLayerBlendConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both",
          "kv_connector_extra_config": {"chunk_size": 256, "cpu_bytes": "256MiB",
                                        "blend": {"enabled": True, "gate": False}}}
    llm = _engine(kv, num_gpu_blocks_override=17, max_num_seqs=3)
    conn = connector_of(llm)
    _gen(llm, [P["pre"] + P["doc_a"]], {"kvlayer_document": {"id": "a", "context_tokens": len(P["pre"])}},
         max_tokens=1)
    _gen(llm, [P["doc_b"]], {"kvlayer_document": {"id": "b", "context_tokens": 0}}, max_tokens=1)
    conn.cache.flush()
    names = ("p1", "p2", "p3")
    r: dict[str, Any] = {"solo": {}, "batch": {}, "stats": {}}

    def snap(name: str) -> None:
        s = conn.stats()
        r["stats"][name] = {"blend": s["blend"], "preemptions": s["connector"]["preemptions"],
                            "leases": s["store"]["store"]["leases"], "pinned": s["store"]["store"]["pinned_keys"],
                            "blend_requests": conn.blend_scheduler.num_requests() if conn.blend_scheduler else -1,
                            "scheduler_requests": s["scheduler_requests"]}

    snap("start")
    for mode, params in (("exact", {"kvlayer_blend": False}), ("r1", {"kvlayer_blend_ratio": 1.0}),
                         ("default", None)):
        # alone: no pressure (7 blocks of 16), so no preemption
        r["solo"][mode] = [_gen(llm, [P[n]], params, max_tokens=PREEMPT_TOKENS)[0]["tokens"] for n in names]
        snap(f"{mode}_solo")
        r["batch"][mode] = [o["tokens"] for o in _gen(llm, [P[n] for n in names], params, max_tokens=PREEMPT_TOKENS)]
        snap(f"{mode}_batch")
    return r


def scenario_replica(args: dict[str, Any]) -> dict[str, Any]:
    """Another engine on the same ``kvlayer serve``: blends documents a server process registered."""
    from kvlayer.connectors.vllm import connector_of

    kv = {"kv_connector": "KVLayerBlendConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both",
          "kv_connector_extra_config": {"chunk_size": 256, "cpu_bytes": "128MiB", "server_url": args["server_url"],
                                        "blend": {"enabled": True, "gate": False}}}
    llm = _engine(kv)
    conn = connector_of(llm)
    blend = _gen(llm, [args["prompt"]], {"kvlayer_blend_ratio": 1.0})[0]
    off = _gen(llm, [args["prompt"]], {"kvlayer_blend": False})[0]  # after: it saves exact prefix chunks
    return {"off": off, "blend": blend, "stats": conn.stats()["blend"],
            "documents": sorted(d.doc_id for d in conn.cache.documents())}


def _script_main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    scenario, arg_file = sys.argv[1], sys.argv[2]
    args = json.loads(Path(arg_file).read_text())
    result = globals()[f"scenario_{scenario}"](args)
    Path(args["out"]).write_text(json.dumps(result, default=str))
    sys.stdout.flush()
    os._exit(0)  # vLLM engines do not always shut down cleanly; the result is written


if __name__ == "__main__":
    _script_main()


# ============================================================================ pytest side
def _run(name: str, tmp: Path, timeout: int = 500, **args: Any) -> dict[str, Any]:
    from tests.integration.test_vllm import engine_env

    out, arg_file, log = tmp / f"{name}.json", tmp / f"{name}.args.json", tmp / f"{name}.log"
    arg_file.write_text(json.dumps({**args, "out": str(out)}))
    env = engine_env()
    env["PYTHONPATH"] = env.get("PYTHONPATH", "").replace(str(REPO), "").strip(os.pathsep)  # installed kvlayer first
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), name, str(arg_file)], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, cwd=str(tmp), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    if rc != 0 or not out.exists():
        raise AssertionError(f"scenario {name} failed (rc={rc}); log tail:\n{log.read_text()[-6000:]}")
    return dict(json.loads(out.read_text()), log=str(log))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pytest.importorskip("vllm")
    from tests.fixtures.tiny_model import tiny_model_dir

    tiny_model_dir()
    tmp = tmp_path_factory.mktemp("vllm_blend")
    yield {"baseline": _run("baseline", tmp),
           "blend": _run("blend", tmp, calibration=str(tmp / "calibration.json"), disk=str(tmp / "disk")),
           "preempt": _run("preempt", tmp)}


def _delta(b: dict[str, Any], after: str, before: str, key: str) -> int:
    return int(b["blend"][after][key]) - int(b["blend"][before][key])


def test_documents_registered_through_the_engine(runs):
    b = runs["blend"]
    assert b["plugin_models"] >= 1, "the kvlayer vllm.general_plugins entry point did not record the model"
    assert b["documents"] == ["a", "b"]
    assert b["blend"]["registered"]["documents_registered"] == 2


def test_ratio_one_gives_the_same_tokens_as_vllm_alone(runs):
    base, b = runs["baseline"], runs["blend"]
    assert b["out"]["p1_r1"]["tokens"] == base["p1"]["tokens"]
    assert b["out"]["p2_r1"]["tokens"] == base["p2"]["tokens"]  # documents reordered
    assert [o["tokens"] for o in b["out"]["batch_r1"]] == [base["p1"]["tokens"], base["p2"]["tokens"]]
    # 256 exact tokens (pre + the head of doc_a, saved by its registration) come from the prefix:
    # doc_a's last 84 tokens and doc_b's 260 are blended
    assert b["blend"]["p1_r1"]["blended"] == 1 and b["blend"]["p1_r1"]["doc_tokens_reused"] == 84 + 260
    assert _delta(b, "batch_r1", "p1_r1", "blended") == 3  # p2 alone, then both in one batch
    assert b["blend"]["batch_r1"]["blend_failures"] == 0


def test_default_ratio_matches_the_reference_runner(runs):
    b = runs["blend"]
    ref = b["reference"]
    assert ref["mode"] == "blend" and ref["prefix"] == 256
    assert _delta(b, "p1_default", "batch_r1", "blended") == 1
    assert _delta(b, "p1_default", "batch_r1", "tokens_recomputed") == ref["recomputed"]
    got = {int(t): lp for t, lp in b["out"]["p1_default"]["logprobs"].items()}
    diffs = {t: abs(lp - ref["logprobs"][t]) for t, lp in got.items()}
    worst = max(diffs.values())
    # the reference's own distance from a full prefill, for scale
    gap = max(abs(ref["logprobs"][t] - ref["full_logprobs"][t]) for t in got)
    assert worst <= LOGPROB_TOL, f"vLLM vs reference top-{TOPK} log-probs differ by {worst:.4f} (blend gap {gap:.4f})"
    assert max(got, key=got.__getitem__) == max(range(len(ref["logprobs"])), key=ref["logprobs"].__getitem__)


def test_blended_blocks_are_never_served_as_exact(runs):
    base, b = runs["baseline"], runs["blend"]
    out = b["out"]
    # vLLM looks its prefix cache up before the connector salts: the same request blended again
    # finds only the exact blocks and is blended again, to the same tokens ...
    assert out["p1_default_again"]["tokens"] == out["p1_default"]["tokens"]
    # ... and an ordinary request for the same prompt gets only the exact blocks (pre + doc_a) from
    # vLLM's prefix cache and computes the rest: the tokens of vLLM alone
    assert out["p1_off_after_blend"]["cached"] <= 256
    assert out["p1_off_after_blend"]["tokens"] == base["p1"]["tokens"]
    assert _delta(b, "off", "p1_default", "blend_refused") == 1
    assert _delta(b, "off", "p1_default", "blended") == 1


def test_gate(runs):
    base, b = runs["baseline"], runs["blend"]
    assert b["out"]["gate_uncalibrated"]["tokens"] == base["p1"]["tokens"]
    assert _delta(b, "gate_uncalibrated", "off", "blended") == 0
    assert _delta(b, "gate_uncalibrated", "off", "blend_refused") == 1
    assert _delta(b, "gate_calibrated", "gate_uncalibrated", "blended") == 1


@pytest.mark.parametrize(("case", "prompt"), [("evicted", "p1"), ("corrupt", "p2"), ("dead_tier", "p2")])
def test_fallbacks_give_the_tokens_of_vllm_alone(runs, case, prompt):
    base, b = runs["baseline"], runs["blend"]
    assert b["out"][case]["tokens"] == base[prompt]["tokens"]


def test_fallback_paths_taken(runs):
    s = runs["blend"]["blend"]
    assert s["evicted"]["blend_refused"] - s["gate_calibrated"]["blend_refused"] == 1  # refused at scheduling
    assert s["evicted"]["blended"] == s["gate_calibrated"]["blended"]
    assert runs["blend"]["corrupted_files"] == 2  # doc_a's two chunks
    assert s["corrupt"]["blend_failures"] - s["evicted"]["blend_failures"] == 1  # claimed, failed at load
    assert s["dead_tier"]["blended"] == s["corrupt"]["blended"]
    b = runs["blend"]
    assert b["out"]["after_faults"]["tokens"] == runs["baseline"]["p1"]["tokens"]
    assert s["after_faults"]["blended"] - s["dead_tier"]["blended"] == 1  # healthy again


def test_preempted_blends_resume_to_the_tokens_of_solo_runs_and_leave_nothing(runs):
    r = runs["preempt"]
    st = r["stats"]
    for mode in ("exact", "r1", "default"):
        before = st[f"{mode}_solo"]
        after = st[f"{mode}_batch"]
        assert after["preemptions"] > before["preemptions"], f"{mode}: vLLM did not preempt (the test needs it)"
        assert [len(t) for t in r["batch"][mode]] == [PREEMPT_TOKENS] * 3
        assert [t[:PREEMPT_COMPARE] for t in r["batch"][mode]] == [t[:PREEMPT_COMPARE] for t in r["solo"][mode]], mode
        assert (after["leases"], after["pinned"]) == (st["start"]["leases"], st["start"]["pinned"]), (mode, after)
        assert after["blend_requests"] == 0 and after["scheduler_requests"] == 0, (mode, after)
    # ratio 1.0 recomputes every token: with or without preemption, the tokens of vLLM alone
    assert r["solo"]["r1"] == r["solo"]["exact"]
    assert [t[:PREEMPT_COMPARE] for t in r["batch"]["r1"]] == [t[:PREEMPT_COMPARE] for t in r["solo"]["exact"]]
    # the blended modes really blended, the batches more than once per request (resumed requests)
    for mode in ("r1", "default"):
        solo = st[f"{mode}_solo"]["blend"]["blended"] - st[("start" if mode == "r1" else "r1_batch")]["blend"]["blended"]
        batch = st[f"{mode}_batch"]["blend"]["blended"] - st[f"{mode}_solo"]["blend"]["blended"]
        assert solo == 3 and batch >= 3, (mode, solo, batch)
        assert st[f"{mode}_batch"]["blend"]["blend_failures"] == 0
    assert st["exact_batch"]["blend"]["blended"] == st["start"]["blend"]["blended"]
