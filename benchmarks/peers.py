"""kvlayer next to LMCache on every storage path, side by side in one run, on the same data.

The data: 32 real SmolLM2-135M-Instruct KV chunks (256 tokens of Paul Graham essays each, 30
layers x 2 x 3 kv heads x 64 dims, fp16 = 5.62 MiB), computed once and cached in kvlayer's cache
dir. Contenders, each timed once per round, rounds interleaved so a noisy neighbour slows them
all alike (within a step the contenders' order flips every round, so none always follows a
write-heavy one); every figure is the median over rounds, in GB/s (1e9 bytes/s) of raw KV:

- CPU: kvlayer's CPU tier (``KVCache.store_chunks`` / ``retrieve_chunks``, raw codec) against a
  copy of the same bytes (memcpy: the faster of torch's parallel ``copy_`` and numpy's
  one-thread ``copyto``, each timed every round: on a busy machine torch's thread pool stalls),
  and LMCache's ``LocalCPUBackend`` (allocate + copy the
  chunk into its memory object + ``submit_put_task``; ``get_blocking``).
- Redis, one ``redis-server`` started here (loopback, no persistence): kvlayer's Redis tier alone
  (``KVCache`` with ``redis_url``, raw codec); LMCache's ``RemoteBackend`` over its Redis connector
  (``redis://``, redis-py, default ``naive`` serde) and over its native RESP client (``resp://``);
  floors: redis-py's plain ``SET``/``GET`` one value at a time, and ``redis-benchmark -d <chunk>``.
- Local disk (same directory tree, ext4 or whatever ``--dir`` is on): kvlayer's disk tier alone
  (raw codec) and LMCache's ``LocalDiskBackend``. Reads are timed twice per round: warm (page cache
  holds the files) and cold (every file fsynced and dropped from the page cache with
  ``posix_fadvise(DONTNEED)`` first).

LMCache puts include allocating its memory object and copying the chunk into it (what its engine
connector does before a store), and wait until its background writers report every key done;
its gets end with its memory objects in hand. kvlayer's puts start from the same chunk tensors
and its gets end with chunk tensors. Before each put round both sides' copies are removed
(untimed), because LMCache skips keys it already holds. Everything is checked bit-exact once.

LMCache 0.5.6 is installed by this script into a private directory (``pip install --no-deps
--target``, plus the two pure-Python modules its storage imports need); kvlayer neither depends
on it nor imports it. If it cannot be installed or driven, the reason is printed and kvlayer is
reported alone. The last stdout line is JSON with ``redis_put_vs_lmcache``, ``redis_get_vs_lmcache``,
``redis_get_vs_lmcache_resp``, ``disk_put_vs_lmcache``, ``disk_get_vs_lmcache`` (the lower of the
cold and warm ratios), ``cpu_vs_memcpy`` (round trip: harmonic mean of store and retrieve), the
absolute GB/s of every contender and the load average.

    python benchmarks/peers.py [--quick] [--record] [--rounds R] [--chunks N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import add_output_args, emit_json, markdown_table, output_dirs, write_results
from redis_tier import redis_benchmark

from kvlayer import assets
from kvlayer.config import KVLayerConfig
from kvlayer.engine import KVCache
from kvlayer.spec import KVSpec
from kvlayer.testing import RedisServer

NAME = "peers"
LMCACHE = "lmcache==0.5.6"
#: the pure-Python modules LMCache's storage backends import that this environment lacks
LMCACHE_EXTRAS = ("aiofile==3.12.3", "caio==0.12.10")
SPEC = KVSpec(model="HuggingFaceTB/SmolLM2-135M-Instruct", num_layers=30, num_kv_heads=3, head_dim=64,
              dtype="float16")
TOKENS = 256
Op = Callable[[], Any]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the data
def real_chunks(n: int) -> tuple[list[torch.Tensor], str]:
    """``n`` real KV chunks ``[30, 2, 256, 3, 64]`` fp16 (cached after the first run)."""
    path = assets.cache_dir() / "peers" / f"smollm2-essays-kv-{n}x{TOKENS}.pt"
    source = f"SmolLM2-135M-Instruct on Paul Graham essays, {n} chunks of {TOKENS} tokens"
    if path.exists():
        return list(torch.load(path)), source
    if not (assets.smollm2_available() and assets.essays_available()):
        raise SystemExit(f"real KV needs SmolLM2 and the essays: {assets.SMOLLM2_INSTALL}")
    from codec_quality import stack_kv

    log("computing real KV (once; cached in " + str(path.parent) + ")")
    model, tok = assets.load_smollm2()
    ids = tok(assets.essay_text(400_000), return_tensors="pt").input_ids[0]
    window = 4 * TOKENS  # short forward passes: 2 cores, no need for 8k-token attention
    chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, n * TOKENS, window):
            out = model(ids[start:start + window][None], use_cache=True)
            kv = stack_kv(out.past_key_values).to(torch.float16)
            chunks += [kv[:, :, s:s + TOKENS].contiguous() for s in range(0, kv.shape[2], TOKENS)]
    chunks = chunks[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(chunks, path)
    return chunks, source


def drop_page_cache(root: Path) -> int:
    """fsync every file under ``root`` and drop it from the page cache; returns the file count."""
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


# ----------------------------------------------------------------------------- LMCache
def install_lmcache(root: Path) -> tuple[Path | None, str]:
    """Install LMCache (no dependencies) into ``root``; (site dir, '') or (None, why not)."""
    site = root / LMCACHE.replace("==", "-")
    done = site / ".installed"
    if not done.exists():
        shutil.rmtree(site, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--target", str(site), LMCACHE, *LMCACHE_EXTRAS]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"pip install {LMCACHE} failed: {e}"
        if r.returncode != 0:
            return None, f"pip install {LMCACHE} failed: {(r.stderr or r.stdout).strip()[-500:]}"
        done.touch()
    return site, ""


class LMCacheSide:
    """LMCache's own storage backends driven the way its cache engine drives them."""

    def __init__(self, site: Path, redis_url: str, disk_dir: Path, n: int) -> None:
        if str(site) not in sys.path:
            sys.path.append(str(site))  # appended: never shadows this environment's packages
        os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
        from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend
        from lmcache.v1.storage_backend.remote_backend import RemoteBackend

        shape = SPEC.chunk_shape(TOKENS)
        chunk_gib = SPEC.bytes_per_token() * TOKENS / 2**30
        meta = LMCacheMetadata(model_name="peers", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                               kv_dtype=torch.float16, kv_shape=tuple(shape), chunk_size=TOKENS)
        cfg = dict(chunk_size=TOKENS, local_cpu=True, max_local_cpu_size=round(4 * n * chunk_gib + 0.25, 2),
                   remote_serde="naive")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lmcache-loop", daemon=True)
        self._thread.start()
        self.cpu = LocalCPUBackend(LMCacheEngineConfig.from_defaults(**cfg), meta)
        self.shapes = meta.get_shapes()
        resp_url = redis_url.replace("redis://", "resp://", 1).rsplit("/", 1)[0]
        self.redis = RemoteBackend(LMCacheEngineConfig.from_defaults(**cfg, remote_url=redis_url), meta,
                                   self.loop, self.cpu)
        self.resp = RemoteBackend(LMCacheEngineConfig.from_defaults(**cfg, remote_url=resp_url), meta,
                                  self.loop, self.cpu)
        if self.redis.connection is None or self.resp.connection is None:
            raise RuntimeError("LMCache could not connect to the redis-server")
        self.disk_dir = disk_dir
        self.disk = LocalDiskBackend(LMCacheEngineConfig.from_defaults(
            # a budget that is only bookkeeping: 0.5.6's remove() never gives back what a put
            # counted, so a budget of a few rounds' data fills up and later puts are refused
            **cfg, local_disk=str(disk_dir) + "/", max_local_disk_size=1024.0),
            self.loop, self.cpu, metadata=meta)
        self.keys = {name: [CacheEngineKey(f"peers-{name}", 1, 0, i, torch.float16) for i in range(n)]
                     for name in ("cpu", "redis", "resp", "disk")}
        self.backends = {"cpu": self.cpu, "redis": self.redis, "resp": self.resp, "disk": self.disk}

    def _objs(self, chunks: list[torch.Tensor]) -> list[Any]:
        objs = []
        for c in chunks:
            o = self.cpu.allocate(self.shapes, torch.float16)
            if o is None:
                raise RuntimeError("LMCache's allocator is full")
            o.tensor.view(-1).copy_(c.view(-1))  # its KV_2LTD layout: the same bytes, as its connector copies them
            objs.append(o)
        return objs

    def put(self, name: str, chunks: list[torch.Tensor]) -> None:
        backend, keys = self.backends[name], self.keys[name]
        objs = self._objs(chunks)
        left = [len(keys)]
        done = threading.Event()

        def one(_key: Any) -> None:
            left[0] -= 1
            if left[0] <= 0:
                done.set()

        backend.batched_submit_put_task(keys, objs, on_complete_callback=one)
        if not done.wait(120):
            raise RuntimeError(f"LMCache {name} put did not finish in 120 s")
        for o in objs:
            o.ref_count_down()

    def get(self, name: str) -> list[Any]:
        backend, keys = self.backends[name], self.keys[name]
        if name == "cpu":
            return [backend.get_blocking(k) for k in keys]
        return list(backend.batched_get_blocking(keys))

    def remove(self, name: str) -> None:
        """Forget ``name``'s keys (LMCache skips puts of keys it holds)."""
        backend = self.backends[name]
        for k in self.keys[name]:
            if name in ("cpu", "disk") and backend.contains(k):
                backend.remove(k, force=True)

    @staticmethod
    def release(objs: list[Any]) -> None:
        for o in objs:
            if o is not None:
                o.ref_count_down()

    def check(self, name: str, chunks: list[torch.Tensor]) -> None:
        got = self.get(name)
        try:
            bad = [i for i, (o, c) in enumerate(zip(got, chunks, strict=True))
                   if o is None or not torch.equal(o.tensor.reshape(-1).view(torch.uint8),
                                                   c.reshape(-1).view(torch.uint8))]
        finally:
            self.release(got)
        if bad:
            raise RuntimeError(f"LMCache {name}: {len(bad)} of {len(chunks)} chunks did not round-trip")

    def close(self) -> None:
        # Not RemoteBackend.close: in 0.5.6 its Redis connector's close waits, on the event loop,
        # for a job that needs that same loop (a deadlock). The process ends right after anyway.
        for b in (self.disk, self.cpu):
            try:
                b.close()
            except Exception as e:  # noqa: BLE001 - a failing close must not hide the results
                log(f"LMCache {b}: close failed: {e}")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- kvlayer and floors
