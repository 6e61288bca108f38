"""Get/put throughput of 256-token KV chunks through the ``remote`` tier (a ``kvlayer serve``
subprocess on loopback), against the in-process CPU tier and the Redis tier (a redis-server
subprocess) measured in the same run, with 1 and 4 clients.

Every contender is driven the same way: a ``TieredStore`` with that one tier and the raw codec,
``put(keys, tensors)`` (encode + write) and ``get(keys)`` (read + verify + decode), so the figures
are what an engine sees. Clients are threads, each with its own tier instance (own connections);
in-process clients share one CPU tier, as threads of one engine would. GB/s counts chunk bytes
moved by all clients together; medians over interleaved rounds. The kvlayer server runs with no
disk tier (like redis-server without persistence) and a CPU budget that holds the working set.

The last stdout line is JSON with ``get_vs_redis`` and ``get_vs_inprocess`` (1 client; the
4-client ratios have a ``_4`` suffix). Redis figures are null when redis-server or the Redis tier
module is missing.

    python benchmarks/server.py [--quick] [--chunks N] [--layers 24 --kv-heads 2 --head-dim 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import REPO, add_output_args, emit_json, markdown_table, write_results

from kvlayer.codec import get_codec
from kvlayer.storage import MemoryTier, TieredStore
from kvlayer.storage.base import Tier

TOKENS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_pid(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)


def start_kvlayer(tmp: Path, cpu_bytes: int) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp / "ready.json"
    cmd = [sys.executable, "-m", "kvlayer.server", "serve", "--port", "0", "--ready-file", str(ready), "--no-disk",
           "--cpu-bytes", str(cpu_bytes), "--metrics-port", "0", "--log-level", "WARNING"]
    p = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            stop_pid(p)
            raise SystemExit("kvlayer server did not start")
        time.sleep(0.05)
    return p, f"127.0.0.1:{json.loads(ready.read_text())['port']}"


def start_redis(tmp: Path) -> tuple[subprocess.Popen[bytes] | None, str | None, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None, "redis-server not installed"
    try:
        import kvlayer.storage.redis  # noqa: F401
    except ImportError as e:
        return None, None, f"Redis tier not available ({e})"
    port = free_port()
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(tmp), "--protected-mode", "no"], stdout=subprocess.DEVNULL,
                         start_new_session=True)
    import redis

    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    r.close()
    return p, f"redis://127.0.0.1:{port}/0", ""


def run_clients(stores: list[TieredStore], fn: Callable[[TieredStore, int], None]) -> float:
    """Seconds for every client to finish ``fn`` once, started together."""
    barrier = threading.Barrier(len(stores) + 1)
    errors: list[BaseException] = []

    def go(i: int) -> None:
        barrier.wait()
        try:
            fn(stores[i], i)
        except BaseException as e:  # report, do not hang
            errors.append(e)

    ths = [threading.Thread(target=go, args=(i,)) for i in range(len(stores))]
    for t in ths:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ths:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="under 60 s: fewer chunks and rounds")
    ap.add_argument("--chunks", type=int, default=0, help="chunks per client per round (default 32, --quick 12)")
    ap.add_argument("--repeat", type=int, default=0, help="interleaved rounds (default 5, --quick 3)")
    ap.add_argument("--layers", type=int, default=24, help="model layers (default 24: a 0.5B-class model)")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--clients", default="1,4", help="client counts (default 1,4)")
    ap.add_argument("--channels", type=int, default=0,
                    help="gRPC connections per remote client (default: the tier's default, 4, like the Redis tier's 4)")
    add_output_args(ap)
    args = ap.parse_args()
    n_chunks = args.chunks or (12 if args.quick else 32)
    repeat = args.repeat or (3 if args.quick else 7)
    clients = [int(c) for c in args.clients.split(",")]
    shape = (args.layers, 2, TOKENS, args.kv_heads, args.head_dim)
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*shape, generator=gen).to(torch.bfloat16) for _ in range(n_chunks)]
    chunk_bytes = tensors[0].numel() * tensors[0].element_size()
    raw = get_codec("raw")
    max_c = max(clients)
    keysets = [[f"{c:04x}{i:060x}" for i in range(n_chunks)] for c in range(max_c)]
    work_bytes = (n_chunks * chunk_bytes + (1 << 20)) * max_c

    tmp = Path(tempfile.mkdtemp(prefix="kvlayer-bench-server-"))
    procs: list[subprocess.Popen[bytes]] = []
    notes: list[str] = []
    try:
        srv, url = start_kvlayer(tmp / "kvlayer", cpu_bytes=2 * work_bytes + (512 << 20))
        procs.append(srv)
        rproc, rurl, why = start_redis(tmp)
        if rproc is not None:
            procs.append(rproc)
        else:
            notes.append(f"redis: {why}")
        shared_cpu = MemoryTier("cpu", 2 * work_bytes)

        def make(kind: str) -> Tier:
            if kind == "inprocess":
                return shared_cpu
            if kind == "remote":
                from kvlayer.storage.remote import RemoteTier

                return RemoteTier(url, timeout_s=30, **({"channels": args.channels} if args.channels else {}))
            from kvlayer.storage.redis import RedisTier

            return RedisTier(str(rurl), name="bench", prefix="kvlayer:bench:")

        kinds = ["inprocess", "remote"] + (["redis"] if rurl else [])
        stores: dict[tuple[str, int], list[TieredStore]] = {}
        for kind in kinds:
            for n in clients:
                stores[(kind, n)] = [TieredStore([(make(kind), raw)], retry_after_s=0.0) for _ in range(n)]
        # Correctness once per contender: what comes back is bit-exact.
        for kind in kinds:
            st = stores[(kind, clients[0])][0]
            st.put(keysets[0], tensors)
            got = st.get(keysets[0])
            assert all(g is not None and torch.equal(g, t) for g, t in zip(got, tensors, strict=True)), kind
        samples: dict[tuple[str, str, int], list[float]] = {}
        for _ in range(repeat):
            for kind in kinds:
                for n in clients:
                    sts = stores[(kind, n)]
                    dt = run_clients(sts, lambda s, i: s.put(keysets[i], tensors))
                    samples.setdefault((kind, "put", n), []).append(n * n_chunks * chunk_bytes / dt / 1e9)
                    dt = run_clients(sts, lambda s, i: [s.get(keysets[0])])
                    samples.setdefault((kind, "get", n), []).append(n * n_chunks * chunk_bytes / dt / 1e9)
        for sts in stores.values():
            for s in sts:
                if s.levels[0].tier is not shared_cpu:
                    s.close()
    finally:
        for p in procs:
            stop_pid(p)
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in samples.items()}

    def g(kind: str, op: str, n: int) -> float | None:
        return med.get((kind, op, n))

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    n1, n4 = clients[0], clients[-1]
    result: dict[str, Any] = {
        "benchmark": "server",
        "chunk_bytes": chunk_bytes,
        "chunk_shape": list(shape),
        "chunks_per_client": n_chunks,
        "rounds": repeat,
        "gbps": {f"{kind}_{op}_{n}": med.get((kind, op, n)) for kind in ("inprocess", "remote", "redis")
                 for op in ("get", "put") for n in clients},
        "get_vs_redis": ratio(g("remote", "get", n1), g("redis", "get", n1)),
        "get_vs_inprocess": ratio(g("remote", "get", n1), g("inprocess", "get", n1)),
        f"get_vs_redis_{n4}": ratio(g("remote", "get", n4), g("redis", "get", n4)),
        f"get_vs_inprocess_{n4}": ratio(g("remote", "get", n4), g("inprocess", "get", n4)),
        "put_vs_redis": ratio(g("remote", "put", n1), g("redis", "put", n1)),
        f"put_vs_redis_{n4}": ratio(g("remote", "put", n4), g("redis", "put", n4)),
        "put_vs_inprocess": ratio(g("remote", "put", n1), g("inprocess", "put", n1)),
        "quick": args.quick,
        "notes": notes,
        "load_avg_1m": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }

    def f3(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3g}"

    rows = []
    for kind in ("inprocess", "remote", "redis"):
        row: dict[str, Any] = {"_name": kind}
        for op in ("get", "put"):
            for n in clients:
                row[f"{op} GB/s x{n}"] = g(kind, op, n)
        rows.append(row)
    cols = [f"{op} GB/s x{n}" for op in ("get", "put") for n in clients]
    md = (f"# kvlayer serve: remote tier throughput\n\n"
          f"256-token chunks of shape {list(shape)} bf16 ({chunk_bytes / 2**20:.1f} MiB), {n_chunks} per client, "
          f"median of {repeat} rounds; clients are threads with their own connections; loopback, no disk tier.\n\n"
          + markdown_table(rows, cols, first="tier")
          + f"\nget_vs_redis = {f3(result['get_vs_redis'])}, get_vs_inprocess = {f3(result['get_vs_inprocess'])} "
          f"(1 client); with {n4} clients: {f3(result[f'get_vs_redis_{n4}'])}, {f3(result[f'get_vs_inprocess_{n4}'])}; "
          f"put_vs_redis = {f3(result['put_vs_redis'])}.\n"
          f"\nMachine: {os.cpu_count()} CPUs shared with other jobs (1-min load average {result['load_avg_1m']:.1f} at "
          "the end of the run): absolute figures are noisy, ratios come from interleaved rounds.\n"
          + "".join(f"\nNote: {n}\n" for n in notes)
          + "\nCommand: `python benchmarks/server.py" + (" --quick" if args.quick else "") + "`\n")
    print(md)
    write_results("server", result, md, args)
    emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
