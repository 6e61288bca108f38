"""lz4 block compression after a byte-shuffle.

Shuffling groups byte j of every element together: fp16 KV has near-constant exponent/sign bytes,
which lz4 then compresses well while the noisy mantissa bytes pass through almost untouched.
"""

from __future__ import annotations

import warnings
from typing import Any

import lz4.block
import numpy as np
import torch

from kvlayer.codec.base import Buffer, Compressor


def _kernel(data: Buffer, typesize: int, inverse: bool) -> Buffer | None:
    """The C++ (un)shuffle when built (one pass, several GB/s); None -> numpy below."""
    from kvlayer.codec import _ext

    mv = memoryview(data).cast("B")
    if mv.nbytes == 0:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers are only read
        src = torch.frombuffer(mv, dtype=torch.uint8)
    out = _ext.shuffle(src, typesize, inverse=inverse)
    return None if out is None else memoryview(out.numpy())


def shuffle(data: Buffer, typesize: int) -> Buffer:
    if typesize <= 1:
        return data
    fast = _kernel(data, typesize, inverse=False)
    if fast is not None:
        return fast
    a = np.frombuffer(data, dtype=np.uint8)
    n = a.size // typesize
    head = a[: n * typesize].reshape(n, typesize).T
    out = np.empty(a.size, dtype=np.uint8)
    out[: n * typesize].reshape(typesize, n)[...] = head
    out[n * typesize :] = a[n * typesize :]
    return memoryview(out)


def unshuffle(data: Buffer, typesize: int) -> Buffer:
    if typesize <= 1:
        return data
    fast = _kernel(data, typesize, inverse=True)
    if fast is not None:
        return fast
    a = np.frombuffer(data, dtype=np.uint8)
    n = a.size // typesize
    out = np.empty(a.size, dtype=np.uint8)
    out[: n * typesize].reshape(n, typesize)[...] = a[: n * typesize].reshape(typesize, n).T
    out[n * typesize :] = a[n * typesize :]
    return memoryview(out)


class LZ4Compressor(Compressor):
    name = "lz4"

    def compress(self, data: Buffer, typesize: int) -> tuple[Buffer, dict[str, Any]]:
        shuffled = bool(self.params.get("shuffle", True)) and typesize > 1
        src = shuffle(data, typesize) if shuffled else data
        raw_len = memoryview(data).nbytes
        out = lz4.block.compress(src, store_size=False, mode="default")
        return out, {"raw_len": raw_len, "typesize": typesize if shuffled else 1}

    def decompress(self, data: memoryview, params: dict[str, Any]) -> Buffer:
        raw_len = int(params["raw_len"])
        try:
            out = lz4.block.decompress(data, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as e:
            raise ValueError(f"lz4: {e}") from None
        if len(out) != raw_len:
            raise ValueError("lz4: wrong decompressed length")
        return unshuffle(out, int(params.get("typesize", 1)))
