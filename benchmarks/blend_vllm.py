"""CacheBlend through vLLM (KVLayerBlendConnector) vs full prefill, on SmolLM2-135M, CPU build.

The RAG workload of ``benchmarks/blend_quality.py`` (its seeded pool of essay documents with one
inserted fact each, its one-hop / two-hop questions over 4-6 shuffled documents): 8 requests with
``--quick``, 24 without. Documents are registered through the engine itself (``kvlayer_document``
requests, computed after the prompts' fixed instruction line). One vLLM engine (single process,
fp32) serves every condition, per request, interleaved:

  full       - ``kvlayer_skip``: vLLM computes the whole prompt (the baseline);
  prefix     - kvlayer prefix reuse only (``kvlayer_blend: false``): the exact chunks of
               instruction + first document that its registration saved;
  naive      - blended at ratio 0 (documents' KV re-rotated, nothing recomputed): the gap's floor;
  blend5/15/25 - CacheBlend at 5/15/25%, kvlayer's query-aware selection.

vLLM's prefix cache is reset before every request. TTFT = time to the first token stepping the
engine (median over requests of the per-request ratio to full). Quality through vLLM, on the first
answer token: KL(full || condition) over the full vocabulary and the gold token's log-prob, both
from vLLM's log-probs of the first generated token (``logprobs=-1``; vLLM cannot return prompt
log-probs of tokens a connector provided, so the answer's later tokens are not teacher-forced
here); greedy agreement of the answer's tokens with full prefill. The reference runner (transformers,
same weights, same documents) gives the same figures side by side; ``vllm_vs_reference_gap_closed``
= the gap closed at 15% through vLLM / the reference runner's.

    python benchmarks/blend_vllm.py --quick     # < 10 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import time
from typing import Any

import torch
from _common import add_output_args, emit_json, markdown_table, output_dirs, write_results
from blend_quality import HEADER, build_pool, build_requests
from vllm_ttft import _env  # the same engine environment (single process, caches under .cache/bench)

NAME = "blend_vllm"
RATIOS = (0.05, 0.15, 0.25)
CONDS = ["full", "prefix", "naive", *[f"blend{int(r * 100)}" for r in RATIOS]]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def params(cond: str) -> dict[str, Any]:
    if cond == "full":
        return {"kvlayer_skip": True, "kvlayer_blend": False}
    if cond == "prefix":
        return {"kvlayer_blend": False}
    if cond == "naive":
        return {"kvlayer_blend_ratio": 0.0}
    return {"kvlayer_blend_ratio": int(cond[5:]) / 100}


def run(llm: Any, ids: list[int], cond: str, max_tokens: int, logprobs: int | None, rid: str
        ) -> tuple[float, list[int], dict[int, float] | None]:
    """(TTFT s, tokens, first token's log-probs) stepping the engine directly."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.reset_prefix_cache()
    eng = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs,
                        extra_args={"kv_transfer_params": params(cond)})
    t0 = time.perf_counter()
    eng.add_request(rid, TokensPrompt(prompt_token_ids=list(ids)), sp)
    ttft: float | None = None
    out = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.outputs and o.outputs[0].token_ids:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                out = o
    assert out is not None and ttft is not None
    lps = None
    if logprobs is not None and out.outputs[0].logprobs:
        lps = {int(t): float(lp.logprob) for t, lp in out.outputs[0].logprobs[0].items()}
    return ttft, list(out.outputs[0].token_ids), lps


def kl(full: torch.Tensor, cond: torch.Tensor) -> float:
    return float((full.exp() * (full - cond)).sum())


def dense(lps: dict[int, float], vocab: int) -> torch.Tensor:
    t = torch.full((vocab,), -1e9)
    for k, v in lps.items():
        if k < vocab:
            t[k] = v
    return t


