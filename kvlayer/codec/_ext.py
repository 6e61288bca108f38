"""Optional C++ kernels for the codecs (placeholder until built): torch fallback everywhere."""

from __future__ import annotations

from typing import Any

import torch


def quantize(x: torch.Tensor, lay: Any, views: tuple[torch.Tensor, ...]) -> bool:
    return False


def dequantize(views: tuple[torch.Tensor, ...], lay: Any, dtype: torch.dtype) -> torch.Tensor | None:
    return None


def fp8_encode(x5: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor) -> bool:
    return False


def fp8_decode(scales: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    return None


def backend_info() -> dict[str, object]:
    return {"backend": "torch", "reason": "C++ kernels not built yet"}


from contextlib import contextmanager  # noqa: E402


@contextmanager
def use_backend(name: str | None):  # type: ignore[no-untyped-def]
    yield
