"""KIVI-style asymmetric integer quantization of KV chunks: the ``kivi`` scheme
of ``int8``/``int4``/``int2`` (:mod:`kvlayer.codec.rotq`: the layout of their blobs before the
rotated scheme, still written with ``scheme: kivi``, on a GPU too, and always decoded), and the
retired ``mixed`` codec's blobs (decoded only).

Why this shape of quantizer (KIVI, Liu et al. 2024): keys have outlier *channels*, so keys are
quantized **per channel** (for each layer and channel, one scale/zero per group of ``k_group_size``
tokens); values have no channel structure but matter per token, so values are quantized **per
token** (for each layer, token and head, one scale/zero per group of ``v_group_size`` channels of
head_dim). MLA chunks (one plane) are treated as values.

Chunk layout: ``[layers, planes, tokens, kv_heads, head_dim]`` with planes = 2 (K, V) or 1 (MLA,
also accepted as 4-d ``[layers, 1, tokens, latent]``). Any token count (0 included) works; the
last token group of K and the last channel group of V may be partial.

Arithmetic (shared bit for bit by the torch reference and the C++ kernels, all in fp32)::

    mn, mx = min(group) + 0.0, max(group) + 0.0   # NaN propagates; +0.0 makes -0 -> +0
    z  = meta(mn)                                 # exact: see "meta dtype"
    s  = meta_round_up((mx - z) / qmax)           # scale rounded *up* so the range is covered
    inv = 1 / s if s > 0 else 0
    q  = rint(clamp((x - z) * inv, 0, qmax))      # NaN -> 0; round half to even
    x' = out_dtype(q * s + z)                     # no fused multiply-add

Meta dtype: fp16 for fp16 chunks (every fp16 value is exact in fp16, so ``z == mn``), fp32 for
bf16/fp32 chunks (fp16 cannot hold their range). Meta costs 2 values per group.

Error bound (tested): for every element of a finite group,
``|x - x'| <= 0.5001 * s + u(x') + 2**-22 * max(|min|, |max|)``, where ``s`` is the stored group
scale, ``s <= (max - min) / qmax * (1 + 2**-10) + 2**-24`` (exact division rounded up to fp16;
fp32 meta adds no rounding), qmax = 255 / 15 / 3 for int8 / int4 / int2, ``u(x')`` is half an ulp
of the output dtype at ``x'`` (the final cast), and the last term covers fp32 arithmetic. In
short: int8 error <= (max-min)/510 per group, int4 <= (max-min)/30, int2 <= (max-min)/6.

Non-finite input: a group holding any NaN or +-inf decodes to all-NaN (its scale or zero is
non-finite); the damage stays visible and confined to its group, and encoding never fails. NaNs
are written as the canonical quiet NaN (meta and output), so blobs and decoded tensors are
byte-identical whichever backend (torch or C++) produced them.

Packing: each token row of each (layer, plane) holds ``kv_heads * head_dim`` codes packed
little-end first (int4: 2 per byte, int2: 4 per byte), padded to a whole byte per row.
Payload = K scales | K zeros | V scales | V zeros | codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kvlayer.codec import register_transform
from kvlayer.codec.base import Buffer, Transform
from kvlayer.errors import ConfigError

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_GROUP = 32
# Params that belong to the compressor stage of a composed codec (``int4+lz4``), not to us.
_COMPRESSOR_PARAMS = frozenset({"shuffle", "min_gain"})


def meta_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """fp16 meta for fp16 data (exact zero points), fp32 otherwise (bf16/fp32 exceed fp16's range)."""
    return torch.float16 if dtype == torch.float16 else torch.float32


def canonical_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    """``(L, P, T, H, D)`` of a chunk; 4-d MLA ``[L, 1, T, latent]`` becomes ``H = 1``."""
    if len(shape) == 4:
        shape = (shape[0], shape[1], shape[2], 1, shape[3])
    if len(shape) != 5:
        raise ValueError(f"quantized codecs need a [layers, 2|1, tokens, heads, head_dim] chunk, got shape {shape}")
    if shape[1] not in (1, 2):
        raise ValueError(f"plane axis must be 2 (K, V) or 1 (MLA), got {shape[1]}")
    L, P, T, H, D = shape
    return L, P, T, H, D


@dataclass(frozen=True)
class QuantLayout:
    """Byte layout of one quantized payload; both encoder and decoder derive it from the header."""

    L: int
    P: int
    T: int
    H: int
    D: int
    bits: int
    gk: int
    gv: int
    meta: torch.dtype

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def C(self) -> int:
        return self.H * self.D

    @property
    def row_bytes(self) -> int:
        return (self.C * self.bits + 7) // 8

    @property
    def nkg(self) -> int:
        return (self.T + self.gk - 1) // self.gk if self.P == 2 else 0

    @property
    def nvg(self) -> int:
        return (self.D + self.gv - 1) // self.gv

    @property
    def k_meta_shape(self) -> tuple[int, int, int]:
        return (self.L, self.nkg, self.C)

    @property
    def v_meta_shape(self) -> tuple[int, int, int, int]:
        return (self.L, self.T, self.H, self.nvg)

    @property
    def codes_shape(self) -> tuple[int, int, int, int]:
        return (self.L, self.P, self.T, self.row_bytes)

    def sizes(self) -> tuple[int, int, int]:
        """(bytes of K meta incl. scales+zeros, bytes of V meta, bytes of codes)."""
        esz = 2 if self.meta == torch.float16 else 4
        k = 2 * math.prod(self.k_meta_shape) * esz
        v = 2 * math.prod(self.v_meta_shape) * esz
        return k, v, math.prod(self.codes_shape)

    @property
    def total(self) -> int:
        return sum(self.sizes())

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(k_scale, k_zero, v_scale, v_zero, codes) as views into a flat uint8 buffer."""
        k, v, c = self.sizes()
        if buf.numel() != k + v + c:
            raise ValueError(f"quantized payload is {buf.numel()} bytes, layout needs {k + v + c}")
        kb, vb = buf[:k], buf[k : k + v]
        kk = kb.view(self.meta).view(2, *self.k_meta_shape)
        vv = vb.view(self.meta).view(2, *self.v_meta_shape)
        codes = buf[k + v :].view(self.codes_shape)
        return kk[0], kk[1], vv[0], vv[1], codes


def make_layout(shape: tuple[int, ...], dtype: torch.dtype, bits: int, gk: int, gv: int) -> QuantLayout:
    L, P, T, H, D = canonical_shape(shape)
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    if gk < 1 or gv < 1:
        raise ValueError("group sizes must be >= 1")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantized codecs take fp16/bf16/fp32 chunks, got {dtype}")
    return QuantLayout(L, P, T, H, D, bits, gk, gv, meta_dtype_for(dtype))


# ----------------------------------------------------------------------------- torch reference


def _group_params(mn: torch.Tensor, mx: torch.Tensor, qmax: int, meta: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(zero, scale) in the meta dtype and (zero, scale, inv) in fp32, per the module docstring."""
    z_m = mn.to(meta)
    z = z_m.float()
    s = (mx - z) / qmax
    s_m = s.to(meta)
    if meta == torch.float16:
        # Round the scale up to the next fp16 (bit pattern + 1 for positives) so q*s covers mx.
        up = s_m.float() < s
        if bool(up.any()):
            s_m = torch.where(up, (s_m.view(torch.int16) + 1).view(torch.float16), s_m)
    sf = s_m.float()
    inv = torch.where(sf > 0, 1.0 / sf, torch.zeros((), dtype=torch.float32))
    return canonical_nan(z_m), canonical_nan(s_m), z, sf, inv


def canonical_nan(t: torch.Tensor) -> torch.Tensor:
    """Every NaN as the one canonical quiet NaN, so both backends write identical bytes."""
    nan = torch.isnan(t)
    return t.masked_fill_(nan, float("nan")) if bool(nan.any()) else t


def _codes(x: torch.Tensor, z: torch.Tensor, inv: torch.Tensor, qmax: int) -> torch.Tensor:
    t = (x - z) * inv
    t = torch.where(t > 0, t, torch.zeros((), dtype=torch.float32))  # NaN -> 0
    t = torch.where(t < qmax, t, torch.full((), float(qmax)))
    return torch.round(t).to(torch.uint8)


def _pad_last(x: torch.Tensor, dim: int, mult: int) -> torch.Tensor:
    """Pad ``dim`` to a multiple of ``mult`` by repeating its last slice (min/max unchanged)."""
    n = x.shape[dim]
    pad = (-n) % mult
    if pad == 0:
        return x
    last = x.narrow(dim, n - 1, 1)
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, last.expand(shape)], dim=dim)


