"""The Redis tier against real redis-server processes (standalone and a 3-master Cluster).

Faults are real too: the server is killed with SIGKILL, frozen with SIGSTOP, absent at start-up,
and values are overwritten behind the tier's back with a plain client.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest
import torch

redis = pytest.importorskip("redis")

from kvlayer import KVCache  # noqa: E402
from kvlayer.codec.buffers import MIN_POOLED  # noqa: E402
from kvlayer.config import KVLayerConfig, TierConfig  # noqa: E402
from kvlayer.errors import ConfigError, TierError  # noqa: E402
from kvlayer.storage import build_tier  # noqa: E402
from kvlayer.storage.redis import _READER_KEEP, MANIFEST_LEN, RedisTier  # noqa: E402
from tests.fixtures import redis_server as _fx  # noqa: E402
from tests.fixtures.redis_server import RedisServer, free_port, skip_without_redis  # noqa: E402

# pytest finds fixtures by module attribute; assigning (not importing) keeps ruff's F811 quiet.
redis_server = _fx.redis_server
redis_cluster = _fx.redis_cluster

pytestmark = [skip_without_redis, pytest.mark.timeout(120)]


def hexkey(i: int) -> str:
    return f"{i:064x}"


def blobs(sizes: list[int], seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


def net_out(client: Any) -> int:
    return int(client.info("stats")["total_net_output_bytes"])


@pytest.fixture
def raw(redis_server: RedisServer):
    c = redis.Redis.from_url(redis_server.url)
    yield c
    c.close()


# ---------------------------------------------------------------------- round trips
def test_round_trip_standalone_bit_exact(redis_server, raw):
    tier = RedisTier(redis_server.url, connections=3)
    try:
        sizes = [0, 1, 100, 6000, 70_000, 1 << 20, 3 << 20] + [200_000] * 9
        vals = blobs(sizes)
        keys = [hexkey(i) for i in range(len(vals))]
        # bytes, bytearray and a numpy-backed memoryview all go in; the batch is big enough to
        # be split across the 3 connections, so ordering bugs would show as wrong values
        items = [(k, v if i % 3 == 0 else bytearray(v) if i % 3 == 1 else memoryview(np.frombuffer(v, np.uint8)))
                 for i, (k, v) in enumerate(zip(keys, vals, strict=True))]
        assert tier.put_many(items) == [True] * len(items)
        got = tier.get_many(keys[::-1] + [hexkey(999)])
        assert got[-1] is None
        # small values are redis-py's reply objects as they are; from 64 KiB on, writable views of
        # recycled pooled buffers (the reply's bytes object is dropped right after its copy)
        for v, g in zip(vals[::-1], got[:-1], strict=True):
            big = len(v) >= MIN_POOLED
            assert type(g) is (memoryview if big else bytes), (len(v), type(g))
            assert not big or not memoryview(g).readonly
        for k, v, g in zip(keys[::-1], vals[::-1], got[:-1], strict=True):
            assert g is not None and bytes(g) == v, k
        assert tier.get(keys[5]) == vals[5]
        assert sorted(tier.keys()) == sorted(keys)
        assert raw.dbsize() == len(keys)
        assert raw.get(tier.rkey(keys[4])) == vals[4]  # stored as is, under the prefix
        assert tier.rkey(keys[0]).startswith("kvlayer:redis:{")
        assert tier.used_bytes() > sum(sizes)
        s = tier.stats()
        assert s.num_keys == len(keys) and s.hits == len(keys) + 1 and s.misses == 1 and s.puts == len(keys)
        assert tier.delete(keys[0]) and not tier.delete(keys[0])
        assert tier.delete_many(keys[1:]) == len(keys) - 1
        assert raw.dbsize() == 0
    finally:
        tier.close()


def test_round_trip_cluster_bit_exact(redis_cluster):
    tier = RedisTier(redis_cluster.url, max_value_bytes=64 << 10)
    try:
        assert tier.cluster
        sizes = [10, 5000, 64 << 10, (64 << 10) + 1, 300_000] * 6
        vals = blobs(sizes, seed=1)
        keys = [hexkey(i) for i in range(len(vals))]
        assert all(tier.put_many(list(zip(keys, vals, strict=True))))
        got = tier.get_many(keys)
        assert [bytes(g) if g is not None else None for g in got] == vals
        assert tier.exists_many(keys + [hexkey(777)]) == [True] * len(keys) + [False]
        assert sorted(tier.keys()) == sorted(keys)
        per_node = [redis.Redis(port=p).dbsize() for p in redis_cluster.ports]
        assert sum(n > 0 for n in per_node) >= 2, per_node  # keys really spread over masters
        assert tier.used_bytes() > 0
        assert tier.delete_many(keys) == len(keys)
        assert sum(redis.Redis(port=p).dbsize() for p in redis_cluster.ports) == 0  # parts went too
        assert all(tier.put_many(list(zip(keys, vals, strict=True))))
        tier.clear()  # SCAN + UNLINK on every primary
        assert sum(redis.Redis(port=p).dbsize() for p in redis_cluster.ports) == 0
    finally:
        tier.close()


def test_cluster_reads_follow_moved(redis_cluster, monkeypatch):
    """Reads are pipelined per node, to the node redis-py's slot map names; a stale map gets a real
    MOVED reply, and those keys are fetched again through redis-py's Cluster pipeline, which
    follows the redirect."""
    tier = RedisTier(redis_cluster.url)
    try:
        vals = blobs([1000] * 12, seed=3)
        keys = [hexkey(i) for i in range(12)]
        assert all(tier.put_many(list(zip(keys, vals, strict=True))))
        calls = {"pipelined": 0}
        real_read_job = tier._read_job

        def counting(target, cmd, rkeys, then=None):
            calls["pipelined"] += target is tier.client  # the whole-Cluster pipeline
            return real_read_job(target, cmd, rkeys, then)

        monkeypatch.setattr(tier, "_read_job", counting)
        assert [bytes(v) for v in tier.get_many(keys)] == vals  # type: ignore[arg-type]
        assert calls["pipelined"] == 0  # served node by node

        client = tier.client
        nodes = client.get_primaries()
        wrong = {rk: next(n for n in nodes if n.name != client.get_node_from_key(rk).name)
                 for rk in map(tier.rkey, keys)}
        monkeypatch.setattr(client, "get_node_from_key", lambda rk, replica=False: wrong[rk])
        assert [bytes(v) for v in tier.get_many(keys)] == vals  # type: ignore[arg-type]
        assert calls["pipelined"] == 1
        # writes sent to the wrong node get MOVED too, and are redone through redis-py
        new = blobs([1500] * 12, seed=8)
        assert tier.put_many(list(zip(keys, new, strict=True))) == [True] * 12
        monkeypatch.undo()
        assert [bytes(v) for v in tier.get_many(keys)] == new  # type: ignore[arg-type]
        assert tier.stats().dropped_writes == 0
    finally:
        tier.close()


def test_cluster_node_killed_other_nodes_still_serve():
    """One master of three dies: its keys are misses, the rest are hits, nothing raises."""
    cl = _fx.RedisCluster(3, node_timeout_ms=60_000)  # the survivors keep serving meanwhile
    with cl:
        tier = RedisTier(cl.url, connect_timeout=0.3, socket_timeout=0.5)
        try:
            vals = blobs([2000] * 30, seed=5)
            keys = [hexkey(i) for i in range(30)]
            assert all(tier.put_many(list(zip(keys, vals, strict=True))))
            dead = cl.nodes[1]
            alive = [tier.client.get_node_from_key(tier.rkey(k)).port != dead.port for k in keys]
            assert 0 < sum(alive) < 30
            dead.kill()
            got = tier.get_many(keys)
            assert [g is not None for g in got] == alive
            assert all(bytes(g) == v for g, v in zip(got, vals, strict=True) if g is not None)
            assert tier.exists_many(keys) == alive
            # writes too: the live nodes take theirs, the dead node's are dropped and counted
            new = blobs([3000] * 30, seed=6)
            assert tier.put_many(list(zip(keys, new, strict=True))) == alive
            got = tier.get_many(keys)
            assert all(bytes(g) == v for g, v in zip(got, new, strict=True) if g is not None)
            assert tier.stats().errors >= 3 and tier.healthy()
        finally:
            tier.close()


def test_cluster_through_kvcache(redis_cluster, spec):
    cfg = KVLayerConfig(chunk_size=16, tiers=[TierConfig(kind="redis", url=redis_cluster.plain_url,
                                                         options={"cluster": True}, codec="lz4")])
    tokens = list(range(100))
    kv = torch.randn(2, 2, 100, 2, 8).to(torch.float16)
    with KVCache(spec, cfg) as cache:
        assert cache.store(tokens, kv) == 7
        assert cache.lookup(tokens).hit_tokens == 100
        n, got = cache.retrieve(tokens)
        assert n == 100 and torch.equal(got, kv)


def test_replies_parsed_by_hiredis(redis_server):
    """redis[hiredis] is a dependency: replies must go through its C parser, not redis-py's Python one."""
    from redis._parsers import _HiredisParser
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE
    tier = RedisTier(redis_server.url)
    try:
        assert tier.put(hexkey(1), b"v" * 100) and tier.get(hexkey(1)) == b"v" * 100
        pool = tier.client.connection_pool
        conn = pool.get_connection()
        try:
            assert isinstance(conn._parser, _HiredisParser)
            # the reply buffer survives between multi-MiB replies (not regrown in fresh pages each time)
            assert conn._parser._reader.getmaxbuf() == _READER_KEEP
        finally:
            pool.release(conn)
    finally:
        tier.close()


