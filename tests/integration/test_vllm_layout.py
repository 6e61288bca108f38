"""Layout adapters against vLLM's real CPU cache-write kernel (no engine needed, ~1 s), and the
connector's config handling."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("vllm")

from kvlayer.connectors.vllm.config import check_chunk_size, parse_extra_config  # noqa: E402
from kvlayer.connectors.vllm.layout import (  # noqa: E402
    IndexAdapter,
    StridedAdapter,
    make_adapter,
    probe_layout,
    table_layout,
)

from kvlayer.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.vllm

NB, H, BS, D, L = 6, 2, 128, 32, 2


def cpu_layer(dtype: torch.dtype) -> types.SimpleNamespace:
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    from tests.fixtures.tiny_model import tiny_model_dir

    cfg = VllmConfig(model_config=ModelConfig(model=tiny_model_dir(), dtype=dtype))
    with set_current_vllm_config(cfg):
        impl = CPUAttentionBackendImpl(num_heads=4, head_size=D, scale=D**-0.5, num_kv_heads=H, alibi_slopes=None,
                                       sliding_window=None, kv_cache_dtype="auto")
    return types.SimpleNamespace(impl=impl, isa=_get_attn_isa(dtype, BS, D), _k_scale_float=1.0, _v_scale_float=1.0)


def vllm_write(layer, cache: torch.Tensor, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
    slots = torch.arange(block * BS, (block + 1) * BS, dtype=torch.long)
    layer.impl.do_kv_cache_update(layer, k.contiguous(), v.contiguous(), cache, slots)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_probe_matches_vllm_cpu_kernel(dtype):
    layer = cpu_layer(dtype)
    buf = torch.zeros((L, NB, H, BS, 2 * D), dtype=dtype)  # layers share one buffer, like vLLM
    caches = [buf[i] for i in range(L)]
    layout = probe_layout(layer, caches[0], num_blocks=NB, block_size=BS, num_heads=H, head_dim=D)
    assert layout.k.affine() is not None and layout.v.affine() is not None
    adapter = make_adapter(caches, layout)
    assert isinstance(adapter, StridedAdapter)
    g = torch.Generator().manual_seed(0)
    k = [torch.randn((BS, H, D), generator=g).to(dtype) for _ in range(L)]
    v = [torch.randn((BS, H, D), generator=g).to(dtype) for _ in range(L)]
    for i in range(L):
        vllm_write(layer, caches[i], 3, k[i], v[i])
    chunk = adapter.gather([3])
    for i in range(L):
        assert torch.equal(chunk[i, 0], k[i]) and torch.equal(chunk[i, 1], v[i])
    # scatter writes exactly the bytes vLLM's own kernel writes
    other = torch.zeros_like(buf)
    make_adapter([other[i] for i in range(L)], layout).scatter([3], chunk)
    assert torch.equal(other, buf)
    # the generic index path agrees with the strided one
    idx = IndexAdapter(caches, layout)
    assert torch.equal(idx.gather([3, 1]), adapter.gather([3, 1]))
    other.zero_()
    IndexAdapter([other[i] for i in range(L)], layout).scatter([3], chunk)
    assert torch.equal(other, buf)


def test_probe_requires_a_write_op():
    with pytest.raises(Exception, match="do_kv_cache_update"):
        probe_layout(types.SimpleNamespace(impl=object()), torch.zeros((NB, H, BS, 2 * D)), num_blocks=NB,
                     block_size=BS, num_heads=H, head_dim=D)


def test_flash_table_layout_views():
    # flash-attention layout of ENGINES.md, on CPU tensors (the backend itself needs a GPU)
    kv = torch.randn((NB, H, 16, 2 * D))
    layout = table_layout("FLASH_ATTN", kv, num_blocks=NB, block_size=16, num_heads=H, head_dim=D)
    a = make_adapter([kv], layout)
    k, v = kv.transpose(1, 2).split(D, -1)
    chunk = a.gather([4, 2])
    assert torch.equal(chunk[0, 0], torch.cat([k[4], k[2]])) and torch.equal(chunk[0, 1], torch.cat([v[4], v[2]]))


def test_extra_config_and_env_precedence(tmp_path):
    f = tmp_path / "kv.yaml"
    f.write_text("chunk_size: 512\ncpu_bytes: 1GiB\n")
    cfg, opts = parse_extra_config({"config_file": str(f), "cpu_bytes": "2GiB", "save_generated": True},
                                   env={"KVLAYER_CHUNK_SIZE": "384", "KVLAYER_DISK_PATH": str(tmp_path)})
    assert cfg.chunk_size == 384 and cfg.cpu_bytes == 2 << 30 and cfg.disk_path == str(tmp_path)
    assert opts.save_generated is True
    with pytest.raises(ConfigError, match="chunk_sise"):
        parse_extra_config({"chunk_sise": 256}, env={})


def test_chunk_size_must_be_a_multiple_of_the_block_size():
    check_chunk_size(256, 128)
    with pytest.raises(ConfigError, match="multiple of vLLM's block size 128"):
        check_chunk_size(200, 128)


def test_worker_saves_in_background_when_the_top_tier_is_not_memory(tmp_path):
    from kvlayer.connectors.vllm.metadata import ConnectorMeta, LoadOp, SaveOp
    from kvlayer.connectors.vllm.worker import WorkerSide

    from kvlayer import KVCache, KVSpec

    dtype = torch.bfloat16
    layer = cpu_layer(dtype)
    buf = torch.randn((L, NB, H, BS, 2 * D)).to(dtype)
    caches = [buf[i] for i in range(L)]
    layout = probe_layout(layer, caches[0], num_blocks=NB, block_size=BS, num_heads=H, head_dim=D)
    spec = KVSpec(model="unit", num_layers=L, num_kv_heads=H, head_dim=D, dtype="bfloat16")
    cache = KVCache(spec, chunk_size=2 * BS, cpu_bytes=0, disk_path=str(tmp_path / "disk"), disk_codec="raw")
    w = WorkerSide(cache, block_size=BS, num_blocks=NB, layer_names=[])
    counters = w.counters
    w.adapter = make_adapter(caches, layout)
    key = "ab" * 32
    w.save(ConnectorMeta(saves=[SaveOp("r1", key, [1, 4])]))  # gathered now, written in the background
    w.flush()
    w.close()
    assert counters.saved_chunks == 1 and cache.locate([key]) == ["disk"]
    (got,) = cache.retrieve_chunks([key])
    assert got is not None and torch.equal(got, w.adapter.gather([1, 4]))
    # and a load writes it back into other blocks, bit for bit
    w.start_load(ConnectorMeta(loads=[LoadOp("r2", [key], [[2, 5]], [0])]))
    assert torch.equal(w.adapter.gather([2, 5]), got) and counters.loaded_tokens == 2 * BS
    cache.close()