def pack_codes(q: torch.Tensor, bits: int, row_bytes: int) -> torch.Tensor:
    """Pack the last axis of uint8 codes ``bits`` wide, low bits first, padding each row."""
    if bits == 8:
        return q
    per = 8 // bits
    q = torch.nn.functional.pad(q, (0, row_bytes * per - q.shape[-1]))
    q = q.view(*q.shape[:-1], row_bytes, per)
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (bits * i)
    return out


def unpack_codes(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return p
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(p >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*p.shape[:-1], p.shape[-1] * per)[..., :n]


def quantize_torch(x: torch.Tensor, lay: QuantLayout, out: tuple[torch.Tensor, ...]) -> None:
    """Reference quantizer: fill ``out = lay.views(buf)`` from chunk ``x`` (torch ops, fp32 math)."""
    k_scale, k_zero, v_scale, v_zero, codes = out
    L, P, T, H, D, C = lay.L, lay.P, lay.T, lay.H, lay.D, lay.C
    if T == 0 or L == 0 or C == 0:
        return
    x5 = x.reshape(L, P, T, H, D).float()
    q_all = torch.empty((L, P, T, C), dtype=torch.uint8)
    if P == 2:
        k = _pad_last(x5[:, 0].reshape(L, T, C), 1, lay.gk).view(L, lay.nkg, lay.gk, C)
        z_m, s_m, z, sf, inv = _group_params(k.amin(2) + 0.0, k.amax(2) + 0.0, lay.qmax, lay.meta)
        k_zero.copy_(z_m)
        k_scale.copy_(s_m)
        q = _codes(k, z[:, :, None], inv[:, :, None], lay.qmax)
        q_all[:, 0] = q.view(L, lay.nkg * lay.gk, C)[:, :T]
    v = _pad_last(x5[:, P - 1], 3, lay.gv).view(L, T, H, lay.nvg, lay.gv)
    z_m, s_m, z, sf, inv = _group_params(v.amin(4) + 0.0, v.amax(4) + 0.0, lay.qmax, lay.meta)
    v_zero.copy_(z_m)
    v_scale.copy_(s_m)
    q = _codes(v, z[..., None], inv[..., None], lay.qmax)
    q_all[:, P - 1] = q.view(L, T, H, lay.nvg * lay.gv)[..., :D].reshape(L, T, C)
    codes.copy_(pack_codes(q_all, lay.bits, lay.row_bytes))


def dequantize_torch(parts: tuple[torch.Tensor, ...], lay: QuantLayout, dtype: torch.dtype) -> torch.Tensor:
    """Reference dequantizer: ``[L, P, T, H, D]`` tensor of ``dtype`` from ``lay.views(buf)``."""
    k_scale, k_zero, v_scale, v_zero, codes = parts
    L, P, T, H, D, C = lay.L, lay.P, lay.T, lay.H, lay.D, lay.C
    out = torch.empty((L, P, T, H, D), dtype=dtype)
    if out.numel() == 0:
        return out
    q = unpack_codes(codes, lay.bits, C).float()  # [L, P, T, C]
    if P == 2:
        s = k_scale.float().repeat_interleave(lay.gk, dim=1)[:, :T]
        z = k_zero.float().repeat_interleave(lay.gk, dim=1)[:, :T]
        out[:, 0] = (q[:, 0] * s + z).view(L, T, H, D)
    s = v_scale.float().repeat_interleave(lay.gv, dim=3)[..., :D]
    z = v_zero.float().repeat_interleave(lay.gv, dim=3)[..., :D]
    out[:, P - 1] = q[:, P - 1].view(L, T, H, D) * s + z
    return canonical_nan(out)


# ----------------------------------------------------------------------------- dispatch


def quantize_into(x: torch.Tensor, lay: QuantLayout, buf: torch.Tensor) -> None:
    """Quantize ``x`` into the flat uint8 ``buf`` with the C++ kernels when built, else torch."""
    from kvlayer.codec import _ext

    views = lay.views(buf)
    if not _ext.quantize(x, lay, views):
        quantize_torch(x, lay, views)


def dequantize_from(buf: torch.Tensor, lay: QuantLayout, dtype: torch.dtype) -> torch.Tensor:
    from kvlayer.codec import _ext

    views = lay.views(buf)
    out = _ext.dequantize(views, lay, dtype)
    return out if out is not None else dequantize_torch(views, lay, dtype)


def _payload_tensor(payload: Buffer) -> torch.Tensor:
    mv = memoryview(payload)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(mv, dtype=torch.uint8)


def _int_param(params: dict[str, Any], key: str, default: int | None = None) -> int:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"parameter {key!r} must be an int, got {v!r}")
    return v