def test_wrong_type_and_hiredis_packer(redis_server, raw):
    """A key of another type (an error reply) is a miss; a tier with redis-py's own command packer
    reads and writes the same values bit for bit."""
    tier = RedisTier(redis_server.url)
    piped = RedisTier(redis_server.url, packer="hiredis", max_value_bytes=100_000)
    try:
        vals = blobs([10, 300_000, 2 << 20], seed=4)
        keys = [hexkey(i) for i in range(3)]
        assert all(tier.put_many(list(zip(keys, vals, strict=True))))
        raw.rpush(tier.rkey(hexkey(9)), b"not a string")
        assert tier.get_many([hexkey(9)] + keys)[0] is None
        assert [bytes(v) for v in tier.get_many(keys)] == vals  # type: ignore[arg-type]
        assert [bytes(v) for v in piped.get_many(keys)] == vals  # type: ignore[arg-type]
        assert piped.get(hexkey(9)) is None
        assert all(piped.put_many(list(zip(keys, vals[::-1], strict=True))))  # split on this one
        assert [bytes(v) for v in tier.get_many(keys)] == vals[::-1]  # type: ignore[arg-type]
    finally:
        tier.close()
        piped.close()


def test_tiered_store_writes_through_in_batches(redis_server, raw, monkeypatch):
    """A memory tier over Redis: the background writer hands Redis whole batches (pipelined
    ``put_many``), encoded with Redis's own codec, and ``delete`` is one ``delete_many`` a tier."""
    import threading

    from kvlayer.codec import decode, get_codec
    from kvlayer.storage.hierarchy import TieredStore
    from kvlayer.storage.memory import MemoryTier

    tier = RedisTier(redis_server.url)
    calls: dict[str, list[int]] = {"put_many": [], "delete_many": []}
    queued = threading.Event()
    real_put, real_delete = tier.put_many, tier.delete_many

    def put_many(items):
        queued.wait(30)  # hold the writer until every chunk is queued: the rest is one batch
        calls["put_many"].append(len(items))
        return real_put(items)

    def delete_many(keys):
        keys = list(keys)
        calls["delete_many"].append(len(keys))
        return real_delete(keys)

    monkeypatch.setattr(tier, "put_many", put_many)
    monkeypatch.setattr(tier, "delete_many", delete_many)
    store = TieredStore([(MemoryTier("cpu", 64 << 20), get_codec("raw")), (tier, get_codec("lz4"))])
    try:
        keys = [hexkey(i) for i in range(40)]
        tensors = [torch.full((64, 32), float(i), dtype=torch.float16) for i in range(40)]
        assert store.put(keys, tensors) == 40
        queued.set()
        assert store.flush(timeout=30)
        assert sum(calls["put_many"]) == 40 and len(calls["put_many"]) <= 2, calls
        assert raw.dbsize() == 40
        got = tier.get_many(keys)
        for g, t in zip(got, tensors, strict=True):
            assert g is not None and bytes(g[:4]) == b"KVLB" and torch.equal(decode(g), t)
        assert store.stats()["store"]["dropped_writes"] == 0
        store.pins.pin(keys[:1])
        assert store.delete(keys) == 39  # the pinned one stays
        assert calls["delete_many"] == [39]
        assert raw.dbsize() == 1 and store.get(keys[:1])[0] is not None
    finally:
        store.close()


