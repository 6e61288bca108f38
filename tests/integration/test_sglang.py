"""SGLang HiCache backend against SGLang's real classes: its backend factory (``dynamic``), its
failure injector and its real CPU host pools (``MHATokenToKVPoolHost``, ``MLATokenToKVPoolHost``)
in every layout. The SGLang engine itself cannot run here (no CPU ``sgl_kernel``); the pools'
"device" buffers are CPU tensors, which the storage path never touches.

Tiers are real: the in-process CPU tier, a disk tier in a temp dir, and a real redis-server.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np
import pytest
import torch

from kvlayer import KVCache, KVSpec
from kvlayer.errors import ConfigError
from tests.fixtures.redis_server import redis_server, skip_without_redis  # noqa: F401
from tests.fixtures.sglang_env import (
    import_sglang,
    make_mha_host_pool,
    make_mla_host_pool,
    prepare_sglang_env,
    sglang_available,
)

pytestmark = [pytest.mark.sglang, pytest.mark.skipif(not sglang_available(), reason="sglang not installed")]

prepare_sglang_env()  # cache dirs + package path only; SGLang itself is imported by the fixture below


# Bound by the fixture below (SGLang is imported when the first test here runs, not at collection).
HiCacheStorageConfig: Any = None
HiCacheStorageExtraInfo: Any = None
HiCacheStorageFailureInjector: Any = None
StorageBackendFactory: Any = None
KVLayerStore: Any = None
derived_key: Any = None
sglang_page_hashes: Any = None


@pytest.fixture(scope="module", autouse=True)
def _sglang_symbols():
    global HiCacheStorageConfig, HiCacheStorageExtraInfo, HiCacheStorageFailureInjector, StorageBackendFactory
    global KVLayerStore, derived_key, sglang_page_hashes
    import_sglang()  # about 10 s, once
    from kvlayer.connectors.sglang import KVLayerStore as store
    from kvlayer.connectors.sglang import keys
    from sglang.srt.mem_cache import hicache_storage as hs
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory as factory

    HiCacheStorageConfig, HiCacheStorageExtraInfo = hs.HiCacheStorageConfig, hs.HiCacheStorageExtraInfo
    HiCacheStorageFailureInjector, StorageBackendFactory, KVLayerStore = hs.HiCacheStorageFailureInjector, factory, store
    derived_key, sglang_page_hashes = keys.derived_key, keys.sglang_page_hashes


P = 4  # page size == kvlayer chunk size in these tests
MHA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_head", "page_unified"]
MLA_LAYOUTS = ["layer_first", "page_first", "page_first_direct", "page_unified"]
POOLS = [("mha", lay) for lay in MHA_LAYOUTS] + [("mla", lay) for lay in MLA_LAYOUTS]


def storage_config(*, mla: bool = False, tp_rank: int = 0, tp_size: int = 1, model: str = "tiny-llama",
                   **kvlayer: object) -> HiCacheStorageConfig:
    extra = {"backend_name": "kvlayer", "module_path": "kvlayer.connectors.sglang", "class_name": "KVLayerStore",
             "interface_v1": 1, "cpu_bytes": "64MiB", **kvlayer}
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=mla, enable_storage_metrics=True, is_page_first_layout=True,
                                model_name=model, extra_config=extra)


def make_pool(kind: str, layout: str) -> object:
    if kind == "mla":
        return make_mla_host_pool(layout, page_size=P)
    if layout == "page_unified":  # two head groups of two heads: exercises the head regrouping
        return make_mha_host_pool(layout, page_size=P, heads=4, head_groups=2)
    return make_mha_host_pool(layout, page_size=P)


def attach(pool: object, cfg: HiCacheStorageConfig) -> KVLayerStore:
    """What SGLang's cache controller does: factory, then register the host pool."""
    backend = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    backend.register_mem_pool_host(pool)
    return backend


