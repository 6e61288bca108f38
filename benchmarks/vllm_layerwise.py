"""Layer-wise loading on CPU: does copying a hit into vLLM's blocks layer by layer, on a helper
thread while the forward pass runs the layers before, beat copying it all before the forward?

One engine (SmolLM2-135M, vLLM CPU build, real essays), kvlayer with a CPU tier. Prompts of
2048 and 4096 cached tokens plus a 128-token new tail; TTFT with ``layerwise_loads`` off and on,
alternated, median over repetitions, tokens compared. Also the save side: the step's gather time
per chunk (what layer-wise saving would move into the forward pass, on the same thread).

    python benchmarks/vllm_layerwise.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from _common import REPO, emit_json, markdown_table, write_results

NAME = "vllm_layerwise"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 repetitions instead of 11")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    cache_dir = REPO / ".cache" / "bench"
    for k, v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR", "VLLM_CPU_KVCACHE_SPACE": "1",
                 "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
                 "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor")}.items():
        os.environ.setdefault(k, v)
    from kvlayer.connectors.vllm import connector_of
    from transformers import AutoTokenizer
    from vllm import LLM

    from kvlayer.assets import essay_text, smollm2_dir
    from kvlayer.demo import timed_request

    model = args.model or str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(essay_text())["input_ids"]
    kv = {"kv_connector": "KVLayerConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": {"chunk_size": 256, "cpu_bytes": "2GiB",
                                                              "load_or_recompute": False}}
    llm = LLM(model, kv_transfer_config=kv, enforce_eager=True, distributed_executor_backend="uni",
              max_model_len=4608, seed=0)
    conn = connector_of(llm)
    worker = conn.pair.worker
    assert worker is not None
    reps = 5 if args.quick else 11
    warm = ids[-3000:]  # every path once (prefill, save, whole and layer-wise loads) before measuring
    timed_request(llm, warm, 1, "warm-cold")
    conn.flush()
    for mode in (True, False):
        worker.options = worker.options.model_copy(update={"layerwise_loads": mode})
        llm.reset_prefix_cache()
        timed_request(llm, warm, 1, f"warm-{mode}")
    t_start = time.perf_counter()
    rows: dict[str, Any] = {}
    load0 = os.getloadavg()[0]
    for n, length in enumerate((2048, 4096)):
        prompt = ids[20_000 * n: 20_000 * n + length + 128]
        saved0 = dict(conn.stats())
        timed_request(llm, prompt, 1, f"cold-{length}")  # stores the prefix
        conn.flush()
        saved1 = dict(conn.stats())
        gather_s = (saved1["save_seconds"] - saved0["save_seconds"])
        chunks = saved1["connector"]["saved_chunks"] - saved0["connector"]["saved_chunks"]
        ttft: dict[str, list[float]] = {"whole": [], "layerwise": []}
        toks: dict[str, set[tuple[int, ...]]] = {"whole": set(), "layerwise": set()}
        for r in range(reps):
            for mode in (("whole", "layerwise") if r % 2 == 0 else ("layerwise", "whole")):
                worker.options = worker.options.model_copy(update={"layerwise_loads": mode == "layerwise"})
                llm.reset_prefix_cache()
                t, _, out = timed_request(llm, prompt, 2, f"{mode}-{length}-{r}")
                ttft[mode].append(t)
                toks[mode].add(tuple(out))
        med = {m: statistics.median(v) for m, v in ttft.items()}
        print(f"  {length}: " + "  ".join(f"{m} " + " ".join(f"{x:.3f}" for x in v) for m, v in ttft.items()),
              file=sys.stderr, flush=True)
        low = {m: min(v) for m, v in ttft.items()}  # on a shared machine the least disturbed run
        rows[str(length)] = {"ttft_whole_s": med["whole"], "ttft_layerwise_s": med["layerwise"],
                             "layerwise_vs_whole": med["layerwise"] / med["whole"],
                             "min_whole_s": low["whole"], "min_layerwise_s": low["layerwise"],
                             "min_layerwise_vs_whole": low["layerwise"] / low["whole"],
                             "same_tokens": len(toks["whole"] | toks["layerwise"]) == 1,
                             "save_gather_ms_per_chunk": 1000 * gather_s / max(1, chunks), "reps": reps}
        print(f"  {length}: {rows[str(length)]}", file=sys.stderr, flush=True)
    load1 = os.getloadavg()[0]
    summary = {"layerwise_vs_whole_4k": rows["4096"]["layerwise_vs_whole"],
               "layerwise_vs_whole_2k": rows["2048"]["layerwise_vs_whole"],
               "min_layerwise_vs_whole_4k": rows["4096"]["min_layerwise_vs_whole"],
               "min_layerwise_vs_whole_2k": rows["2048"]["min_layerwise_vs_whole"], "loadavg": (load0 + load1) / 2,
               "quick": args.quick}
    md = ["# Layer-wise loading on CPU (vLLM CPU build)\n",
          "TTFT of a request whose prefix is in kvlayer's CPU tier, + 128 new tokens: copied whole before the "
          "forward pass vs layer by layer on a helper thread. Medians, alternated.\n",
          markdown_table([{"_name": f"{k} cached tokens", **v} for k, v in rows.items()],
                         ["ttft_whole_s", "ttft_layerwise_s", "layerwise_vs_whole", "min_whole_s", "min_layerwise_s",
                          "min_layerwise_vs_whole", "same_tokens",
                          "save_gather_ms_per_chunk", "reps"], first="prompt"),
          f"\nload average {summary['loadavg']:.2f}; {time.perf_counter() - t_start:.0f} s; "
          f"command `python benchmarks/vllm_layerwise.py{' --quick' if args.quick else ''}`\n"]
    if not args.quick:
        write_results(NAME, {"summary": summary, "rows": rows}, "\n".join(md))
    else:
        print("\n".join(md), file=sys.stderr)
    emit_json(summary)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