# ---------------------------------------------------------------------- lookup
def test_exists_moves_no_values(redis_server, raw, spec):
    tier = RedisTier(redis_server.url)
    try:
        keys = [hexkey(i) for i in range(8)]
        tier.put_many([(k, b"x" * (1 << 20)) for k in keys])
        before = net_out(raw)
        assert tier.exists_many(keys + [hexkey(99)]) == [True] * 8 + [False]
        assert tier.contains(keys[0])
        moved = net_out(raw) - before
        assert moved < 16384, moved  # 8 MiB stored; only ":1" replies (and one INFO reply) were sent
    finally:
        tier.close()
    # the same through KVCache.lookup
    cfg = KVLayerConfig(chunk_size=16, tiers=[TierConfig(kind="redis", url=redis_server.url, codec="raw")])
    tokens = list(range(64))
    with KVCache(spec, cfg) as cache:
        cache.store(tokens, torch.randn(2, 2, 64, 2, 8).to(torch.float16))
        before = net_out(raw)
        assert cache.lookup(tokens).hit_tokens == 64
        assert net_out(raw) - before < 16384


# ---------------------------------------------------------------------- split values
def test_large_values_split_and_reassembled(redis_server, raw):
    tier = RedisTier(redis_server.url, max_value_bytes=4096)
    try:
        big, exact, small = blobs([10_000, 8192, 100], seed=2)
        assert tier.put_many([(hexkey(1), big), (hexkey(2), exact), (hexkey(3), small)]) == [True] * 3
        # 3 + 2 parts and 3 main keys; only main keys are listed
        assert raw.dbsize() == 3 + 2 + 3
        assert len(raw.get(tier.rkey(hexkey(1)))) == MANIFEST_LEN
        assert sorted(tier.keys()) == [hexkey(1), hexkey(2), hexkey(3)]
        g = tier.get_many([hexkey(1), hexkey(2), hexkey(3)])
        assert [bytes(x) for x in g] == [big, exact, small]  # type: ignore[arg-type]
        assert isinstance(g[0], memoryview) and not g[0].readonly  # parts joined into one writable pooled buffer
        assert tier.exists_many([hexkey(1)]) == [True]

        # overwrite a split value with a small one: the old parts are removed
        assert tier.put(hexkey(2), b"tiny")
        assert tier.get(hexkey(2)) == b"tiny"
        assert raw.dbsize() == 3 + 3
        # ... and a small one with a split one, then delete: nothing is left behind
        assert tier.put(hexkey(3), big) and bytes(tier.get(hexkey(3))) == big  # type: ignore[arg-type]
        assert tier.delete(hexkey(3)) and tier.get(hexkey(3)) is None
        assert raw.dbsize() == 4 + 1  # hexkey(1): manifest + 3 parts; hexkey(2): one value

        # a missing part is a miss, never a partial blob, and the rest of the value is removed
        part = next(k for k in raw.scan_iter(match=tier.rkey(hexkey(1)) + ":*"))
        raw.delete(part)
        assert tier.get(hexkey(1)) is None
        assert tier.stats().corrupt == 1
        assert raw.exists(tier.rkey(hexkey(1))) == 0
        assert list(raw.scan_iter(match=tier.rkey(hexkey(1)) + "*")) == []
        # a short part is a miss too
        assert tier.put(hexkey(4), big)
        part = next(k for k in raw.scan_iter(match=tier.rkey(hexkey(4)) + ":*"))
        raw.set(part, raw.get(part)[:-1])
        assert tier.get(hexkey(4)) is None
    finally:
        tier.close()


