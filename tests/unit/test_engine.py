"""KVCache: the public API end to end on real memory and disk tiers."""

from __future__ import annotations

import ctypes
import gc
import shutil
import time

import numpy as np
import psutil
import pytest
import torch

from kvlayer import KVCache, KVSpec
from kvlayer.config import KVLayerConfig
from kvlayer.errors import SpecMismatchError
from kvlayer.storage.disk import DiskTier
from kvlayer.storage.memory import MemoryTier

CS = 16  # chunk size (tokens)
MiB = 1 << 20


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def kv_for(spec: KVSpec, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(spec.chunk_shape(n), generator=g).to(spec.torch_dtype)


def chunk_bytes(spec: KVSpec, n: int = CS) -> int:
    return spec.bytes_per_token() * n


@pytest.fixture
def make_cache(tmp_path):
    caches: list[KVCache] = []

    def make(spec: KVSpec, **kw) -> KVCache:
        kw.setdefault("chunk_size", CS)
        kw.setdefault("cpu_bytes", 1 * MiB)
        kw.setdefault("env", {})
        env = kw.pop("env")
        from kvlayer.config import load_config

        c = KVCache(spec, load_config(env=env, **kw))
        caches.append(c)
        return c

    yield make
    for c in caches:
        c.close()


def _trimmed_rss() -> int:
    """Resident bytes after handing memory freed by earlier tests back to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return psutil.Process().memory_info().rss


def tier(cache: KVCache, name: str):
    return next(lv.tier for lv in cache._store.levels if lv.name == name)


# ---------------------------------------------------------------------------------- prefix API
def test_store_lookup_retrieve_bit_exact_with_partial_last_chunk(spec, make_cache, tmp_path):
    c = make_cache(spec, disk_path=str(tmp_path / "d"))
    t = toks(40)  # 2 full chunks + 8 tokens
    kv = kv_for(spec, 40)
    assert c.lookup(t).hit_tokens == 0
    assert c.store(t, kv) == 3
    c.flush()
    r = c.lookup(t)
    assert (r.hit_tokens, r.hit_chunks, r.num_chunks, r.tiers) == (40, 3, 3, ["cpu"] * 3)
    n, got = c.retrieve(t)
    assert n == 40 and torch.equal(got, kv)
    # a longer prompt with the same start hits its full chunks, not the partial one
    longer = t + toks(30, 1000)
    assert c.lookup(longer).hit_tokens == 32
    n, got = c.retrieve(longer)
    assert n == 32 and torch.equal(got, kv[:, :, :32])
    n, got = c.retrieve(t, max_tokens=20)
    assert n == 16 and torch.equal(got, kv[:, :, :16])
    # a different first token shares nothing
    assert c.lookup([7] + t[1:]).hit_tokens == 0
    assert c.retrieve([7] + t[1:]) == (0, None)
    # already cached chunks are not written again
    assert c.store(t, kv) == 0
    assert c.store(longer, torch.cat([kv, kv_for(spec, 30, 1)], dim=2)) == 3
    assert c.lookup(longer).hit_tokens == 70


def test_full_only_skips_the_partial_chunk(spec, make_cache):
    c = make_cache(spec)
    t = toks(40)
    assert c.store(t, kv_for(spec, 40), full_only=True) == 2
    assert c.lookup(t).hit_tokens == 32
    assert c.store(toks(10), kv_for(spec, 10), full_only=True) == 0
    assert c.store([], kv_for(spec, 0)) == 0


def test_kv_longer_than_tokens_is_accepted_and_wrong_shapes_rejected(spec, make_cache):
    c = make_cache(spec)
    kv = kv_for(spec, 48)
    assert c.store(toks(32), kv) == 2  # engines hand a padded buffer
    assert torch.equal(c.retrieve(toks(32))[1], kv[:, :, :32])
    with pytest.raises(SpecMismatchError):
        c.store(toks(32), kv_for(spec, 16))
    with pytest.raises(SpecMismatchError):
        c.store(toks(16), kv_for(spec, 16).float())
    with pytest.raises(SpecMismatchError):
        c.store(toks(16), torch.zeros(2, 2, 16, 3, 8, dtype=torch.float16))


def test_keys_are_shared_across_caches_of_the_same_spec_and_salt_separates(spec, make_cache, tmp_path):
    d = str(tmp_path / "shared")
    a = make_cache(spec, cpu_bytes=0, disk_path=d)
    kv = kv_for(spec, 32)
    a.store(toks(32), kv)
    a.flush()
    b = make_cache(spec, cpu_bytes=0, disk_path=d)  # another cache, same disk: same keys
    assert b.lookup(toks(32)).hit_tokens == 32
    assert torch.equal(b.retrieve(toks(32))[1], kv)
    salted = make_cache(spec, cpu_bytes=0, disk_path=d, salt="tenant-b")
    assert salted.namespace != a.namespace
    assert salted.lookup(toks(32)).hit_tokens == 0


def test_config_object_with_overrides(spec):
    cfg = KVLayerConfig(chunk_size=CS, cpu_bytes="1MiB")
    with KVCache(spec, cfg, chunk_size=8) as c:
        assert c.chunk_size == 8 and c.config.cpu_bytes == MiB
        assert len(c.keys(toks(20))) == 3


def test_rope_theta_reaches_the_int_codecs_only(spec, make_cache, tmp_path):
    """``rope_theta`` (the engine's model base) goes to the tiers whose codec uses it, unless the
    tier's own codec settings name one; lossless and KIVI-scheme tiers are built as configured."""
    from kvlayer.config import TierConfig

    tiers = [TierConfig(kind="memory", name="cpu", capacity=MiB, codec="raw"),
             TierConfig(kind="disk", name="disk", capacity=4 * MiB, path=str(tmp_path / "d"), codec="int4+lz4"),
             TierConfig(kind="disk", name="d2", capacity=4 * MiB, path=str(tmp_path / "e"), codec="int8",
                        codec_params={"rope_theta": 0}),
             TierConfig(kind="disk", name="d3", capacity=4 * MiB, path=str(tmp_path / "f"), codec="int4",
                        codec_params={"scheme": "kivi"})]
    c = make_cache(spec, tiers=tiers, env={"KVLAYER_ROPE_THETA": "10000"})
    got = {t["name"]: t.get("codec_params", {}).get("rope_theta") for t in c.stats()["tiers"]}
    assert got == {"cpu": None, "disk": 10000.0, "d2": 0, "d3": None}
    off = make_cache(spec, env={"KVLAYER_ROPE_THETA": "0"},  # 0 = keys as stored
                     tiers=[tiers[0], TierConfig(kind="disk", name="disk", capacity=4 * MiB, path=str(tmp_path / "g"),
                                                 codec="int4")])
    assert "codec_params" not in off.stats()["tiers"][1]


# ---------------------------------------------------------------------------------- documents
def test_documents_roundtrip_and_position_independent_keys(spec, make_cache):
    c = make_cache(spec)
    doc_toks = toks(40, 5000)
    kv = kv_for(spec, 40, 3)
    d = c.put_document("manual", doc_toks, kv, title="the manual")
    assert d.num_tokens == 40 and len(d.keys) == 3 and d.meta == {"title": "the manual"}
    assert c.document("manual") is d and c.documents() == [d]
    n, got = c.get_document("manual")
    assert n == 40 and torch.equal(got, kv)
    # keys depend on the document's tokens only: the same in any cache of this spec
    assert c.document_keys(np.asarray(doc_toks)) == d.keys
    # a prompt that starts with the document is a prefix hit
    assert c.lookup(doc_toks[:32] + toks(10)).hit_tokens == 32
    # registering known tokens without KV finds the stored chunks
    d2 = c.register_document("alias", doc_toks)
    assert d2.keys == d.keys and c.get_document("alias")[0] == 40
    with pytest.raises(KeyError, match="nope"):
        c.document("nope")
    assert c.stats()["documents"] == 2


def test_remove_document(spec, make_cache):
    c = make_cache(spec)
    c.put_document("a", toks(32, 100), kv_for(spec, 32))
    c.pin(doc_id="a")
    assert c.remove_document("a") == 2  # its lease goes with it, so its chunks can go
    assert c.lookup(toks(32, 100)).hit_tokens == 0
    assert c.remove_document("a") == 0
    assert c.stats()["store"]["pinned_keys"] == 0
    c.put_document("b", toks(32, 200), kv_for(spec, 32))
    assert c.remove_document("b", evict=False) == 0
    assert c.lookup(toks(32, 200)).hit_tokens == 32


# ---------------------------------------------------------------------------------- pins / evict
def _overload(c: KVCache, spec: KVSpec, factor: int = 10, start: int = 100_000) -> None:
    cpu = tier(c, "cpu")
    n_chunks = factor * cpu.capacity_bytes // chunk_bytes(spec) + 1
    kv = kv_for(spec, CS, 99)
    for i in range(n_chunks):
        c.store(toks(CS, start + i * CS), kv)
        assert cpu.used_bytes() <= cpu.capacity_bytes


def test_pinned_prefix_and_document_survive_10x_overload(spec, make_cache):
    c = make_cache(spec, cpu_bytes=16 * chunk_bytes(spec))
    p = toks(48)
    kv = kv_for(spec, 48, 1)
    c.store(p, kv)
    lease = c.pin(p)
    dkv = kv_for(spec, 32, 2)
    c.put_document("doc", toks(32, 9000), dkv)
    c.pin(doc_id="doc")
    unpinned = toks(32, 50_000)
    c.store(unpinned, kv_for(spec, 32, 3))
    _overload(c, spec)
    assert c.lookup(p).tiers == ["cpu"] * 3
    assert torch.equal(c.retrieve(p)[1], kv)
    assert torch.equal(c.get_document("doc")[1], dkv)
    assert c.lookup(unpinned).hit_tokens == 0  # the control: unpinned data was evicted
    assert tier(c, "cpu").stats().evictions > 0
    st = c.stats()["store"]
    assert st["pinned_keys"] == 5 and st["leases"] == 2
    # release everything: nothing stays pinned, and the chunks become evictable
    assert c.unpin(lease) == 1
    assert c.unpin(doc_id="doc") == 1
    assert c.stats()["store"]["pinned_keys"] == 0 and c.stats()["store"]["leases"] == 0
    _overload(c, spec, start=500_000)
    assert c.lookup(p).hit_tokens == 0 and c.get_document("doc")[0] == 0


def test_unpin_twice_is_a_noop_and_counts_never_go_negative(spec, make_cache):
    c = make_cache(spec, cpu_bytes=8 * chunk_bytes(spec))
    p = toks(32)
    c.store(p, kv_for(spec, 32))
    a = c.pin(p)
    b = c.pin(p)
    assert c.unpin(a) == 1
    assert c.unpin(a) == 0  # second release of the same lease changes nothing
    assert c.unpin("no-such-lease") == 0
    assert c.unpin(doc_id="never-registered") == 0
    assert c.stats()["store"]["pinned_keys"] == 2  # still held by b
    _overload(c, spec)
    assert c.lookup(p).hit_tokens == 32
    assert c.unpin(b) == 1 and c.unpin(b) == 0
    assert c.stats()["store"]["pinned_keys"] == 0
    c2 = c.pin(p)  # pinning again after all that works normally: the count is exactly one
    assert c.stats()["store"]["pinned_keys"] == 2
    assert c.unpin(c2) == 1 and c.stats()["store"]["pinned_keys"] == 0


def test_ttl_lease_expires(spec, make_cache):
    c = make_cache(spec, cpu_bytes=8 * chunk_bytes(spec))
    p = toks(32)
    c.store(p, kv_for(spec, 32))
    forever = c.pin(toks(16, 7000))
    c.pin(p, ttl_s=1.0)
    assert c.stats()["store"]["pinned_keys"] == 3
    time.sleep(1.1)
    st = c.stats()["store"]
    assert st["pinned_keys"] == 1 and st["leases"] == 1
    _overload(c, spec)
    assert c.lookup(p).hit_tokens == 0  # expired pin no longer protects it
    c.unpin(forever)
    assert c.stats()["store"]["pinned_keys"] == 0


def test_evict_by_prefix_and_by_document_respects_pins(spec, make_cache, tmp_path):
    c = make_cache(spec, disk_path=str(tmp_path / "d"))
    p = toks(32)
    c.store(p, kv_for(spec, 32))
    c.put_document("d", toks(48, 3000), kv_for(spec, 48))
    c.flush()
    lease = c.pin(p)
    assert c.evict(p) == 0 and c.lookup(p).hit_tokens == 32
    assert c.evict(p, force=True) == 2 and c.lookup(p).hit_tokens == 0
    assert not tier(c, "disk").keys() == []  # the document is still on disk
    assert c.evict(doc_id="d") == 3
    assert c.lookup(toks(48, 3000)).hit_tokens == 0
    assert tier(c, "disk").keys() == [] and tier(c, "cpu").keys() == []
    c.unpin(lease)
    with pytest.raises(ValueError, match="exactly one"):
        c.evict(p, doc_id="d")
    with pytest.raises(ValueError, match="exactly one"):
        c.pin()


def test_evict_by_keys_and_clear(spec, make_cache, tmp_path):
    c = make_cache(spec, disk_path=str(tmp_path / "d"))
    c.store(toks(48), kv_for(spec, 48))
    c.flush()
    keys = c.keys(toks(48))
    assert c.evict(keys=keys[2:]) == 1
    assert c.lookup(toks(48)).hit_tokens == 32
    c.pin(toks(48))
    c.clear()
    st = c.stats()
    assert st["store"]["pinned_keys"] == 0
    assert [t["num_keys"] for t in st["tiers"]] == [0, 0]
    assert c.lookup(toks(48)).hit_tokens == 0


# ---------------------------------------------------------------------------------- stats
def test_stats_per_tier(spec, make_cache, tmp_path):
    c = make_cache(spec, cpu_bytes=4 * chunk_bytes(spec) + 4 * 200, disk_path=str(tmp_path / "d"))
    kv = kv_for(spec, 96)
    c.store(toks(96), kv)  # 6 chunks into a 4-chunk CPU tier
    c.flush()
    s = c.stats()
    assert s["chunk_size"] == CS and s["namespace"] == c.namespace.hex()
    cpu, disk = s["tiers"]
    assert (cpu["name"], cpu["codec"], disk["name"], disk["codec"]) == ("cpu", "raw", "disk", "raw+lz4")
    assert cpu["puts"] == 6 and cpu["evictions"] == 2 and cpu["num_keys"] == 4
    assert disk["puts"] == 6 and disk["num_keys"] == 6 and disk["bytes_written"] > 0
    assert cpu["used_bytes"] <= cpu["capacity_bytes"]
    n, got = c.retrieve(toks(96))
    assert n == 96 and torch.equal(got, kv)
    s = c.stats()
    cpu2, disk2 = s["tiers"]
    assert s["store"]["hits"] == 6 and s["store"]["misses"] == 0
    assert s["store"]["hits_by_tier"] == {"disk": 2, "cpu": 4}
    assert disk2["hits"] == 2 and disk2["bytes_read"] > 0
    assert cpu2["hits"] == 4 and cpu2["bytes_read"] >= 4 * chunk_bytes(spec)
    assert s["store"]["promotions"] == 2
    c.retrieve(toks(16, 777))
    assert c.stats()["store"]["misses"] == 1


# ---------------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("where", ["memory", "disk"])
def test_corrupt_chunk_truncates_the_hit_and_is_deleted(where, spec, make_cache, tmp_path):
    if where == "memory":
        c = make_cache(spec)
    else:
        c = make_cache(spec, cpu_bytes=0, disk_path=str(tmp_path / "d"))
    t = toks(48)
    kv = kv_for(spec, 48)
    c.store(t, kv)
    c.flush()
    tr = c._store.levels[0].tier
    k1 = c.keys(t)[1]
    good = bytes(tr.get(k1))
    bad = bytearray(good)
    bad[-3] ^= 0x04
    if isinstance(tr, DiskTier):
        (tr.root / k1[:2] / f"{k1}.kvb").write_bytes(bad)
    else:
        assert isinstance(tr, MemoryTier)
        tr.put(k1, good[:-100])  # in memory the payload is never hashed (it never left the process)
    n, got = c.retrieve(t)
    assert n == CS and torch.equal(got, kv[:, :, :CS])  # the good prefix, never the bad chunk
    assert not tr.contains(k1)
    assert c.lookup(t).hit_tokens == CS
    assert c.stats()["store"]["corrupt"] == 1
    assert c.store(t, kv) == 1  # only the hole is written again
    assert torch.equal(c.retrieve(t)[1], kv)


# ---------------------------------------------------------------------------------- failing tier
def test_broken_disk_does_not_break_store_or_retrieve(spec, make_cache, tmp_path):
    root = tmp_path / "d"
    c = make_cache(spec, disk_path=str(root), retry_after_s=3600)
    a, kva = toks(32), kv_for(spec, 32, 1)
    c.store(a, kva)
    c.flush()
    shutil.rmtree(root)
    root.write_text("the disk went away")  # every path under it now fails with an OSError
    b, kvb = toks(32, 4000), kv_for(spec, 32, 2)
    assert c.store(b, kvb) == 2
    assert c.flush(timeout=30)
    assert torch.equal(c.retrieve(a)[1], kva) and torch.equal(c.retrieve(b)[1], kvb)
    tier(c, "cpu").clear()
    assert c.retrieve(a) == (0, None)  # the disk copy is unreachable: a miss, not an exception
    assert c.lookup(a).hit_tokens == 0
    s = c.stats()
    disk = s["tiers"][1]
    assert disk["errors"] >= 1 and disk["available"] is False
    assert s["store"]["tier_errors"] >= 1 and s["store"]["dropped_writes"] >= 1


# ---------------------------------------------------------------------------------- RSS budget
def test_kvcache_budgets_and_rss_hold_under_10x_overload(make_cache, tmp_path):
    spec = KVSpec(model="rss", num_layers=8, num_kv_heads=4, head_dim=64)  # 1 MiB per 128 tokens
    cs = 128
    budget, queue = 32 * MiB, 8 * MiB
    c = make_cache(spec, chunk_size=cs, cpu_bytes=budget, disk_path=str(tmp_path / "d"), disk_bytes=budget,
                   disk_codec="raw", write_queue_bytes=queue)
    cpu, disk = tier(c, "cpu"), tier(c, "disk")
    kv = kv_for(spec, cs)
    c.store(toks(cs, 10**7), kv)
    c.flush()
    proc = psutil.Process()
    base = _trimmed_rss()
    peak = base
    for i in range(10 * budget // chunk_bytes(spec, cs)):
        c.store(toks(cs, i * cs), kv)
        assert cpu.used_bytes() <= budget and disk.used_bytes() <= budget
        if i % 8 == 0:
            peak = max(peak, proc.memory_info().rss)
    c.flush()
    gc.collect()
    peak = max(peak, proc.memory_info().rss)
    assert disk.used_bytes() <= budget and cpu.used_bytes() <= budget
    assert c.stats()["store"]["dropped_writes"] == 0  # back-pressure, not loss
    assert peak - base <= budget + queue + 24 * MiB, f"RSS grew {(peak - base) / MiB:.1f} MiB"


@pytest.mark.parametrize("n_tokens", [CS, 3 * CS + 5])
def test_retrieve_returns_memory_the_caller_owns(spec, make_cache, tmp_path, n_tokens):
    """Writing into a tensor from the public ``retrieve`` (or ``get_document``) changes nothing
    stored: the next read is still a hit with the original values, in every tier (it used to drop
    the chunk: the tensor viewed the CPU blob, which then failed its checksum)."""
    c = make_cache(spec, disk_path=str(tmp_path / "d"))
    t = toks(n_tokens)
    kv = kv_for(spec, n_tokens)
    c.store(t, kv)
    c.put_document("doc", toks(n_tokens, 7000), kv)
    assert c.flush(timeout=30)
    for read in (lambda: c.retrieve(t), lambda: c.get_document("doc")):
        n, got = read()
        assert n == n_tokens
        got.add_(1)  # the caller's memory: any write is fine
        got.zero_()
        n2, again = read()
        assert n2 == n_tokens and torch.equal(again, kv)
    s = c.stats()
    assert s["store"]["corrupt"] == 0 and s["store"]["misses"] == 0


def test_retrieve_chunks_is_the_zero_copy_read(spec, make_cache):
    """Connectors' path: raw CPU hits view the stored blob (no copy), so they are read-only; the
    public ``retrieve`` copies instead."""
    c = make_cache(spec)
    t = toks(CS)
    kv = kv_for(spec, CS)
    c.store(t, kv)
    k = c.keys(t)
    a, b = c.retrieve_chunks(k)[0], c.retrieve_chunks(k)[0]
    assert a is not None and b is not None and torch.equal(a, kv)
    assert a.data_ptr() == b.data_ptr()  # both view the one stored blob
    _, owned = c.retrieve(t)
    assert owned is not None and owned.data_ptr() != a.data_ptr()
