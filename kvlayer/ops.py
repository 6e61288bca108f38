"""Paged cache <-> chunk tensor copies, the reference implementation in torch.

An engine keeps KV in pages ("blocks") of ``block_size`` tokens whose inner layout depends on the
attention backend. A layout adapter (``kvlayer.connectors.vllm.layout``) turns each layer's
cache into two *logical* views ``K, V: [num_blocks, block_size, kv_heads, head_dim]`` (any
strides, no copy); the functions here only see those views, so they are backend-agnostic:

    chunk = gather_layers(views, block_ids)          # [layers, 2, n*block_size, heads, dim]
    scatter_layers(views, block_ids, chunk)          # the reverse

When the tensors live on a CUDA device and kvlayer's CUDA library builds
(:mod:`kvlayer.codec.cuda`, from ``csrc/cuda/paged_copy.cu``), ``gather_layers`` and
``scatter_layers`` run one kernel for all layers and blocks instead of two copies per layer;
everything else (and every CPU tensor) takes the torch path, which is what the tests compare the
kernels against. A gathered chunk stays on the GPU, where a quantizing codec encodes it
(``kvlayer.codec.cuda``) before anything crosses PCIe.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch

from kvlayer.codec import cuda

KVViews = Sequence[tuple[torch.Tensor, torch.Tensor]]


def _ids(block_ids: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(block_ids, torch.Tensor):
        return block_ids.to(device=device, dtype=torch.long)
    return torch.as_tensor(list(block_ids), dtype=torch.long, device=device)


def gather_blocks(k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor | Sequence[int],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """One layer: blocks ``block_ids`` of the logical views -> ``[2, n*block_size, heads, dim]``."""
    ids = _ids(block_ids, k.device)
    n, bs, h, d = len(ids), k.shape[1], k.shape[2], k.shape[3]
    if out is None:
        out = torch.empty((2, n * bs, h, d), dtype=k.dtype, device=k.device)
    out[0].view(n, bs, h, d).copy_(k.index_select(0, ids))
    out[1].view(n, bs, h, d).copy_(v.index_select(0, ids))
    return out


def scatter_blocks(k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor | Sequence[int],
                   src: torch.Tensor) -> None:
    """One layer: write ``src [2, n*block_size, heads, dim]`` into blocks ``block_ids``."""
    ids = _ids(block_ids, k.device)
    n, bs, h, d = len(ids), k.shape[1], k.shape[2], k.shape[3]
    if src.shape != (2, n * bs, h, d):
        raise ValueError(f"scatter_blocks: src {tuple(src.shape)} != {(2, n * bs, h, d)}")
    src = src.to(device=k.device, dtype=k.dtype)
    k.index_copy_(0, ids, src[0].reshape(n, bs, h, d))
    v.index_copy_(0, ids, src[1].reshape(n, bs, h, d))


def gather_layers(views: KVViews, block_ids: torch.Tensor | Sequence[int],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """All layers: -> canonical chunk ``[layers, 2, n*block_size, heads, dim]``."""
    k0 = views[0][0]
    ids = _ids(block_ids, k0.device)
    n, bs, h, d = len(ids), k0.shape[1], k0.shape[2], k0.shape[3]
    if out is None:
        out = torch.empty((len(views), 2, n * bs, h, d), dtype=k0.dtype, device=k0.device)
    if k0.is_cuda and _cuda_lib() is not None:
        _cuda_gather(views, ids, out)
        return out
    for layer, (k, v) in enumerate(views):
        gather_blocks(k, v, ids, out[layer])
    return out


def scatter_layers(views: KVViews, block_ids: torch.Tensor | Sequence[int], chunk: torch.Tensor) -> None:
    """All layers: canonical ``chunk [layers, 2, n*block_size, heads, dim]`` -> blocks."""
    if chunk.shape[0] != len(views):
        raise ValueError(f"scatter_layers: chunk has {chunk.shape[0]} layers, cache has {len(views)}")
    k0 = views[0][0]
    ids = _ids(block_ids, k0.device)
    if k0.is_cuda and _cuda_lib() is not None:
        _cuda_scatter(views, ids, chunk.to(device=k0.device, dtype=k0.dtype).contiguous())
        return
    for layer, (k, v) in enumerate(views):
        scatter_blocks(k, v, ids, chunk[layer])


# ---------------------------------------------------------------------------------------- CUDA
def _cuda_lib() -> ctypes.CDLL | None:
    return cuda.library()


def _layer_meta(views: KVViews, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer and plane: base address; per plane: (block, token, head, dim) strides in elements."""
    ptrs = torch.tensor([[t.data_ptr() for t in kv] for kv in views], dtype=torch.int64, device=device)
    k, v = views[0]
    strides = torch.tensor([list(k.stride()), list(v.stride())], dtype=torch.int64, device=device)
    for kk, vv in views:
        if kk.stride() != k.stride() or vv.stride() != v.stride():
            raise ValueError("all layers must share one layout to use the CUDA kernels")
    return ptrs, strides


def _cuda_paged_copy(fn_name: str, views: KVViews, ids: torch.Tensor, buf: torch.Tensor) -> None:
    """Run ``kvl_paged_gather`` (paged -> ``buf``) or ``kvl_paged_scatter`` (``buf`` -> paged)."""
    lib = cuda.library()
    assert lib is not None
    k = views[0][0]
    ptrs, strides = _layer_meta(views, k.device)
    cuda.check(getattr(lib, fn_name)(ptrs.data_ptr(), strides.data_ptr(), ids.data_ptr(), len(ids), len(views),
                                     k.shape[1], k.shape[2], k.shape[3], k.element_size(), buf.data_ptr(),
                                     cuda.stream_of(k)), fn_name)


def _cuda_gather(views: KVViews, ids: torch.Tensor, out: torch.Tensor) -> None:
    _cuda_paged_copy("kvl_paged_gather", views, ids, out)


def _cuda_scatter(views: KVViews, ids: torch.Tensor, src: torch.Tensor) -> None:
    _cuda_paged_copy("kvl_paged_scatter", views, ids, src)