class KVLayerSide:
    def __init__(self, redis_url: str, disk_dir: Path, nbytes: int) -> None:
        self.caches = {
            "cpu": KVCache(SPEC, KVLayerConfig(cpu_bytes=2 * nbytes + (64 << 20))),
            "redis": KVCache(SPEC, KVLayerConfig(cpu_bytes=0, redis_url=redis_url, redis_codec="raw")),
            "disk": KVCache(SPEC, KVLayerConfig(cpu_bytes=0, disk_path=str(disk_dir), disk_codec="raw",
                                                disk_bytes=2 * nbytes + (64 << 20))),
        }
        self.disk_dir = disk_dir

    def keys(self, n: int) -> list[str]:
        return [f"{i:064x}" for i in range(n)]

    def put(self, name: str, chunks: list[torch.Tensor]) -> None:
        stored = self.caches[name].store_chunks(self.keys(len(chunks)), chunks)
        if stored != len(chunks):
            raise RuntimeError(f"kvlayer {name}: stored {stored} of {len(chunks)} chunks")

    def get(self, name: str, n: int) -> list[torch.Tensor | None]:
        return self.caches[name].retrieve_chunks(self.keys(n))

    def remove(self, name: str, n: int) -> None:
        self.caches[name].evict(keys=self.keys(n), force=True)

    def check(self, name: str, chunks: list[torch.Tensor]) -> None:
        got = self.get(name, len(chunks))
        bad = [i for i, (t, c) in enumerate(zip(got, chunks, strict=True)) if t is None or not torch.equal(t, c)]
        if bad:
            raise RuntimeError(f"kvlayer {name}: {len(bad)} of {len(chunks)} chunks did not round-trip")

    def close(self) -> None:
        for c in self.caches.values():
            c.close()


