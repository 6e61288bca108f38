"""The ``int8`` / ``int4`` / ``int2`` codecs: rotated quantization (default) or KIVI (older blobs).

Why this scheme (chosen by measurement on SmolLM2-135M's real KV, see docs/codecs.md): the keys'
error is what changes the next token, and these cut it at no or little cost in bytes:

* **Hadamard rotation** of each head's ``head_dim`` before quantizing (QuaRot/SpinQuant's idea,
  applied to stored KV): an orthonormal transform spreads outlier channels over all channels, so
  4-bit groups lose far less; the decoder applies the same transform (it is its own inverse).
* **Outlier tokens stored exactly**: an attention sink (the sequence's first token) draws ~20%
  of all attention and its key is unlike the others; quantized, it both loses precision and
  widens every key group it sits in. The codec cannot know positions, so it finds such tokens
  by their keys: per chunk, at most ``outlier_tokens`` (default 2) tokens whose key z-score
  (max over channels, summed over layers) exceeds ``TAU`` x the chunk's median. They are kept
  in the chunk's dtype and left out of the key statistics; on real text that is the sink and
  nothing else (about 1 token in 2,000, negligible in bytes).
* **Compact metadata**, so the bits go to the codes: keys per channel over groups of ``gk``
  tokens, each group's (min, max) as two 8-bit codes on the channel's fp32 (min, max) over the
  chunk (rounded outward, so the range is covered); values per token over groups of ``gv``
  channels, symmetric mid-rise levels, the scale as an 8-bit code: a float with 5 mantissa bits
  within 8 octaves below the (layer, head)'s largest scale. int4: 4.5 bits per element (3.55x
  fp16) against KIVI's 5 bits at the same group sizes.
* **RoPE undone within the chunk** (``rope_theta``, the model's RoPE base, which the engine
  connectors fill in; KVQuant's pre-RoPE keys without positions): keys are stored post-RoPE, so
  a channel pair spins with the position and its group range spans the pair's whole circle.
  Rotating each token back by its *offset in the chunk* (RoPE is a rotation per pair, and a
  chunk's tokens sit at consecutive positions) leaves every token rotated by the same angle, the
  chunk's first position: a fixed orthogonal map that keeps each channel as steady as before
  RoPE. The codec needs no absolute position (a CacheBlend document chunk moves, a prefix chunk
  does not: both work), and a wrong base only loses the gain, never exactness of the inverse.
* **int8 keys over 16 tokens** (``rot_groups``; values over 32 channels): on SmolLM2 the keys'
  error costs 3x the values' (KL), and int8 has bytes to spare for shorter key groups (1.83x
  instead of 1.88x, 30% less KL on two sets of 12 contexts). int4 keeps 32 / 32: the int4 splits
  at the same ratio (e.g. keys 28 / values 64) won on one set of contexts and lost on another and
  end to end; see docs/codecs.md for the sweep.

Arithmetic (fp32, shared bit for bit by the torch reference below and the C++ kernels; no fused
multiply-add, except the kernels' butterflies ``x * (+-1) + partner``, exact in either form)::

    K: x = unrope(x)            # with rope_theta: pairs (a, b) = (x[j], x[j + D/2]) of each head,
                                # (a*c + b*s, b*c - a*s) with the f32 cos/sin of t * theta^(-2j/D), t = offset in chunk
    y  = fwht(x) * c            # butterflies h = 1, 2, 4, ..., D/2: (a + b, a - b); c = f32(1/sqrt(D))
    K: step = (bmax - bmin) / 255; lo = floor((gmin - bmin) / step), hi = ceil((gmax - bmin) / step),
       each corrected by one step if rounding left the group uncovered; mn = bmin + lo * step,
       mx = bmin + hi * step, s = (mx - mn) / qmax, q = rint(clamp((y - mn) * inv(s), 0, qmax)),
       y' = q * s + mn
    V: need = max|y| / (qmax / 2); top = (max need over the (layer, head)) rounded up to 5
       mantissa bits; s = need rounded up to 5 mantissa bits (if within 8 octaves of top, else
       top's exponent - 7), coded as (top's exponent - s's exponent) << 5 | s's 5 mantissa bits;
       q = rint(clamp(y * inv(s) + qmax / 2, 0, qmax)), y' = (q - qmax / 2) * s
    x' = dtype(rope(fwht(y') * c)) (K: (a*c - b*s, b*c + a*s) with rope_theta), then the outlier
    tokens' rows are written back exactly.

``inv(s) = 1 / s if s > 0 else 0``; rint rounds half to even. Heads whose ``head_dim`` is not a
power of two are not rotated (``r = 0`` in the header). Non-finite input: a key channel (after
rotation: the head's channels) or a value (layer, head) holding NaN/inf decodes to NaN there
(canonical quiet NaN); encoding never fails.

Payload (every section's parameters are in the header, ``{"s": "rot", "b", "gk", "gv", "r",
"o"}`` and ``"rt"``, the RoPE base, when keys were un-rotated; blobs without it decode as before)::

    V scale bases f32 [L, H] | K bases f32 [L, 2, C] | K group codes u8 [L, nkg, 2, C]
    | V scale codes u8 [L, T, H, nvg] | codes [L, P, T, row_bytes] (packed as quant.py)
    | token bitmap (ceil(T/8) bytes, zero-padded to a 4-byte boundary) | outlier rows (chunk dtype) [L, P, o, C]

MLA chunks (one plane) are quantized as values. Blobs without ``"s"`` in their parameters are
KIVI blobs (the scheme before this one, still written with ``scheme: kivi``) and decode through
:mod:`kvlayer.codec.quant`.

GPU chunks: this scheme has no CUDA kernel. A CUDA chunk is copied to host memory (the raw
bytes cross PCIe, not the 2-8x smaller payload) and encoded by the C++ kernel: the same blob as
from a CPU tensor. Only ``scheme: kivi`` (and ``fp8``) encode on the GPU (:mod:`kvlayer.codec.cuda`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvlayer.codec import _ext, register_transform
from kvlayer.codec.base import Buffer, Transform, tensor_bytes
from kvlayer.codec.buffers import POOL
from kvlayer.codec.quant import (
    _COMPRESSOR_PARAMS,
    DEFAULT_GROUP,
    _check_group,
    _int_param,
    _pack_mask,
    _payload_tensor,
    _unpack_mask,
    canonical_nan,
    canonical_shape,
    dequantize_from,
    make_layout,
    pack_codes,
    quantize_into,
    unpack_codes,
)
from kvlayer.errors import ConfigError

#: A token is an outlier when its key z-score exceeds TAU x the chunk's median z-score.
TAU = 2.25
#: Chunks shorter than this have too few tokens for a median: no outlier search.
MIN_DETECT_TOKENS = 16
DEFAULT_OUTLIERS = 2
#: V scales keep 5 mantissa bits (23 - 18 dropped) and span 8 octaves below the (layer, head)'s top.
_SCALE_DROP = 18
_SCALE_OCTAVES = 8
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_F32_MAX = torch.finfo(torch.float32).max


@functools.lru_cache(maxsize=64)
def rotation_scale(D: int) -> float | None:
    """``f32(1/sqrt(D))`` when head_dim ``D`` is a power of two (>= 2), else None (no rotation).
    Cached: every encode and decode asks, and building the tensor cost ~10 us each time."""
    if D < 2 or D & (D - 1):
        return None
    return float(torch.tensor(1.0 / math.sqrt(D), dtype=torch.float32))


@dataclass(frozen=True)
class RotLayout:
    """Byte layout of one rotated-quantization payload; encoder and decoder derive it from the header."""

    L: int
    P: int
    T: int
    H: int
    D: int
    bits: int
    gk: int
    gv: int
    rot: bool
    n_out: int
    dtype: torch.dtype
    #: RoPE base the keys were un-rotated with (by each token's offset in the chunk); 0 = not
    rope: float = 0.0

    @property
    def C(self) -> int:
        return self.H * self.D

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def row_bytes(self) -> int:
        return (self.C * self.bits + 7) // 8

    @property
    def nkg(self) -> int:
        return (self.T + self.gk - 1) // self.gk if self.P == 2 else 0

    @property
    def nvg(self) -> int:
        return (self.D + self.gv - 1) // self.gv

    @functools.cached_property
    def sections(self) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
        """name -> (byte offset, dtype, shape); the outlier rows last, so a buffer sized for more
        outlier tokens holds every other section at the same offset."""
        L, P, T, H, C = self.L, self.P, self.T, self.H, self.C
        spec: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
            ("v_base", torch.float32, (L, H)),
            ("k_base", torch.float32, (L, 2, C) if P == 2 else (0,)),
            ("k_codes", torch.uint8, (L, self.nkg, 2, C)),
            ("v_codes", torch.uint8, (L, T, H, self.nvg)),
            ("codes", torch.uint8, (L, P, T, self.row_bytes)),
            ("mask", torch.uint8, ((T + 7) // 8,)),  # zero-padded so the rows start 4-byte aligned
            ("raw", self.dtype, (L, P, self.n_out, C)),
        ]
        out, off = {}, 0
        for name, dt, shape in spec:
            if name == "mask":
                shape = (shape[0] + (-(off + shape[0]) % 4),)
            out[name] = (off, dt, shape)
            off += math.prod(shape) * dt.itemsize
        out["_end"] = (off, torch.uint8, (0,))
        return out

    @property
    def total(self) -> int:
        return self.sections["_end"][0]

    @property
    def mask_bytes(self) -> int:
        return self.sections["mask"][2][0]

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each section as a typed view into the flat uint8 ``buf`` (at least ``total`` bytes)."""
        if buf.numel() < self.total:
            raise ValueError(f"rotated payload is {buf.numel()} bytes, layout needs {self.total}")
        out = {}
        for name, (off, dt, shape) in self.sections.items():
            if name != "_end":
                n = math.prod(shape) * dt.itemsize
                out[name] = buf[off : off + n].view(dt).view(shape)
        return out

    def pointers(self, buf: torch.Tensor) -> list[int]:
        """Addresses of the sections in ``buf`` (the C kernels' arguments), in layout order."""
        base = buf.data_ptr()
        return [base + off for name, (off, _, _) in self.sections.items() if name != "_end"]


