"""The CUDA kernels (``csrc/cuda/*.cu``): chunks that live on a GPU are encoded there.

Why: an engine's KV is on the GPU. Encoding it there (fp8, and int8/int4/int2 with
``scheme: kivi``) before the copy to host memory moves 2-8x fewer bytes over PCIe than copying
the raw chunk and encoding on the CPU, and the result is the same blob, bit for bit (the kernels
follow the torch reference's fp32 arithmetic; ``tests/unit/test_cuda_codec.py`` checks it on a
GPU). The default rotated int scheme (:mod:`kvlayer.codec.rotq`) has no kernel here yet: its GPU
chunks are copied to host memory and encoded by the C++ kernel. The same library holds the
paged gather/scatter that ``kvlayer.ops`` uses.

Build: one shared library from every ``.cu`` file, with ``nvcc`` (``$NVCC``, ``PATH``,
``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``) for the GPU this process sees
(``$KVLAYER_CUDA_ARCH``, e.g. ``90``, overrides), cached like the C++ kernels
(``kvlayer.codec._ext.cached_build``: the file name hashes the sources, flags, nvcc version and
architecture), so only the first process on a machine compiles. Plain C launchers through ctypes:
no torch headers, no coupling to torch's C++ ABI. ``KVLAYER_NO_CUDA=1``, no GPU, no nvcc or a
failed build leave every path on the CPU (reason in :func:`cuda_info`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from kvlayer.codec import _ext

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "--fmad=false"]
_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}



def sources() -> list[Path]:
    return sorted(_ext.source_dir("cuda").glob("*.cu"))


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def device_arch() -> str | None:
    """``"90"`` for an sm_90 GPU: ``$KVLAYER_CUDA_ARCH``, else the current device, else None."""
    env = os.environ.get("KVLAYER_CUDA_ARCH", "").strip().lower().removeprefix("sm_").replace(".", "")
    if env:
        return env
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}{minor}"
    return None


def _nvcc_version(nvcc: str) -> str:
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return nvcc


def build(arch: str | None = None, *, force: bool = False, nvcc: str | None = None) -> Path:
    """Compile the CUDA library for ``arch`` (default :func:`device_arch`; None = nvcc's default)
    into the kernel cache, or find it there; RuntimeError when it cannot be built."""
    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no CUDA sources in {_ext.source_dir('cuda')}")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)")
    arch = arch or device_arch()
    flags = FLAGS + ([f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"] if arch else [])
    key = [p.name.encode() + b"\0" + p.read_bytes() for p in srcs]
    key += [" ".join(flags).encode(), _nvcc_version(nvcc).encode()]
    return _ext.cached_build("kvlayer_cuda", key, lambda tmp: [nvcc, *flags, *map(str, srcs), "-o", tmp],
                             "the CUDA kernels", force)


def _bind(lib: ctypes.CDLL) -> None:
    p, i, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    for name in ("kvl_paged_gather", "kvl_paged_scatter"):
        fn = getattr(lib, name)
        fn.argtypes = [p, p, p, i64, i64, i64, i64, i64, i, p, p]
        fn.restype = i
    lib.kvl_cuda_quantize.argtypes = [p, i, i, i, i, i, i, i, i, i, p, p, p, p, p, p, p]
    lib.kvl_cuda_quantize.restype = i
    lib.kvl_cuda_fp8_encode.argtypes = [p, i, i, i, i, i, i, p, p, p]
    lib.kvl_cuda_fp8_encode.restype = i


def _open() -> tuple[ctypes.CDLL, Path]:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    try:
        path = build()
        lib = ctypes.CDLL(str(path))
        _bind(lib)
    except (RuntimeError, OSError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("kvlayer CUDA kernels unavailable, GPU chunks are encoded on the CPU: %s", e)
        raise
    return lib, path


LIBRARY = _ext.LazyLibrary(_open, "KVLAYER_NO_CUDA")


def library() -> ctypes.CDLL | None:
    """The CUDA library, built on first call in this process; None (reason in :func:`cuda_info`) if unusable."""
    return LIBRARY.get()


def cuda_info() -> dict[str, Any]:
    """``{"backend": "cuda", "path": ..., "arch": ...}`` or ``{"backend": None, "reason": ...}``."""
    if library() is None:
        return {"backend": None, "reason": LIBRARY.reason}
    return {"backend": "cuda", "path": LIBRARY.path, "arch": device_arch()}


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed: CUDA error {rc}")


def stream_of(t: torch.Tensor) -> int:
    return int(torch.cuda.current_stream(t.device).cuda_stream)


def _to_host(buf: torch.Tensor) -> torch.Tensor:
    """The payload in (pinned, recycled by torch's host allocator) CPU memory, copy finished."""
    out = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
    out.copy_(buf, non_blocking=True)
    torch.cuda.current_stream(buf.device).synchronize()
    return out


def _usable(x: torch.Tensor) -> ctypes.CDLL | None:
    if not x.is_cuda or x.dtype not in _DT:
        return None
    return library()


# ----------------------------------------------------------------------------- codec entry points
# Each returns the payload as a CPU uint8 tensor, or None when the CPU path must run instead.


def quantize(x: torch.Tensor, lay: Any) -> torch.Tensor | None:
    """KIVI int8/int4/int2 of a CUDA chunk: ``lay`` (a ``quant.QuantLayout``) of ``x``'s shape."""
    lib = _usable(x)
    if lib is None:
        return None
    x = x.detach().contiguous()
    with torch.cuda.device(x.device):
        buf = torch.empty(lay.total, dtype=torch.uint8, device=x.device)
        ks, kz, vs, vz, codes = lay.views(buf)
        scratch = torch.empty(max(1, lay.L * lay.T * lay.C), dtype=torch.uint8, device=x.device)
        check(lib.kvl_cuda_quantize(
            x.data_ptr(), _DT[x.dtype], lay.L, lay.P, lay.T, lay.H, lay.D, lay.bits, lay.gk, lay.gv,
            ks.data_ptr(), kz.data_ptr(), vs.data_ptr(), vz.data_ptr(), codes.data_ptr(), scratch.data_ptr(),
            stream_of(x)), "kvl_cuda_quantize")  # fmt: skip
        return _to_host(buf)


def fp8_encode(x5: torch.Tensor) -> torch.Tensor | None:
    """fp8 payload (scales ``[L, P, H]`` fp32 | codes) of a CUDA ``[L, P, T, H, D]`` chunk."""
    lib = _usable(x5)
    if lib is None:
        return None
    x5 = x5.detach().contiguous()
    L, P, T, H, D = x5.shape
    ns = L * P * H * 4
    with torch.cuda.device(x5.device):
        buf = torch.empty(ns + x5.numel(), dtype=torch.uint8, device=x5.device)
        check(lib.kvl_cuda_fp8_encode(x5.data_ptr(), _DT[x5.dtype], L, P, T, H, D, buf.data_ptr(),
                                      buf[ns:].data_ptr(), stream_of(x5)), "kvl_cuda_fp8_encode")
        return _to_host(buf)


__all__ = ["build", "cuda_info", "device_arch", "find_nvcc", "fp8_encode", "library", "quantize", "sources"]
