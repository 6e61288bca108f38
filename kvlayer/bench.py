"""The store benchmark behind ``kvlayer bench`` and ``benchmarks/store.py``.

Measures store and retrieve throughput of real-model-shaped chunks through the CPU tier and the
disk tier, each next to its physical baseline measured in the same run: a torch tensor copy of
the same bytes (CPU) and a plain file write + read of the same bytes (disk).
"""

from __future__ import annotations

import os
import shutil
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


def _best(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def make_chunks(n: int, spec: KVSpec = DEFAULT_SPEC, chunk_tokens: int = 256, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(spec.chunk_shape(chunk_tokens), generator=g).to(spec.torch_dtype) for _ in range(n)]


def _time_cache(cache: KVCache, chunks: list[torch.Tensor], repeat: int) -> tuple[float, float]:
    """Best store and retrieve times of ``chunks`` through ``cache`` (checked bit-exact), then close it."""
    keys = [f"{i:064x}" for i in range(len(chunks))]
    try:
        t_store = _best(lambda: cache.store_chunks(keys, chunks), repeat)
        out: list[Any] = []
        t_get = _best(lambda: out.__setitem__(slice(None), cache.retrieve_chunks(keys)), repeat)
        assert all(o is not None and torch.equal(o, c) for o, c in zip(out, chunks, strict=True)), "bad round trip"
    finally:
        cache.close()
    return t_store, t_get


def bench_cpu(chunks: list[torch.Tensor], repeat: int = 3, spec: KVSpec = DEFAULT_SPEC) -> BenchResult:
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    dst = [torch.empty_like(c) for c in chunks]

    def memcpy() -> None:
        for d, c in zip(dst, chunks, strict=True):
            d.copy_(c)

    memcpy()
    t_copy = _best(memcpy, repeat)
    cfg = KVLayerConfig(cpu_bytes=nbytes * 2, chunk_size=chunks[0].shape[2])
    t_store, t_get = _time_cache(KVCache(spec, cfg), chunks, repeat)
    gb = nbytes / 1e9
    return BenchResult("cpu", gb / t_store, gb / t_get, gb / t_copy, gb / t_copy)


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

    t_w = _best(fwrite, repeat)
    t_r = _best(fread, repeat)
    cfg = KVLayerConfig(cpu_bytes=0, disk_path=os.path.join(root, "kv"), disk_bytes=nbytes * 3, disk_codec=codec,
                        chunk_size=chunks[0].shape[2])
    t_store, t_get = _time_cache(KVCache(spec, cfg), chunks, repeat)
    gb = nbytes / 1e9
    return BenchResult(f"disk[{codec}]", gb / t_store, gb / t_get, gb / t_w, gb / t_r)


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
