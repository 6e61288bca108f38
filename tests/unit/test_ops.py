"""kvlayer.ops: paged <-> chunk copies (torch reference) and the CUDA kernels (compile here,
parity where a GPU exists)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kvlayer import ops

BS, H, D, NB, L = 32, 2, 16, 9, 3


def cpu_like_cache(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A cache shaped like vLLM's CPU backend: [blocks, heads, block_size, 2*D] per layer, K stored
    transposed as [D, block_size] inside each (block, head) page, V as [block_size, D]."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn((L, NB, H, BS, 2 * D), generator=g).to(dtype)
    views = []
    for layer in range(L):
        page = buf[layer].view(NB, H, 2 * BS * D)
        k = page[:, :, : BS * D].view(NB, H, D, BS).permute(0, 3, 1, 2)  # [NB, BS, H, D]
        v = page[:, :, BS * D:].view(NB, H, BS, D).permute(0, 2, 1, 3)
        views.append((k, v))
    return buf, views


def test_gather_matches_logical_views():
    _, views = cpu_like_cache()
    ids = [5, 1, 7]
    out = ops.gather_layers(views, ids)
    assert out.shape == (L, 2, len(ids) * BS, H, D)
    for layer, (k, v) in enumerate(views):
        for j, b in enumerate(ids):
            assert torch.equal(out[layer, 0, j * BS:(j + 1) * BS], k[b])
            assert torch.equal(out[layer, 1, j * BS:(j + 1) * BS], v[b])


def test_scatter_then_gather_roundtrip_and_leaves_other_blocks():
    buf, views = cpu_like_cache()
    before = buf.clone()
    chunk = torch.randn((L, 2, 2 * BS, H, D))
    ops.scatter_layers(views, [2, 6], chunk)
    assert torch.equal(ops.gather_layers(views, [2, 6]), chunk)
    untouched = [b for b in range(NB) if b not in (2, 6)]
    assert torch.equal(buf[:, untouched], before[:, untouched])
    # the transposed K really lands transposed in the page
    page = buf[0, 2, 1].reshape(-1)[: BS * D].view(D, BS)
    assert torch.equal(page.t(), chunk[0, 0, :BS, 1])


def test_scatter_rejects_wrong_shape():
    _, views = cpu_like_cache()
    with pytest.raises(ValueError):
        ops.scatter_blocks(*views[0], [1], torch.zeros((2, BS + 1, H, D)))
    with pytest.raises(ValueError):
        ops.scatter_layers(views, [1], torch.zeros((L + 1, 2, BS, H, D)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_reference_error_bound(dtype):
    _, views = cpu_like_cache(seed=3, dtype=dtype)
    q, scale = ops.gather_quant_int8(views, [0, 4])
    ref = ops.gather_layers(views, [0, 4]).float()
    assert q.dtype == torch.int8 and scale.shape == (*ref.shape[:-1], 1)
    back = ops.dequantize_int8(q, scale, torch.float32)
    # symmetric rounding: at most half a step per element
    assert bool(((back - ref).abs() <= scale * 0.5 + 1e-6 + ref.abs() * 1e-2 * (dtype != torch.float32)).all())
    assert int(q.abs().max()) == 127


nvcc = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)


@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
def test_cuda_kernels_compile(tmp_path):
    lib = ops.build_cuda_lib(tmp_path, nvcc=nvcc)
    data = lib.read_bytes()
    assert lib.stat().st_size > 10_000
    for sym in (b"kvl_paged_gather", b"kvl_paged_scatter", b"kvl_paged_gather_int8"):
        assert sym in data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (parity of kernels vs torch)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_parity_with_torch(dtype):
    buf, views = cpu_like_cache(seed=1, dtype=dtype)
    gbuf = buf.cuda()
    gviews = []
    for layer in range(L):
        page = gbuf[layer].view(NB, H, 2 * BS * D)
        gviews.append((page[:, :, : BS * D].view(NB, H, D, BS).permute(0, 3, 1, 2),
                       page[:, :, BS * D:].view(NB, H, BS, D).permute(0, 2, 1, 3)))
    ids = [3, 0, 8]
    assert ops._cuda_lib() is not None
    assert torch.equal(ops.gather_layers(gviews, ids).cpu(), ops.gather_layers(views, ids))
    chunk = torch.randn((L, 2, 2 * BS, H, D)).to(dtype)
    ops.scatter_layers(gviews, [1, 5], chunk.cuda())
    ops.scatter_layers(views, [1, 5], chunk)
    assert torch.equal(gbuf.cpu(), buf)
    q, s = ops.cuda_gather_quant_int8(gviews, ids)
    rq, rs = ops.gather_quant_int8(views, ids)
    assert torch.allclose(s.cpu(), rs, rtol=1e-6)
    assert int((q.cpu().int() - rq.int()).abs().max()) <= 1
