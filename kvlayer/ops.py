"""Paged cache <-> chunk tensor copies, the reference implementation in torch.

An engine keeps KV in pages ("blocks") of ``block_size`` tokens whose inner layout depends on the
attention backend. A layout adapter (``kvlayer.connectors.vllm.layout``) turns each layer's
cache into two *logical* views ``K, V: [num_blocks, block_size, kv_heads, head_dim]`` (any
strides, no copy); the functions here only see those views, so they are backend-agnostic:

    chunk = gather_layers(views, block_ids)          # [layers, 2, n*block_size, heads, dim]
    scatter_layers(views, block_ids, chunk)          # the reverse

``quantize_int8`` / ``gather_quant_int8`` are the reference for the fused CUDA kernel in
``csrc/cuda/paged_copy.cu`` (one int8 value per element, one fp32 scale per token and head).
When that kernel library is built and the tensors live on a CUDA device, ``gather_layers`` and
``scatter_layers`` use it; everything else (and every CPU tensor) takes the torch path, which is
what the tests compare the kernels against.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KVViews = Sequence[tuple[torch.Tensor, torch.Tensor]]

CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "paged_copy.cu"


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


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last axis: ``(q int8, scale fp32 [..., 1])``, ``x ~= q * scale``."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def gather_quant_int8(views: KVViews, block_ids: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather + per-(token, head) int8 quantization: what the fused kernel computes in one pass."""
    return quantize_int8(gather_layers(views, block_ids))


# ---------------------------------------------------------------------------------------- CUDA
_LIB: ctypes.CDLL | None | bool = False  # False = not tried yet


def build_cuda_lib(out_dir: str | os.PathLike[str] | None = None, *, nvcc: str | None = None,
                   arch: str | None = None) -> Path:
    """Compile ``csrc/cuda/paged_copy.cu`` into a shared library with nvcc (no torch headers:
    plain C launchers called through ctypes, so the build is independent of torch's ABI)."""
    nvcc = nvcc or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    out = Path(out_dir or os.environ.get("KVLAYER_EXT_CACHE") or Path.home() / ".cache" / "kvlayer" / "ext")
    out.mkdir(parents=True, exist_ok=True)
    lib = out / "libkvlayer_paged_copy.so"
    cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", str(CSRC), "-o", str(lib)]
    if arch:
        cmd[1:1] = [f"-arch={arch}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return lib


def _cuda_lib() -> ctypes.CDLL | None:
    """The kernel library when CUDA is usable and it builds (once per process), else None."""
    global _LIB
    if _LIB is not False:
        return _LIB or None  # type: ignore[return-value]
    _LIB = None
    if os.environ.get("KVLAYER_DISABLE_CUDA_OPS") or not torch.cuda.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(build_cuda_lib()))
        for name in ("kvl_paged_gather", "kvl_paged_scatter", "kvl_paged_gather_int8"):
            getattr(lib, name).restype = ctypes.c_int
        _LIB = lib
    except Exception as e:  # the torch path is always there
        log.warning("kvlayer CUDA ops unavailable, using torch: %s", e)
    return _LIB or None  # type: ignore[return-value]


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
    lib = _cuda_lib()
    assert lib is not None
    k = views[0][0]
    ptrs, strides = _layer_meta(views, k.device)
    rc = getattr(lib, fn_name)(
        ctypes.c_void_p(ptrs.data_ptr()), ctypes.c_void_p(strides.data_ptr()), ctypes.c_void_p(ids.data_ptr()),
        ctypes.c_int64(len(ids)), ctypes.c_int64(len(views)), ctypes.c_int64(k.shape[1]), ctypes.c_int64(k.shape[2]),
        ctypes.c_int64(k.shape[3]), ctypes.c_int(k.element_size()), ctypes.c_void_p(buf.data_ptr()),
        ctypes.c_void_p(torch.cuda.current_stream(k.device).cuda_stream))
    if rc != 0:
        raise RuntimeError(f"{fn_name} failed: CUDA error {rc}")


def _cuda_gather(views: KVViews, ids: torch.Tensor, out: torch.Tensor) -> None:
    _cuda_paged_copy("kvl_paged_gather", views, ids, out)


def _cuda_scatter(views: KVViews, ids: torch.Tensor, src: torch.Tensor) -> None:
    _cuda_paged_copy("kvl_paged_scatter", views, ids, src)


def cuda_gather_quant_int8(views: KVViews, block_ids: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gather + int8 (CUDA only); same contract as ``gather_quant_int8``."""
    lib = _cuda_lib()
    if lib is None:
        raise RuntimeError("CUDA kernels are not available")
    k = views[0][0]
    ids = _ids(block_ids, k.device)
    n, bs, h, d = len(ids), k.shape[1], k.shape[2], k.shape[3]
    q = torch.empty((len(views), 2, n * bs, h, d), dtype=torch.int8, device=k.device)
    scale = torch.empty((len(views), 2, n * bs, h, 1), dtype=torch.float32, device=k.device)
    ptrs, strides = _layer_meta(views, k.device)
    dtype_code = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}[k.dtype]
    rc = lib.kvl_paged_gather_int8(
        ctypes.c_void_p(ptrs.data_ptr()), ctypes.c_void_p(strides.data_ptr()), ctypes.c_void_p(ids.data_ptr()),
        ctypes.c_int64(n), ctypes.c_int64(len(views)), ctypes.c_int64(bs), ctypes.c_int64(h), ctypes.c_int64(d),
        ctypes.c_int(dtype_code), ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(scale.data_ptr()),
        ctypes.c_void_p(torch.cuda.current_stream(k.device).cuda_stream))
    if rc != 0:
        raise RuntimeError(f"kvl_paged_gather_int8 failed: CUDA error {rc}")
    return q, scale