def test_concurrent_callers_many_parts(redis_server):
    """Several threads share one tier (the engine thread and the store's writer do); values of
    many parts are read in parallel over several connections: every byte must land where it belongs."""
    import threading

    tier = RedisTier(redis_server.url, max_value_bytes=1024, connections=4)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            vals = blobs([1024 * 37 + t, 10, 5000, 1024], seed=100 + t)
            keys = [hexkey(1000 * t + i) for i in range(len(vals))]
            for _ in range(5):
                assert all(tier.put_many(list(zip(keys, vals, strict=True))))
                got = tier.get_many(keys[::-1])
                assert [bytes(g) for g in got[::-1]] == vals  # type: ignore[arg-type]
        except BaseException as e:  # reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert not errors, errors[0]
        assert len(tier.keys()) == 16
    finally:
        tier.close()


def test_unreachable_part_is_a_miss_not_a_deletion(redis_server, raw, monkeypatch):
    """A connection failing while parts are read (fault injected into one of the parallel
    connections) is a miss for that value only; unlike a missing part it deletes nothing."""
    tier = RedisTier(redis_server.url, max_value_bytes=1024, connections=2)
    try:
        big, other = blobs([5000, 500], seed=11)
        assert all(tier.put_many([(hexkey(1), big), (hexkey(2), other)]))
        before = raw.dbsize()
        real = tier._read_job

        def flaky(target, cmd, rkeys, then=None):
            # the job holding part 0 of hexkey(1) fails; the other job (parts 1, 3) answers
            if any(rk.startswith(tier.rkey(hexkey(1)) + ":") and rk.endswith(":0") for rk in rkeys):
                raise redis.ConnectionError("injected: connection reset")
            return real(target, cmd, rkeys, then)

        monkeypatch.setattr(tier, "_read_job", flaky)
        got = tier.get_many([hexkey(1), hexkey(2)])
        assert got[0] is None and got[1] is not None and bytes(got[1]) == other
        assert tier.stats().corrupt == 0 and tier.stats().errors >= 1
        monkeypatch.undo()
        assert raw.dbsize() == before  # nothing was deleted
        assert bytes(tier.get(hexkey(1))) == big  # type: ignore[arg-type]
    finally:
        tier.close()


