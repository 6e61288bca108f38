"""Put/get throughput of 1, 4 and 8 MiB values through the kvlayer Redis tier, against two
baselines measured in the same run on the same redis-server:

- ``redis-benchmark`` (the C client shipped with Redis): ``-t set,get -d <size> -c C -P 1 --csv``;
  its requests/s x value size. ``-c`` equals the tier's connection count (default 4) so both sides
  may keep the same number of requests in flight; ``-P 1`` because pipelining multi-MB values buys
  nothing (the socket is the bottleneck) and larger ``-P`` only makes its latency burstier. Its keys
  are one fixed key (no ``-r``), so every GET finds the value its SET wrote.
- naive redis-py: one ``SET``/``GET`` call at a time on one connection (hiredis parser), the way a
  simple client stores KV chunks; like the tier it keeps every value it read until the batch is done
  (redis-benchmark reads each reply into one reused buffer, which a cache that hands values to its
  caller cannot do; on machines where fresh pages are costly this is most of the gap).

The tier moves a batch of N values with ``put_many``/``get_many`` (pipelined, split across its
connections). Every contender runs once per round and rounds are interleaved, so load from other
processes hits all of them alike; figures are medians over rounds, ratios per size plus their
geometric mean. Also reported: the client CPU seconds per GB of the tier's reads and writes, the
same for writes with redis-py's hiredis command packer (``packer="hiredis"``), and ``TieredStore.get``
end to end (read + checksum + decode).
The last stdout line is JSON with ``put_vs_redis_benchmark``, ``get_vs_redis_benchmark`` and
``get_vs_naive``.

    python benchmarks/redis_tier.py [--quick] [--url redis://host:port/0] [--connections 4]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import redis
import torch
from _common import add_output_args, emit_json, markdown_table, time_gbps, write_results

from kvlayer.codec import get_codec
from kvlayer.storage import TieredStore  # noqa: E402
from kvlayer.storage.redis import RedisTier  # noqa: E402

MiB = 1 << 20


def redis_benchmark(host: str, port: int, size: int, requests: int, clients: int) -> dict[str, float]:
    """GB/s of SET and GET from redis-benchmark's CSV (requests/s x value size)."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise SystemExit("redis-benchmark not found (it ships with redis-server: apt-get install redis-server)")
    cmd = [exe, "-h", host, "-p", str(port), "-t", "set,get", "-d", str(size), "-n", str(requests),
           "-c", str(clients), "-P", "1", "--csv"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    rows = {r["test"]: float(r["rps"]) for r in csv.DictReader(io.StringIO(out))}
    return {"put": rows["SET"] * size / 1e9, "get": rows["GET"] * size / 1e9}


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="under 60 s: fewer bytes and repeats")
    ap.add_argument("--url", help="use this Redis (redis://host:port/db) instead of starting a redis-server; "
                                  "it must be a scratch server: keys under kvlayer:bench: and redis-benchmark's are written")
    ap.add_argument("--sizes", default="1,4,8", help="value sizes in MiB (default 1,4,8)")
    ap.add_argument("--batch-mib", type=int, default=0, help="MiB per batch (default 128, --quick 32)")
    ap.add_argument("--repeat", type=int, default=0, help="interleaved rounds (default 7, --quick 3)")
    ap.add_argument("--connections", type=int, default=4, help="tier connections = redis-benchmark -c")
    ap.add_argument("--malloc-tuning", action="store_true",
                    help="apply kvlayer.malloc.tune_for_blobs() first (what malloc_tuning: true does in an engine); "
                         "results go to redis_tier_malloc_tuned.{json,md}")
    add_output_args(ap)
    args = ap.parse_args()
    if args.malloc_tuning:
        from kvlayer.malloc import tune_for_blobs

        if tune_for_blobs() is None:
            raise SystemExit("--malloc-tuning needs glibc on Linux")
    batch = (args.batch_mib or (32 if args.quick else 128)) * MiB
    repeat = args.repeat or (3 if args.quick else 7)
    sizes = [int(float(s) * MiB) for s in args.sizes.split(",")]

    server = None
    if args.url:
        url = args.url
    else:
        from kvlayer.testing import RedisServer

        server = RedisServer().start()
        url = server.url
    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    try:
        tier = RedisTier(url, name="bench", connections=args.connections)
        piped = RedisTier(url, name="bench", connections=args.connections, packer="hiredis")
        naive = redis.Redis(host=host, port=port, password=u.password, username=u.username, protocol=2)
        for size in sizes:
            n = max(4, batch // size)
            value = os.urandom(size)
            keys = [f"{i:064x}" for i in range(n)]
            items = [(k, value) for k in keys]
            nkeys = [tier.rkey(k) for k in keys]
            tier.put_many(items)
            got = tier.get_many(keys)
            assert all(g is not None and bytes(g) == value for g in got), "tier round trip is not bit-exact"
            del got

            def naive_put(nkeys: list[str] = nkeys, value: bytes = value) -> None:
                for k in nkeys:
                    naive.set(k, value)

            def naive_get(nkeys: list[str] = nkeys) -> list[Any]:
                return [naive.get(k) for k in nkeys]  # keeps the values, as a caller must

            # Rounds interleave every contender, so a noisy neighbour slows them all alike; each
            # figure is the median over rounds.
            # End to end: TieredStore.get = tier read + header/checksum verification + decode to a tensor.
            tensors = [torch.frombuffer(bytearray(value), dtype=torch.uint8)[: size - 256].clone()]
            skeys = [f"{i + 10**6:064x}" for i in range(n)]
            raw_codec = get_codec("raw")
            for k in skeys:
                tier.put(k, raw_codec.encode(tensors[0]))
            store = TieredStore([(tier, raw_codec)])
            assert all(t is not None and torch.equal(t, tensors[0]) for t in store.get(skeys))

            m: dict[str, list[float]] = {k: [] for k in ("ret", "put", "get", "cpu", "put_piped", "pcpu", "pcpu_piped",
                                                          "nput", "nget", "rb_put", "rb_get")}
            for _ in range(repeat):
                c0 = time.process_time()
                m["put"].append(time_gbps(lambda items=items: tier.put_many(items), n * size, repeat=1, warmup=0))
                m["pcpu"].append((time.process_time() - c0) / (n * size / 1e9))
                c0 = time.process_time()
                m["put_piped"].append(time_gbps(lambda items=items: piped.put_many(items), n * size, repeat=1,
                                                warmup=0))
                m["pcpu_piped"].append((time.process_time() - c0) / (n * size / 1e9))
                c0 = time.process_time()
                m["get"].append(time_gbps(lambda keys=keys: tier.get_many(keys), n * size, repeat=1, warmup=0))
                m["cpu"].append((time.process_time() - c0) / (n * size / 1e9))
                m["nput"].append(time_gbps(naive_put, n * size, repeat=1, warmup=0))
                m["nget"].append(time_gbps(naive_get, n * size, repeat=1, warmup=0))
                # at least as many bytes as one tier batch, so its timer is not all start-up
                rb = redis_benchmark(host, port, size, requests=max(2 * n, 16), clients=args.connections)
                m["rb_put"].append(rb["put"])
                m["rb_get"].append(rb["get"])
                m["ret"].append(time_gbps(lambda st=store, sk=skeys: st.get(sk), n * size, repeat=1, warmup=0))
            tier.clear()
            naive.delete("key:__rand_int__")
            med = {k: statistics.median(v) for k, v in m.items()}
            rows.append({
                "_name": f"{size / MiB:g} MiB", "size_mib": size / MiB, "batch": n,
                "tier_put_gbps": med["put"], "tier_get_gbps": med["get"],
                "redis_benchmark_put_gbps": med["rb_put"], "redis_benchmark_get_gbps": med["rb_get"],
                "naive_put_gbps": med["nput"], "naive_get_gbps": med["nget"],
                "put_vs_redis_benchmark": med["put"] / med["rb_put"], "get_vs_redis_benchmark": med["get"] / med["rb_get"],
                "put_vs_naive": med["put"] / med["nput"], "get_vs_naive": med["get"] / med["nget"],
                "get_client_cpu_s_per_gb": med["cpu"], "retrieve_gbps": med["ret"],
                "tier_put_hiredis_packer_gbps": med["put_piped"], "put_client_cpu_s_per_gb": med["pcpu"],
                "put_hiredis_packer_client_cpu_s_per_gb": med["pcpu_piped"],
            })
            print(f"{size / MiB:g} MiB x {n}: tier put {med['put']:.2f} get {med['get']:.2f} GB/s "
                  f"(get client CPU {med['cpu']:.3f} s/GB) | redis-benchmark put {med['rb_put']:.2f} get {med['rb_get']:.2f} "
                  f"| naive put {med['nput']:.2f} get {med['nget']:.2f}", file=sys.stderr)
        tier.close()
        piped.close()
        naive.close()
    finally:
        if server is not None:
            server.cleanup()

    summary = {k: geomean([r[k] for r in rows]) for k in
               ("put_vs_redis_benchmark", "get_vs_redis_benchmark", "get_vs_naive", "put_vs_naive")}
    cols = ["batch", "tier_put_gbps", "tier_get_gbps", "redis_benchmark_put_gbps", "redis_benchmark_get_gbps",
            "naive_put_gbps", "naive_get_gbps", "put_vs_redis_benchmark", "get_vs_redis_benchmark", "get_vs_naive",
            "get_client_cpu_s_per_gb", "tier_put_hiredis_packer_gbps", "put_client_cpu_s_per_gb",
            "put_hiredis_packer_client_cpu_s_per_gb", "retrieve_gbps"]
    table = markdown_table(rows, cols, first="value size")
    print(table, file=sys.stderr)
    md = (
        "# Redis tier benchmark (`benchmarks/redis_tier.py`)\n\n"
        f"Values of {args.sizes} MiB on one local `redis-server` (no persistence), batches of "
        f"{batch // MiB} MiB, median of {repeat} interleaved rounds{' (--quick)' if args.quick else ''}, on "
        f"{os.cpu_count()} CPUs with a 1-minute load average of {load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs share the machine: absolute GB/s vary run to run, "
        "ratios less so). "
        "GB/s = 1e9 bytes/s. "
        f"Tier: `put_many`/`get_many` over {args.connections} connections. Baselines in the same run: "
        f"`redis-benchmark -t set,get -d <size> -c {args.connections} -P 1` (requests/s x size) and naive "
        "redis-py, one SET/GET call at a time. Ratios in the summary are geometric means over sizes. "
        "Reads are redis-py pipelines parsed by hiredis. `tier_put_hiredis_packer` is the tier with "
        "`packer='hiredis'` (redis-py's default command packing, which copies every value twice) instead of "
        "memoryview sends; the client CPU columns are this process's CPU seconds per GB moved. `retrieve` is "
        "`TieredStore.get` over the tier (read + header/checksum check + decode to a tensor, raw codec; "
        "redis-py's read-only `bytes` cost the decoder one copy). "
        f"glibc malloc: {'tuned for multi-MiB blobs (kvlayer.malloc, --malloc-tuning)' if args.malloc_tuning else 'defaults'}.\n\n"
        + table + "\n" + "\n".join(f"- {k}: {v:.3g}" for k, v in summary.items()) + "\n"
    )
    per_size = {r["_name"]: {k: v for k, v in r.items() if k != "_name"} for r in rows}
    data = {**summary, "sizes": per_size, "cpus": os.cpu_count(), "loadavg_1min": [load_start, os.getloadavg()[0]], "connections": args.connections, "batch_mib": batch // MiB,
            "repeat": repeat, "quick": args.quick, "malloc_tuning": args.malloc_tuning,
            "seconds": time.perf_counter() - t_start}
    write_results("redis_tier_malloc_tuned" if args.malloc_tuning else "redis_tier", data, md, args)
    emit_json(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
