"""Codec building blocks: a *transform* turns a tensor into bytes (raw, quantizers), an optional
*compressor* turns bytes into fewer bytes (lz4). A codec name is ``transform[+compressor]``.
"""

from __future__ import annotations

import re
import warnings
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

Buffer = bytes | bytearray | memoryview

#: torch warns when it views a read-only buffer; kvlayer views them only to read (decoded tensors
#: are read-only by contract). A filter for this module, set once: ``warnings.catch_warnings()``
#: around each call swapped process-wide state and is not thread-safe (blobs are decoded on
#: several reader threads at once).
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=re.escape(__name__))


class Transform(ABC):
    """Tensor <-> bytes. Lossless transforms must round-trip bit-exactly."""

    name: str = ""
    lossless: bool = False
    #: False: a retired transform, kept only so that its blobs still decode; no codec writes it.
    writable: bool = True

    def __init__(self, **params: Any) -> None:
        self.params = params

    @classmethod
    def takes_rope(cls, params: dict[str, Any]) -> bool:
        """Whether, with ``params``, this transform uses a ``rope_theta`` (the model's RoPE base)."""
        return False

    @abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[Buffer, dict[str, Any], int]:
        """Return (payload, params needed to decode, element size for byte-shuffling)."""

    def encode_into(self, x: torch.Tensor, head: int) -> tuple[np.ndarray, int, dict[str, Any]] | None:
        """Like ``encode``, into a fresh buffer whose first ``head`` bytes are left for the blob's
        header: (buffer, payload length, params), the payload at ``buffer[head:head + length]``;
        the blob then needs no copy of it (7% of an int8 encode). Used only without a compressor,
        so no element size. None where a transform has no such path; the buffer's lifetime is the
        blob's."""
        return None

    @abstractmethod
    def decode(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any]) -> torch.Tensor:
        """Rebuild a tensor of ``shape``/``dtype``; may raise ValueError on inconsistent input."""


class Compressor(ABC):
    """Bytes <-> bytes, lossless."""

    name: str = ""

    def __init__(self, **params: Any) -> None:
        self.params = params

    @abstractmethod
    def compress(self, data: Buffer, typesize: int) -> tuple[Buffer, dict[str, Any]]: ...

    @abstractmethod
    def decompress(self, data: memoryview, params: dict[str, Any]) -> Buffer: ...


def tensor_bytes(x: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    x = x.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.contiguous()
    return x.view(torch.uint8).reshape(-1).numpy().data  # typed as a memoryview, unlike memoryview(ndarray)


def tensor_from_bytes(payload: Buffer, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``payload``, never a copy. A read-only buffer (the ``bytes`` a Redis reply
    arrives in, which nothing else holds) is viewed as it is: decoded tensors are read-only by
    contract (``KVCache.retrieve_chunks``), and a copy here cost a fifth of a Redis read."""
    mv = memoryview(payload)
    if mv.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mv, dtype=torch.uint8).view(dtype).reshape(shape)
