"""C++ codec kernels == torch reference, bit for bit (NaN included), and the CUDA sources compile.

The C++ library is built (or found) in the normal extension cache (``KVLAYER_EXT_CACHE``, ...);
the tests skip with the reason when no compiler is found or ``KVLAYER_NO_EXT=1`` is set. Both backends must also produce byte-identical *blobs*, so a chunk stored
by a machine with the kernels decodes identically on one without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvlayer.codec import _ext, backend_info, decode, encode
from kvlayer.codec.fp8 import fp8_decode_torch, fp8_encode_torch
from kvlayer.codec.lz4 import shuffle, unshuffle
from kvlayer.codec.quant import dequantize_torch, make_layout, quantize_torch
from tests.unit.test_codecs import legacy_mixed_blob

REPO = Path(__file__).resolve().parents[2]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    if _ext.find_compiler() is None:
        pytest.skip("no C++ compiler (g++/c++/$CXX) found: the C++ codec kernels cannot be built")
    if not _ext.SOURCE.exists():
        pytest.skip(f"kernel source {_ext.SOURCE} missing")
    path = _ext.build()
    assert path.exists()
    lib = _ext.load()
    if lib is None:
        pytest.skip(f"C++ kernels not loaded: {_ext.backend_info()}")
    return lib


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    )


def _shapes(n: int, seed: int) -> list[tuple[tuple[int, ...], torch.dtype, int, int, int, bool]]:
    g = torch.Generator().manual_seed(seed)

    def r(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (), generator=g))

    out = []
    for i in range(n):
        P = r(1, 2)
        shape = (r(1, 3), P, r(1, 70), 1 if P == 1 and i % 2 else r(1, 3), r(1, 70))
        out.append((shape, DTYPES[i % 3], [8, 4, 2][(i // 3) % 3], [1, 5, 32, 64][i % 4], [1, 7, 32, 64][(i // 2) % 4], i % 4 == 0))
    # Edge sizes: one token, one channel, group == tokens, group > everything, a 256-token real shape.
    out += [
        ((1, 2, 1, 1, 1), torch.float16, 4, 32, 32, False),
        ((2, 2, 32, 2, 32), torch.float16, 2, 32, 32, False),
        ((1, 1, 3, 1, 5), torch.bfloat16, 2, 64, 64, False),
        ((30, 2, 256, 3, 64), torch.float16, 4, 32, 32, True),
        ((2, 1, 17, 1, 512), torch.bfloat16, 8, 32, 32, False),
    ]
    return out


def _input(shape: tuple[int, ...], dtype: torch.dtype, nonfinite: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** int(torch.randint(-3, 4, (), generator=g))
    x = torch.randn(shape, generator=g) * mag
    if nonfinite:
        idx = torch.randint(0, x.numel(), (3,), generator=g)
        x.view(-1)[idx] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        x.view(-1)[0] = -float("nan")  # a negative NaN: must still come out canonical
    return x.to(dtype)


@pytest.mark.parametrize("case", range(len(_shapes(60, 0))))
def test_quant_kernels_match_torch(lib: object, case: int) -> None:
    shape, dtype, bits, gk, gv, nonfinite = _shapes(60, 0)[case]
    x = _input(shape, dtype, nonfinite, case)
    lay = make_layout(shape, dtype, bits, gk, gv)
    b_ref = torch.zeros(lay.total, dtype=torch.uint8)
    b_cpp = torch.full((lay.total,), 0xAB, dtype=torch.uint8)  # every byte must be written
    quantize_torch(x, lay, lay.views(b_ref))
    with _ext.use_backend("cpp"):
        assert _ext.quantize(x, lay, lay.views(b_cpp))
    assert torch.equal(b_ref, b_cpp), f"payload differs at {(b_ref != b_cpp).nonzero()[:5].view(-1).tolist()}"
    y_ref = dequantize_torch(lay.views(b_ref), lay, dtype)
    with _ext.use_backend("cpp"):
        y_cpp = _ext.dequantize(lay.views(b_ref), lay, dtype)
    assert y_cpp is not None and _same_bits(y_ref, y_cpp)


def _rot_cases() -> list[tuple[tuple[int, ...], torch.dtype, int, int, int, bool, bool]]:
    """(shape, dtype, bits, gk, gv, nonfinite, sink): random odd shapes plus head_dim 64 (the
    vectorised fast path) and power-of-two head dims (rotated) with an attention-sink-like token."""
    cases = [(*c, i % 3 == 0) for i, c in enumerate(_shapes(40, 2))]
    for i, dtype in enumerate(DTYPES):
        for bits in (8, 4, 2):
            cases.append(((3, 2, 100 + 7 * i, 2, 64), dtype, bits, 32, 32, bits == 4, True))
            cases.append(((2, 2, 64, 3, 32 if i else 128), dtype, bits, 16, 16, False, True))
        cases.append(((4, 1, 50, 1, 64), dtype, 4, 32, 32, False, True))  # MLA
        cases.append(((2, 2, 40, 2, 64), dtype, 4, 32, 48, True, False))  # partial V groups
        cases.append(((2, 2, 70, 2, 64), dtype, 8, 16, 16, True, True))  # one V scale per vector
        cases.append(((2, 2, 33, 3, 64), dtype, 4, 8, 64, True, False))  # one V scale per head
    return cases


@pytest.mark.parametrize("case", range(len(_rot_cases())))
def test_rot_blobs_match_torch(lib: object, case: int) -> None:
    """Rotated int codecs: the C++ blob (outlier search included) is the torch reference's, byte
    for byte, and both decoders agree bit for bit (NaN included)."""
    shape, dtype, bits, gk, gv, nonfinite, sink = _rot_cases()[case]
    x = _input(shape, dtype, nonfinite, 500 + case).float()
    if sink and shape[2] >= 16:
        x[:, 0, 0] = x[:, 0, 0] * 0.1 + 10 * x.abs().max()
    if dtype != torch.float16 and case % 5 == 1:  # near the float range: the transform may overflow to inf - inf
        x = x / x.abs().amax().clamp_min(1e-30) * 3e37
    x = x.to(dtype)
    # RoPE-aware keys (``rope_theta``; ignored for MLA's one plane and odd head dims) on both paths.
    for rotate, rope in ((True, 0.0), (False, 0.0), (True, 10000.0), (False, 500.0)):
        params = {"k_group_size": gk, "v_group_size": gv, "rotate": rotate, "rope_theta": rope}
        with _ext.use_backend("torch"):
            b_t = bytes(encode(x, f"int{bits}", **params))
        with _ext.use_backend("cpp"):
            b_c = bytes(encode(x, f"int{bits}", **params))
        assert b_t == b_c, f"blobs differ at {[i for i in range(min(len(b_t), len(b_c))) if b_t[i] != b_c[i]][:5]}"
        with _ext.use_backend("torch"):
            y_t = decode(b_c)
        with _ext.use_backend("cpp"):
            y_c = decode(b_t)
        assert _same_bits(y_t, y_c)


_ISA_CHECK = """
import sys, torch
from kvlayer.codec import _ext, decode, encode
assert _ext.backend_info()["backend"] == "cpp", _ext.backend_info()
for i, shape in enumerate([(3, 2, 70, 3, 64), (2, 2, 33, 2, 32), (2, 1, 20, 1, 128), (2, 2, 40, 2, 40)]):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 3
        x[:, 0, 0] += 40
        x = x.to(dtype)
        for codec, rope in [(c, r) for c in ("int8", "int4", "int2") for r in (0.0, 10000.0)]:
            with _ext.use_backend("torch"):
                ref = bytes(encode(x, codec, rope_theta=rope)); y_ref = decode(ref)
            with _ext.use_backend("cpp"):
                got = bytes(encode(x, codec, rope_theta=rope)); y = decode(ref)
            assert got == ref, (shape, dtype, codec, rope)
            assert torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8)), (shape, dtype, codec, rope)