def gap(lp: dict[str, float], c: str) -> float | None:
    g = lp["full"] - lp["naive"]
    return (lp[c] - lp["naive"]) / g if abs(g) > 1e-9 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 requests, 1 TTFT repeat (< 10 min on 2 cores)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-plot", action="store_true")
    add_output_args(ap)
    args = ap.parse_args()
    _env()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    quick = args.quick
    n_req = args.requests or (8 if quick else 24)
    pool = 12 if quick else 24
    repeats = 1 if quick else 3
    rng = random.Random(args.seed)

    from kvlayer.connectors.vllm import connector_of
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvlayer import KVCache
    from kvlayer.assets import load_smollm2, smollm2_dir
    from kvlayer.blend import BlendConfig, Blender, Runner

    model, tok = load_smollm2(dtype=torch.float32)
    docs, questions = build_pool(tok, rng, pool)
    reqs = build_requests(tok, rng, docs, questions, n_req)
    header = list(tok(HEADER, add_special_tokens=False)["input_ids"])
    used = sorted({j for r in reqs for j in r.docs})
    vocab = int(model.config.vocab_size)
    log(f"SmolLM2-135M fp32, {len(used)} documents, {n_req} requests "
        f"({statistics.fmean(len(r.prompt) for r in reqs):.0f} prompt tokens on average)")

    kv = {"kv_connector": "KVLayerBlendConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": {
              "chunk_size": 256, "cpu_bytes": "2GiB", "blend": {"enabled": True, "gate": False, "min_match": 16}}}
    llm = LLM(str(smollm2_dir()), kv_transfer_config=kv, enforce_eager=True, distributed_executor_backend="uni",
              max_model_len=4096, seed=0, dtype="float32", max_logprobs=-1)
    conn = connector_of(llm)
    t0 = time.perf_counter()
    for j in used:
        sp = SamplingParams(temperature=0.0, max_tokens=1, extra_args={"kv_transfer_params": {
            "kvlayer_document": {"id": f"doc{j}", "context_tokens": len(header)}}})
        llm.generate([TokensPrompt(prompt_token_ids=header + docs[j])], sp, use_tqdm=False)
    register_s = time.perf_counter() - t0
    log(f"{len(used)} documents registered through vLLM in {register_s:.1f} s")

    # the reference runner over the same weights and documents
    runner_cache = KVCache(Runner(model).kv_spec(), cpu_bytes="2GiB")
    blender = Blender(model, runner_cache, BlendConfig(gate=False, document_context=tuple(header)))
    for j in used:
        blender.add_document(f"doc{j}", docs[j])

    cache = conn.cache

    def measure(c: str, ids: list[int], max_tokens: int, logprobs: int | None, rid: str
                ) -> tuple[float, list[int], dict[int, float] | None]:
        """One request; the prefix condition saves the prompt's exact chunks, which would turn
        every later run of that prompt into a whole-prompt hit: they are evicted again (chunks
        stored before it, e.g. instruction + first document by its registration, stay)."""
        keys = cache.keys(ids)
        before = {k for k, w in zip(keys, cache.locate(keys), strict=True) if w is not None}
        out = run(llm, ids, c, max_tokens, logprobs, rid)
        if c == "prefix":
            conn.flush()
            cache.evict(keys=[k for k in keys if k not in before], force=True)
        return out

    ttft: dict[str, list[float]] = {c: [] for c in CONDS}
    first_lp: dict[str, list[float]] = {c: [] for c in CONDS}
    kls: dict[str, list[float]] = {c: [] for c in CONDS}
    agree: dict[str, list[float]] = {c: [] for c in CONDS}
    ref_lp: dict[str, list[float]] = {c: [] for c in ("full", "naive", "blend15")}
    ref_kl: list[float] = []
    for ri, r in enumerate(reqs):
        gold = r.answer[0]
        dist: dict[str, torch.Tensor] = {}
        toks: dict[str, list[int]] = {}
        for c in CONDS:  # quality run: the answer's length, full first-token distribution
            _, toks[c], lps = measure(c, r.prompt, len(r.answer), -1, f"q{ri}-{c}")
            dist[c] = torch.log_softmax(dense(lps or {}, vocab), -1)
            first_lp[c].append(float(dist[c][gold]))
        for c in CONDS:
            kls[c].append(kl(dist["full"], dist[c]))
            agree[c].append(float(toks[c] == toks["full"]))
        for rep in range(repeats):  # TTFT runs, interleaved
            for c in CONDS:
                ttft[c].append(measure(c, r.prompt, 1, None, f"t{ri}-{rep}-{c}")[0])
        with torch.inference_mode():
            full_logits = model(torch.tensor([r.prompt]), logits_to_keep=1).logits[0, -1].float()
        rf = torch.log_softmax(full_logits, -1)
        ref_lp["full"].append(float(rf[gold]))
        for c, ratio in (("naive", 0.0), ("blend15", 0.15)):
            out = blender.blend(r.prompt, recompute_ratio=ratio)
            rl = torch.log_softmax(out.logits[-1].float(), -1)
            ref_lp[c].append(float(rl[gold]))
            if c == "blend15":
                ref_kl.append(kl(rf, rl))
        log(f"request {ri + 1}/{n_req} ({r.kind}, {len(r.prompt)} tokens): ttft full {ttft['full'][-1]:.2f}s "
            f"prefix {ttft['prefix'][-1]:.2f}s b15 {ttft['blend15'][-1]:.2f}s; gold lp full {first_lp['full'][-1]:.2f} "
            f"naive {first_lp['naive'][-1]:.2f} b15 {first_lp['blend15'][-1]:.2f} (reference {ref_lp['blend15'][-1]:.2f})")

    def rel(c: str) -> float:
        return statistics.median(t / f for t, f in zip(ttft[c], ttft["full"], strict=True))

    mean_lp = {c: statistics.fmean(v) for c, v in first_lp.items()}
    mean_ref = {c: statistics.fmean(v) for c, v in ref_lp.items()}
    closed = {c: gap(mean_lp, c) for c in CONDS if c not in ("full", "naive")}
    ref_closed = gap(mean_ref, "blend15")
    v15 = closed["blend15"]
    rows = []
    for c in CONDS:
        rows.append({"_name": c, "ttft_s_median": statistics.median(ttft[c]), "ttft_vs_full": rel(c),
                     "first_token_gold_logprob": mean_lp[c], "kl_vs_full": statistics.fmean(kls[c]),
                     "greedy_answer_agreement": statistics.fmean(agree[c]),
                     "gap_closed": 1.0 if c == "full" else 0.0 if c == "naive" else closed[c]})
    stats = conn.stats()
    result: dict[str, Any] = {
        "benchmark": NAME, "quick": quick, "model": "SmolLM2-135M-Instruct (fp32, vLLM CPU build)",
        "requests": n_req, "documents": len(used), "seed": args.seed, "threads": args.threads,
        "mean_prompt_tokens": statistics.fmean(len(r.prompt) for r in reqs), "ttft_repeats": repeats,
        "conditions": {row["_name"]: {k: v for k, v in row.items() if k != "_name"} for row in rows},
        "reference": {"first_token_gold_logprob": mean_ref, "gap_closed_at_15": ref_closed,
                      "kl_blend15_vs_full": statistics.fmean(ref_kl)},
        "ttft_blend15_vs_full": rel("blend15"),
        "ttft_prefix_vs_full": rel("prefix"),
        "gap_closed_at_15": v15,
        "vllm_vs_reference_gap_closed": (v15 / ref_closed) if v15 is not None and ref_closed else None,
        "document_register_s": register_s,
        "connector_blend_counters": stats.get("blend", {}),
        "targets": {"ttft_blend15_vs_full": "<= 0.4", "vllm_vs_reference_gap_closed": ">= 0.95",
                    "gap_closed_at_15": "reported (long-run goal 0.9)"},
        "seconds": time.perf_counter() - t_start,
    }
    result["targets_met"] = {
        "ttft_blend15_vs_full": result["ttft_blend15_vs_full"] <= 0.4,
        "vllm_vs_reference_gap_closed": (result["vllm_vs_reference_gap_closed"] or 0.0) >= 0.95,
    }
    cols = ["ttft_s_median", "ttft_vs_full", "first_token_gold_logprob", "kl_vs_full", "greedy_answer_agreement",
            "gap_closed"]
    md = (f"# CacheBlend through vLLM ({'quick' if quick else 'full'} run)\n\n"
          f"SmolLM2-135M-Instruct fp32 on vLLM's CPU build ({args.threads} threads), KVLayerBlendConnector, "
          f"{n_req} requests of the blend_quality workload ({result['mean_prompt_tokens']:.0f} prompt tokens on "
          f"average, 4-6 shuffled documents each), documents registered through the engine. Conditions interleaved "
          f"per request, vLLM's prefix cache reset before each; TTFT = median of per-request ratios to full "
          f"({repeats} run(s) each). Quality on the first answer token from vLLM's full first-token log-probs; "
          "`gap_closed` = (lp - lp_naive) / (lp_full - lp_naive) on the mean gold log-prob.\n\n"
          + markdown_table(rows, cols, first="condition")
          + f"\nReference runner (transformers, same documents) on the same basis: gold log-prob full "
            f"{mean_ref['full']:.3f}, naive {mean_ref['naive']:.3f}, 15% {mean_ref['blend15']:.3f}; gap closed at "
            f"15% {ref_closed}, KL {result['reference']['kl_blend15_vs_full']:.4f}.\n\n"
            f"`ttft_blend15_vs_full` = {result['ttft_blend15_vs_full']:.3f} (target <= 0.4), `gap_closed_at_15` = "
            f"{v15}, `vllm_vs_reference_gap_closed` = {result['vllm_vs_reference_gap_closed']} (target >= 0.95).\n"
          + "\n![TTFT and quality per condition](../../benchmarks/results/blend_vllm.png)\n")
    jpath, mpath = write_results(NAME, result, md, args)
    if not args.no_plot:
        result["plot"] = str(plot(rows, output_dirs(args)[0] / f"{NAME}.png"))
        jpath, mpath = write_results(NAME, result, md, args)
    log(md)
    log(f"wrote {jpath} and {mpath}")
    emit_json(result)
    runner_cache.close()
    return 0


def plot(rows: list[dict[str, Any]], path: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["_name"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].bar(names, [r["ttft_vs_full"] for r in rows], color="#4477aa")
    ax[0].axhline(0.4, ls="--", c="grey")
    ax[0].set_ylabel("TTFT / full prefill (median)")
    ax[1].bar(names, [r["kl_vs_full"] for r in rows], color="#cc6677")
    ax[1].set_ylabel("KL(full || condition), first token")
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    fig.suptitle("CacheBlend through vLLM, SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