# ---------------------------------------------------------------------- TTL
def test_ttl_honoured(redis_server, raw):
    tier = build_tier(TierConfig(kind="redis", url=redis_server.url,
                                 options={"ttl_s": 1.0, "max_value_bytes": "2KiB", "prefix": "t:"}))
    try:
        t0 = time.monotonic()
        assert tier.put_many([(hexkey(1), b"a" * 100), (hexkey(2), b"b" * 5000)]) == [True, True]
        main = "t:{" + hexkey(2) + "}"
        main_ttl = raw.pttl(main)
        parts = list(raw.scan_iter(match=main + ":*"))
        assert main_ttl <= 1000 and main_ttl != -1  # an expiry is set (-2: already expired, on a slow box)
        assert len(parts) == 3 and all(raw.pttl(p) > max(main_ttl, 0) for p in parts)  # parts outlive it
        if time.monotonic() - t0 < 0.5:  # (only meaningful while surely before the expiry)
            assert tier.get(hexkey(1)) == b"a" * 100
        deadline = time.monotonic() + 15
        while tier.get_many([hexkey(1), hexkey(2)]) != [None, None] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tier.get_many([hexkey(1), hexkey(2)]) == [None, None]
    finally:
        tier.close()


# ---------------------------------------------------------------------- faults
def _cache(url: str, spec, **kw) -> KVCache:
    cfg = KVLayerConfig(chunk_size=16, retry_after_s=0.05,
                        tiers=[TierConfig(kind="redis", url=url, codec="raw",
                                          options={"connect_timeout": 0.3, "socket_timeout": 0.5, **kw})])
    return KVCache(spec, cfg)