def _check_group(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v > 1 << 20:
        raise ConfigError(f"codec parameter {name}={v!r}: expected an int in [1, 1048576]")
    return v


# ----------------------------------------------------------------------------- mixed precision


@register_transform
class MixedTransform(Transform):
    """Retired: ZipCache-style mixed precision (the ``nh`` most salient tokens, by key norm, at
    ``hb`` bits, the rest at ``lb`` bits, each subset quantized KIVI-style on its own). The rotated
    int4/int2 beat it on both compression and model quality (docs/codecs.md), so nothing writes
    it any more; its blobs still decode.

    Payload: token bitmap (1 bit per token, set = high) | high-bit payload | low-bit payload,
    the first two zero-padded to 4-byte multiples so the meta arrays stay aligned.
    """

    name = "mixed"
    lossless = False
    writable = False

    def encode(self, x: torch.Tensor) -> tuple[Buffer, dict[str, Any], int]:
        raise ConfigError("codec 'mixed' is retired: its blobs decode, nothing writes them (use int4 or int2)")

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]) -> torch.Tensor:
        L, P, T, H, D = canonical_shape(shape)
        hb, lb = _int_param(params, "hb"), _int_param(params, "lb")
        gk, gv, n_high = _int_param(params, "gk"), _int_param(params, "gv"), _int_param(params, "nh")
        if not 0 <= n_high <= T:
            raise ValueError(f"mixed: {n_high} high-precision tokens out of {T}")
        mbytes = _up4((T + 7) // 8)
        lay_h = make_layout((L, P, n_high, H, D), dtype, hb, gk, gv)
        lay_l = make_layout((L, P, T - n_high, H, D), dtype, lb, gk, gv)
        expect = mbytes + _up4(lay_h.total) + _up4(lay_l.total)
        if payload.nbytes != expect:
            raise ValueError(f"mixed payload is {payload.nbytes} bytes, expected {expect}")
        buf = _payload_tensor(payload)
        mask = _unpack_mask(buf[:mbytes], T)
        if int(mask.sum()) != n_high:
            raise ValueError("mixed: token bitmap disagrees with the header")
        out = torch.empty((L, P, T, H, D), dtype=dtype)
        off = mbytes
        for lay, sel in ((lay_h, mask), (lay_l, ~mask)):
            sub = dequantize_from(buf[off : off + lay.total], lay, dtype)
            off += _up4(lay.total)
            out[:, :, sel] = sub
        return out.reshape(shape)


def _up4(n: int) -> int:
    return (n + 3) & ~3


def _pack_mask(mask: torch.Tensor) -> torch.Tensor:
    n = mask.numel()
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-n) % 8)).view(-1, 8)
    w = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (m * w).sum(1, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)


def _unpack_mask(b: torch.Tensor, n: int) -> torch.Tensor:
    w = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    bits = (b[:, None] & w) != 0
    rest = bits.reshape(-1)
    if bool(rest[n:].any()):  # also covers the 4-byte alignment padding
        raise ValueError("mixed: padding bits set in token bitmap")
    return rest[:n]


__all__ = [
    "MixedTransform",
    "QuantLayout",
    "dequantize_torch",
    "make_layout",
    "quantize_torch",
]
