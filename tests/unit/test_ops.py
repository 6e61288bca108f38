"""kvlayer.ops: paged <-> chunk copies (torch reference) and the CUDA kernels (compile here,
parity where a GPU exists)."""

from __future__ import annotations

import pytest
import torch

from kvlayer import ops
from kvlayer.codec import cuda

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


def gpu_views(buf: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same strided views as ``cpu_like_cache`` over a copy of ``buf`` on the GPU."""
    views = []
    for layer in range(L):
        page = buf[layer].view(NB, H, 2 * BS * D)
        views.append((page[:, :, : BS * D].view(NB, H, D, BS).permute(0, 3, 1, 2),
                      page[:, :, BS * D:].view(NB, H, BS, D).permute(0, 2, 1, 3)))
    return views


@pytest.mark.skipif(cuda.find_nvcc() is None, reason="nvcc not installed")
def test_cuda_library_compiles_once_per_source_hash(tmp_path, monkeypatch):
    """Compile-only here (no GPU needed): one library with the paged copies and the codec
    kernels, cached by the hash of the sources, flags, nvcc and architecture."""
    monkeypatch.setenv("KVLAYER_EXT_CACHE", str(tmp_path))
    lib = cuda.build(arch="80")
    data = lib.read_bytes()
    for sym in (b"kvl_paged_gather", b"kvl_paged_scatter", b"kvl_cuda_quantize", b"kvl_cuda_fp8_encode"):
        assert sym in data
    mtime = lib.stat().st_mtime_ns
    assert cuda.build(arch="80") == lib and lib.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert cuda.build(arch="90") != lib  # another GPU generation: its own file


def test_cpu_tensors_never_touch_the_cuda_library(monkeypatch):
    """Without a GPU (or for CPU views) the torch path runs and nothing is compiled."""
    calls = []
    monkeypatch.setattr(cuda, "library", lambda: calls.append(1))
    _, views = cpu_like_cache()
    ops.gather_layers(views, [0, 1])
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (parity of kernels vs torch)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_parity_with_torch(dtype):
    buf, views = cpu_like_cache(seed=1, dtype=dtype)
    gbuf = buf.cuda()
    gviews = gpu_views(gbuf)
    ids = [3, 0, 8]
    assert cuda.library() is not None, cuda.cuda_info()
    assert torch.equal(ops.gather_layers(gviews, ids).cpu(), ops.gather_layers(views, ids))
    chunk = torch.randn((L, 2, 2 * BS, H, D)).to(dtype)
    ops.scatter_layers(gviews, [1, 5], chunk.cuda())
    ops.scatter_layers(views, [1, 5], chunk)
    assert torch.equal(gbuf.cpu(), buf)
