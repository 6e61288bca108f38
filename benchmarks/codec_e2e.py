"""End to end through vLLM: does a lossy disk tier change what the model answers?

    python benchmarks/codec_e2e.py --quick     # last stdout line = JSON (``e2e_int4_identical``, ...)

SmolLM2-135M-Instruct in vLLM (the CPU build), kvlayer as its KV connector with **only a disk
tier** (``cpu_bytes: 0``) whose codec is the one under test, so every reused chunk is decoded from
that codec's blob. Prompts are real text with long shared prefixes: ``P`` essays (``prefix``
tokens each) x ``S`` suffixes (passages of other essays, ``suffix`` tokens), ``P * S`` >= 24
prompts. Per prompt: a cold request (prefill, chunks stored), vLLM's prefix cache reset, then a
warm request (the prefix's full chunks load from the disk tier), greedy, ``--new`` tokens.

Each codec runs in its own engine (a fresh process, a fresh disk directory), on the same prompts
in the same order. Reported per codec: ``identical`` = share of prompts whose warm continuation
equals the ``raw`` codec's warm continuation token for token (the raw tier is lossless, so this
isolates the codec), ``same_first`` = share whose first token matches, the mean length of the
common prefix, the tokens loaded from the tier (must be > 0: the comparison is real), and the
stored ratio (raw disk bytes / codec disk bytes). ``raw`` also reports how often its warm
continuation equals its own cold one (the engine's own reproducibility).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, add_output_args, emit_json, markdown_table, write_results
from vllm_ttft import vllm_env

NAME = "codec_e2e"
#: name -> (codec, params); the workers take these by name.
CODECS: dict[str, tuple[str, dict[str, Any]]] = {
    "raw": ("raw", {}),
    "raw-again": ("raw", {}),  # a second lossless engine: how reproducible the reference itself is
    "int8": ("int8", {}),
    "int8-g32": ("int8", {"group_size": 32}),  # the default before the group-size sweep
    "int4": ("int4", {}),
    "int4-k24v64": ("int4", {"k_group_size": 24, "v_group_size": 64}),
    "int4-g64": ("int4", {"group_size": 64}),
    "int4-kivi": ("int4", {"scheme": "kivi"}),
    "int4-kivi-g64": ("int4", {"scheme": "kivi", "group_size": 64}),
    "fp8": ("fp8", {}),
    "int2": ("int2", {}),
    # Keys quantized as stored (post-RoPE; the connector otherwise hands the codec the model's base).
    "int8-norope": ("int8", {"rope_theta": 0}),
    "int4-norope": ("int4", {"rope_theta": 0}),
    "int4-k24v64-norope": ("int4", {"k_group_size": 24, "v_group_size": 64, "rope_theta": 0}),
}
QUICK_CODECS = ["raw", "int8", "int4"]
FULL_CODECS = ["raw", "int8", "int4", "int4-kivi-g64", "fp8"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompts(tok: Any, n_prefix: int, n_suffix: int, prefix: int, suffix: int, seed: int) -> list[list[int]]:
    """``n_prefix`` essay openings x ``n_suffix`` passages of other essays (seeded), as token ids."""
    from kvlayer.assets import essays

    texts = essays()
    rng = random.Random(seed)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    long = [i for i, t in enumerate(ids) if len(t) >= prefix + suffix]
    if len(long) < n_prefix + 1:
        raise SystemExit(f"only {len(long)} essays hold {prefix + suffix} tokens")
    heads = rng.sample(long, n_prefix)
    out = []
    for h in heads:
        others = [i for i in long if i != h]
        for _ in range(n_suffix):
            o = rng.choice(others)
            start = rng.randrange(0, len(ids[o]) - suffix + 1)
            out.append(ids[h][:prefix] + ids[o][start : start + suffix])
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- one engine


def generate(llm: Any, ps: list[list[int]], new: int) -> list[list[int]]:
    """Greedy continuations of ``ps`` (one batch), in prompt order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in ps], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run every prompt cold then warm on one engine whose only tier is a disk tier with ``codec``."""
    vllm_env()
    from kvlayer.connectors.vllm import connector_of
    from transformers import AutoTokenizer
    from vllm import LLM

    from kvlayer.assets import smollm2_dir
    from kvlayer.codec import with_rope
    from kvlayer.demo import timed_request

    codec, params = CODECS[args.worker]
    model = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(model)
    ps = prompts(tok, args.prefixes, args.suffixes, args.prefix, args.suffix, args.seed)
    disk = Path(args.disk)
    extra = {"chunk_size": args.chunk, "cpu_bytes": 0, "disk_path": str(disk), "disk_codec": codec,
             "disk_bytes": "8GiB"}
    if params:
        extra["codec_params"] = params
    kv = {"kv_connector": "KVLayerConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": extra}
    t0 = time.perf_counter()
    llm = LLM(model, kv_transfer_config=kv, enforce_eager=True, distributed_executor_backend="uni",
              max_model_len=args.prefix + args.suffix + args.new + 64, seed=0, dtype=args.dtype)
    connector = connector_of(llm)
    warm_ids = tok("A few words to warm the engine up.")["input_ids"]
    timed_request(llm, warm_ids, 2, "warmup", skip_kvlayer=True)
    log(f"[{args.worker}] engine up in {time.perf_counter() - t0:.0f} s; {len(ps)} prompts")
    # Cold: every prompt prefilled (its full chunks stored) and continued, as warm will be (the
    # same schedule in every engine; the raw reference also checks warm == cold). Warm: vLLM's prefix cache reset, every prompt again, its prefix chunks
    # loaded from the disk tier. Each phase is one batch (vLLM schedules it), the same for every codec.
    cold = generate(llm, ps, args.new)
    connector.flush()
    before = connector.stats()["connector"]["loaded_tokens"]
    llm.reset_prefix_cache()
    warm = generate(llm, ps, args.new)
    loaded = connector.stats()["connector"]["loaded_tokens"] - before
    cold_tokens, warm_tokens = cold, warm
    connector.flush()
    return {"codec": args.worker, "warm": warm_tokens, "cold": cold_tokens, "loaded": loaded,
            # the RoPE base the tier's codec got: its own setting, else the one the connector read from vLLM
            "rope_theta": with_rope(codec, params, connector.cache.config.rope_theta).get("rope_theta"),
            "disk_bytes": dir_bytes(disk), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- driver


def run_codec(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    disk = tmp / f"disk-{name.replace('/', '_')}"
    out = tmp / f"{name}.json"
    cmd = [sys.executable, __file__, "--worker", name, "--disk", str(disk), "--out", str(out),
           "--prefixes", str(args.prefixes), "--suffixes", str(args.suffixes), "--prefix", str(args.prefix),
           "--suffix", str(args.suffix), "--new", str(args.new), "--chunk", str(args.chunk), "--seed", str(args.seed),
           "--dtype", args.dtype]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=REPO)
    if r.returncode != 0 or not out.exists():
        raise SystemExit(f"codec {name}: worker failed (exit {r.returncode})")
    res = json.loads(out.read_text())
    log(f"[{name}] done in {time.perf_counter() - t0:.0f} s")
    shutil.rmtree(disk, ignore_errors=True)
    return res


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def compare(ref: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    n = len(ref["warm"])
    same = [a == b for a, b in zip(ref["warm"], res["warm"], strict=True)]
    first = [a[:1] == b[:1] for a, b in zip(ref["warm"], res["warm"], strict=True)]
    row = {
        "identical": sum(same) / n,
        "identical_count": sum(same),
        "same_first_token": sum(first) / n,
        "mean_common_prefix": sum(common_prefix(a, b) for a, b in zip(ref["warm"], res["warm"], strict=True)) / n,
        "prompts": n,
        "loaded_tokens": res["loaded"],
        "ratio": ref["disk_bytes"] / res["disk_bytes"] if res["disk_bytes"] else None,
        "seconds": res["seconds"],
        "rope_theta": res.get("rope_theta"),  # what the connector gave the codec (from vLLM's model config)
    }
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 prefixes x 6 suffixes, 1024-token prefixes, raw/int8/int4")
    ap.add_argument("--codecs", default=None, help=f"comma list from {','.join(CODECS)} (raw is always run)")
    ap.add_argument("--prefixes", type=int, default=None, help="essays used as shared prefixes (4 quick, 6 full)")
    ap.add_argument("--suffixes", type=int, default=None, help="prompts per prefix (6 quick, 8 full)")
    ap.add_argument("--prefix", type=int, default=None, help="prefix tokens, a multiple of --chunk (1024 quick, 2048 full)")
    ap.add_argument("--suffix", type=int, default=96, help="suffix tokens (a passage of another essay)")
    ap.add_argument("--new", type=int, default=32, help="greedy tokens generated per warm request")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32",
                    help="the engine's (and so the stored KV's) dtype (vLLM's auto picks bf16 on this CPU); "
                         "in bf16 any change of the KV, however small, reorders roundings downstream "
                         "and flips near-tied greedy tokens, which would measure bf16, not the codec")
    ap.add_argument("--no-write", action="store_true", help="do not write results")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--disk", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    add_output_args(ap)
    args = ap.parse_args(argv)
    args.prefixes = args.prefixes or (4 if args.quick else 6)
    args.suffixes = args.suffixes or (6 if args.quick else 8)
    args.prefix = args.prefix or (1024 if args.quick else 2048)
    if args.worker:
        res = worker(args)
        Path(args.out).write_text(json.dumps(res))
        return res
    names = [c.strip() for c in (args.codecs or ",".join(QUICK_CODECS if args.quick else FULL_CODECS)).split(",")]
    unknown = [c for c in names if c not in CODECS]
    if unknown:
        ap.error(f"unknown codecs {unknown}; choose from {list(CODECS)}")
    names = ["raw"] + [c for c in names if c != "raw"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvlayer-codec-e2e-") as tmp:
        runs = {c: run_codec(c, args, Path(tmp)) for c in names}
    ref = runs["raw"]
    rows = {c: compare(ref, runs[c]) for c in names}
    rows["raw"]["warm_equals_cold"] = sum(a == b for a, b in zip(ref["warm"], ref["cold"], strict=True)) / len(ref["warm"])
    seconds = time.perf_counter() - t0
    meta = {"model": "SmolLM2-135M-Instruct", "engine": "vLLM (CPU build)", "dtype": args.dtype,
            "prompts": len(ref["warm"]), "prefixes": args.prefixes, "suffixes_per_prefix": args.suffixes,
            "prefix_tokens": args.prefix, "suffix_tokens": args.suffix, "new_tokens": args.new,
            "chunk_tokens": args.chunk, "tier": "disk only (cpu_bytes 0)", "codec_params": {c: CODECS[c] for c in names},
            "seconds": seconds, "quick": args.quick}
    for c, r in rows.items():
        if r["loaded_tokens"] <= 0:
            raise SystemExit(f"codec {c}: a warm request loaded nothing from the tier; the comparison would be empty")
    log(f"done in {seconds:.0f} s: " + ", ".join(f"{c} {r['identical_count']}/{r['prompts']}" for c, r in rows.items()))
    if not args.no_write:
        cols = ["identical", "identical_count", "same_first_token", "mean_common_prefix", "ratio", "loaded_tokens", "rope_theta"]
        md = (
            "# Codecs end to end through vLLM\n\n"
            f"Generated by `python benchmarks/codec_e2e.py{' --quick' if args.quick else ''}` in {seconds:.0f} s. "
            f"SmolLM2-135M-Instruct in vLLM (CPU build, {args.dtype}), kvlayer with only a disk tier using the codec; "
            f"{meta['prompts']} prompts = {args.prefixes} essay openings of {args.prefix} tokens x {args.suffixes} "
            f"passages of {args.suffix} tokens from other essays. Each prompt cold, then warm (its {args.prefix // args.chunk} "
            f"prefix chunks decoded from the tier), greedy {args.new} tokens. `identical` = share of prompts whose warm "
            "continuation equals the raw tier's, token for token; `ratio` = raw disk bytes / codec disk bytes.\n\n"
            + markdown_table([{"_name": c, **r} for c, r in rows.items()], cols, first="codec")
            + f"\nraw: warm continuation equals its own cold one for {rows['raw']['warm_equals_cold']:.3f} of the prompts.\n"
        )
        write_results(NAME, {"codecs": rows, "_meta": meta}, md, args)
    out = {f"e2e_{c.replace('-', '_')}_identical": r["identical"] for c, r in rows.items()}
    emit_json({**out, "codecs": rows})
    return {**out, "codecs": rows}


if __name__ == "__main__":
    main()