print("ok")
"""


@pytest.mark.parametrize("isa", ["-mno-avx512f", "-mno-avx2"], ids=["avx2", "sse"])
def test_rot_kernels_without_avx512_match_torch(lib: object, isa: str, tmp_path: Path) -> None:
    """The AVX2 and the scalar paths (what a machine without AVX-512 runs) give the same blobs:
    built with ``isa`` appended to the flags (a compiler wrapper), in a fresh extension cache."""
    cxx = _ext.find_compiler()
    assert cxx is not None
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\nexec "{cxx}" "$@" {isa}\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "CXX": str(wrapper), "KVLAYER_EXT_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", _ISA_CHECK], env=env, capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("case", range(len(_shapes(30, 1))))
def test_fp8_kernels_match_torch(lib: object, case: int) -> None:
    shape, dtype, _, _, _, nonfinite = _shapes(30, 1)[case]
    x = _input(shape, dtype, nonfinite, 1000 + case)
    L, P, T, H, D = shape
    s_ref, c_ref = torch.zeros(L, P, H), torch.zeros(shape, dtype=torch.uint8)
    s_cpp, c_cpp = torch.full((L, P, H), 7.0), torch.full(shape, 0xAB, dtype=torch.uint8)
    fp8_encode_torch(x, s_ref, c_ref)
    with _ext.use_backend("cpp"):
        assert _ext.fp8_encode(x, s_cpp, c_cpp)
    assert _same_bits(s_ref, s_cpp) and torch.equal(c_ref, c_cpp)
    with _ext.use_backend("cpp"):
        y_cpp = _ext.fp8_decode(s_ref, c_ref, dtype)
    assert y_cpp is not None and _same_bits(fp8_decode_torch(s_ref, c_ref, dtype), y_cpp)


def test_fp8_all_codes_decode_like_torch(lib: object) -> None:
    codes = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1, 1)
    scales = torch.tensor([[[0.75]]])
    with _ext.use_backend("cpp"):
        y = _ext.fp8_decode(scales, codes, torch.float32)
    assert y is not None and _same_bits(fp8_decode_torch(scales, codes, torch.float32), y)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 4097, 100_003])
@pytest.mark.parametrize("ts", [1, 2, 3, 4, 8])
def test_shuffle_kernels_match_numpy(lib: object, n: int, ts: int) -> None:
    data = torch.randint(0, 256, (n,), dtype=torch.uint8)
    with _ext.use_backend("torch"):
        ref = bytes(shuffle(data.numpy().tobytes(), ts))
    with _ext.use_backend("cpp"):
        got = _ext.shuffle(data, ts)
        assert got is not None and bytes(got.numpy()) == ref
        back = _ext.shuffle(got, ts, inverse=True)
    assert back is not None and torch.equal(back, data)
    with _ext.use_backend("torch"):
        assert bytes(unshuffle(ref, ts)) == data.numpy().tobytes()


@pytest.mark.parametrize("codec", ["int8", "int4", "int2", "fp8", "mixed", "lz4", "int4+lz4", "mixed+lz4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_blobs_identical_across_backends(lib: object, codec: str, dtype: torch.dtype) -> None:
    """``mixed`` is retired (decode only): its blobs are written as its encoder wrote them."""
    x = _input((3, 2, 45, 2, 40), dtype, codec in ("int4", "fp8"), 7)

    def enc() -> bytes | memoryview:
        if codec.startswith("mixed"):
            return legacy_mixed_blob(x, lz4=codec.endswith("+lz4"))
        return encode(x, codec)

    with _ext.use_backend("torch"):
        b_t = enc()
    with _ext.use_backend("cpp"):
        b_c = enc()
    assert b_t == b_c
    with _ext.use_backend("torch"):
        y_t = decode(b_c)
    with _ext.use_backend("cpp"):
        y_c = decode(b_t)
    assert _same_bits(y_t, y_c)


def test_backend_info_reports_cpp_and_env_forces_torch(lib: object, tmp_path: Path) -> None:
    assert backend_info()["backend"] == "cpp"
    code = "from kvlayer.codec import backend_info; print(backend_info()['backend'])"
    env = {**os.environ, "KVLAYER_NO_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "torch"
    # No compiler on PATH and an empty cache: falls back, still encodes.
    env = {**os.environ, "PATH": str(tmp_path), "CXX": "", "KVLAYER_EXT_CACHE": str(tmp_path / "c")}
    code = (
        "import torch; from kvlayer.codec import backend_info, encode, decode\n"
        "x = torch.randn(2, 2, 8, 1, 16).half(); assert decode(encode(x, 'int8')).shape == x.shape\n"
        "print(backend_info())"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert "'backend': 'torch'" in out.stdout and "compiler" in out.stdout


def test_cache_dir_respects_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVLAYER_EXT_CACHE", str(tmp_path / "a"))
    assert _ext.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("KVLAYER_EXT_CACHE")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "b"))
    assert _ext.cache_dir() == tmp_path / "b" / "kvlayer"


CUDA_SOURCES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: CUDA kernels are not compiled")
@pytest.mark.parametrize("src", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(src: Path, tmp_path: Path) -> None:
    """Compile-only (no GPU here): the CUDA kernels must at least build with the local nvcc."""
    out = tmp_path / (src.stem + ".o")
    r = subprocess.run(
        ["nvcc", "-c", "-O3", "-std=c++17", "-arch=sm_80", str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.stat().st_size > 0


def test_cuda_sources_exist() -> None:
    assert CUDA_SOURCES, "csrc/cuda/*.cu missing"
