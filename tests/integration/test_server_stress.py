"""kvlayer serve under load (real subprocess): 16 client threads of mixed operations with
byte-exact checking and the server's RSS watched; kill -9 mid-load with durable puts."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import threading
import time

import pytest
import torch

grpc = pytest.importorskip("grpc")
psutil = pytest.importorskip("psutil")

from kvlayer import KVSpec  # noqa: E402
from kvlayer.codec import encode  # noqa: E402
from kvlayer.config import parse_size  # noqa: E402
from kvlayer.engine import KVCache  # noqa: E402
from kvlayer.rpc.client import KVLayerClient  # noqa: E402
from tests.fixtures.kvlayer_server import kvlayer_server_factory_fixture  # noqa: E402,F401

SIZES = (16, 32, 64, 128)  # tokens per chunk -> 16..128 KiB blobs


def key(i: int, tag: str) -> str:
    return hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()


def make_blob(i: int, tag: str) -> bytes:
    """The one value ever stored under key(i, tag): any other bytes read back are a mismatch."""
    g = torch.Generator().manual_seed(int(key(i, tag)[:8], 16))
    n = SIZES[i % len(SIZES)]
    return bytes(encode(torch.randn(4, 2, n, 4, 32, generator=g).half(), "raw"))


class RSSWatch(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.samples = 0
        self.stop_ev = threading.Event()

    def run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                self.samples += 1
            except psutil.Error:
                return
            time.sleep(0.02)


def test_16_threads_mixed_ops_exact_bytes_and_bounded_rss(kvlayer_server_factory) -> None:
    budget = "64MiB"
    srv = kvlayer_server_factory(cpu_bytes=budget)
    n_keys, n_threads, n_ops = 768, 16, 250  # ~62 MiB of distinct blobs: the CPU tier must evict
    tag = "stress"
    blobs = [make_blob(i, tag) for i in range(n_keys)]
    keys = [key(i, tag) for i in range(n_keys)]
    with srv.client() as c:  # warm the server's code paths before the baseline
        c.put([(keys[0], blobs[0])])
        c.get([keys[0]])
        c.evict(keys=[keys[0]])
    time.sleep(0.3)
    baseline = srv.rss()
    watch = RSSWatch(srv.pid)
    watch.start()
    mismatched = [0]
    counts = {"get_hits": 0, "get_misses": 0, "puts": 0, "errors": 0}
    lock = threading.Lock()
    errors: list[str] = []

    def worker(t: int) -> None:
        rnd = random.Random(t)
        hits = misses = puts = bad = 0
        with KVLayerClient(srv.url, timeout_s=30) as c:
            for _ in range(n_ops):
                op = rnd.random()
                idx = [rnd.randrange(n_keys) for _ in range(rnd.randint(1, 4))]
                try:
                    if op < 0.45:
                        got = c.get([keys[i] for i in idx])
                        for i, b in zip(idx, got, strict=True):
                            if b is None:
                                misses += 1
                            elif bytes(b) != blobs[i]:
                                exp = blobs[i]
                                bad += max(len(b), len(exp)) if len(b) != len(exp) else sum(
                                    x != y for x, y in zip(b, exp, strict=True))
                            else:
                                hits += 1
                    elif op < 0.80:
                        res = c.put([(keys[i], blobs[i]) for i in idx])
                        puts += sum(res)
                    elif op < 0.90:
                        c.exists([keys[i] for i in idx])
                    elif op < 0.96:
                        c.lookup(keys=[keys[i] for i in idx])
                    else:
                        c.evict(keys=[keys[i] for i in idx])
                except grpc.RpcError as e:
                    with lock:
                        counts["errors"] += 1
                        errors.append(f"{e.code().name}: {e.details()}")
        with lock:
            mismatched[0] += bad
            counts["get_hits"] += hits
            counts["get_misses"] += misses
            counts["puts"] += puts

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    watch.stop_ev.set()
    watch.join()
    with srv.client() as c:
        stats = c.stats()
    cpu = next(t for t in stats.tiers if t.name == "cpu")
    growth = watch.peak - baseline
    limit = parse_size(budget)
    print(f"baseline RSS {baseline >> 20} MiB, peak {watch.peak >> 20} MiB (+{growth >> 20} MiB, budget {limit >> 20} "
          f"MiB), {watch.samples} samples; {counts}; cpu tier used {cpu.used_bytes >> 20} MiB, "
          f"evictions {cpu.evictions}")
    assert not errors, errors[:5]
    assert mismatched[0] == 0
    assert counts["get_hits"] > 100 and counts["puts"] > 500
    assert cpu.evictions > 0 and cpu.used_bytes <= cpu.capacity_bytes
    assert watch.samples > 10
    assert growth <= 1.1 * limit, f"server RSS grew {growth >> 20} MiB over a {limit >> 20} MiB budget"


def test_kill_9_mid_load_then_restart_keeps_durable_puts(kvlayer_server_factory) -> None:
    srv = kvlayer_server_factory(cpu_bytes="64MiB")
    tag = "kill"
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    failures = [0]

    def writer(t: int) -> None:
        with KVLayerClient(srv.url, timeout_s=2) as c:
            i = t * 100_000
            while not stop.is_set():
                items = [(key(i + j, tag), make_blob(i + j, tag)) for j in range(2)]
                i += 2
                try:
                    ok = c.put(items, durable=True)
                except grpc.RpcError:
                    with lock:
                        failures[0] += 1
                    time.sleep(0.05)
                    continue
                with lock:
                    acked.update({k: b for (k, b), s in zip(items, ok, strict=True) if s})

    spec = KVSpec(model="kill-test", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
    cache = KVCache(spec, chunk_size=32, cpu_bytes=0, server_url=srv.url, retry_after_s=0.2)
    tokens = list(range(96))
    kv = torch.randn(2, 2, 96, 2, 8).half()
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    try:
        for th in threads:
            th.start()
        deadline = time.monotonic() + 120
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(acked) >= 60, "writers made no progress"
        # a hung server (SIGSTOP) costs a deadline, then misses: never an exception or a hang
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            assert cache.retrieve(tokens) == (0, None)
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        srv.kill()  # SIGKILL while the writers are mid-stream
        time.sleep(0.5)
        # an engine using the remote tier sees misses, not exceptions
        assert cache.lookup(tokens).hit_tokens == 0
        assert cache.retrieve(tokens) == (0, None)
        cache.store(tokens, kv)
        assert failures[0] > 0
        stop.set()
        for th in threads:
            th.join(30)
        with lock:
            snapshot = dict(acked)
        srv.start()  # same port, same disk directory
        with srv.client() as c:
            ks = list(snapshot)
            got: list[memoryview | None] = []
            for s in range(0, len(ks), 32):
                got += c.get(ks[s:s + 32])
        missing = [k for k, b in zip(ks, got, strict=True) if b is None]
        wrong = [k for k, b in zip(ks, got, strict=True) if b is not None and bytes(b) != snapshot[k]]
        assert not missing, f"{len(missing)} of {len(ks)} acknowledged durable chunks lost"
        assert not wrong
        # the same KVCache reconnects to the restarted server once its backoff passes
        deadline = time.monotonic() + 30
        n = 0
        while time.monotonic() < deadline:
            cache.store(tokens, kv)
            n, got_kv = cache.retrieve(tokens)
            if n == 96:
                assert torch.equal(got_kv, kv)
                break
            time.sleep(0.3)
        assert n == 96
    finally:
        stop.set()
        for th in threads:
            th.join(30)
        cache.close()