@functools.lru_cache(maxsize=256)
def make_rot_layout(shape: tuple[int, ...], dtype: torch.dtype, bits: int, gk: int, gv: int, rot: bool,
                    n_out: int, rope: float = 0.0) -> RotLayout:
    L, P, T, H, D = canonical_shape(shape)
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    if gk < 1 or gv < 1:
        raise ValueError("group sizes must be >= 1")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantized codecs take fp16/bf16/fp32 chunks, got {dtype}")
    if rot and rotation_scale(D) is None:
        raise ValueError(f"rotation needs a power-of-two head_dim, got {D}")
    if not 0 <= n_out <= T:
        raise ValueError(f"{n_out} outlier tokens out of {T}")
    if rope and (P != 2 or D % 2 or not math.isfinite(rope) or rope <= 0):
        raise ValueError(f"RoPE base {rope} for a chunk of {P} plane(s) and head_dim {D}")
    return RotLayout(L, P, T, H, D, bits, gk, gv, rot, n_out, dtype, float(rope))


@functools.lru_cache(maxsize=64)
def rope_tables(T: int, D: int, theta: float) -> torch.Tensor:
    """cos and sin ``[2, T, D/2]`` (fp32) of each token's offset in the chunk times the
    frequencies ``theta^(-2i/D)`` of the rotate-half layout (Llama's, vLLM's neox style). One
    table feeds both backends, so they agree bit for bit; computed in float64, rounded once."""
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.stack((ang.cos(), ang.sin())).float().contiguous()


