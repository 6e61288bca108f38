"""Chunks on a GPU: fp8 and the KIVI int codecs (``scheme: kivi``) are encoded there
(``kvlayer.codec.cuda``), into the very blob the CPU writes; the default rotated int codecs
(``kvlayer.codec.rotq``) have no CUDA kernel: their CUDA chunks are copied to host memory and
encoded by the C++ kernel, the same blob as from a CPU tensor.

The parity tests need a CUDA GPU (``.ci/gpu`` runs them on one); on a machine without one they
skip, and the tests below them check what can be checked here: CPU tensors never reach the CUDA
library, the KIVI codecs consult the GPU path and use its payload as is (checked with a stand-in
for the GPU, which this machine does not have), the rotated codecs never consult it, and a missing
GPU is reported, not raised.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvlayer import KVCache, KVSpec, ops
from kvlayer.codec import _ext, cuda, decode, encode
from kvlayer.codec.quant import quantize_torch

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CODECS = ["int8", "int4", "int2", "fp8", "int4+lz4", "fp8+lz4"]
#: (codec, params) on a GPU: the KIVI int codecs and fp8 run the CUDA kernels; the rotated
#: (default) int codecs run on the host copy, which must give the same blob too.
GPU_CASES = [(c, {"scheme": "kivi"} if c.startswith("int") else {}) for c in CODECS] + [
    (c, {}) for c in CODECS if c.startswith("int")]
GPU_IDS = [f"{c}-{p.get('scheme', 'rot' if c.startswith('int') else '')}".rstrip("-") for c, p in GPU_CASES]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def chunk(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, special: bool = False) -> torch.Tensor:
    """Outlier channels like real keys; with ``special``: NaN, +-inf, -0 and subnormals in places."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-1])
    if special:
        flat = x.view(-1)
        flat[3], flat[17], flat[40] = float("nan"), float("inf"), -float("inf")
        flat[5:9] = -0.0
        flat[60:64] = 1e-40
    return x.to(dtype)


def cpu_blob(x: torch.Tensor, codec: str, **params: object) -> bytes:
    with _ext.use_backend("torch"):  # the reference every backend must equal
        return bytes(encode(x, codec, **params))


# ----------------------------------------------------------------------------- on a GPU


@GPU
@pytest.mark.parametrize(("codec", "params"), GPU_CASES, ids=GPU_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2, 45, 2, 40), (2, 2, 256, 3, 64), (2, 1, 33, 1, 72), (2, 1, 20, 48)],
                         ids=["partial-groups", "smollm2-chunk", "mla", "mla-4d"])
def test_gpu_encode_is_the_cpu_blob_bit_for_bit(codec: str, params: dict[str, object], dtype: torch.dtype,
                                                shape: tuple[int, ...]) -> None:
    assert cuda.library() is not None, cuda.cuda_info()
    x = chunk(shape, dtype, seed=len(shape) + shape[2])
    assert bytes(encode(x.cuda(), codec, **params)) == cpu_blob(x, codec, **params)


@GPU
@pytest.mark.parametrize(("codec", "params"), [c for c in GPU_CASES if "+" not in c[0]],
                         ids=[i for i, c in zip(GPU_IDS, GPU_CASES, strict=True) if "+" not in c[0]])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_encode_matches_on_nan_inf_signed_zero_and_subnormals(codec: str, params: dict[str, object],
                                                                  dtype: torch.dtype) -> None:
    x = chunk((2, 2, 40, 2, 32), dtype, seed=5, special=True)
    assert bytes(encode(x.cuda(), codec, **params)) == cpu_blob(x, codec, **params)
    y = chunk((2, 2, 40, 2, 32), dtype, seed=6)
    y[0, 0, :8] = -0.0  # a whole key group of -0: its zero point must be +0 as on the CPU
    assert bytes(encode(y.cuda(), codec, **params)) == cpu_blob(y, codec, **params)


@GPU
@pytest.mark.parametrize("group", [1, 7, 32, 64])
@pytest.mark.parametrize("scheme", ["kivi", "rot"])
def test_gpu_encode_group_sizes(group: int, scheme: str) -> None:
    x = chunk((2, 2, 50, 2, 64), torch.float16, seed=group)
    for codec in ("int8", "int4", "int2"):
        got = encode(x.cuda(), codec, group_size=group, scheme=scheme)
        assert bytes(got) == cpu_blob(x, codec, group_size=group, scheme=scheme)