def _prompt(i: int) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return [i * 1000 + t for t in range(48)], torch.randn(2, 2, 48, 2, 8, generator=g).to(torch.float16)


def _wait_recovered(cache: KVCache, start: int, deadline_s: float = 15.0) -> int:
    """Store/retrieve until a round trip succeeds again; returns the prompt index used."""
    deadline = time.monotonic() + deadline_s
    i = start
    while time.monotonic() < deadline:
        tokens, kv = _prompt(i)
        cache.store(tokens, kv)
        n, got = cache.retrieve(tokens)
        if n == 48:
            assert got is not None and torch.equal(got, kv)
            return i
        i += 1
        time.sleep(0.05)
    raise AssertionError("redis tier did not recover")


def test_kill_during_run_then_restart_same_port(redis_server, spec):
    cache = _cache(redis_server.url, spec)
    try:
        hits_before = 0
        for i in range(30):
            if i == 12:
                redis_server.kill()  # SIGKILL mid-run
            tokens, kv = _prompt(i)
            cache.store(tokens, kv)  # must not raise
            n, got = cache.retrieve(tokens)  # must not raise
            if i < 12:
                assert n == 48 and torch.equal(got, kv)
                hits_before += 1
            else:
                assert n == 0 and got is None
            assert cache.lookup(tokens).hit_tokens == (48 if i < 12 else 0)
            time.sleep(0.01)
        st = cache.stats()
        assert st["store"]["misses"] > 0 and st["store"]["tier_errors"] > 0
        assert cache._store.levels[0].tier.stats().errors > 0
        assert hits_before == 12

        redis_server.start()  # same port, empty (no persistence): same process, same KVCache
        i = _wait_recovered(cache, 100)
        tokens, kv = _prompt(i + 1)
        cache.store(tokens, kv)
        n, got = cache.retrieve(tokens)
        assert n == 48 and torch.equal(got, kv)
        assert cache._store.levels[0].tier.healthy()
    finally:
        cache.close()


def test_absent_at_startup_then_appears(spec):
    port = free_port()
    srv = RedisServer(port)
    cache = _cache(srv.url, spec)  # nothing listens yet: building must not fail
    try:
        tokens, kv = _prompt(1)
        assert cache.store(tokens, kv) == 3
        assert cache.retrieve(tokens) == (0, None)
        assert cache.stats()["store"]["tier_errors"] > 0
        srv.start()
        _wait_recovered(cache, 10)
    finally:
        cache.close()
        srv.cleanup()


