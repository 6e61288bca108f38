"""Codec round trips (hypothesis) against each codec's documented error bound, and corruption.

Bounds are recomputed here from first principles (group min/max of the input), not taken from
the codec, so a wrong grouping or a wrong scale shows up as a violated bound.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlayer.codec import Codec, available_codecs, decode, encode
from kvlayer.codec import header as hdr
from kvlayer.codec.lz4 import LZ4Compressor
from kvlayer.codec.quant import _pack_mask, canonical_shape, make_layout, quantize_into
from kvlayer.errors import ConfigError, CorruptBlobError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
QMAX = {8: 255, 4: 15, 2: 3}
HALF_ULP = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
SUBNORMAL = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float32: 2.0**-150}


@st.composite
def chunks(draw: st.DrawFn, min_tokens: int = 1, mla: bool | None = None) -> torch.Tensor:
    """A random KV chunk: odd shapes, any float dtype, magnitudes from 1e-3 to 1e3, outliers."""
    is_mla = draw(st.booleans()) if mla is None else mla
    L = draw(st.integers(1, 3))
    T = draw(st.integers(min_tokens, 70))
    H = 1 if is_mla else draw(st.integers(1, 3))
    D = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    mag = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    shape = (L, 1, T, H, D) if is_mla else (L, 2, T, H, D)
    x = torch.randn(shape, generator=g) * mag
    if draw(st.booleans()) and x.numel():
        # Channel and token outliers, the structure KIVI is built for.
        x[:, 0, :, :, 0] *= 20
        x[:, :, 0] += mag * 5
    if draw(st.booleans()):
        x = x.reshape(L, 1, T, H * D) if is_mla else x  # 4-d MLA layout
    return x.to(dtype)


def _out_slack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Half an ulp of the output dtype at the decoded value (the final cast)."""
    return y.float().abs() * HALF_ULP[x.dtype] + SUBNORMAL[x.dtype]


def _int_bound(x5: torch.Tensor, y5: torch.Tensor, bits: int, gk: int, gv: int) -> torch.Tensor:
    """Per-element bound of the KIVI codecs (quant.py docstring), from the input's own groups."""
    L, P, T, H, D = x5.shape
    xf = x5.float()
    meta16 = x5.dtype == torch.float16
    bound = torch.empty_like(xf)

    def group_bound(g: torch.Tensor, dim: int) -> torch.Tensor:
        mn, mx = g.amin(dim, keepdim=True), g.amax(dim, keepdim=True)
        s = (mx - mn) / QMAX[bits]
        if meta16:
            s = s * (1 + 2.0**-10) + 2.0**-24
        else:
            s = s * (1 + 2.0**-22)
        return (0.5001 * s + 2.0**-22 * torch.maximum(mn.abs(), mx.abs())).expand_as(g)

    if P == 2:
        for t0 in range(0, T, gk):
            sl = xf[:, 0, t0 : t0 + gk]
            bound[:, 0, t0 : t0 + gk] = group_bound(sl, 1)
    for c0 in range(0, D, gv):
        sl = xf[:, P - 1, :, :, c0 : c0 + gv]
        bound[:, P - 1, :, :, c0 : c0 + gv] = group_bound(sl, 3)
    return bound + _out_slack(x5, y5)


