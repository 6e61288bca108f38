"""The store benchmark behind ``kvlayer bench`` and ``benchmarks/store.py``.

Measures store and retrieve throughput of real-model-shaped chunks through the CPU tier and the
disk tier, each next to its physical baseline measured in the same run: a torch tensor copy of
the same bytes (CPU) and a plain file write + read of the same bytes (disk).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvlayer.config import KVLayerConfig
from kvlayer.engine import KVCache
from kvlayer.spec import KVSpec

# SmolLM2-135M's KV geometry: 30 layers x 3 kv heads x 64 dims, fp16.
DEFAULT_SPEC = KVSpec(model="bench/smollm2-135m-shape", num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16")


@dataclass
class BenchResult:
    name: str
    store_gbps: float
    retrieve_gbps: float
    baseline_write_gbps: float
    baseline_read_gbps: float

    @property
    def roundtrip_gbps(self) -> float:
        return 2 / (1 / self.store_gbps + 1 / self.retrieve_gbps)

    @property
    def baseline_gbps(self) -> float:
        return 2 / (1 / self.baseline_write_gbps + 1 / self.baseline_read_gbps)

    @property
    def ratio(self) -> float:
        return self.roundtrip_gbps / self.baseline_gbps


def _interleaved(fns: list[Callable[[], Any]], repeat: int) -> list[float]:
    """Median time of each function, timed in rounds (a, b, c, a, b, c, ...): on a shared or
    memory-reclaiming machine, noise then hits the baseline and the tier alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:  # warm-up: first touch of every buffer
        fn()
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def make_chunks(n: int, spec: KVSpec = DEFAULT_SPEC, chunk_tokens: int = 256, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(spec.chunk_shape(chunk_tokens), generator=g).to(spec.torch_dtype) for _ in range(n)]


def _bench(name: str, cache: KVCache, chunks: list[torch.Tensor], baseline_write: Callable[[], Any],
           baseline_read: Callable[[], Any], repeat: int) -> BenchResult:
    """Store/retrieve ``chunks`` through ``cache`` (checked bit-exact) next to the two baselines."""
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    keys = [f"{i:064x}" for i in range(len(chunks))]
    out: list[Any] = []
    try:
        t_w, t_r, t_store, t_get = _interleaved(
            [baseline_write, baseline_read, lambda: cache.store_chunks(keys, chunks),
             lambda: out.__setitem__(slice(None), cache.retrieve_chunks(keys))], repeat)
        assert all(o is not None and torch.equal(o, c) for o, c in zip(out, chunks, strict=True)), "bad round trip"
    finally:
        cache.close()
    gb = nbytes / 1e9
    return BenchResult(name, gb / t_store, gb / t_get, gb / t_w, gb / t_r)


def bench_cpu(chunks: list[torch.Tensor], repeat: int = 3, spec: KVSpec = DEFAULT_SPEC) -> BenchResult:
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    dst = [torch.empty_like(c) for c in chunks]

    def memcpy() -> None:
        for d, c in zip(dst, chunks, strict=True):
            d.copy_(c)

    cfg = KVLayerConfig(cpu_bytes=nbytes * 2, chunk_size=chunks[0].shape[2])
    return _bench("cpu", KVCache(spec, cfg), chunks, memcpy, memcpy, repeat)


def bench_disk(chunks: list[torch.Tensor], root: str, codec: str = "raw", repeat: int = 3,
               spec: KVSpec = DEFAULT_SPEC) -> BenchResult:
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    raw = [bytes(c.view(torch.uint8).reshape(-1).numpy()) for c in chunks]
    fdir = os.path.join(root, "plain")
    os.makedirs(fdir, exist_ok=True)

    def fwrite() -> None:
        for i, b in enumerate(raw):
            tmp = os.path.join(fdir, f"{i}.tmp")
            with open(tmp, "wb", buffering=0) as f:
                f.write(b)
            os.replace(tmp, os.path.join(fdir, f"{i}.bin"))

    def fread() -> None:
        for i, b in enumerate(raw):
            with open(os.path.join(fdir, f"{i}.bin"), "rb", buffering=0) as f:
                buf = bytearray(len(b))
                f.readinto(buf)

    cfg = KVLayerConfig(cpu_bytes=0, disk_path=os.path.join(root, "kv"), disk_bytes=nbytes * 3, disk_codec=codec,
                        chunk_size=chunks[0].shape[2])
    return _bench(f"disk[{codec}]", KVCache(spec, cfg), chunks, fwrite, fread, repeat)


def run(num_chunks: int = 16, repeat: int = 3, workdir: str | None = None, progress: bool = True,
        disk_codecs: tuple[str, ...] = ("raw", "lz4")) -> dict[str, Any]:
    """Run the whole benchmark; returns a dict with the issue's JSON keys and per-path figures."""
    from rich.progress import Progress

    own = workdir is None
    root = tempfile.mkdtemp(prefix="kvlayer-bench-") if own else str(workdir)
    results: list[BenchResult] = []
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("benchmarking", total=2 + len(disk_codecs))
            chunks = make_chunks(num_chunks)
            bar.advance(task)
            results.append(bench_cpu(chunks, repeat))
            bar.advance(task)
            for codec in disk_codecs:
                results.append(bench_disk(chunks, root, codec=codec, repeat=repeat))
                bar.advance(task)
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    chunk_mb = chunks[0].numel() * chunks[0].element_size() / 2**20
    out: dict[str, Any] = {
        "cpu_vs_memcpy": round(results[0].ratio, 3),
        "disk_vs_file": round(results[1].ratio, 3),
        "chunk_mib": round(chunk_mb, 2),
        "num_chunks": num_chunks,
        "paths": {
            r.name: {
                "store_gbps": round(r.store_gbps, 3),
                "retrieve_gbps": round(r.retrieve_gbps, 3),
                "baseline_write_gbps": round(r.baseline_write_gbps, 3),
                "baseline_read_gbps": round(r.baseline_read_gbps, 3),
                "vs_baseline": round(r.ratio, 3),
            }
            for r in results
        },
    }
    return out


def render_table(res: dict[str, Any]) -> str:
    lines = [
        "| path | store GB/s | retrieve GB/s | baseline write GB/s | baseline read GB/s | round trip vs baseline |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res["paths"].items():
        lines.append(f"| {name} | {r['store_gbps']} | {r['retrieve_gbps']} | {r['baseline_write_gbps']} | "
                     f"{r['baseline_read_gbps']} | {r['vs_baseline']}x |")
    return "\n".join(lines)
