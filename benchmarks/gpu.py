"""The GPU save/load path: paged gather/scatter kernels and GPU-side encode vs a plain device-to-host copy.

What an engine on a GPU pays to move one chunk (256 tokens, all layers) between its paged KV cache
and kvlayer, each figure next to the physical baseline measured in the same run: ``cudaMemcpy``
of the same bytes from the GPU into pinned host memory (``torch`` ``copy_``, non-blocking, then a
stream sync).

- **gather / scatter**: vLLM's flash-attention layout (``[2, blocks, block_size, kv_heads,
  head_dim]`` per layer, 16-token blocks, the chunk's blocks scattered over the cache), kvlayer's
  CUDA kernel (one launch for all layers) vs the torch path (two ``index_select``/``index_copy_``
  per layer), GB/s of chunk bytes on the GPU.
- **save = gather + encode + to host**: ``raw`` (the chunk copied as is) vs ``int8``/``int4``/``fp8``
  encoded on the GPU (only the payload crosses PCIe) vs copying the raw chunk and encoding on the
  CPU (kvlayer's C++ kernels), GB/s of *uncompressed* chunk bytes, with every GPU blob checked
  byte for byte against the CPU blob.

    python benchmarks/gpu.py --quick     # ~1 min on one GPU; the last stdout line is one JSON object

Refuses to run without a CUDA GPU and kvlayer's CUDA kernels (exit code 2, reason on stderr).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import add_output_args, emit_json, markdown_table, write_results

from kvlayer import ops
from kvlayer.codec import Codec, _ext, cuda

NAME = "gpu"
#: KV geometry (layers, kv heads, head dim) of real models, fp16.
SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}
BLOCK = 16
CHUNK = 256
CODECS = ("int8", "int4", "fp8")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _median_s(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``fn`` with the GPU synchronised before and after each call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _paged_cache(layers: int, heads: int, dim: int, num_blocks: int) -> ops.KVViews:
    """K/V views of one ``[2, blocks, block_size, heads, dim]`` tensor per layer (vLLM flash-attention)."""
    caches = [torch.randn(2, num_blocks, BLOCK, heads, dim, device="cuda", dtype=torch.float16) for _ in range(layers)]
    return [(c[0], c[1]) for c in caches]


def measure_shape(name: str, repeat: int) -> dict[str, Any]:
    layers, heads, dim = SHAPES[name]
    num_blocks = 64 * (CHUNK // BLOCK)
    views = _paged_cache(layers, heads, dim, num_blocks)
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(num_blocks, generator=g)[: CHUNK // BLOCK].cuda()
    chunk = ops.gather_layers(views, ids)
    nbytes = chunk.numel() * chunk.element_size()
    pinned = torch.empty(chunk.shape, dtype=chunk.dtype, pin_memory=True)
    row: dict[str, Any] = {"shape": list(chunk.shape), "chunk_mb": nbytes / 1e6}

    def gbps(fn: Callable[[], Any]) -> float:
        return nbytes / _median_s(fn, repeat) / 1e9

    row["memcpy_d2h_gbps"] = gbps(lambda: pinned.copy_(chunk, non_blocking=True))
    out = torch.empty_like(chunk)
    row["gather_kernel_gbps"] = gbps(lambda: ops.gather_layers(views, ids, out))
    row["scatter_kernel_gbps"] = gbps(lambda: ops.scatter_layers(views, ids, chunk))
    kernel_lib = ops._cuda_lib
    ops._cuda_lib = lambda: None  # type: ignore[assignment]  # the torch path, same call
    try:
        row["gather_torch_gbps"] = gbps(lambda: ops.gather_layers(views, ids, out))
        row["scatter_torch_gbps"] = gbps(lambda: ops.scatter_layers(views, ids, chunk))
    finally:
        ops._cuda_lib = kernel_lib  # type: ignore[assignment]
    assert torch.equal(out, chunk)
    row["gather_kernel_vs_torch"] = row["gather_kernel_gbps"] / row["gather_torch_gbps"]
    row["scatter_kernel_vs_torch"] = row["scatter_kernel_gbps"] / row["scatter_torch_gbps"]

    raw = Codec("raw")
    row["save_raw_gbps"] = gbps(lambda: raw.encode(ops.gather_layers(views, ids, out)))
    for name_c in CODECS:
        codec = Codec(name_c)
        row[f"save_{name_c}_gpu_gbps"] = gbps(lambda c=codec: c.encode(ops.gather_layers(views, ids, out)))
        row[f"save_{name_c}_cpu_gbps"] = gbps(lambda c=codec: c.encode(ops.gather_layers(views, ids, out).cpu()))
        row[f"{name_c}_gpu_vs_memcpy"] = row[f"save_{name_c}_gpu_gbps"] / row["memcpy_d2h_gbps"]
        row[f"{name_c}_gpu_vs_cpu_encode"] = row[f"save_{name_c}_gpu_gbps"] / row[f"save_{name_c}_cpu_gbps"]
        with _ext.use_backend("torch"):
            reference = bytes(codec.encode(chunk.cpu()))
        row[f"{name_c}_identical_to_cpu"] = bytes(codec.encode(chunk)) == reference
        row[f"{name_c}_payload_ratio"] = len(reference) / nbytes
    row["save_raw_vs_memcpy"] = row["save_raw_gbps"] / row["memcpy_d2h_gbps"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one model shape (llama3-8b), 20 repetitions")
    ap.add_argument("--shapes", default=None, help=f"comma-separated, from {','.join(SHAPES)} (default: all)")
    ap.add_argument("--repeat", type=int, default=None, help="timed repetitions (median; default 20 quick, 50)")
    ap.add_argument("--no-write", action="store_true", help="do not write results/ and docs/")
    add_output_args(ap)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU visible to torch; this benchmark measures the GPU path only",
              file=sys.stderr)
        return 2
    info = cuda.cuda_info()
    if info["backend"] is None:
        print(f"benchmarks/gpu.py: kvlayer's CUDA kernels are unavailable: {info['reason']}", file=sys.stderr)
        return 2
    shapes = args.shapes.split(",") if args.shapes else (["llama3-8b"] if args.quick else list(SHAPES))
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    repeat = args.repeat or (20 if args.quick else 50)
    device = torch.cuda.get_device_name()
    _log(f"{device}, torch {torch.__version__}, CUDA kernels {info['path']} (sm_{info['arch']})")
    rows = {}
    for s in shapes:
        rows[s] = measure_shape(s, repeat)
        torch.cuda.empty_cache()  # the previous shape's paged cache
        r = rows[s]
        _log(f"{s} {r['shape']} ({r['chunk_mb']:.1f} MB): memcpy D2H {r['memcpy_d2h_gbps']:.1f} GB/s; "
             f"gather {r['gather_kernel_gbps']:.0f} vs torch {r['gather_torch_gbps']:.0f} GB/s; "
             + "; ".join(f"{c} save {r[f'save_{c}_gpu_gbps']:.1f} GB/s on GPU, {r[f'save_{c}_cpu_gbps']:.1f} via CPU"
                         for c in CODECS))
    first = rows[shapes[0]]
    summary = {
        "device": device,
        "shape": shapes[0],
        "memcpy_d2h_gbps": first["memcpy_d2h_gbps"],
        "gather_kernel_vs_torch": first["gather_kernel_vs_torch"],
        "scatter_kernel_vs_torch": first["scatter_kernel_vs_torch"],
        "save_raw_vs_memcpy": first["save_raw_vs_memcpy"],
        **{f"{c}_gpu_vs_memcpy": first[f"{c}_gpu_vs_memcpy"] for c in CODECS},
        **{f"{c}_gpu_vs_cpu_encode": first[f"{c}_gpu_vs_cpu_encode"] for c in CODECS},
        "identical_to_cpu": all(r[f"{c}_identical_to_cpu"] for r in rows.values() for c in CODECS),
        "quick": args.quick,
    }
    if not args.no_write:
        cols = ["memcpy_d2h_gbps", "gather_kernel_gbps", "gather_torch_gbps", "scatter_kernel_gbps",
                "scatter_torch_gbps", "save_raw_gbps"] + [f"save_{c}_{w}_gbps" for c in CODECS for w in ("gpu", "cpu")]
        md = (f"# GPU save path ({device})\n\nGenerated by `python benchmarks/gpu.py{' --quick' if args.quick else ''}`: "
              f"one chunk of {CHUNK} tokens, fp16, vLLM flash-attention paging ({BLOCK}-token blocks); GB/s of "
              "uncompressed chunk bytes, median of "
              f"{repeat}. `save_*` = gather + encode + blob in host memory; `_gpu` encodes on the GPU, `_cpu` copies "
              "the raw chunk and encodes with the C++ kernels.\n\n"
              + markdown_table([{"_name": s, **r} for s, r in rows.items()], cols, first="model shape"))
        write_results(NAME, {"summary": summary, "rows": rows, "cuda": info}, md, args)
    emit_json(summary)
    return 0 if summary["identical_to_cpu"] else 1


if __name__ == "__main__":
    sys.exit(main())