def _hadamard(D: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(D)


def _unrope(k: torch.Tensor, theta: float) -> torch.Tensor:
    """Keys ``[L, T, H, D]`` (float64) rotated back by each token's offset in the chunk (rotate-half pairs)."""
    T, D = k.shape[1], k.shape[-1]
    ang = torch.arange(T, dtype=torch.float64)[:, None] / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    a, b = k[..., : D // 2], k[..., D // 2 :]
    return torch.cat((a * c + b * s, b * c - a * s), dim=-1)


def _rot_bound(x5: torch.Tensor, y5: torch.Tensor, bits: int, gk: int, gv: int, rotate: bool = True,
               rope: float = 0.0) -> torch.Tensor:
    """Per-element bound of the rotated codecs (rotq.py docstring), from the input's own groups.

    In the rotated domain (exact float64 Hadamard here): keys err by at most half a step of
    (group range + 4 chunk-range/255) / qmax (the outward-rounded 8-bit group bounds), values by
    half a step of the needed scale rounded up to 5 mantissa bits (or 2^-7 of the head's top);
    back in the original domain, element i of a head errs by at most 1/sqrt(D) x the sum of the
    head's rotated bounds. Outlier tokens (stored exactly) are bounded as if quantized. With
    ``rope``, keys are grouped after RoPE is undone by each token's in-chunk offset, and putting
    it back mixes each channel j with j + D/2: its bound becomes sqrt(B_j^2 + B_(j+D/2)^2)."""
    L, P, T, H, D = x5.shape
    rot = rotate and D >= 2 and D & (D - 1) == 0
    rope = rope if P == 2 and D % 2 == 0 else 0.0
    xd = x5.double()
    y = torch.stack((_unrope(xd[:, 0], rope), xd[:, 1]), dim=1) if rope else xd
    y = y @ _hadamard(D) if rot else y
    qmax, half = QMAX[bits], QMAX[bits] / 2
    b = torch.empty_like(y)
    if P == 2 and T:
        k = y[:, 0]
        step = (k.amax(1, keepdim=True) - k.amin(1, keepdim=True)) / 255
        big = torch.maximum(k.amax(1, keepdim=True).abs(), k.amin(1, keepdim=True).abs())
        for t0 in range(0, T, gk):
            g = k[:, t0 : t0 + gk]
            rng = g.amax(1, keepdim=True) - g.amin(1, keepdim=True)
            s = (rng + 4 * step) / qmax * (1 + 1e-6)
            b[:, 0, t0 : t0 + gk] = (0.5001 * s + 2.0**-20 * big).expand_as(g)
    v = y[:, P - 1]
    if T:
        needs = [v[..., c0 : c0 + gv].abs().amax(-1, keepdim=True) / half for c0 in range(0, D, gv)]
        top = torch.stack(needs).amax(dim=(0, 2), keepdim=True)[0] * (1 + 2.0**-5)  # per (layer, head)
        for c0, need in zip(range(0, D, gv), needs, strict=True):
            g = v[..., c0 : c0 + gv]
            s = torch.maximum(need * (1 + 2.0**-5), top * 2.0**-7)
            b[:, P - 1, :, :, c0 : c0 + gv] = (0.5001 * s + 2.0**-20 * half * need).expand_as(g)
    if rot:
        b = b.sum(-1, keepdim=True).expand_as(b) / math.sqrt(D) + 2.0**-20 * xd.abs().sum(-1, keepdim=True)
    if rope:  # element j mixes with j + D/2 (and back): |c e_j -+ s e_p| <= sqrt(e_j^2 + e_p^2)
        k = b[:, 0]
        partner = torch.cat((k[..., D // 2 :], k[..., : D // 2]), dim=-1)
        b[:, 0] = (k.square() + partner.square()).sqrt() + 2.0**-20 * xd[:, 0].abs().sum(-1, keepdim=True)
    return b.float() + _out_slack(x5, y5)


def _as5(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(3) if x.dim() == 4 else x


def _assert_within(x: torch.Tensor, y: torch.Tensor, bound: torch.Tensor) -> None:
    err = (x.float() - y.float()).abs()
    bad = err > bound
    assert not bool(bad.any()), f"max excess {(err - bound).max().item()} at {bad.nonzero()[:3].tolist()}"


# ----------------------------------------------------------------------------- lossless


@FAST
@given(x=chunks(), codec=st.sampled_from(["raw", "lz4"]))
def test_lossless_bit_exact(x: torch.Tensor, codec: str) -> None:
    y = decode(encode(x, codec))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y.contiguous().view(-1).view(torch.uint8), x.contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("codec", ["raw", "lz4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_special_values_bit_exact(codec: str, dtype: torch.dtype) -> None:
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-30, 65504.0], dtype=dtype)
    x = x.reshape(1, 1, 7, 1, 1)
    y = decode(encode(x, codec))
    assert torch.equal(y.view(-1).view(torch.uint8), x.view(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lz4_stores_incompressible_and_compresses_the_rest(dtype: torch.dtype) -> None:
    """Random bytes are stored as is (a probe predicts < 5% gain); structured data compresses;
    ``min_gain=1`` forces an lz4 attempt. All round-trip bit-exactly."""
    nbytes = 4 * 2 * 256 * 2 * 64 * torch.empty((), dtype=dtype).element_size()
    noisy = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).view(dtype).view(4, 2, 256, 2, 64)
    smooth = torch.zeros(4, 2, 256, 2, 64, dtype=dtype)
    smooth[:, :, ::7] = 1.5
    for x, min_gain, stored in ((noisy, None, True), (smooth, None, False), (noisy, 1.0, False)):
        params = {} if min_gain is None else {"min_gain": min_gain}
        blob = encode(x, "lz4", **params)
        h = hdr.verify(blob)
        # forced: lz4 is tried, but a larger-than-input result is still stored as is
        assert bool(h.params["c"].get("stored")) == stored or min_gain == 1.0
        y = decode(blob)
        assert torch.equal(y.view(-1).view(torch.uint8), x.view(-1).view(torch.uint8))
    assert len(encode(smooth, "lz4")) < smooth.numel() * smooth.element_size() / 4
    y = decode(encode(torch.randn(2, 2, 64, 2, 64).to(dtype), "int8+lz4", min_gain=1.0))
    assert y.shape == (2, 2, 64, 2, 64)


# ----------------------------------------------------------------------------- int codecs


@FAST
@given(
    x=chunks(),
    bits=st.sampled_from([8, 4, 2]),
    gk=st.sampled_from([1, 7, 32, 64]),
    gv=st.sampled_from([3, 16, 32]),
    lz4=st.booleans(),
    rotate=st.booleans(),
    rope=st.sampled_from([0.0, 10000.0, 100.0]),
)
def test_int_within_bound(x: torch.Tensor, bits: int, gk: int, gv: int, lz4: bool, rotate: bool, rope: float) -> None:
    name = f"int{bits}" + ("+lz4" if lz4 else "")
    blob = encode(x, name, k_group_size=gk, v_group_size=gv, rotate=rotate, rope_theta=rope)
    y = decode(blob)
    assert y.dtype == x.dtype and y.shape == x.shape
    x5, y5 = _as5(x), _as5(y)
    _assert_within(x5, y5, _rot_bound(x5, y5, bits, gk, gv, rotate, rope))


@FAST
@given(
    x=chunks(),
    bits=st.sampled_from([8, 4, 2]),
    gk=st.sampled_from([1, 7, 32, 64]),
    gv=st.sampled_from([3, 16, 32]),
)
def test_kivi_scheme_within_bound(x: torch.Tensor, bits: int, gk: int, gv: int) -> None:
    """``scheme: kivi`` writes (and every build reads) the blobs of the scheme before rotation."""
    blob = encode(x, f"int{bits}", k_group_size=gk, v_group_size=gv, scheme="kivi")
    assert "s" not in hdr.verify(blob).params["t"]
    y = decode(blob)
    x5, y5 = _as5(x), _as5(y)
    _assert_within(x5, y5, _int_bound(x5, y5, bits, gk, gv))


def test_int_payload_sizes() -> None:
    """Rotated scheme: bits per element + K: two u8 codes per group of ``gk`` tokens and an fp32
    (min, max) per channel; V: one u8 per group of ``gv`` channels and an fp32 top per (layer,
    head); the token bitmap; no outlier token in random data. Default groups (gk, gv): int8
    (16, 32), int4 (28, 64, the last key group partial), int2 (32, 32); ``group_size`` sets both.
    KIVI: one (scale, zero) pair per group, fp16 for fp16 chunks, fp32 otherwise."""
    L, T, H, D = 2, 64, 2, 64
    x = torch.randn(L, 2, T, H, D, dtype=torch.float16)
    n, C = x.numel(), H * D
    cases = [(8, {}, 16, 32), (4, {}, 32, 32), (2, {}, 32, 32), (8, {"group_size": 32}, 32, 32),
             (8, {"k_group_size": 64}, 64, 32), (4, {"k_group_size": 28, "v_group_size": 64}, 28, 64)]
    for b, params, gk, gv in cases:
        h = hdr.verify(encode(x, f"int{b}", **params))
        assert h.params["t"]["o"] == 0
        assert (h.params["t"]["gk"], h.params["t"]["gv"]) == (gk, gv)
        meta = L * -(-T // gk) * 2 * C + L * 2 * C * 4 + L * T * H * (D // gv) + L * H * 4
        codes = n * b // 8
        mask = T // 8 + (-(meta + codes + T // 8) % 4)
        assert h.payload_len == codes + meta + mask
    for b in (8, 4, 2):
        h = hdr.verify(encode(x, f"int{b}", scheme="kivi"))
        assert h.payload_len == n * b // 8 + (n // 32) * 4
    h = hdr.verify(encode(x.float(), "int4", scheme="kivi"))  # fp32 meta for fp32/bf16 chunks
    assert h.payload_len == n // 2 + (n // 32) * 8


def test_int4_ratio_on_a_full_chunk() -> None:
    """The default int4 on a 256-token fp16 chunk of SmolLM2's shape: >= 3.5x, headers included."""
    x = torch.randn(30, 2, 256, 3, 64, dtype=torch.float16)
    assert x.numel() * 2 / len(encode(x, "int4")) >= 3.5


def test_outlier_tokens_are_stored_exactly() -> None:
    """A token whose keys stand out (an attention sink) is found and kept bit-exact; the others
    are quantized without it widening their key groups."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 128, 2, 64, generator=g)
    x[:, 0, 0] = x[:, 0, 0] * 0.2 + 12.0  # an attention-sink-like key
    x = x.half()
    blob = encode(x, "int4")
    assert hdr.verify(blob).params["t"]["o"] == 1
    y = decode(blob)
    assert torch.equal(y[:, :, 0], x[:, :, 0])
    plain = decode(encode(x, "int4", outlier_tokens=0))
    err = (y[:, 0, 1:].float() - x[:, 0, 1:].float()).norm()
    assert err < 0.8 * (plain[:, 0, 1:].float() - x[:, 0, 1:].float()).norm()
    assert hdr.verify(encode(torch.randn(4, 2, 128, 2, 64).half(), "int4")).params["t"]["o"] == 0


def _roped_keys(theta: float, start: int, seed: int = 5) -> torch.Tensor:
    """A chunk whose keys are RoPE'd at positions ``start..`` (rotate-half pairs, base ``theta``)
    from pre-RoPE keys with steady channels (what real keys look like before RoPE)."""
    g = torch.Generator().manual_seed(seed)
    L, T, H, D = 2, 128, 2, 64
    pre = torch.randn(L, 1, H, D, generator=g).double() * 4 + torch.randn(L, T, H, D, generator=g).double() * 0.3
    ang = torch.arange(start, start + T, dtype=torch.float64)[:, None] / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    a, b = pre[..., : D // 2], pre[..., D // 2 :]
    k = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    v = torch.randn(L, T, H, D, generator=g).double()
    return torch.stack((k, v), dim=1).half()


def test_rope_aware_keys_lose_less_and_say_so_in_the_header() -> None:
    """``rope_theta``: keys are quantized with RoPE undone by each token's offset in the chunk, so a
    channel keeps its pre-RoPE steadiness whatever the chunk's absolute position (the shift left
    is one rotation shared by the chunk). The base is in the header; values are untouched."""
    for start in (0, 1000, 77_777):
        x = _roped_keys(10000.0, start)
        plain, aware = encode(x, "int4", outlier_tokens=0), encode(x, "int4", outlier_tokens=0, rope_theta=10000.0)
        assert "rt" not in hdr.verify(plain).params["t"] and hdr.verify(aware).params["t"]["rt"] == 10000.0
        assert hdr.verify(plain).payload_len == hdr.verify(aware).payload_len  # the same bytes, spent better

        k = x[:, 0].float()
        e_plain, e_aware = ((decode(b)[:, 0].float() - k).norm() / k.norm() for b in (plain, aware))
        assert e_aware < 0.5 * e_plain, (start, e_aware, e_plain)  # measured: 0.006 against 0.042
        assert torch.equal(decode(aware)[:, 1], decode(plain)[:, 1])
    mla = torch.randn(2, 1, 40, 1, 64).half()  # MLA's one plane holds no RoPE'd keys
    assert "rt" not in hdr.verify(encode(mla, "int4", rope_theta=10000.0)).params["t"]


def test_rope_theta_param_is_checked() -> None:
    for bad in (-1.0, True, "1e4", float("inf"), float("nan"), [1]):
        with pytest.raises(ConfigError, match="rope_theta"):
            Codec("int4", rope_theta=bad)
    with pytest.raises(ConfigError, match="scheme 'rot' only"):
        Codec("int4", scheme="kivi", rope_theta=10000.0)
    for off in (0, 0.0, None):
        assert Codec("int4", rope_theta=off).transform.rope == 0.0


def test_with_rope_gives_the_base_to_the_codecs_that_use_it() -> None:
    from kvlayer.codec import with_rope

    assert with_rope("int4+lz4", {}, 1e4) == {"rope_theta": 1e4}
    assert with_rope("INT8", {"group_size": 32}, 1e4) == {"group_size": 32, "rope_theta": 1e4}
    assert with_rope("int4", {"rope_theta": 0}, 1e4) == {"rope_theta": 0}  # an explicit setting wins
    for name, params in (("raw", {}), ("lz4", {}), ("fp8", {}), ("int4", {"scheme": "kivi"}), ("bogus", {})):
        assert with_rope(name, params, 1e4) == params
    assert with_rope("int4", {}, None) == {}


def test_old_kivi_blob_decodes() -> None:
    """A KIVI int4 blob (parameters without "s": written before the rotated scheme) still decodes
    to the values it always did."""
    x = (torch.arange(2 * 2 * 4 * 1 * 8, dtype=torch.float32).view(2, 2, 4, 1, 8) / 7 - 4).half()
    kivi = bytes(encode(x, "int4", scheme="kivi"))
    h = hdr.verify(kivi)
    assert h.params["t"] == {"b": 4, "gk": 32, "gv": 32}
    assert bytes(memoryview(kivi)[h.header_len :]).hex() == KIVI_PAYLOAD_HEX
    y = decode(kivi)
    assert (y.float() - x.float()).abs().max() < 0.25 and torch.equal(decode(kivi), y)


#: The payload of ``test_old_kivi_blob_decodes``'s chunk as the KIVI encoder wrote it before the rotated
#: scheme existed (computed with that release's ``quant.quantize_torch``).
KIVI_PAYLOAD_HEX = (
    "513351335133513350335133513351334f334f33523352334f33543352334f3300c4b7c36ec325c3dbc292c249c200c2"
    "254549456e459245b745db4500462546452c462c452c452c452c452c452c452c9238db3eb7410044db486e49004a924a"
    "0000000055555555aaaaaaaaffffffff2064b9fd2064b9fd2064b9fd2064b9fd0000000055555555aaaaaaaaffffffff"
    "2064b9fd2064b9fd2064b9fd2064b9fd"
)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_int_group_size_param_applies_to_both(bits: int) -> None:
    c = Codec(f"int{bits}", group_size=16)
    assert (c.transform.gk, c.transform.gv) == (16, 16)
    c = Codec(f"int{bits}", group_size=16, v_group_size=8)
    assert (c.transform.gk, c.transform.gv) == (16, 8)


def test_bad_params_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Codec("int4", group_size=0)
    with pytest.raises(ConfigError):
        Codec("int4", bogus=1)
    for retired in ("mixed", "mixed+lz4"):  # decode-only now
        with pytest.raises(ConfigError, match="retired"):
            Codec(retired)
    with pytest.raises(ConfigError):
        Codec("fp8", group_size=32)


@pytest.mark.parametrize("codec", ["int8", "int4", "int2", "fp8", "int4+lz4"])
def test_empty_and_single_token(codec: str) -> None:
    for T in (0, 1):
        x = torch.randn(2, 2, T, 2, 8, dtype=torch.float16)
        y = decode(encode(x, codec))
        assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("codec", ["int8", "int4", "int2", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_poisons_only_its_group(codec: str, dtype: torch.dtype) -> None:
    """Documented: a group (fp8: a layer/plane/head slice) with NaN/inf decodes to NaN; others are fine."""
    x = torch.randn(2, 2, 40, 2, 64).to(dtype)
    x[0, 1, 3, 0, 5] = float("nan")
    x[1, 1, 7, 1, 9] = float("inf")
    x[1, 0, 2, 0, 1] = -float("inf")
    y = decode(encode(x, codec, group_size=32) if codec != "fp8" else encode(x, codec))
    assert bool(torch.isnan(y[0, 1, 3, 0, 5])) and bool(torch.isnan(y[1, 1, 7, 1, 9]))
    assert bool(torch.isnan(y[1, 0, 2, 0, 1]))
    clean = y[0, 0]  # layer 0 keys hold no non-finite value
    assert bool(torch.isfinite(clean).all())
    assert (clean.float() - x[0, 0].float()).abs().max() < 2.0


def test_constant_group_is_exact() -> None:
    """KIVI groups hold their min exactly; rotated keys too (a constant channel has step 0); rotated
    values have no zero level (mid-rise), so only their keys are exact."""
    x = torch.full((1, 2, 33, 1, 40), 3.25, dtype=torch.float16)
    for name in ("int8", "int4", "int2"):
        assert torch.equal(decode(encode(x, name, scheme="kivi")), x)
        assert torch.equal(decode(encode(x, name))[:, 0], x[:, 0])
    assert torch.equal(decode(legacy_mixed_blob(x)), x)


# ----------------------------------------------------------------------------- mixed (retired: decode only)


def legacy_salience(x5: torch.Tensor) -> torch.Tensor:
    """The retired ``mixed`` writer's token salience: key L2 norm summed over layers (NaN = most)."""
    L, P, T, H, D = x5.shape
    n = torch.linalg.vector_norm(x5.reshape(L, P, T, H * D)[:, 0].float(), dim=-1)
    return torch.nan_to_num(n, nan=float("inf")).sum(0)


def legacy_mixed_blob(x: torch.Tensor, hi: int = 8, lo: int = 4, frac: float = 0.1, group: int = 32,
                      lz4: bool = False) -> bytes:
    """A blob of the retired ``mixed`` codec, written as its encoder wrote them (the ``frac`` most
    salient tokens at ``hi`` bits, the rest at ``lo``, each subset KIVI-quantized on its own), so
    the decoder that stays is checked on the blobs stores may still hold."""
    shape = tuple(x.shape)
    L, P, T, H, D = canonical_shape(shape)
    x5 = x.reshape(L, P, T, H, D).contiguous()
    n_high = min(T, math.ceil(frac * T - 1e-9)) if T else 0
    mask = torch.zeros(T, dtype=torch.bool)
    mask[torch.sort(legacy_salience(x5), descending=True, stable=True).indices[:n_high]] = True
    m = _pack_mask(mask)
    parts = [torch.nn.functional.pad(m, (0, -m.numel() % 4))]
    for bits, sel in ((hi, mask), (lo, ~mask)):
        sub = x5[:, :, sel].contiguous()
        lay = make_layout(tuple(sub.shape), x.dtype, bits, group, group)
        buf = torch.zeros(lay.total + (-lay.total % 4), dtype=torch.uint8)
        quantize_into(sub, lay, buf[: lay.total])
        parts.append(buf)
    payload: bytes | memoryview = torch.cat(parts).numpy().tobytes()
    params: dict = {"t": {"hb": hi, "lb": lo, "gk": group, "gv": group, "nh": n_high}}
    if lz4:
        payload, params["c"] = LZ4Compressor().compress(payload, 1)
    head = hdr.pack_header("mixed+lz4" if lz4 else "mixed", shape, x.dtype, params, memoryview(payload).nbytes)
    return bytes(hdr.assemble(head, payload))


@FAST
@given(
    x=chunks(min_tokens=0),
    frac=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    lo=st.sampled_from([4, 2]),
    hi=st.sampled_from([8, 4]),
    lz4=st.booleans(),
)
def test_retired_mixed_blobs_still_decode_within_bound(x: torch.Tensor, frac: float, lo: int, hi: int,
                                                       lz4: bool) -> None:
    gk = gv = 16
    y = decode(legacy_mixed_blob(x, hi, lo, frac, 16, lz4))
    assert y.shape == x.shape and y.dtype == x.dtype
    x5, y5 = _as5(x), _as5(y)
    T = x5.shape[2]
    n_high = min(T, math.ceil(frac * T - 1e-9))
    mask = torch.zeros(T, dtype=torch.bool)
    mask[torch.sort(legacy_salience(x5), descending=True, stable=True).indices[:n_high]] = True
    for bits, sel in ((hi, mask), (lo, ~mask)):
        if bool(sel.any()):
            xs, ys = x5[:, :, sel], y5[:, :, sel]
            _assert_within(xs, ys, _int_bound(xs, ys, bits, gk, gv))


# ----------------------------------------------------------------------------- fp8


@FAST
@given(x=chunks(), lz4=st.booleans())
def test_fp8_within_bound(x: torch.Tensor, lz4: bool) -> None:
    y = decode(encode(x, "fp8+lz4" if lz4 else "fp8"))
    assert y.shape == x.shape and y.dtype == x.dtype
    x5, y5 = _as5(x).float(), _as5(y)
    s = x5.abs().amax(dim=(2, 4), keepdim=True) / 448.0
    bound = (2.0**-4 + 1e-6) * x5.abs() + 2.0**-10 * s + _out_slack(_as5(x), y5)
    _assert_within(x5, y5, bound)


# ----------------------------------------------------------------------------- corruption

BLOB_CODECS = ["raw", "lz4", "int8", "int4", "int2", "fp8", "mixed", "int4+lz4", "int8+lz4", "mixed+lz4"]


def _blob(codec: str) -> bytes | memoryview:
    x = torch.randn(2, 2, 20, 2, 16, generator=torch.Generator().manual_seed(1)).half()
    if codec.startswith("mixed"):
        return legacy_mixed_blob(x, lz4=codec.endswith("+lz4"))
    return encode(x, codec)


_BLOBS = {c: _blob(c) for c in BLOB_CODECS}


def test_available_codecs_covers_all() -> None:
    names = set(available_codecs())
    assert {"int8", "int4", "int2", "fp8", "int4+lz4", "fp8+lz4"} <= names
    assert "mixed" not in names and "mixed+lz4" not in names  # retired: decode only


@FAST
@given(codec=st.sampled_from(BLOB_CODECS), data=st.data())
def test_bit_flip_raises(codec: str, data: st.DataObject) -> None:
    blob = bytearray(_BLOBS[codec])
    pos = data.draw(st.integers(0, len(blob) - 1))
    bit = data.draw(st.integers(0, 7))
    blob[pos] ^= 1 << bit
    with pytest.raises(CorruptBlobError):
        decode(blob)


@FAST
@given(codec=st.sampled_from(BLOB_CODECS), data=st.data())
def test_truncated_or_padded_raises(codec: str, data: st.DataObject) -> None:
    blob = bytes(_BLOBS[codec])
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(CorruptBlobError):
        decode(blob[:cut])
    with pytest.raises(CorruptBlobError):
        decode(blob + b"\0" * data.draw(st.integers(1, 9)))


@pytest.mark.parametrize("codec", BLOB_CODECS)
def test_wrong_version_and_magic_raise(codec: str) -> None:
    blob = bytearray(_BLOBS[codec])
    v = bytearray(blob)
    v[4] = hdr.FORMAT_VERSION + 1
    with pytest.raises(CorruptBlobError, match="version"):
        decode(v)
    m = bytearray(blob)
    m[:4] = b"XXXX"
    with pytest.raises(CorruptBlobError, match="magic"):
        decode(m)


@FAST
@given(garbage=st.binary(min_size=0, max_size=300))
def test_garbage_raises(garbage: bytes) -> None:
    with pytest.raises(CorruptBlobError):
        decode(garbage)
    with pytest.raises(CorruptBlobError):
        decode(hdr.MAGIC + bytes([hdr.FORMAT_VERSION]) + garbage)


def _reseal(codec: str, shape: tuple[int, ...], dtype: torch.dtype, params: dict, payload: bytes) -> bytearray:
    """A blob with a *valid* checksum around inconsistent content: only decode-side checks catch it."""
    return hdr.assemble(hdr.pack_header(codec, shape, dtype, params, len(payload)), payload)


@pytest.mark.parametrize("codec", ["int8", "int4", "int2", "fp8", "mixed", "int4+lz4"])
def test_inconsistent_but_checksummed_blobs_raise(codec: str) -> None:
    blob = _BLOBS[codec]
    h = hdr.verify(blob)
    payload = bytes(memoryview(blob)[h.header_len :])
    cases = [
        (h.shape, h.params, payload[:-1]),  # short payload
        (h.shape, h.params, payload + b"\0"),  # long payload
        ((h.shape[0], h.shape[1], h.shape[2] + 1, *h.shape[3:]), h.params, payload),  # wrong shape
    ]
    t = dict(h.params.get("t", {}))
    if t:
        cases.append((h.shape, {}, payload))  # params missing
    if "b" in t:
        cases.append((h.shape, {**h.params, "t": {**t, "b": 3}}, payload))
        cases.append((h.shape, {**h.params, "t": {**t, "gk": 0}}, payload))
        cases.append((h.shape, {**h.params, "t": {**t, "gv": "x"}}, payload))
    if t.get("s") == "rot":
        cases.append((h.shape, {**h.params, "t": {**t, "o": t["o"] + 1}}, payload))
        cases.append((h.shape, {**h.params, "t": {**t, "o": -1}}, payload))
        cases.append((h.shape, {**h.params, "t": {**t, "r": 2}}, payload))
        cases.append((h.shape, {**h.params, "t": {**t, "s": "other"}}, payload))
        for rt in (-5.0, "x", True, float("inf"), float("nan")):  # a RoPE base no encoder writes
            cases.append((h.shape, {**h.params, "t": {**t, "rt": rt}}, payload))
    if "nh" in t:
        cases.append((h.shape, {**h.params, "t": {**t, "nh": t["nh"] + 1}}, payload))
        cases.append((h.shape, {**h.params, "t": {**t, "nh": -1}}, payload))
    if "c" in h.params:
        cases.append((h.shape, {**h.params, "c": {**h.params["c"], "raw_len": h.params["c"]["raw_len"] + 4}}, payload))
    for shape, params, pay in cases:
        with pytest.raises(CorruptBlobError):
            decode(_reseal(h.codec, shape, h.dtype, params, pay))


def test_mixed_bitmap_disagreeing_with_header_raises() -> None:
    blob = _BLOBS["mixed"]
    h = hdr.verify(blob)
    payload = bytearray(memoryview(blob)[h.header_len :])
    payload[0] ^= 0xFF  # flips which tokens are "high": count no longer matches nh
    with pytest.raises(CorruptBlobError):
        decode(_reseal(h.codec, h.shape, h.dtype, h.params, bytes(payload)))


@pytest.mark.parametrize("codec", ["int4", "int8"])
def test_rot_bitmap_disagreeing_with_header_raises(codec: str) -> None:
    x = torch.randn(2, 2, 40, 2, 16).half()
    x[:, 0, 0] += 30
    blob = encode(x, codec)
    h = hdr.verify(blob)
    assert h.params["t"]["o"] == 1
    payload = bytearray(memoryview(blob)[h.header_len :])
    lay_end = len(payload) - 2 * 2 * 1 * 32 * 2  # the outlier rows (fp16) are the last section
    for pos, flip in ((lay_end - 4, 0x02), (lay_end - 1, 0x80)):  # another token; a padding bit
        bad = bytearray(payload)
        bad[pos] ^= flip
        with pytest.raises(CorruptBlobError):
            decode(_reseal(h.codec, h.shape, h.dtype, h.params, bytes(bad)))


def test_header_is_small() -> None:
    for codec in BLOB_CODECS:
        h = hdr.verify(_BLOBS[codec])
        assert h.header_len < 192, (codec, h.header_len)  # 32 bytes of it: the key digest


@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
@pytest.mark.parametrize("sealed", [True, False])
def test_payload_written_in_place_makes_the_same_blob_as_a_copy(codec: str, sealed: bool) -> None:
    """The rotated codecs write their payload where the blob needs it (``encode_into``, no copy):
    the blob is byte for byte the one the copying path assembles, sized exactly (the outlier
    tokens are found before the buffer is taken), and lives on after its buffer's other views."""
    x = torch.randn(3, 2, 70, 2, 64) * 2
    x[:, 0, 0] += 30  # an attention-sink-like token: one outlier row in the payload
    x = x.half()
    c = Codec(codec)
    blob = c.encode(x, key="k", sealed=sealed)
    payload, tparams, _ = c.transform.encode(x)
    head = hdr.pack_header(c.name, tuple(x.shape), x.dtype, {"t": tparams}, memoryview(payload).nbytes, "k")
    assert bytes(blob) == bytes(hdr.assemble(head, payload, sealed=sealed))
    assert tparams["o"] == 1
    if sealed:
        assert torch.equal(decode(blob, key="k"), decode(bytes(blob), key="k"))
    assert hdr.open_local(blob, "k").total_len == memoryview(blob).nbytes


def test_place_copies_when_the_header_does_not_fit_the_room() -> None:
    buf = hdr.POOL.take(hdr.HEAD_ROOM + 100)
    buf[hdr.HEAD_ROOM:] = 7
    long_head = bytes(range(256)) * 3  # longer than the room in front of the payload
    blob = hdr.place(buf, long_head, 100)
    assert bytes(blob) == bytes(hdr.assemble(long_head, bytes([7]) * 100))
    short = hdr.place(buf, b"abc", 100)
    assert bytes(short) == bytes(hdr.assemble(b"abc", bytes([7]) * 100))