def fill_random(pool: object, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    kv = pool.kv_buffer  # type: ignore[attr-defined]
    kv.copy_(torch.randn(kv.shape, generator=g).to(kv.dtype))


def pages(pool: object, idx: torch.Tensor) -> list[torch.Tensor]:
    """Each page as SGLang's own get_data_page sees it (the oracle: independent of our layout code);
    page_unified has no get_data_page in SGLang: its page block is ``kv_buffer[page]``."""
    if pool.layout == "page_unified":  # type: ignore[attr-defined]
        return [pool.kv_buffer[int(idx[i * P]) // P].flatten().clone() for i in range(idx.numel() // P)]  # type: ignore[attr-defined]
    return [pool.get_data_page(int(idx[i * P]), flat=True).clone() for i in range(idx.numel() // P)]  # type: ignore[attr-defined]


def page_keys(n: int, tag: str = "") -> list[str]:
    tokens = np.arange(n * P) + sum(map(ord, tag)) * 7  # different tags, different sequences
    return sglang_page_hashes(tokens, P)


def vllm_spec(model: str, *, revision: str | None = None, dtype: torch.dtype = torch.float16) -> KVSpec:
    """The KVSpec kvlayer's vLLM connector builds (``build_spec``) for a 2-layer, 2-kv-head,
    head-dim-8 model: the few vLLM config fields it reads are stand-ins, so vLLM is not needed."""
    from types import SimpleNamespace as NS

    from kvlayer.connectors.vllm.config import ConnectorOptions, build_spec

    attn = NS(num_kv_heads=2, head_size=8, dtype=dtype)
    kv_cache_config = NS(kv_cache_groups=[NS(kv_cache_spec=attn, layer_names=["l0", "l1"])])
    vllm_config = NS(cache_config=NS(cache_dtype="auto"), model_config=NS(model=model, revision=revision),
                     parallel_config=NS(tensor_parallel_size=1))
    return build_spec(vllm_config, kv_cache_config, ConnectorOptions())


def test_both_engines_derive_one_spec_for_one_model(tmp_path, cleanup):
    """Same model (name or local folder, revision) and KV shape: the SGLang backend and the vLLM
    connector build one KVSpec, hence one namespace and shared chunks, with no shared setting."""
    folder = tmp_path / "SmolLM2"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 576}')
    specs = []
    for model, rev in [("meta-llama/Llama-3.1-8B", None), ("x", "abc"), (str(folder), None)]:
        extra = {"revision": rev} if rev else {}
        b = attach(make_mha_host_pool("page_first", page_size=P), storage_config(model=model, **extra))
        cleanup.append(b)
        assert b.spec == vllm_spec(model, revision=rev)
        specs.append(b.spec)
    assert len({s.namespace() for s in specs}) == 3
    assert specs[2].model.startswith("SmolLM2@")  # a local folder: its name plus a digest of its config.json


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cleanup():
    made: list[object] = []
    yield made
    for b in made:
        b.close()  # type: ignore[attr-defined]


# ------------------------------------------------------------------ factory, layouts, round trips
def test_factory_builds_kvlayer_backend_with_layout_independent_namespace(cleanup):
    specs = set()
    for layout in MHA_LAYOUTS:
        b = attach(make_mha_host_pool(layout, page_size=P, head_groups=2 if layout == "page_unified" else 1),
                   storage_config())
        cleanup.append(b)
        assert type(b) is KVLayerStore and b.interface_v1
        specs.add(b.spec)
    assert len(specs) == 1, "the namespace must not depend on the host layout"
    (spec,) = specs
    assert spec == vllm_spec("tiny-llama")
    assert b.cache.chunk_size == P


@pytest.mark.parametrize("kind,layout", POOLS)
def test_set_zero_get_restores_pool_byte_identically(kind, layout, cleanup):
    pool = make_pool(kind, layout)
    b = attach(pool, storage_config(mla=kind == "mla"))
    cleanup.append(b)
    fill_random(pool, 1)
    idx = pool.alloc(5 * P)
    keys = page_keys(5)
    before = pages(pool, idx)
    assert b.batch_set_v1(keys, idx) == [True] * 5
    assert b.batch_set_v1(keys, idx) == [True] * 5  # already stored: not rewritten
    assert b.kvlayer_stats()["backend"]["set_skipped_present"] == 5
    pool.kv_buffer.zero_()
    assert b.batch_exists(keys) == 5
    assert b.batch_get_v1(keys, idx) == [True] * 5
    after = pages(pool, idx)
    for x, y in zip(before, after, strict=True):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    assert pool.kv_buffer.any()
    for i in range(5):  # zero the loaded pages again: nothing outside them was written
        if layout == "page_unified":
            pool.kv_buffer[int(idx[i * P]) // P] = 0
        else:
            pool.set_from_flat_data_page(int(idx[i * P]), torch.zeros_like(after[i]))
    assert not pool.kv_buffer.any()
    m = b.get_stats()
    assert type(m).__name__ == "StorageMetrics" and m.prefetch_pgs == [5] and m.backup_pgs == [5]
    assert b.get_stats().prefetch_pgs == []  # reported once


@pytest.mark.parametrize("kind,layout", [("mha", "page_first"), ("mha", "page_head"), ("mla", "layer_first")])
def test_exists_counts_leading_run_and_failed_pages_stay_untouched(kind, layout, cleanup):
    pool = make_pool(kind, layout)
    b = attach(pool, storage_config(mla=kind == "mla"))
    cleanup.append(b)
    fill_random(pool, 2)
    idx = pool.alloc(4 * P)
    keys = page_keys(4)
    assert b.batch_set_v1([keys[0], keys[1], keys[3]], torch.cat([idx[: 2 * P], idx[3 * P :]])) == [True] * 3
    assert b.batch_exists(keys) == 2  # page 2 missing: only the leading run counts
    assert b.batch_exists(keys[2:]) == 0
    assert b.batch_exists(keys[3:]) == 1
    before = pages(pool, idx)
    pool.kv_buffer.fill_(7)
    assert b.batch_get_v1(keys, idx) == [True, True, False, True]
    after = pages(pool, idx)
    assert torch.equal(after[0], before[0]) and torch.equal(after[3], before[3])
    assert bool((after[2] == 7).all()), "a missing page must not be written"
    assert b.batch_get_v1(keys[:2], idx[:P]) == [False, False]  # wrong index count: failure, no exception


@pytest.mark.parametrize("kind,layout", [("mha", "layer_first"), ("mha", "page_first"), ("mla", "layer_first"),
                                         ("mla", "page_first")])
def test_scattered_token_slots_use_the_gather_path(kind, layout, cleanup):
    """Token-addressed layouts also accept pages whose slots are not consecutive; the gather path
    must agree with the one-view-per-page path token for token."""
    pool = make_pool(kind, layout)
    b = attach(pool, storage_config(mla=kind == "mla"))
    cleanup.append(b)
    fill_random(pool, 14)
    idx = pool.alloc(2 * P)
    rev = idx.reshape(2, P).flip(1).reshape(-1)  # each page's slots in reverse order
    straight, scattered = b.layout.read(idx), b.layout.read(rev)
    assert all(torch.equal(a.flip(2), c) for a, c in zip(straight, scattered, strict=True))
    keys = page_keys(2, "scatter")
    before = pages(pool, idx)
    assert b.batch_set_v1(keys, rev) == [True, True]
    pool.kv_buffer.zero_()
    assert b.batch_get_v1(keys, rev) == [True, True]
    assert all(torch.equal(x, y) for x, y in zip(pages(pool, idx), before, strict=True))


def test_misaligned_pages_are_failures_not_exceptions(cleanup):
    pool = make_mha_host_pool("page_first_direct", page_size=P)
    b = attach(pool, storage_config())
    cleanup.append(b)
    idx = pool.alloc(2 * P) + 1  # page starts off the page grid
    assert b.batch_set_v1(page_keys(2, "misaligned"), idx) == [False, False]
    assert b.batch_get_v1(page_keys(2, "misaligned"), idx) == [False, False]
    assert b.kvlayer_stats()["backend"]["errors"] >= 1


def test_pages_written_from_one_layout_load_into_another(tmp_path, cleanup):
    """Canonical chunks: page_head (MHA) pages written to a disk tier load into a layer_first pool of
    another backend instance, token for token."""
    cfg = dict(cpu_bytes=0, disk_path=str(tmp_path / "kv"), disk_codec="lz4")
    src = make_mha_host_pool("page_head", page_size=P)
    a = attach(src, storage_config(**cfg))
    fill_random(src, 3)
    idx = src.alloc(3 * P)
    keys = page_keys(3)
    assert a.batch_set_v1(keys, idx) == [True] * 3
    a.close()
    dst = make_mha_host_pool("layer_first", page_size=P)
    b = attach(dst, storage_config(**cfg))
    cleanup.append(b)
    didx = dst.alloc(3 * P)
    assert b.batch_get_v1(keys, didx) == [True] * 3
    # logical (layer, k/v, token, head, dim) of both pools, indexed by SGLang's documented shapes
    s = src.kv_buffer  # (2, pages, heads, page, layers, dim)
    d = dst.kv_buffer  # (2, layers, size, heads, dim)
    for t in range(3 * P):
        sp, so = int(idx[t]) // P, int(idx[t]) % P
        assert torch.equal(s[:, sp, :, so, :, :].permute(0, 2, 1, 3), d[:, :, int(didx[t])])


def test_page_unified_head_groups_load_into_page_head(tmp_path, cleanup):
    cfg = dict(cpu_bytes=0, disk_path=str(tmp_path / "kv"))
    src = make_mha_host_pool("page_unified", page_size=P, heads=4, head_groups=2)
    a = attach(src, storage_config(**cfg))
    fill_random(src, 13)
    idx = src.alloc(2 * P)
    keys = page_keys(2, "unified")
    assert a.batch_set_v1(keys, idx) == [True] * 2
    a.close()
    dst = make_mha_host_pool("page_head", page_size=P, heads=4)
    b = attach(dst, storage_config(**cfg))
    cleanup.append(b)
    didx = dst.alloc(2 * P)
    assert b.batch_get_v1(keys, didx) == [True] * 2
    s = src.kv_buffer  # (pages, groups, layers, 2, page, heads/group, dim)
    d = dst.kv_buffer  # (2, pages, heads, page, layers, dim)
    for t in range(2 * P):
        sp, so, dp, do = int(idx[t]) // P, int(idx[t]) % P, int(didx[t]) // P, int(didx[t]) % P
        for g in range(2):
            for hi in range(2):
                # (layers, 2, dim) of head g*2+hi at this token, in both pools
                assert torch.equal(s[sp, g, :, :, so, hi, :], d[:, dp, g * 2 + hi, do, :, :].permute(1, 0, 2))


@pytest.mark.parametrize("kind,layout", [("mha", "layer_first"), ("mha", "page_first"), ("mha", "page_first_direct"),
                                         ("mha", "page_head"), ("mla", "page_first")])
def test_legacy_get_set_with_flat_pages(kind, layout, cleanup):
    pool = make_pool(kind, layout)
    b = attach(pool, storage_config(mla=kind == "mla"))
    cleanup.append(b)
    fill_random(pool, 4)
    idx = pool.alloc(3 * P)
    keys = page_keys(3, "legacy")
    flats = pages(pool, idx)
    assert b.set(keys[0], flats[0]) and b.batch_set(keys[1:], flats[1:])
    assert b.exists(keys[0]) and not b.exists("0" * 64)
    targets = [pool.get_dummy_flat_data_page() for _ in keys]
    got = b.batch_get(keys + ["0" * 64], targets + [pool.get_dummy_flat_data_page()])
    assert got[-1] is None
    pool.kv_buffer.zero_()
    for i, g in enumerate(got[:3]):
        assert g is targets[i] and torch.equal(g, flats[i])
        pool.set_from_flat_data_page(int(idx[i * P]), g)  # what SGLang's generic get path does
    assert all(torch.equal(x, y) for x, y in zip(pages(pool, idx), flats, strict=True))
    # the legacy path and the zero-copy path store the same canonical chunk under the same key
    pool.kv_buffer.zero_()
    assert b.batch_get_v1(keys, idx) == [True] * 3
    assert all(torch.equal(x, y) for x, y in zip(pages(pool, idx), flats, strict=True))


# ------------------------------------------------------------------ failures never raise, never corrupt
def test_sglang_failure_injector_returns_failures_and_never_corrupts(monkeypatch, cleanup):
    monkeypatch.setenv("SGLANG_TEST_HICACHE_BACKEND_RANDOM_FAILURE", "0.5")
    pool = make_mha_host_pool("page_first", page_size=P)
    b = attach(pool, storage_config())
    assert isinstance(b, HiCacheStorageFailureInjector)
    cleanup.append(b)
    fill_random(pool, 5)
    idx = pool.alloc(4 * P)
    reference = pages(pool, idx)
    keys = page_keys(4, "inject")
    outcomes: set[bool] = set()
    for rnd in range(30):
        ok_set = b.batch_set_v1(keys, idx)
        assert isinstance(ok_set, list) and len(ok_set) == 4
        n = b.batch_exists(keys)
        assert isinstance(n, int) and 0 <= n <= 4
        pool.kv_buffer.fill_(-1)
        ok_get = b.batch_get_v1(keys, idx)
        outcomes.update(ok_get)
        now = pages(pool, idx)
        for i, ok in enumerate(ok_get):
            if ok:
                assert torch.equal(now[i], reference[i]), f"round {rnd}: page {i} loaded wrong bytes"
            else:
                assert bool((now[i] == -1).all()), f"round {rnd}: failed page {i} was written"
        pool.kv_buffer.zero_()
        for i in range(4):
            pool.set_from_flat_data_page(int(idx[i * P]), reference[i])
    assert outcomes == {True, False}, "with p=0.5 over 30 rounds both outcomes must occur"


@pytest.mark.parametrize("tier", ["redis", "server"])
def test_dead_redis_or_server_tier_means_failures_not_exceptions(tier, cleanup):
    """Nothing listens on the port: the real Redis / remote (gRPC) tier fails every call."""
    url = {"redis": f"redis://127.0.0.1:{closed_port()}/0", "server": f"grpc://127.0.0.1:{closed_port()}"}[tier]
    pool = make_mha_host_pool("page_first_direct", page_size=P)
    b = attach(pool, storage_config(cpu_bytes=0, retry_after_s=0, **{f"{tier}_url": url}))
    cleanup.append(b)
    fill_random(pool, 6)
    idx = pool.alloc(2 * P)
    keys = page_keys(2, "dead")
    before = pool.kv_buffer.clone()
    assert b.batch_set_v1(keys, idx) == [False, False]
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, idx) == [False, False]
    assert b.get(keys[0], pool.get_dummy_flat_data_page()) is None
    assert b.set(keys[0], pool.get_data_page(int(idx[0]))) is False
    assert b.exists(keys[0]) is False
    assert isinstance(b.clear(), bool)
    assert torch.equal(pool.kv_buffer, before), "a dead tier must not touch the pool"
    s = b.kvlayer_stats()
    assert s["store"]["tier_errors"] > 0


@skip_without_redis
def test_redis_killed_mid_run_then_back(redis_server, cleanup):  # noqa: F811
    pool = make_mha_host_pool("page_head", page_size=P)
    b = attach(pool, storage_config(cpu_bytes=0, redis_url=redis_server.url, retry_after_s=0,
                                    redis_codec="lz4"))
    cleanup.append(b)
    fill_random(pool, 7)
    idx = pool.alloc(3 * P)
    keys = page_keys(3, "redis")
    ref = pages(pool, idx)
    assert b.batch_set_v1(keys, idx) == [True] * 3
    redis_server.kill()
    pool.kv_buffer.fill_(3)
    assert b.batch_exists(keys) == 0
    assert b.batch_get_v1(keys, idx) == [False] * 3
    assert all(bool((p == 3).all()) for p in pages(pool, idx))
    redis_server.start()  # empty again: nothing persisted
    assert b.batch_get_v1(keys, idx) == [False] * 3
    for i in range(3):
        pool.set_from_flat_data_page(int(idx[i * P]), ref[i])
    for _ in range(200):  # the tier's circuit breaker lets it try again after its backoff
        if b.batch_set_v1(keys, idx) == [True] * 3:
            break
        time.sleep(0.05)
    pool.kv_buffer.zero_()
    assert b.batch_get_v1(keys, idx) == [True] * 3
    assert all(torch.equal(x, y) for x, y in zip(pages(pool, idx), ref, strict=True))


# ------------------------------------------------------------------ codecs, config, MLA ranks
@pytest.mark.parametrize("layout", ["page_first", "page_head"])
def test_int8_codec_restores_within_its_error_bound(layout, cleanup):
    pool = make_mha_host_pool(layout, page_size=P, head_dim=32)
    b = attach(pool, storage_config(cpu_codec="int8"))
    cleanup.append(b)
    fill_random(pool, 8)
    idx = pool.alloc(3 * P)
    keys = page_keys(3, "int8")
    chunks = b.layout.read(idx)  # canonical [layers, 2, page, heads, dim]
    assert b.batch_set_v1(keys, idx) == [True] * 3
    pool.kv_buffer.zero_()
    assert b.batch_get_v1(keys, idx) == [True] * 3
    got = b.layout.read(idx)
    for x, y in zip(chunks, got, strict=True):
        x32, y32 = x.float(), y.float()
        for layer in range(x.shape[0]):
            for plane in range(2):
                a, r = x32[layer, plane], y32[layer, plane]
                bound = (a.max() - a.min()) / 255 + 1e-3  # 2x KIVI int8's (max-min)/510 per group
                assert float((a - r).abs().max()) <= float(bound)
    assert any(not torch.equal(x, y) for x, y in zip(chunks, got, strict=True)), "int8 must really quantize"


def test_rope_base_comes_from_the_models_local_config():
    """SGLang names the model (a path or a hub id): a local config gives the int codecs the RoPE
    base; a name with no local config gives none (keys quantized as stored); a setting wins."""
    from kvlayer.assets import tiny_model_dir

    assert KVLayerStore(storage_config(model=tiny_model_dir())).config.rope_theta == 10000.0
    assert KVLayerStore(storage_config(model="no-such/model-anywhere")).config.rope_theta is None
    assert KVLayerStore(storage_config(model=tiny_model_dir(), rope_theta=500.0)).config.rope_theta == 500.0


def test_bad_config_fails_at_startup_with_the_reason():
    with pytest.raises(ConfigError, match="cpu_byts"):
        KVLayerStore(storage_config(cpu_byts="1GiB"))
    with pytest.raises(ConfigError, match="model"):
        KVLayerStore(storage_config(model=""))


def test_mla_ranks_share_one_namespace_and_only_the_writer_writes(tmp_path, cleanup):
    disk = dict(cpu_bytes=0, disk_path=str(tmp_path / "kv"))
    w_pool, r_pool = make_mla_host_pool("page_first", page_size=P), make_mla_host_pool("page_first", page_size=P)
    writer = attach(w_pool, storage_config(mla=True, tp_rank=0, tp_size=2, **disk))
    reader = attach(r_pool, storage_config(mla=True, tp_rank=1, tp_size=2, **disk))
    cleanup.append(writer)
    assert writer.spec == reader.spec and writer.spec.tp_size == 1
    fill_random(w_pool, 9)
    fill_random(r_pool, 10)
    idx = w_pool.alloc(2 * P)
    keys = page_keys(2, "mla")
    assert reader.batch_set_v1(keys, idx) == [True, True]  # done by the writer rank, as SGLang skips it
    assert reader.batch_exists(keys) == 0 and writer.batch_exists(keys) == 0
    reader.close()
    assert writer.batch_set_v1(keys, idx) == [True, True]
    # a rank-1 process started later finds the writer's pages: one copy for all ranks
    reader = attach(r_pool, storage_config(mla=True, tp_rank=1, tp_size=2, **disk))
    cleanup.append(reader)
    assert reader.batch_exists(keys) == 2
    ridx = r_pool.alloc(2 * P)
    assert reader.batch_get_v1(keys, ridx) == [True, True]
    assert all(torch.equal(x, y) for x, y in zip(pages(r_pool, ridx), pages(w_pool, idx), strict=True))


def test_mha_tp_ranks_do_not_share(cleanup):
    a = attach(make_mha_host_pool("page_first", page_size=P), storage_config(tp_rank=0, tp_size=2))
    b = attach(make_mha_host_pool("page_first", page_size=P), storage_config(tp_rank=1, tp_size=2))
    cleanup += [a, b]
    assert a.spec.namespace() != b.spec.namespace()
    assert a.kv_keys(page_keys(1)) != b.kv_keys(page_keys(1))


# ------------------------------------------------------------------ keys and cross-engine hits
def test_page_hashes_match_sglang_native_hash():
    from sglang.srt.mem_cache.utils import get_hash_str

    tokens = list(np.random.default_rng(0).integers(0, 50_000, 5 * P + 3))
    # SGLang also hashes a trailing partial page; only full pages are ever stored
    assert sglang_page_hashes(tokens, P) == get_hash_str(tokens, None, page_size=P)[:5]
    seed = "ab" * 32
    assert sglang_page_hashes(tokens, P, seed) == get_hash_str(tokens, seed, page_size=P)[:5]


@skip_without_redis
def test_cross_engine_vllm_store_is_sglang_hit_and_back(redis_server, cleanup):  # noqa: F811
    """A chunk stored through the vLLM path's API (``KVCache.store_chunks(cache.keys(tokens), ...)``)
    is a hit through the SGLang backend, and pages SGLang stores are hits for ``KVCache`` — same
    model, same tokens, page size == chunk size, one shared Redis tier."""
    shared = dict(cpu_bytes=0, redis_url=redis_server.url)
    pool = make_mha_host_pool("page_head", page_size=P)
    sg = attach(pool, storage_config(model="tiny-llama", **shared))
    cleanup.append(sg)
    # the vLLM connector's default fingerprint of the same model name: no shared setting needed
    spec = vllm_spec("tiny-llama")
    vllm_side = KVCache(spec, chunk_size=P, **shared)
    cleanup.append(vllm_side)
    rng = np.random.default_rng(1)

    # vLLM -> SGLang
    tokens = rng.integers(0, 1000, 3 * P).tolist()
    chunks = [torch.randn(spec.chunk_shape(P)).half() for _ in range(3)]
    assert vllm_side.store_chunks(vllm_side.keys(tokens), chunks) == 3
    sg_keys = sglang_page_hashes(tokens, P)
    info = HiCacheStorageExtraInfo(prefix_keys=[], extra_info={"token_ids": tokens})
    assert sg.batch_exists(sg_keys, info) == 3
    idx = pool.alloc(3 * P)
    assert sg.batch_get_v1(sg_keys, idx, info) == [True] * 3
    assert all(torch.equal(a, c) for a, c in zip(sg.layout.read(idx), chunks, strict=True))
    # stock SGLang passes only its bare page hashes: kvlayer keys bind the same chain, so still a hit
    assert sg.batch_exists(sg_keys) == 3
    assert sg.kv_keys(sg_keys) == [derived_key(sg.cache.namespace, k) for k in sg_keys] == vllm_side.keys(tokens)
    # a wrong token list is never mapped onto another sequence's keys: the page hashes decide
    other = sglang_page_hashes([t + 1 for t in tokens], P)
    liar = HiCacheStorageExtraInfo(prefix_keys=[], extra_info={"token_ids": tokens})
    assert sg.batch_exists(other, liar) == 0

    # SGLang -> vLLM, second batch of a sequence (prefix_keys = the pages before it)
    tokens2 = rng.integers(0, 1000, 4 * P).tolist()
    fill_random(pool, 11)
    idx2 = pool.alloc(4 * P)
    all_keys = sglang_page_hashes(tokens2, P)
    info2 = HiCacheStorageExtraInfo(prefix_keys=all_keys[:2], extra_info={"token_ids": tokens2})
    first = HiCacheStorageExtraInfo(prefix_keys=[], extra_info={"token_ids": tokens2[: 2 * P]})
    assert sg.batch_set_v1(all_keys[:2], idx2[: 2 * P], first) == [True, True]
    assert sg.batch_set_v1(all_keys[2:], idx2[2 * P :], info2) == [True, True]
    assert vllm_side.lookup(tokens2).hit_tokens == 4 * P
    n, kv = vllm_side.retrieve(tokens2)
    assert n == 4 * P and torch.equal(kv, torch.cat(sg.layout.read(idx2), dim=2))

    # stock SGLang (bare page hashes, no tokens) reads what vLLM stored under its ordinary keys
    from kvlayer.connectors.sglang.keys import sglang_bridge_keys

    tokens3 = rng.integers(0, 1000, 2 * P).tolist()
    chunks3 = [torch.randn(spec.chunk_shape(P)).half() for _ in range(2)]
    assert sglang_bridge_keys(vllm_side.namespace, tokens3, P) == vllm_side.keys(tokens3)
    assert vllm_side.store_chunks(vllm_side.keys(tokens3), chunks3) == 2
    bare = sglang_page_hashes(tokens3, P)
    assert sg.batch_exists(bare) == 2
    idx3 = pool.alloc(2 * P)
    assert sg.batch_get_v1(bare, idx3) == [True, True]
    assert all(torch.equal(a, c) for a, c in zip(sg.layout.read(idx3), chunks3, strict=True))


# ------------------------------------------------------------------ SGLang's own controller I/O code
def test_sglang_controller_backup_query_and_prefetch_paths(cleanup):
    """Drive the backend through HiCacheController's real storage methods: ``_page_backup`` (128-page
    batches, prefix_keys carried across them), ``_storage_hit_query`` (SGLang computes the page
    hashes from tokens itself) and ``_page_transfer`` with the zero-copy get. The controller object
    itself needs device pools, CUDA streams and process groups, so these unbound methods run on a
    minimal stand-in ``self`` holding only what they read."""
    import functools
    import queue
    from types import SimpleNamespace

    from sglang.srt.managers.cache_controller import HiCacheController as HC
    from sglang.srt.managers.cache_controller import PrefetchOperation, StorageOperation
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    pool = make_mha_host_pool("page_first", page_size=P, device_tokens=700)
    b = attach(pool, storage_config())
    cleanup.append(b)
    ctl = SimpleNamespace(page_size=P, storage_backend=b, prefetch_sync_queue=queue.Queue())
    ctl.page_get_func = functools.partial(HC._page_get_zero_copy, ctl)
    ctl.page_set_func = functools.partial(HC._page_set_zero_copy, ctl)
    ctl._page_transfer_kv_batch = functools.partial(HC._page_transfer_kv_batch, ctl)

    n_pages = 300  # three STORAGE_BATCH_SIZE (128) batches
    tokens = np.random.default_rng(2).integers(0, 30_000, n_pages * P).tolist()
    fill_random(pool, 12)
    idx = pool.alloc(n_pages * P)
    ref = pages(pool, idx)
    hashes = get_storage_hash_str(tokens, None, page_size=P)
    backup = StorageOperation(idx, tokens, hash_value=hashes, prefix_keys=[])
    HC._page_backup(ctl, backup)
    assert backup.completed_tokens == n_pages * P
    pool.free(idx)
    pool.kv_buffer.zero_()

    op = PrefetchOperation("req-1", tokens + [1, 2], prefix_keys=[])  # a partial tail page is never a hit
    hit_hashes, hit_tokens = HC._storage_hit_query(ctl, op)
    assert hit_tokens == n_pages * P and hit_hashes == hashes
    op.hash_value = hit_hashes
    op.host_indices = pool.alloc(n_pages * P)
    assert HC._page_transfer(ctl, op) == n_pages
    assert all(torch.equal(x, y) for x, y in zip(pages(pool, op.host_indices), ref, strict=True))
    assert b.get_stats().prefetch_pgs == [128, 128, 44]


def test_unsupported_pool_fails_the_attach_with_the_reason():
    pool = make_mha_host_pool("page_first", page_size=P, dtype=torch.float8_e4m3fn)
    with pytest.raises(Exception, match="float8"):
        attach(pool, storage_config())


def test_hybrid_v2_calls_answer_nothing_instead_of_raising(cleanup):
    from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer

    pool = make_mha_host_pool("page_first", page_size=P)
    b = attach(pool, storage_config())
    cleanup.append(b)
    idx = pool.alloc(2 * P)
    keys = page_keys(2, "v2")
    transfers = [PoolTransfer(name=PoolName.KV, host_indices=idx, keys=keys),
                 PoolTransfer(name=PoolName.MAMBA, host_indices=idx, keys=keys)]
    assert b.batch_exists_v2(keys, transfers).kv_hit_pages == 0
    assert b.batch_set_v2(transfers) == {PoolName.KV: [False, False], PoolName.MAMBA: [False, False]}
    assert b.batch_get_v2(transfers) == {PoolName.KV: [False, False], PoolName.MAMBA: [False, False]}


def test_concurrent_backup_and_prefetch_threads(cleanup):
    """SGLang calls the backend from its backup and prefetch threads at once: pages written and read
    concurrently (disjoint host pages, overlapping keys) always load the bytes stored for their key."""
    import threading

    pool = make_mha_host_pool("page_first", page_size=P, device_tokens=256)
    b = attach(pool, storage_config())
    cleanup.append(b)
    fill_random(pool, 15)
    n_threads, per = 4, 4
    slots = [pool.alloc(per * P) for _ in range(n_threads)]
    ref = {t: pages(pool, slots[t]) for t in range(n_threads)}
    keys = {t: page_keys(per, f"thread{t}") for t in range(n_threads)}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for _ in range(15):
                mine = slots[t]
                for i in range(per):
                    pool.set_from_flat_data_page(int(mine[i * P]), ref[t][i])
                assert all(b.batch_set_v1(keys[t], mine))
                other = (t + 1) % n_threads  # read a neighbour's keys into my pages
                got = b.batch_get_v1(keys[other], mine)
                now = pages(pool, mine)
                for i, ok in enumerate(got):
                    if ok:
                        assert torch.equal(now[i], ref[other][i])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert b.kvlayer_stats()["backend"]["errors"] == 0
