"""Blobs are bound to their keys, through real shared tiers: a valid value moved or copied under
another key (a buggy client, a restore gone wrong, a hostile writer with access to Redis or to the
server's disk) is a miss and is deleted, never the other key's KV. Old (version 1) blobs, written
before the binding, are misses too.

Real parts: a redis-server (tests/fixtures/redis_server.py) and ``kvlayer serve`` subprocesses
(tests/fixtures/kvlayer_server.py); values are moved behind kvlayer's back with a plain Redis
client and by renaming the server's files.
"""

from __future__ import annotations

import os

import pytest
import torch

redis = pytest.importorskip("redis")
grpc = pytest.importorskip("grpc")

from kvlayer import KVCache, KVSpec  # noqa: E402
from kvlayer.codec import encode  # noqa: E402
from kvlayer.server.service import tenant_prefix  # noqa: E402
from tests.fixtures import redis_server as _fx  # noqa: E402
from tests.fixtures.kvlayer_server import kvlayer_server_factory_fixture, kvlayer_server_fixture  # noqa: E402,F401
from tests.fixtures.redis_server import skip_without_redis  # noqa: E402
from tests.unit.test_hierarchy import v1_blob  # noqa: E402

redis_server = _fx.redis_server

CS = 16
SPEC = KVSpec(model="key-binding", num_layers=2, num_kv_heads=2, head_dim=8)
A = list(range(100, 100 + 2 * CS))
B = list(range(900, 900 + 2 * CS))


def kv_for(n: int, seed: int) -> torch.Tensor:
    return torch.randn(SPEC.chunk_shape(n), generator=torch.Generator().manual_seed(seed)).half()


KV_A, KV_B = kv_for(2 * CS, 1), kv_for(2 * CS, 2)


def cache(**kw) -> KVCache:
    return KVCache(SPEC, **{"chunk_size": CS, "cpu_bytes": 0, "retry_after_s": 0.2, **kw})


def code_and_details(fn) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


# ---------------------------------------------------------------------------------- Redis
@skip_without_redis
@pytest.mark.parametrize("codec", ["raw", "int4+lz4"])
def test_values_swapped_in_redis_are_misses_and_deleted(redis_server, codec):
    cfg = {"redis_url": redis_server.url, "redis_codec": codec}
    with cache(**cfg) as w:
        assert w.store(A, KV_A) == 2 and w.store(B, KV_B) == 2
        ka, kb = w.keys(A), w.keys(B)
    raw = redis.Redis.from_url(redis_server.url)
    rk = [f"kvlayer:redis:{{{k}}}" for k in (ka[1], kb[1])]
    va, vb = raw.get(rk[0]), raw.get(rk[1])
    assert va and vb
    raw.set(rk[0], vb)  # the second chunks swap places
    raw.set(rk[1], va)
    with cache(**cfg, cpu_bytes=1 << 20) as r:  # a CPU tier above: nothing misplaced is promoted into it
        for toks, kv in ((A, KV_A), (B, KV_B)):
            n, got = r.retrieve(toks)
            assert n == CS  # the first chunk only, never the other prompt's second chunk
            if codec == "raw":
                assert torch.equal(got, kv[:, :, :CS])
            else:
                assert (got.float() - kv[:, :, :CS].float()).abs().max() < 1.0
        assert raw.exists(*rk) == 0  # both deleted from Redis
        s = r.stats()
        assert s["store"]["misplaced"] == 2 and s["store"]["corrupt"] == 0
        assert {t["name"]: t["misplaced"] for t in s["tiers"]} == {"cpu": 0, "redis": 2}
        assert r.lookup(A).hit_tokens == CS and r.locate([ka[1], kb[1]]) == [None, None]
        # an old-format value (written before the binding) is a miss as well
        good = raw.get(f"kvlayer:redis:{{{ka[0]}}}")
        r.evict(keys=[ka[0]])
        raw.set(f"kvlayer:redis:{{{ka[0]}}}", v1_blob(good))
        assert r.retrieve(A) == (0, None) and r.stats()["store"]["corrupt"] == 1


# ---------------------------------------------------------------------------------- kvlayer serve
def test_server_refuses_a_blob_put_under_another_key(kvlayer_server):
    with cache(server_url=kvlayer_server.url) as c:
        ka, kb = c.keys(A), c.keys(B)
    x = KV_A[:, :, :CS].contiguous()
    bound_a = bytes(encode(x, key=ka[0]))
    with kvlayer_server.client() as cl:
        code, details = code_and_details(lambda: cl.put([(kb[0], bound_a)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"under key {kb[0][:16]}... was encoded for another key" in details, details
        code, details = code_and_details(lambda: cl.put([(ka[0], v1_blob(bound_a))]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "version 1" in details, details
        assert cl.get([kb[0], ka[0]]) == [None, None]  # nothing of either was stored
        assert cl.put([(ka[0], bound_a)]) == [True]  # under its own key it is fine
        assert bytes(cl.get([ka[0]])[0]) == bound_a


def test_an_unbound_blob_on_the_server_is_a_miss_for_every_reader(kvlayer_server):
    """The server keeps what raw clients upload without a key (a blob store), but a reader that
    names the key refuses it: the remote tier's copy is deleted and counted as misplaced."""
    with cache(server_url=kvlayer_server.url, salt="unbound") as c:
        k = c.keys(A)
        with kvlayer_server.client() as cl:
            assert cl.put([(k[0], bytes(encode(KV_A[:, :, :CS].contiguous())))]) == [True]
            assert c.retrieve(A) == (0, None)
            assert cl.get([k[0]]) == [None]
        s = c.stats()
        assert s["store"]["misplaced"] == 1 and s["tiers"][0]["misplaced"] == 1


@pytest.mark.parametrize("cpu_bytes", ["64MiB", "0"], ids=["memory+disk", "disk-only"])
def test_blobs_moved_in_the_servers_disk_tier_are_misses(kvlayer_server_factory, cpu_bytes):
    srv = kvlayer_server_factory("--durable", cpu_bytes=cpu_bytes)
    with cache(server_url=srv.url) as w:
        assert w.store(A, KV_A) == 2 and w.store(B, KV_B) == 2
        assert w.flush(timeout=30)
        ka, kb = w.keys(A), w.keys(B)
    srv.stop()
    pre = tenant_prefix("default")
    fa, fb = (srv.disk_dir / (pre + k)[:2] / f"{pre + k}.kvb" for k in (ka[1], kb[1]))
    tmp = fa.with_suffix(".swap")
    os.replace(fa, tmp)
    os.replace(fb, fa)
    os.replace(tmp, fb)
    srv.start()
    with cache(server_url=srv.url) as r:
        for toks, kv in ((A, KV_A), (B, KV_B)):
            n, got = r.retrieve(toks)
            assert n == CS and torch.equal(got, kv[:, :, :CS])  # never the other prompt's chunk
        assert r.stats()["store"]["misplaced"] == 0  # the server caught them before they travelled
    with srv.client() as cl:
        assert cl.exists([ka[1], kb[1]]) == [False, False]  # deleted on the server
        assert cl.stats().counters["misplaced"] == 2
    assert not fa.exists() and not fb.exists()