def rope_keys(k: torch.Tensor, tab: torch.Tensor, sign: int) -> torch.Tensor:
    """Keys ``[L, T, H, D]`` (fp32) rotated by ``sign`` x each token's in-chunk angle: -1 undoes
    RoPE up to one rotation shared by the whole chunk (its first position's), +1 puts it back.
    Per pair (a, b) = (x[j], x[j + D/2]): undo ``(a*c + b*s, b*c - a*s)``, redo ``(a*c - b*s, b*c + a*s)``."""
    h = k.shape[-1] // 2
    c, s = tab[0][None, :, None, :], tab[1][None, :, None, :]
    a, b = k[..., :h], k[..., h:]
    if sign < 0:
        return torch.cat((a * c + b * s, b * c - a * s), dim=-1)
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1)


# ----------------------------------------------------------------------------- torch reference


def fwht(y: torch.Tensor, c: float) -> torch.Tensor:
    """Normalised fast Walsh-Hadamard transform of the last axis (a power of two); its own inverse."""
    D = y.shape[-1]
    shape = y.shape
    h = 1
    while h < D:
        v = y.reshape(*shape[:-1], D // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(shape)
        h *= 2
    return y * c


def detect_torch(k: torch.Tensor, max_out: int) -> torch.Tensor:
    """Outlier tokens (bool ``[T]``) of the key plane ``k`` ``[L, T, C]`` (fp32), per the module docstring.

    Scored on the layers 0, s, 2s, ... (s = ceil(L / 8): the sink stands out in every layer, so 8
    layers find it as well as all of them). Sums run token by token (and layer by layer) so the
    C++ kernel reproduces them exactly; the variance is E[x^2] - mean^2 (one pass)."""
    L, T, C = k.shape
    mask = torch.zeros(T, dtype=torch.bool)
    if max_out <= 0 or T < MIN_DETECT_TOKENS or L == 0 or C == 0:
        return mask
    s = torch.zeros(L, C)
    s2 = torch.zeros(L, C)
    layers = list(range(0, L, (L + 7) // 8))
    for t in range(T):
        xt = k[layers, t]
        s[layers] += xt
        s2[layers] += xt * xt
    mean = s / T
    var = s2 / T - mean * mean
    sd = torch.sqrt(torch.where(var > 0, var, torch.zeros(())))
    inv = torch.where(sd > 0, 1.0 / sd, torch.zeros(()))
    z = (k - mean[:, None]).abs() * inv[:, None]
    z = torch.where(torch.isnan(z), torch.zeros(()), z).amax(-1)  # [L, T]
    score = torch.zeros(T)
    for layer in layers:
        score += z[layer]
    med = score.sort().values[(T - 1) // 2]
    cand = torch.nonzero(score > med * TAU).flatten()
    if cand.numel():
        order = torch.sort(score[cand], descending=True, stable=True).indices
        mask[cand[order[:max_out]]] = True
    return mask


def _inv(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, 1.0 / s, torch.zeros((), dtype=torch.float32))


def _rint_codes(t: torch.Tensor, qmax: int) -> torch.Tensor:
    t = torch.where(t > 0, t, torch.zeros((), dtype=torch.float32))  # NaN -> 0
    t = torch.where(t < qmax, t, torch.full((), float(qmax)))
    return torch.round(t).to(torch.uint8)


def _nonfinite(y: torch.Tensor) -> torch.Tensor:
    return ~(y.abs() <= _F32_MAX)


def _k_meta(base: torch.Tensor, gcodes: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mn, s) ``[L, nkg, C]`` from the K bases ``[L, 2, C]`` and group codes ``[L, nkg, 2, C]``."""
    bmin, bmax = base[:, 0:1], base[:, 1:2]
    step = (bmax - bmin) / 255
    mn = bmin + gcodes[:, :, 0].float() * step
    mx = bmin + gcodes[:, :, 1].float() * step
    return mn, (mx - mn) / qmax


def _round_up_bits(x: torch.Tensor) -> torch.Tensor:
    """Non-negative finite fp32 values rounded up to 5 mantissa bits, as int32 bit patterns."""
    low = (1 << _SCALE_DROP) - 1
    return (x.view(torch.int32) + low) & ~low


def _scale_top(S: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(S), S, _round_up_bits(S).view(torch.float32))


def _scale_codes(top: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Per-group V scale codes ``e << 5 | m`` (int32): the needed scale rounded up to 5 mantissa
    bits, ``e`` octaves below the top (at most 7, and never below the smallest normal float)."""
    eu = top.view(torch.int32) >> 23
    emax = (eu - 1).clamp(max=_SCALE_OCTAVES - 1)
    v = _round_up_bits(need)
    e = eu - (v >> 23)
    exact = (need > 0) & (e <= emax)
    code = torch.where(exact, (e << 5) | ((v >> _SCALE_DROP) & 31), emax << 5)
    return torch.where(eu == 0, torch.zeros((), dtype=torch.int32), code)


def _v_scales(vbase: torch.Tensor, vcodes: torch.Tensor) -> torch.Tensor:
    """Per-group V scales ``[L, T, H, nvg]`` from the tops ``[L, H]`` and the codes."""
    top = vbase[:, None, :, None]
    eu = top.view(torch.int32) >> 23
    c = vcodes.to(torch.int32)
    bits = ((eu - (c >> 5)) << 23) | ((c & 31) << _SCALE_DROP)
    s = torch.where(eu == 0, torch.zeros(()), bits.view(torch.float32))
    return torch.where(torch.isnan(top), top, s)


def _quantize_k(yk: torch.Tensor, mask: torch.Tensor, lay: RotLayout, v: dict[str, torch.Tensor]) -> torch.Tensor:
    """Fill the K bases and group codes from the rotated keys ``[L, T, C]``; return K codes ``[L, T, C]``."""
    L, T, C, gk, nkg = lay.L, lay.T, lay.C, lay.gk, lay.nkg
    pad = nkg * gk - T
    yp = torch.cat([yk, yk.new_zeros(L, pad, C)], 1) if pad else yk
    ex = torch.cat([mask, mask.new_ones(pad)]) if pad else mask
    g = yp.view(L, nkg, gk, C)
    exg = ex.view(1, nkg, gk, 1)
    bad = (_nonfinite(g) & ~exg).any(2).any(1)  # [L, C]
    inf = torch.full((), float("inf"))
    gmin = torch.where(exg | _nonfinite(g), inf, g).amin(2)  # [L, nkg, C]; +inf for empty groups
    gmax = torch.where(exg | _nonfinite(g), -inf, g).amax(2)
    empty = exg.all(2).view(1, nkg, 1).expand(L, nkg, C)
    if bool(ex.all()):
        bmin = bmax = torch.zeros(L, C)
    else:
        bmin, bmax = gmin.amin(1), gmax.amax(1)
    bad |= _nonfinite(bmax - bmin)
    nan = torch.full((), float("nan"))
    bmin, bmax = torch.where(bad, nan, bmin), torch.where(bad, nan, bmax)
    step = (bmax - bmin) / 255
    live = (step > 0)[:, None] & ~empty  # [L, nkg, C]
    one = torch.ones(())
    st = torch.where(step > 0, step, one)[:, None]
    b0 = bmin[:, None]
    lo = torch.floor(((gmin - b0) / st).clamp(0, 255))
    lo = torch.where(live & (lo > 0) & (b0 + lo * st > gmin), lo - 1, lo)
    hi = torch.ceil(((gmax - b0) / st).clamp(0, 255))
    hi = torch.where(live & (hi < 255) & (b0 + hi * st < gmax), hi + 1, hi)
    zero = torch.zeros(())
    v["k_base"][:, 0], v["k_base"][:, 1] = canonical_nan(bmin.clone()), canonical_nan(bmax.clone())
    v["k_codes"][:, :, 0] = torch.where(live, lo, zero).to(torch.uint8)
    v["k_codes"][:, :, 1] = torch.where(live, hi, zero).to(torch.uint8)
    mn, s = _k_meta(v["k_base"], v["k_codes"], lay.qmax)
    q = _rint_codes((g - mn[:, :, None]) * _inv(s)[:, :, None], lay.qmax)
    return q.view(L, nkg * gk, C)[:, :T]


def _quantize_v(yv: torch.Tensor, lay: RotLayout, v: dict[str, torch.Tensor]) -> torch.Tensor:
    """Fill the V bases and scale codes from the rotated values ``[L, T, H, D]``; return codes ``[L, T, C]``."""
    L, T, H, D, gv, nvg = lay.L, lay.T, lay.H, lay.D, lay.gv, lay.nvg
    half = lay.qmax / 2
    pad = nvg * gv - D
    yp = torch.cat([yv, yv.new_zeros(L, T, H, pad)], 3) if pad else yv
    g = yp.view(L, T, H, nvg, gv)
    bad = _nonfinite(g).flatten(3).any(3).any(1)  # [L, H]
    need = g.abs().amax(-1) / half  # [L, T, H, nvg]
    need = torch.where(bad[:, None, :, None], torch.zeros(()), need)
    S = need.permute(0, 2, 1, 3).reshape(L, H, -1).amax(-1) if T else torch.zeros(L, H)
    top = torch.where(bad, torch.full((), float("nan")), _scale_top(S))
    code = _scale_codes(torch.where(bad, torch.zeros(()), top)[:, None, :, None], need)
    code = torch.where(bad[:, None, :, None], torch.zeros((), dtype=code.dtype), code)
    v["v_base"].copy_(canonical_nan(top))
    v["v_codes"].copy_(code.to(torch.uint8))
    s = _v_scales(v["v_base"], v["v_codes"])
    q = _rint_codes(g * _inv(s)[..., None] + half, lay.qmax)
    return q.reshape(L, T, H, nvg * gv)[..., :D].reshape(L, T, lay.C)


def encode_torch(x5: torch.Tensor, mask: torch.Tensor, lay: RotLayout, buf: torch.Tensor) -> None:
    """Reference encoder: fill ``buf`` (``lay.total`` bytes) from ``x5`` ``[L, P, T, H, D]``."""
    v = lay.views(buf)
    L, P, T, D, C = lay.L, lay.P, lay.T, lay.D, lay.C
    v["raw"].copy_(x5[:, :, mask].reshape(L, P, lay.n_out, C))
    v["mask"].zero_()
    v["mask"][: (T + 7) // 8].copy_(_pack_mask(mask))
    if L == 0 or T == 0 or C == 0:
        v["v_base"].zero_()
        v["k_base"].zero_()
        v["k_codes"].zero_()
        return
    y = x5.float()
    if lay.rope:
        y = torch.stack((rope_keys(y[:, 0], rope_tables(T, D, lay.rope), -1), y[:, 1]), dim=1)
    if lay.rot:
        y = fwht(y, rotation_scale(D) or 1.0)
    q_all = torch.empty((L, P, T, C), dtype=torch.uint8)
    if P == 2:
        q_all[:, 0] = _quantize_k(y[:, 0].reshape(L, T, C), mask, lay, v)
    q_all[:, P - 1] = _quantize_v(y[:, P - 1], lay, v)
    v["codes"].copy_(pack_codes(q_all, lay.bits, lay.row_bytes))


def decode_torch(buf: torch.Tensor, lay: RotLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference decoder: (``[L, P, T, H, D]`` of ``lay.dtype`` without the outlier rows, token mask)."""
    v = lay.views(buf)
    L, P, T, H, D, C = lay.L, lay.P, lay.T, lay.H, lay.D, lay.C
    out = torch.empty((L, P, T, H, D), dtype=torch.float32)
    if out.numel():
        q = unpack_codes(v["codes"], lay.bits, C).float()  # [L, P, T, C]
        if P == 2:
            mn, s = _k_meta(v["k_base"], v["k_codes"], lay.qmax)
            s = s.repeat_interleave(lay.gk, dim=1)[:, :T]
            mn = mn.repeat_interleave(lay.gk, dim=1)[:, :T]
            out[:, 0] = (q[:, 0] * s + mn).view(L, T, H, D)
        sv = _v_scales(v["v_base"], v["v_codes"]).repeat_interleave(lay.gv, dim=3)[..., :D]
        out[:, P - 1] = (q[:, P - 1].view(L, T, H, D) - lay.qmax / 2) * sv
        if lay.rot:
            out = fwht(out, rotation_scale(D) or 1.0)
        if lay.rope:
            out[:, 0] = rope_keys(out[:, 0], rope_tables(T, D, lay.rope), 1)
    return canonical_nan(out.to(lay.dtype)), _unpack_mask(v["mask"], T)


# ----------------------------------------------------------------------------- C++ dispatch

_bound: set[int] = set()
_bind_lock = threading.Lock()
_DT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _lib() -> ctypes.CDLL | None:
    lib = _ext._active()
    if lib is None or id(lib) in _bound:
        return lib
    with _bind_lock:
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.kvl_rot_detect.argtypes = [p, i, i, i, i, i, i, i, p]
        lib.kvl_rot_detect.restype = i
        lib.kvl_rot_encode.argtypes = [p, i, i, i, i, i, i, i, i, i, i, f, p, p, i, p, p, p, p, p, p, p]
        lib.kvl_rot_encode.restype = i
        lib.kvl_rot_decode.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, i, i, i, i, i, i, i, f, p, p]
        lib.kvl_rot_decode.restype = i
        _bound.add(id(lib))
    return lib


def _pooled(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` in recycled memory (:mod:`kvlayer.codec.buffers`): the
    payload that is copied into the blob, the chunk a decode returns. Fresh multi-MiB memory is
    page faults, which cost the kernels a fifth of their time; the memory goes back to the pool
    when the last tensor viewing it is gone, never earlier."""
    return torch.from_numpy(POOL.take(nbytes))


def encode_chunk(x5: torch.Tensor, bits: int, gk: int, gv: int, rot: bool, max_out: int,
                 rope: float = 0.0, head: int = 0) -> tuple[np.ndarray, RotLayout]:
    """(buffer, layout) of a contiguous ``[L, P, T, H, D]`` chunk: C++ when built, else torch. The
    buffer is recycled memory (``buffers.POOL``): ``head`` bytes left free for the caller (a blob
    header), then the payload, ``layout.total`` bytes."""
    L, P, T, H, D = x5.shape
    lib = _lib()
    if lib is None:
        mask = detect_torch(x5[:, 0].reshape(L, T, H * D).float(), max_out)
        lay = make_rot_layout(tuple(x5.shape), x5.dtype, bits, gk, gv, rot, int(mask.sum()), rope)
        arr = POOL.take(head + lay.total)
        encode_torch(x5, mask, lay, torch.from_numpy(arr)[head:])
        return arr, lay
    mask_np = np.empty(T, dtype=np.uint8)
    n = lib.kvl_rot_detect(x5.data_ptr(), _DT[x5.dtype], L, P, T, H, D, min(max_out, T), mask_np.ctypes.data)
    if n < 0:
        raise ValueError("kvl_rot_detect: bad arguments")
    lay = make_rot_layout(tuple(x5.shape), x5.dtype, bits, gk, gv, rot, n, rope)
    arr = POOL.take(head + lay.total)
    # torch.from_numpy keeps ``arr`` (whose lifetime returns the memory to the pool) alive; a numpy
    # slice of it would not
    buf = torch.from_numpy(arr)[head:]
    tab = rope_tables(T, D, rope) if rope else None
    n = lib.kvl_rot_encode(x5.data_ptr(), _DT[x5.dtype], L, P, T, H, D, bits, gk, gv, int(rot),
                           rotation_scale(D) or 1.0, None if tab is None else tab.data_ptr(), mask_np.ctypes.data,
                           lay.mask_bytes, *lay.pointers(buf))
    if n != lay.n_out:
        raise ValueError(f"kvl_rot_encode failed ({n})")
    return arr, lay


def decode_from(buf: torch.Tensor, lay: RotLayout) -> torch.Tensor:
    """The decoded ``[L, P, T, H, D]`` chunk, outlier rows included."""
    lib = _lib()
    if lib is None:
        out, mask = decode_torch(buf, lay)
        if int(mask.sum()) != lay.n_out:
            raise ValueError("token bitmap disagrees with the header")
        if lay.n_out:
            out[:, :, mask] = lay.views(buf)["raw"].view(lay.L, lay.P, lay.n_out, lay.H, lay.D)
        return out
    shape = (lay.L, lay.P, lay.T, lay.H, lay.D)
    out = _pooled(math.prod(shape) * lay.dtype.itemsize).view(lay.dtype).view(shape)
    tab = rope_tables(lay.T, lay.D, lay.rope) if lay.rope else None
    rc = lib.kvl_rot_decode(*lay.pointers(buf), lay.mask_bytes, lay.n_out, _DT[lay.dtype], lay.L, lay.P, lay.T, lay.H, lay.D,
                            lay.bits, lay.gk, lay.gv, int(lay.rot), rotation_scale(lay.D) or 1.0,
                            None if tab is None else tab.data_ptr(), out.data_ptr())
    if rc == 2:
        raise ValueError("token bitmap disagrees with the header")
    if rc != 0:
        raise ValueError(f"kvl_rot_decode failed ({rc})")
    return out


# ----------------------------------------------------------------------------- the transforms


class _IntQuant(Transform):
    """Shared encode/decode of int8/int4/int2; subclasses only fix ``bits``."""

    bits: int = 8
    #: Default (key, value) group sizes of the rotated scheme: the keys' error is what changes the
    #: next token (on SmolLM2, int4 keys alone cost 3x the KL of int4 values alone), so int8
    #: gives its keys shorter groups; see the module docstring.
    rot_groups: tuple[int, int] = (DEFAULT_GROUP, DEFAULT_GROUP)
    lossless = False
    _own_params = frozenset({"group_size", "k_group_size", "v_group_size", "scheme", "rotate", "outlier_tokens",
                             "rope_theta"})

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        unknown = set(params) - self._own_params - _COMPRESSOR_PARAMS
        if unknown:
            raise ConfigError(f"codec {self.name!r}: unknown parameter(s) {sorted(unknown)}; accepted: {sorted(self._own_params)}")
        self.scheme = params.get("scheme", "rot")
        if self.scheme not in ("rot", "kivi"):
            raise ConfigError(f"codec {self.name!r}: scheme={self.scheme!r}, expected 'rot' or 'kivi'")
        if "group_size" in params:
            dk = dv = _check_group("group_size", params["group_size"])
        else:
            dk, dv = self.rot_groups if self.scheme == "rot" else (DEFAULT_GROUP, DEFAULT_GROUP)
        self.gk = _check_group("k_group_size", params.get("k_group_size", dk))
        self.gv = _check_group("v_group_size", params.get("v_group_size", dv))
        self.rotate = params.get("rotate", True)
        if not isinstance(self.rotate, bool):
            raise ConfigError(f"codec {self.name!r}: rotate={self.rotate!r}, expected true or false")
        n = params.get("outlier_tokens", DEFAULT_OUTLIERS)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1 << 16:
            raise ConfigError(f"codec {self.name!r}: outlier_tokens={n!r}, expected an int in [0, 65536]")
        self.outliers = n
        theta = params.get("rope_theta", 0.0)
        if theta is None:
            theta = 0.0
        if isinstance(theta, bool) or not isinstance(theta, int | float) or not math.isfinite(theta) or theta < 0:
            raise ConfigError(f"codec {self.name!r}: rope_theta={theta!r}, expected the model's RoPE base (a number "
                              "> 0, e.g. 10000.0) or 0 for keys quantized as stored")
        self.rope = float(theta)
        if self.scheme == "kivi" and ("rotate" in params or "outlier_tokens" in params or self.rope):
            raise ConfigError(f"codec {self.name!r}: rotate/outlier_tokens/rope_theta apply to scheme 'rot' only")

    @classmethod
    def takes_rope(cls, params: dict[str, Any]) -> bool:
        return params.get("scheme", "rot") == "rot"

    def encode(self, x: torch.Tensor) -> tuple[Buffer, dict[str, Any], int]:
        if self.scheme == "kivi":
            return self._encode_kivi(x)
        arr, length, params = self._encode_rot(x, 0)
        return arr.data[:length], params, 1

    def encode_into(self, x: torch.Tensor, head: int) -> tuple[np.ndarray, int, dict[str, Any]] | None:
        return None if self.scheme == "kivi" else self._encode_rot(x, head)

    def _encode_rot(self, x: torch.Tensor, head: int) -> tuple[np.ndarray, int, dict[str, Any]]:
        x = x.detach().cpu().contiguous()  # no CUDA kernel for this scheme: a GPU chunk is encoded on the host
        L, P, T, H, D = canonical_shape(tuple(x.shape))
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"quantized codecs take fp16/bf16/fp32 chunks, got {x.dtype}")
        rot = self.rotate and rotation_scale(D) is not None
        rope = self.rope if P == 2 and D % 2 == 0 else 0.0  # MLA's one plane holds no RoPE'd keys
        arr, lay = encode_chunk(x.view(L, P, T, H, D), self.bits, self.gk, self.gv, rot, self.outliers, rope, head)
        params: dict[str, Any] = {"s": "rot", "b": self.bits, "gk": self.gk, "gv": self.gv, "r": int(rot), "o": lay.n_out}
        if rope:
            params["rt"] = rope
        return arr, lay.total, params

    def _encode_kivi(self, x: torch.Tensor) -> tuple[Buffer, dict[str, Any], int]:
        from kvlayer.codec import cuda

        lay = make_layout(tuple(x.shape), x.dtype, self.bits, self.gk, self.gv)
        buf = cuda.quantize(x, lay)  # a CUDA chunk is quantized on its GPU; None: on the CPU here
        if buf is None:
            x = x.detach().cpu().contiguous()
            buf = torch.empty(lay.total, dtype=torch.uint8)
            quantize_into(x, lay, buf)
        return tensor_bytes(buf), {"b": self.bits, "gk": self.gk, "gv": self.gv}, 1

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]) -> torch.Tensor:
        bits = _int_param(params, "b")
        if bits != self.bits:
            raise ValueError(f"{self.name} blob says {bits} bits")
        gk, gv = _int_param(params, "gk"), _int_param(params, "gv")
        scheme = params.get("s", "kivi")
        if scheme == "kivi":
            klay = make_layout(shape, dtype, bits, gk, gv)
            if payload.nbytes != klay.total:
                raise ValueError(f"{self.name} payload is {payload.nbytes} bytes, shape {shape} needs {klay.total}")
            return dequantize_from(_payload_tensor(payload), klay, dtype).reshape(shape)
        if scheme != "rot":
            raise ValueError(f"{self.name}: unknown scheme {scheme!r}")
        r = _int_param(params, "r")
        if r not in (0, 1):
            raise ValueError(f"{self.name}: rotation flag {r}")
        rope = params.get("rt", 0.0)
        if isinstance(rope, bool) or not isinstance(rope, int | float):
            raise ValueError(f"{self.name}: RoPE base {rope!r}")
        lay = make_rot_layout(shape, dtype, bits, gk, gv, bool(r), _int_param(params, "o"), float(rope))
        if payload.nbytes != lay.total:
            raise ValueError(f"{self.name} payload is {payload.nbytes} bytes, shape {shape} needs {lay.total}")
        return decode_from(_payload_tensor(payload), lay).reshape(shape)


@register_transform
class Int8Transform(_IntQuant):
    """8-bit rotated quantization (KIVI blobs decode too): see the module docstring."""

    name = "int8"
    bits = 8
    rot_groups = (16, 32)


@register_transform
class Int4Transform(_IntQuant):
    """4-bit rotated quantization (KIVI blobs decode too): see the module docstring."""

    name = "int4"
    bits = 4


@register_transform
class Int2Transform(_IntQuant):
    """2-bit rotated quantization (KIVI blobs decode too): see the module docstring."""

    name = "int2"
    bits = 2


__all__ = [
    "Int2Transform",
    "Int4Transform",
    "Int8Transform",
    "RotLayout",
    "decode_torch",
    "detect_torch",
    "encode_torch",
    "fwht",
    "make_rot_layout",
]