class PlainRedis:
    """redis-py as a simple client uses it: one SET / GET per chunk on one connection."""

    def __init__(self, url: str, n: int) -> None:
        import redis

        self.r = redis.Redis.from_url(url, protocol=2)
        self.keys = [f"peers:plain:{i}" for i in range(n)]

    def put(self, chunks: list[torch.Tensor]) -> None:
        for k, c in zip(self.keys, chunks, strict=True):
            self.r.set(k, c.reshape(-1).view(torch.uint8).numpy().data)

    def get(self) -> list[Any]:
        return [self.r.get(k) for k in self.keys]  # keeps the values, as a caller must

    def close(self) -> None:
        self.r.delete(*self.keys)
        self.r.close()


# ----------------------------------------------------------------------------- rounds
class Rounds:
    """Named operations run once per round; medians over rounds, in GB/s. Operations come in
    groups (the same step for every contender, ``group()`` starts one): a group's order is
    reversed every other round, so no contender always runs right after a write-heavy step or
    right before another's (dirty-page writeback, cache state)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.groups: list[list[tuple[str, Op | None, Op, Callable[[Any], None] | None]]] = [[]]
        self.times: dict[str, list[float]] = {}
        self.rates: dict[str, list[float]] = {}  # GB/s a contender reports itself (redis-benchmark)
        self.loads: list[float] = []
        self.op_loads: dict[str, list[float]] = {}  # the 1-minute load average right after each timed op
        self.cpu: dict[str, list[float]] = {}  # this process's CPU seconds (all threads) per timed op
        self.warming_up = False

    def add(self, name: str, fn: Op, *, before: Op | None = None, after: Callable[[Any], None] | None = None) -> None:
        """``before`` (untimed) prepares, ``fn`` is timed, ``after(result)`` (untimed) cleans up."""
        self.groups[-1].append((name, before, fn, after))
        self.times[name] = []
        self.op_loads[name] = []
        self.cpu[name] = []

    def group(self) -> None:
        if self.groups[-1]:
            self.groups.append([])

    def report(self, name: str, gbps: float) -> None:
        if not self.warming_up:
            self.rates.setdefault(name, []).append(gbps)

    def run(self, rounds: int) -> None:
        """One untimed warm-up round (first touch of every buffer, connections), then ``rounds``."""
        for r in range(-1, rounds):
            t_round = time.perf_counter()
            self.warming_up = r < 0
            ops = [op for g in self.groups for op in (g[::-1] if r % 2 else g)]
            for name, before, fn, after in ops:
                if before is not None:
                    before()
                c0, t0 = time.process_time(), time.perf_counter()
                out = fn()
                if r >= 0:
                    self.times[name].append(time.perf_counter() - t0)
                    self.cpu[name].append(time.process_time() - c0)
                    self.op_loads[name].append(os.getloadavg()[0])
                if after is not None:
                    after(out)
                del out
            if r >= 0:
                self.loads.append(os.getloadavg()[0])
                log(f"round {r + 1}/{rounds}: {time.perf_counter() - t_round:.1f} s, load {self.loads[-1]:.2f}")

    def gbps(self) -> dict[str, float]:
        out = {k: self.nbytes / statistics.median(v) / 1e9 for k, v in self.times.items() if v}
        out.update({k: statistics.median(v) for k, v in self.rates.items() if v})
        return out

    def cpu_s_per_gb(self) -> dict[str, float]:
        """Median client CPU seconds per GB (this process only: not redis-server's, not the kernel's
        work for other processes)."""
        return {k: statistics.median(v) / self.nbytes * 1e9 for k, v in self.cpu.items() if v}

    def paired(self, ours: str, theirs: str) -> list[float]:
        """Round by round, ``theirs``' time over ``ours`` (the two ran within seconds of each
        other), sorted: the spread a median hides on a shared machine."""
        a, b = self.times.get(ours) or [], self.times.get(theirs) or []
        return sorted(tb / ta for ta, tb in zip(a, b, strict=False) if ta > 0)

    def load_during(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.op_loads.items() if v}


# ----------------------------------------------------------------------------- report
PATHS = [  # (row, kvlayer op, LMCache op, LMCache RESP op, floors)
    ("CPU put", "kvlayer_cpu_put", "lmcache_cpu_put", None, ["memcpy"]),
    ("CPU get", "kvlayer_cpu_get", "lmcache_cpu_get", None, ["memcpy"]),
    ("Redis put", "kvlayer_redis_put", "lmcache_redis_put", "lmcache_resp_put", ["redispy_set", "redis_benchmark_set"]),
    ("Redis get", "kvlayer_redis_get", "lmcache_redis_get", "lmcache_resp_get", ["redispy_get", "redis_benchmark_get"]),
    ("disk put", "kvlayer_disk_put", "lmcache_disk_put", None, []),
    ("disk get, warm page cache", "kvlayer_disk_get_warm", "lmcache_disk_get_warm", None, []),
    ("disk get, cold page cache", "kvlayer_disk_get_cold", "lmcache_disk_get_cold", None, []),
]
#: ratio key -> (kvlayer op, peer op), for the round-by-round spread
PAIRS = {
    "redis_put_vs_lmcache": ("kvlayer_redis_put", "lmcache_redis_put"),
    "redis_get_vs_lmcache": ("kvlayer_redis_get", "lmcache_redis_get"),
    "redis_get_vs_lmcache_resp": ("kvlayer_redis_get", "lmcache_resp_get"),
    "disk_put_vs_lmcache": ("kvlayer_disk_put", "lmcache_disk_put"),
    "disk_get_warm_vs_lmcache": ("kvlayer_disk_get_warm", "lmcache_disk_get_warm"),
    "disk_get_cold_vs_lmcache": ("kvlayer_disk_get_cold", "lmcache_disk_get_cold"),
}
FLOOR_NAMES = {"memcpy": "memcpy", "redispy_set": "redis-py SET", "redispy_get": "redis-py GET",
               "redis_benchmark_set": "redis-benchmark SET", "redis_benchmark_get": "redis-benchmark GET"}


def summarize(g: dict[str, float]) -> dict[str, float]:
    def ratio(a: str, b: str) -> float | None:
        return g[a] / g[b] if g.get(a) and g.get(b) else None

    def hm(a: float, b: float) -> float:
        return 2 / (1 / a + 1 / b)

    out: dict[str, Any] = {
        "redis_put_vs_lmcache": ratio("kvlayer_redis_put", "lmcache_redis_put"),
        "redis_get_vs_lmcache": ratio("kvlayer_redis_get", "lmcache_redis_get"),
        "redis_get_vs_lmcache_resp": ratio("kvlayer_redis_get", "lmcache_resp_get"),
        "redis_put_vs_lmcache_resp": ratio("kvlayer_redis_put", "lmcache_resp_put"),
        "disk_put_vs_lmcache": ratio("kvlayer_disk_put", "lmcache_disk_put"),
        "disk_get_warm_vs_lmcache": ratio("kvlayer_disk_get_warm", "lmcache_disk_get_warm"),
        "disk_get_cold_vs_lmcache": ratio("kvlayer_disk_get_cold", "lmcache_disk_get_cold"),
        "cpu_put_vs_lmcache": ratio("kvlayer_cpu_put", "lmcache_cpu_put"),
        "cpu_get_vs_lmcache": ratio("kvlayer_cpu_get", "lmcache_cpu_get"),
        "cpu_vs_memcpy": hm(g["kvlayer_cpu_put"], g["kvlayer_cpu_get"]) / g["memcpy"],
        "cpu_put_vs_memcpy": g["kvlayer_cpu_put"] / g["memcpy"],
    }
    warm, cold = out["disk_get_warm_vs_lmcache"], out["disk_get_cold_vs_lmcache"]
    out["disk_get_vs_lmcache"] = min(warm, cold) if warm and cold else None
    return out


def table(g: dict[str, float], cpu: dict[str, float] | None = None, load: dict[str, float] | None = None,
          ) -> tuple[str, list[dict[str, Any]]]:
    """The markdown table; ``cpu`` (client CPU s/GB) and ``load`` (1-minute load average after
    each op, median) per op name add a column each where given."""
    cpu, load = cpu or {}, load or {}
    rows = []
    for path, ours, theirs, resp, floors in PATHS:
        row: dict[str, Any] = {"_name": path, "kvlayer": g.get(ours), "LMCache": g.get(theirs),
                               "LMCache RESP": g.get(resp) if resp else None,
                               "floors": ", ".join(f"{FLOOR_NAMES[f]} {g[f]:.2f}" for f in floors if f in g)}
        row["kvlayer / LMCache"] = g[ours] / g[theirs] if g.get(ours) and g.get(theirs) else None
        row["kvlayer / RESP"] = g[ours] / g[resp] if resp and g.get(ours) and g.get(resp) else None
        names = [n for n in (ours, theirs, resp) if n]
        row["client CPU s/GB (kvlayer / LMCache / RESP)"] = " / ".join(
            f"{cpu[n]:.3f}" for n in names if n in cpu) if cpu else None
        loads = [load[n] for n in names if n in load]
        row["load (1 min)"] = statistics.median(loads) if loads else None
        rows.append(row)
    cols = ["kvlayer", "LMCache", "LMCache RESP", "kvlayer / LMCache", "kvlayer / RESP", "floors"]
    cols += [c for c in ("client CPU s/GB (kvlayer / LMCache / RESP)", "load (1 min)") if any(r[c] for r in rows)]
    return markdown_table(rows, cols, first="path (GB/s)"), rows


def plot(rows: list[dict[str, Any]], g: dict[str, float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [("kvlayer", "kvlayer", "#1f77b4"), ("LMCache", "LMCache (redis-py / its backend)", "#ff7f0e"),
              ("LMCache RESP", "LMCache native RESP", "#d62728")]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    width = 0.26
    ys = list(range(len(rows)))
    for j, (col, label, color) in enumerate(series):
        vals = [r.get(col) or 0.0 for r in rows]
        if any(vals):
            pos = [y + (j - 1) * width for y in ys]
            ax.barh(pos, vals, height=width, label=label, color=color)
            for y, v in zip(pos, vals, strict=True):
                if v:
                    ax.text(v * 1.05, y, f"{v:.3g}", va="center", fontsize=7)
    ax.set_xscale("log")  # CPU gets (views, references) are bookkeeping: thousands of GB/s
    for y, (_, _, _, _, floors) in zip(ys, PATHS, strict=True):
        for f in floors:
            if f in g:
                ax.plot([g[f]] * 2, [y - 1.5 * width, y + 1.5 * width], color="black", lw=1,
                        ls="--" if f.startswith("redis_benchmark") else ":")
    ax.set_yticks(ys, [r["_name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("GB/s of raw KV (log scale, medians of rounds); dotted: memcpy, redis-py; dashed: redis-benchmark")
    ax.set_xlim(right=ax.get_xlim()[1] * 3)  # room for the labels
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rounds instead of 7 (well under 10 minutes)")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 7, --quick 3)")
    ap.add_argument("--chunks", type=int, default=32, help="KV chunks of 256 tokens (default 32 = 189 MB)")
    ap.add_argument("--dir", help="where both disk tiers write (default: a temp dir; use a real disk)")
    ap.add_argument("--no-lmcache", action="store_true", help="kvlayer and the floors only")
    ap.add_argument("--malloc-tuning", action="store_true",
                    help="apply kvlayer.malloc.tune_for_blobs() first (what malloc_tuning: true does in an engine; "
                         "process-wide, so every contender gets it); results go to peers_malloc_tuned.{json,md}")
    add_output_args(ap)
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    if args.malloc_tuning:
        from kvlayer.malloc import tune_for_blobs

        if tune_for_blobs() is None:
            raise SystemExit("--malloc-tuning needs glibc on Linux")
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    logging.getLogger("kvlayer").setLevel(logging.ERROR)

    chunks, source = real_chunks(args.chunks)
    n = len(chunks)
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    server = RedisServer().start()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kvlayer-peers-"))
    kv_dir, lm_dir = root / "kvlayer", root / "lmcache"
    lm_dir.mkdir(parents=True, exist_ok=True)
    kv = lm = plain = None
    why = "skipped (--no-lmcache)" if args.no_lmcache else ""
    try:
        kv = KVLayerSide(server.url, kv_dir, nbytes)
        if not args.no_lmcache:
            site, why = install_lmcache(assets.cache_dir() / "peers")
            if site is not None:
                try:
                    lm = LMCacheSide(site, server.url, lm_dir, n)
                    for name in lm.backends:
                        lm.remove(name)
                        lm.put(name, chunks)
                        lm.check(name, chunks)
                except Exception as e:  # noqa: BLE001 - any failure to drive it is reported, not fatal
                    why = f"LMCache could not be driven: {type(e).__name__}: {e}"
                    if lm is not None:
                        lm.close()
                    lm = None
        if lm is None:
            log(f"LMCache: {why}; reporting kvlayer alone")
        plain = PlainRedis(server.url, n)
        for name in kv.caches:
            kv.put(name, chunks)
            kv.check(name, chunks)

        R = Rounds(nbytes)
        dsts = [torch.empty_like(c) for c in chunks]
        R.add("memcpy_torch", lambda: [d.copy_(c) for d, c in zip(dsts, chunks, strict=True)])
        R.add("memcpy_numpy", lambda: [np.copyto(d.numpy(), c.numpy()) for d, c in zip(dsts, chunks, strict=True)])
        R.group()
        R.add("kvlayer_cpu_put", lambda: kv.put("cpu", chunks), before=lambda: kv.remove("cpu", n))
        if lm is not None:
            R.add("lmcache_cpu_put", lambda: lm.put("cpu", chunks), before=lambda: lm.remove("cpu"))
        R.group()
        R.add("kvlayer_cpu_get", lambda: kv.get("cpu", n))
        if lm is not None:
            R.add("lmcache_cpu_get", lambda: lm.get("cpu"), after=lm.release)
        R.group()
        R.add("kvlayer_redis_put", lambda: kv.put("redis", chunks))
        if lm is not None:
            for name in ("redis", "resp"):
                R.add(f"lmcache_{name}_put", lambda name=name: lm.put(name, chunks))
        R.add("redispy_set", lambda: plain.put(chunks))
        R.group()
        R.add("kvlayer_redis_get", lambda: kv.get("redis", n))
        if lm is not None:
            for name in ("redis", "resp"):
                R.add(f"lmcache_{name}_get", lambda name=name: lm.get(name), after=lm.release)
        R.add("redispy_get", plain.get)
        R.group()

        u = server.url.split("//", 1)[1].split("/", 1)[0]
        host, port = u.rsplit(":", 1)

        def rbench() -> None:
            res = redis_benchmark(host, int(port), nbytes // n, requests=max(2 * n, 16), clients=4)
            R.report("redis_benchmark_set", res["put"])
            R.report("redis_benchmark_get", res["get"])

        R.add("_redis_benchmark", rbench)
        R.group()
        R.add("kvlayer_disk_put", lambda: kv.put("disk", chunks), before=lambda: kv.remove("disk", n))
        if lm is not None:
            R.add("lmcache_disk_put", lambda: lm.put("disk", chunks), before=lambda: lm.remove("disk"))
        R.group()
        R.add("kvlayer_disk_get_warm", lambda: kv.get("disk", n))
        if lm is not None:
            R.add("lmcache_disk_get_warm", lambda: lm.get("disk"), after=lm.release)
        R.group()
        R.add("kvlayer_disk_get_cold", lambda: kv.get("disk", n), before=lambda: drop_page_cache(kv_dir))
        if lm is not None:
            R.add("lmcache_disk_get_cold", lambda: lm.get("disk"), before=lambda: drop_page_cache(lm_dir),
                  after=lm.release)
        R.run(rounds)
    finally:
        for side in (plain, lm, kv):
            if side is not None:
                side.close()
        server.cleanup()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    g = {k: v for k, v in R.gbps().items() if not k.startswith("_")}
    g["memcpy"] = max(g["memcpy_torch"], g["memcpy_numpy"])
    summary = summarize(g)
    cpu, load_during = R.cpu_s_per_gb(), R.load_during()
    per_round = {k: R.paired(a, b) for k, (a, b) in PAIRS.items() if R.paired(a, b)}
    md_table, rows = table(g, cpu, load_during)
    load_end = os.getloadavg()
    print(md_table, file=sys.stderr)
    for k, v in summary.items():
        log(f"{k}: {'n/a' if v is None else f'{v:.3f}'}")
    log(f"load average (1, 5, 15 min): start {load_start}, end {load_end}; per round {R.loads}")
    data: dict[str, Any] = {
        **summary, "gbps": g, "lmcache": LMCACHE if lm is not None or not why else f"not run: {why}",
        "cpu_s_per_gb": {k: v for k, v in cpu.items() if not k.startswith("_")},
        "per_round": per_round,
        "loadavg": {"start": list(load_start), "end": list(load_end), "rounds": R.loads,
                    "per_op": {k: v for k, v in load_during.items() if not k.startswith("_")}},
        "cpus": os.cpu_count(), "rounds": rounds, "chunks": n, "chunk_mib": nbytes / n / 2**20,
        "kv_source": source, "quick": args.quick, "malloc_tuning": args.malloc_tuning,
        "seconds": time.perf_counter() - t_start,
    }
    name = NAME + ("_malloc_tuned" if args.malloc_tuning else "")
    png = plot(rows, g, output_dirs(args)[1] / f"{name}.png")
    write_results(name, data, markdown(data, md_table, png.name), args)
    emit_json(data)
    return 0


def markdown(data: dict[str, Any], md_table: str, png: str) -> str:
    ld = data["loadavg"]
    def spread(k: str) -> str:
        rs = data.get("per_round", {}).get(k)
        return f" (round by round: {', '.join(f'{r:.2f}' for r in rs)})" if rs else ""

    ratios = "\n".join(f"- `{k}`: {data[k]:.3g}{spread(k)}" if data[k] is not None else f"- `{k}`: n/a"
                       for k in ("redis_put_vs_lmcache", "redis_get_vs_lmcache", "redis_get_vs_lmcache_resp",
                                 "disk_put_vs_lmcache", "disk_get_vs_lmcache", "disk_get_warm_vs_lmcache",
                                 "disk_get_cold_vs_lmcache", "cpu_vs_memcpy", "cpu_put_vs_memcpy"))
    return (
        f"# kvlayer vs LMCache, every storage path (`benchmarks/{NAME}.py`)\n\n"
        f"{data['chunks']} real KV chunks ({data['kv_source']}; {data['chunk_mib']:.2f} MiB each, fp16), "
        f"{data['rounds']} interleaved rounds, medians, GB/s = 1e9 bytes/s of raw KV. LMCache: {data['lmcache']}. "
        f"{data['cpus']} CPUs, load average (1/5/15 min) {', '.join(f'{x:.2f}' for x in ld['start'])} at the start, "
        f"{', '.join(f'{x:.2f}' for x in ld['end'])} at the end (the machine is shared: absolute GB/s move "
        "from run to run, ratios less). kvlayer uses the raw (lossless) codec on every tier, each tier alone; "
        "LMCache its own backends with its default `naive` serde. glibc malloc: "
        f"{'tuned for multi-MiB blobs (kvlayer.malloc, --malloc-tuning, every contender)' if data['malloc_tuning'] else 'defaults'}. "
        "What each contender does is in the benchmark's docstring.\n\n"
        + md_table + "\n" + ratios + "\n\n"
        f"![kvlayer vs LMCache]({png})\n\n" + NOTES
    )


NOTES = """## Reading the table

