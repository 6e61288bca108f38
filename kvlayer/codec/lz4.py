"""lz4 block compression after a byte-shuffle (or the payload stored as is when lz4 would not pay).

Shuffling groups byte j of every element together: fp16 KV has near-constant exponent/sign bytes,
which lz4 then compresses well while the noisy mantissa bytes pass through almost untouched.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import lz4.block
import numpy as np
import torch

from kvlayer.codec.base import Buffer, Compressor

# (see kvlayer.codec.base: one filter for this module, not catch_warnings() per call across threads)
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=re.escape(__name__))


def _kernel(data: Buffer, typesize: int, inverse: bool) -> Buffer | None:
    """The C++ (un)shuffle when built (one pass, several GB/s); None -> numpy below."""
    from kvlayer.codec import _ext

    mv = memoryview(data).cast("B")
    if mv.nbytes == 0:
        return None
    src = torch.frombuffer(mv, dtype=torch.uint8)  # read-only buffers are only read
    out = _ext.shuffle(src, typesize, inverse=inverse)
    return None if out is None else out.numpy().data


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
    return out.data  # a memoryview, typed as one


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
    return out.data  # a memoryview, typed as one


PROBE_SLICES = 4
PROBE_BYTES = 16 << 10
DEFAULT_MIN_GAIN = 1.05


def probe_ratio(data: Buffer, typesize: int, shuffled: bool) -> float:
    """Compression ratio of a few evenly spaced 16 KiB slices: a cheap preview of the whole.

    Why: fp16/bf16 KV and quantized codes are close to incompressible for lz4 (measured ratio
    ~1.00 on SmolLM2 KV), while compressing and decompressing them still costs 5-10x a memcpy;
    the probe lets such payloads be stored as they are.
    """
    mv = memoryview(data).cast("B")
    n = mv.nbytes
    step = max(typesize, 1)
    span = PROBE_BYTES - PROBE_BYTES % step
    if n <= PROBE_SLICES * span:
        return 0.0  # small payload: just compress it
    parts = []
    for i in range(PROBE_SLICES):
        off = (n - span) * i // (PROBE_SLICES - 1)
        off -= off % step
        parts.append(bytes(mv[off : off + span]))
    sample = b"".join(parts)
    src = shuffle(sample, typesize) if shuffled else sample
    return len(sample) / max(1, len(lz4.block.compress(src, store_size=False)))


class LZ4Compressor(Compressor):
    """lz4 block after a byte-shuffle; stores the payload as is when a probe predicts less than
    ``min_gain`` (default 1.05x) compression (``min_gain=1`` always compresses)."""

    name = "lz4"

    def compress(self, data: Buffer, typesize: int) -> tuple[Buffer, dict[str, Any]]:
        shuffled = bool(self.params.get("shuffle", True)) and typesize > 1
        raw_len = memoryview(data).nbytes
        min_gain = float(self.params.get("min_gain", DEFAULT_MIN_GAIN))
        if min_gain > 1.0:
            r = probe_ratio(data, typesize, shuffled)
            if r and r < min_gain:
                return data, {"raw_len": raw_len, "stored": 1}
        src = shuffle(data, typesize) if shuffled else data
        out = lz4.block.compress(src, store_size=False, mode="default")
        if len(out) >= raw_len:  # never larger than the input
            return data, {"raw_len": raw_len, "stored": 1}
        return out, {"raw_len": raw_len, "typesize": typesize if shuffled else 1}

    def decompress(self, data: memoryview, params: dict[str, Any]) -> Buffer:
        raw_len = int(params["raw_len"])
        if params.get("stored"):
            if data.nbytes != raw_len:
                raise ValueError("lz4: stored payload length mismatch")
            return data
        try:
            out = lz4.block.decompress(data, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as e:
            raise ValueError(f"lz4: {e}") from None
        if len(out) != raw_len:
            raise ValueError("lz4: wrong decompressed length")
        return unshuffle(out, int(params.get("typesize", 1)))