def test_frozen_server_times_out_then_recovers(redis_server):
    """SIGSTOP = a server that accepts nothing and answers nothing: short timeouts, then back."""
    tier = RedisTier(redis_server.url, socket_timeout=0.3, connect_timeout=0.3, retries=0)
    try:
        assert tier.put(hexkey(1), b"v" * 1000)
        os.kill(redis_server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TierError):
                tier.get(hexkey(1))
            assert not tier.healthy()
            with pytest.raises(TierError):
                tier.put(hexkey(2), b"w")  # the tier has no breaker of its own: each call times out
        finally:
            os.kill(redis_server.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if tier.get(hexkey(1)) == b"v" * 1000:
                    break
            except TierError:
                time.sleep(0.05)
        assert tier.get(hexkey(1)) == b"v" * 1000
        assert tier.healthy()
    finally:
        tier.close()


def test_full_server_drops_writes_cleanly():
    """maxmemory + noeviction: SETs fail with OOM. The write is dropped and counted, nothing is
    left half-written (no orphan parts), earlier values stay readable."""
    srv = RedisServer(extra_args=("--maxmemory", "3mb", "--maxmemory-policy", "noeviction"))
    with srv:
        tier = RedisTier(srv.url, max_value_bytes=256 << 10)
        raw_c = redis.Redis(port=srv.port)
        try:
            small = blobs([1000], seed=7)[0]
            assert tier.put(hexkey(1), small)
            oks = [tier.put(hexkey(10 + i), b"\x01" * (1 << 20)) for i in range(6)]
            assert not all(oks)  # the server filled up; no exception
            assert tier.stats().dropped_writes >= 1
            assert tier.get(hexkey(1)) == small
            failed = [hexkey(10 + i) for i, ok in enumerate(oks) if not ok]
            assert tier.get_many(failed) == [None] * len(failed)
            for k in failed:  # no parts of a failed split write stay behind
                assert list(raw_c.scan_iter(match=tier.rkey(k) + "*")) == []
        finally:
            tier.close()
            raw_c.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "split_part_garbage"])
def test_garbage_or_truncated_values_are_misses_and_deleted(redis_server, raw, spec, damage):
    opts = {"max_value_bytes": 1024} if damage == "split_part_garbage" else {}
    cache = _cache(redis_server.url, spec, **opts)
    try:
        tokens, kv = _prompt(5)
        assert cache.store(tokens, kv) == 3
        keys = cache.keys(tokens)
        tier = cache._store.levels[0].tier
        assert isinstance(tier, RedisTier)
        victim = tier.rkey(keys[1])
        if damage == "garbage":
            raw.set(victim, os.urandom(len(raw.get(victim))))
        elif damage == "truncated":
            raw.set(victim, raw.get(victim)[:-7])
        else:
            # same length, other bytes: only the blob's checksum (the caller's decode) can tell
            part = sorted(raw.scan_iter(match=victim + ":*"))[-1]
            raw.set(part, os.urandom(len(raw.get(part))))
        n, got = cache.retrieve(tokens)
        assert n == 16 and torch.equal(got, kv[:, :, :16])  # prefix up to the damaged chunk
        st = cache.stats()
        assert st["store"]["corrupt"] == 1 and st["tiers"][0]["corrupt"] == 1
        assert raw.exists(victim) == 0
        assert list(raw.scan_iter(match=victim + "*")) == []  # parts too
        assert cache.lookup(tokens).hit_tokens == 16
        # storing again heals it
        assert cache.store(tokens, kv) == 1
        n, got = cache.retrieve(tokens)
        assert n == 48 and torch.equal(got, kv)
    finally:
        cache.close()