- CPU get: both sides hand back the stored memory itself (LMCache a reference-counted memory
  object, kvlayer a tensor viewing the stored blob after a header and key check), so the figure
  is bookkeeping, not bandwidth; `cpu_vs_memcpy` is the round trip (store + get) against a
  tensor copy of the same bytes. kvlayer's CPU tier stores blobs unsealed (no checksum pass) and
  seals them when they leave the process.
- Redis get: LMCache's native RESP client (C++) receives each value straight into its memory
  object and checks nothing: about 0.2 client CPU s/GB. kvlayer reads with redis-py + hiredis
  (Cluster, TLS and its failure handling come with it), which copies each reply twice in the
  client (into hiredis's read buffer, then into a fresh `bytes` object) before kvlayer checks
  its checksum; no well-kept Python client receives a value into a caller's buffer. The fresh
  `bytes` used to cost more than the copies (glibc maps multi-MiB ones in fresh pages and gives
  them back when a batch is freed: ~34k page faults per 189 MB batch); kvlayer now copies each
  large reply into a recycled pooled buffer and frees the `bytes` at once, so the next reply
  reuses it: ~0.5-0.65 instead of ~0.9 client CPU s/GB, still more than the RESP client's. A
  reader that received bulk-string replies straight into pooled buffers (measured as a
  ceiling, not shipped: it is a hand-written protocol reader) used 0.25 s/GB with the check.
- Client CPU s/GB is this process's CPU time (all its threads) during each op, median over
  rounds: the redis-server's share and other processes' are not in it. On 2 shared CPUs it
  says more than GB/s about what each client costs.
- memcpy is the faster of torch's parallel `copy_` and numpy's one-thread `copyto` (both in the
  JSON's `gbps`): in a process with other busy threads torch's thread pool often stalls, which is
  also what LMCache's CPU put (a torch copy into its memory object) pays; kvlayer's encode copies
  with numpy.
- Disk get: both sides `readinto` a buffer that is already faulted in, on 4 threads; every
  kvlayer read is also checked (xxh3 right after the copy, on the same thread and CPU slot),
  LMCache reads its files unchecked. A warm read is a copy out of the page cache, so the check
  (~0.03 CPU s/GB on top of a ~0.09-0.10 s/GB copy) and the store's bookkeeping are what
  separate the two: kvlayer cannot pass an unchecked copy while it copies too. Mapping the files
  instead (`mmap` + `MADV_POPULATE_READ` + xxh3, no copy) measured 0.115 CPU s/GB against 0.137
  for the copy alone, but a mapped file that another process truncates, or a page that fails to
  read back after reclaim, is a SIGBUS in the engine instead of a miss, so it is not done.
  kvlayer lets at most one copy or check per CPU run at once (on 2 CPUs, 4 threads copying at
  once were slower than 2); O_DIRECT reads are not counted, so cold files keep 4 reads in
  flight. Cold reads are fsynced and dropped from the page cache (`posix_fadvise(DONTNEED)`)
  before each round, so they measure the device; kvlayer reads a file the page cache does not
  hold with `O_DIRECT`.
"""


if __name__ == "__main__":
    sys.exit(main())
