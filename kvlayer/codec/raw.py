"""The identity transform: the tensor's bytes as they are (lossless, memcpy speed)."""

from __future__ import annotations

from typing import Any

import torch

from kvlayer.codec.base import Buffer, Transform, tensor_bytes, tensor_from_bytes


class RawTransform(Transform):
    name = "raw"
    lossless = True

    def encode(self, x: torch.Tensor) -> tuple[Buffer, dict[str, Any], int]:
        return tensor_bytes(x), {}, x.element_size()

    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        if payload.nbytes != n * torch.empty((), dtype=dtype).element_size():
            raise ValueError("raw payload size does not match shape")
        return tensor_from_bytes(payload, dtype, shape)