# ---------------------------------------------------------------------- config
def test_config_url_options_and_errors(spec):
    pw = RedisServer(password="s3cret")
    with pw:
        tier = build_tier(TierConfig(kind="redis", name="shared", url=pw.url))
        try:
            assert isinstance(tier, RedisTier) and tier.prefix == "kvlayer:shared:" and not tier.cluster
            assert tier.put(hexkey(1), b"ok") and tier.get(hexkey(1)) == b"ok"
            assert "s3cret" not in repr(tier)
        finally:
            tier.close()
        opt = build_tier(TierConfig(kind="redis", url=f"redis://127.0.0.1:{pw.port}/0",
                                    options={"password": "s3cret", "connections": 2}))
        bad = build_tier(TierConfig(kind="redis", url=f"redis://:wrong@127.0.0.1:{pw.port}/0"))
        try:
            assert opt.get(hexkey(1)) is None  # other prefix ("kvlayer:redis:")
            with pytest.raises(TierError):
                bad.get(hexkey(1))
        finally:
            opt.close()
            bad.close()
        # the flat config field builds a redis tier too (KVLAYER_REDIS_URL / --redis-url)
        cfg = KVLayerConfig(chunk_size=16, cpu_bytes=0, redis_url=pw.url)
        with KVCache(spec, cfg) as cache:
            tokens, kv = _prompt(3)
            cache.store(tokens, kv)
            n, got = cache.retrieve(tokens)
            assert n == 48 and torch.equal(got, kv)
            assert cache.stats()["tiers"][0]["kind"] == "redis"
    # a Cluster that is down at start-up: building works, operations fail as TierError (= misses)
    down = build_tier(TierConfig(kind="redis", url=f"redis+cluster://127.0.0.1:{free_port()}/0",
                                 options={"connect_timeout": 0.2}))
    try:
        assert isinstance(down, RedisTier) and down.cluster
        with pytest.raises(TierError):
            down.get(hexkey(1))
        assert not down.ping() and down.used_bytes() == 0
    finally:
        down.close()
    for options, match in [({"bogus": 1}, "unknown option"), ({"prefix": "a{b"}, "must not contain"),
                           ({"packer": "x"}, "packer"), ({"max_value_bytes": 10}, "max_value_bytes")]:
        with pytest.raises(ConfigError, match=match):
            build_tier(TierConfig(kind="redis", url="redis://127.0.0.1:1/0", options=options))
    with pytest.raises(ConfigError, match="scheme"):
        build_tier(TierConfig(kind="redis", url="http://127.0.0.1:1/0"))
    with pytest.raises(ConfigError, match="unix socket"):
        build_tier(TierConfig(kind="redis", url="unix:///tmp/x.sock", options={"cluster": True}))


@pytest.mark.skipif(__import__("shutil").which("openssl") is None, reason="needs openssl")
def test_tls_rediss_round_trip(tmp_path):
    """rediss:// with a CA file (ssl_* options): pipelined reads and memoryview sends over TLS."""
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    tls_port = free_port()
    srv = RedisServer(extra_args=("--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                                  "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"))
    with srv:
        tier = build_tier(TierConfig(kind="redis", url=f"rediss://127.0.0.1:{tls_port}/0",
                                     options={"ssl_ca_certs": str(cert), "max_value_bytes": 1 << 20}))
        untrusted = RedisTier(f"rediss://127.0.0.1:{tls_port}/0", connect_timeout=1.0)
        try:
            vals = blobs([100, 3 << 20, 500_000], seed=9)
            keys = [hexkey(i) for i in range(3)]
            assert all(tier.put_many(list(zip(keys, vals, strict=True))))
            assert [bytes(v) for v in tier.get_many(keys)] == vals  # type: ignore[arg-type]
            assert tier.exists_many(keys) == [True] * 3
            assert redis.Redis(port=srv.port).dbsize() == 3 + 3  # plain port, same data: 3 parts
            with pytest.raises(TierError):  # server certificate not trusted
                untrusted.get(keys[0])
        finally:
            tier.close()
            untrusted.close()


def test_unix_socket_and_clear_keeps_foreign_keys(tmp_path):
    sock = tmp_path / "r.sock"
    srv = RedisServer(extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700"))
    with srv:
        tier = RedisTier(f"unix://{sock}?db=0", prefix="p:", max_value_bytes=1024)
        other = redis.Redis(port=srv.port)
        try:
            other.set("foreign", b"keep")
            tier.put_many([(hexkey(i), b"z" * 3000) for i in range(5)])
            assert tier.get(hexkey(3)) == b"z" * 3000
            tier.clear()
            assert tier.keys() == [] and other.dbsize() == 1 and other.get("foreign") == b"keep"
        finally:
            tier.close()
            other.close()