@GPU
def test_gathered_gpu_chunk_stored_and_read_back_as_from_the_cpu() -> None:
    """The connector's save path on a GPU: paged gather on the GPU, encode on the GPU, store."""
    spec = KVSpec(model="gpu-test", num_layers=2, num_kv_heads=2, head_dim=32, dtype="float16")
    pages = chunk((2, 2, 8 * 16, 2, 32), torch.float16, seed=9).view(2, 2, 8, 16, 2, 32)
    views = [(pages[i, 0].cuda(), pages[i, 1].cuda()) for i in range(2)]  # [blocks, block_size, heads, dim]
    gpu_chunk = ops.gather_layers(views, [6, 2])
    assert gpu_chunk.is_cuda
    cpu_chunk = ops.gather_layers([(k.cpu(), v.cpu()) for k, v in views], [6, 2])
    with KVCache(spec, chunk_size=32, cpu_bytes="64MiB", cpu_codec="int4") as gpu_cache, \
            KVCache(spec, chunk_size=32, cpu_bytes="64MiB", cpu_codec="int4") as cpu_cache:
        tokens = list(range(32))
        assert gpu_cache.store(tokens, gpu_chunk) == cpu_cache.store(tokens, cpu_chunk) == 1
        _, a = gpu_cache.retrieve(tokens)
        _, b = cpu_cache.retrieve(tokens)
        assert a is not None and b is not None and torch.equal(a, b) and not a.is_cuda


# ----------------------------------------------------------------------------- everywhere


def test_cpu_tensors_never_reach_the_cuda_library(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> None:
        raise AssertionError("the CUDA library was loaded for a CPU tensor")

    monkeypatch.setattr(cuda, "library", boom)
    x = chunk((2, 2, 40, 2, 16), torch.float16)
    for codec in CODECS:
        assert decode(encode(x, codec)).shape == x.shape


def test_kivi_codecs_take_the_gpu_payload_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """The KIVI hook in rotq.py: what ``cuda.quantize`` returns (here a stand-in for the GPU,
    computed by the torch reference) is the payload, byte for byte. (fp8's hook is taken for CUDA
    tensors only, so only the GPU tests above reach it.)"""
    seen: list[str] = []

    def fake_quantize(x: torch.Tensor, lay: object) -> torch.Tensor:
        seen.append("quant")
        buf = torch.empty(lay.total, dtype=torch.uint8)  # type: ignore[attr-defined]
        quantize_torch(x, lay, lay.views(buf))  # type: ignore[arg-type, attr-defined]
        return buf

    x = chunk((2, 2, 45, 2, 40), torch.bfloat16, seed=3)
    want = cpu_blob(x, "int4", scheme="kivi")
    monkeypatch.setattr(cuda, "quantize", fake_quantize)
    assert bytes(encode(x, "int4", scheme="kivi")) == want and seen == ["quant"]
    monkeypatch.setattr(cuda, "quantize", lambda x, lay: torch.zeros(lay.total, dtype=torch.uint8))
    y = decode(encode(x, "int8", scheme="kivi"))  # all-zero meta and codes: zeros, proving the payload was used
    assert torch.equal(y, torch.zeros_like(y))


def test_rotated_codecs_never_consult_the_gpu_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (rotated) int codecs have no CUDA kernel: the GPU hook is never called, and the
    blob is the C++ kernel's (bit-identical to the torch reference)."""
    def boom(*_: object) -> None:
        raise AssertionError("the rotated codec called the CUDA path")

    monkeypatch.setattr(cuda, "quantize", boom)
    monkeypatch.setattr(cuda, "library", boom)
    x = chunk((2, 2, 45, 2, 64), torch.float16, seed=4)
    for codec in ("int8", "int4", "int2", "int4+lz4"):
        blob = encode(x, codec)
        assert bytes(blob) == cpu_blob(x, codec)
        assert decode(blob).shape == x.shape


def test_no_gpu_is_reported_not_raised() -> None:
    env = {**os.environ, "KVLAYER_NO_CUDA": "1"}
    code = ("from kvlayer.codec import cuda; import torch; x = torch.ones(1, 2, 4, 1, 8).half()\n"
            "assert cuda.quantize(x, None) is None and cuda.fp8_encode(x) is None\n"
            "print(cuda.cuda_info())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    info = out.stdout.strip()
    assert "'backend': None" in info and "KVLAYER_NO_CUDA" in info
    if not torch.cuda.is_available():
        assert cuda.cuda_info() == {"backend": None, "reason": "no CUDA device"}
