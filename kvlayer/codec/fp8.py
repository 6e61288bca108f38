"""``fp8``: e4m3 (``torch.float8_e4m3fn``) with one fp32 scale per (layer, plane, head).

Why per head: K and V of different heads and layers differ in magnitude by orders; one scale per
(layer, plane, head) puts each slice's absolute maximum at 448 (the e4m3fn maximum) so the
3-bit mantissa is used where the values are, at 1 byte per element plus 4 bytes per slice.

Arithmetic (fp32, shared bit for bit with the C++ kernels)::

    s   = amax(|x|) over (tokens, head_dim) / 448      # NaN propagates
    inv = 1 / s if s > 0 else 0
    q   = e4m3fn(x * inv)                              # round to nearest even, saturating at 448
    x'  = out_dtype(float(q) * s)

Error bound (tested): ``|x - x'| <= 2**-4 * |x| + 2**-10 * s + 1e-6 * |x| + u(x')`` where
``2**-4`` is half an ulp of the 3-bit mantissa relative to the value, ``2**-10 * s`` covers the
subnormal range (|x| < 2**-6 s), ``1e-6`` the fp32 scaling and ``u`` half an ulp of the output
dtype. Non-finite input: a (layer, plane, head) slice holding NaN or +-inf decodes to all-NaN
(the canonical quiet NaN, as in quant.py).

Payload = scales (fp32, ``[L, P, H]``) | codes (``[L, P, T, H, D]``, 1 byte each).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from kvlayer.codec import register_transform
from kvlayer.codec.base import Buffer, Transform, tensor_bytes
from kvlayer.codec.quant import _COMPRESSOR_PARAMS, _payload_tensor, canonical_nan, canonical_shape
from kvlayer.errors import ConfigError

FP8_MAX = 448.0
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fp8_scales(x5: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inv) per (layer, plane, head) of an ``[L, P, T, H, D]`` chunk, fp32."""
    amax = x5.float().abs().amax(dim=(2, 4))
    s = amax / FP8_MAX
    inv = torch.where(s > 0, 1.0 / s, torch.zeros((), dtype=torch.float32))
    return s, inv


def fp8_encode_torch(x5: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> None:
    """Reference: fill ``scales [L,P,H]`` (fp32) and ``codes [L,P,T,H,D]`` (uint8)."""
    if x5.numel() == 0:
        if scales.numel():
            scales.zero_()
        return
    s, inv = fp8_scales(x5)
    scales.copy_(canonical_nan(s))
    y = x5.float() * inv[:, :, None, :, None]
    codes.copy_(y.to(torch.float8_e4m3fn).view(torch.uint8))


def fp8_decode_torch(scales: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = codes.view(torch.float8_e4m3fn).float()
    return canonical_nan((y * scales[:, :, None, :, None]).to(dtype))


def _views(buf: torch.Tensor, L: int, P: int, T: int, H: int, D: int) -> tuple[torch.Tensor, torch.Tensor]:
    ns = L * P * H * 4
    if buf.numel() != ns + L * P * T * H * D:
        raise ValueError(f"fp8 payload is {buf.numel()} bytes, shape needs {ns + L * P * T * H * D}")
    return buf[:ns].view(torch.float32).view(L, P, H), buf[ns:].view(L, P, T, H, D)


@register_transform
class FP8Transform(Transform):
    """e4m3 with per-(layer, plane, head) scales; relative error <= 2**-4 (see module docstring)."""

    name = "fp8"
    lossless = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        unknown = set(params) - _COMPRESSOR_PARAMS
        if unknown:
            raise ConfigError(f"codec 'fp8': unknown parameter(s) {sorted(unknown)}; it takes none")

    def encode(self, x: torch.Tensor) -> tuple[Buffer, dict[str, Any], int]:
        from kvlayer.codec import _ext, cuda

        if x.is_cuda and (gpu := cuda.fp8_encode(x.reshape(canonical_shape(tuple(x.shape))))) is not None:
            return tensor_bytes(gpu), {}, 1  # a CUDA chunk is encoded on its GPU
        x = x.detach().cpu().contiguous()
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"fp8 takes fp16/bf16/fp32 chunks, got {x.dtype}")
        L, P, T, H, D = canonical_shape(tuple(x.shape))
        buf = torch.empty(L * P * H * 4 + math.prod((L, P, T, H, D)), dtype=torch.uint8)
        scales, codes = _views(buf, L, P, T, H, D)
        x5 = x.reshape(L, P, T, H, D)
        if not _ext.fp8_encode(x5, scales, codes):
            fp8_encode_torch(x5, scales, codes)
        return tensor_bytes(buf), {}, 1

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]) -> torch.Tensor:
        from kvlayer.codec import _ext

        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"fp8 blob with dtype {dtype}")
        L, P, T, H, D = canonical_shape(shape)
        scales, codes = _views(_payload_tensor(payload), L, P, T, H, D)
        out = _ext.fp8_decode(scales, codes, dtype)
        if out is None:
            out = fp8_decode_torch(scales, codes, dtype)
        return out.reshape(shape)


__all__ = ["FP8_MAX", "FP8Transform", "fp8_decode_torch", "fp8_encode_torch", "fp8_scales"]
