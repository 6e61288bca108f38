"""The blob header: everything needed to validate and decode a payload, checksummed with it.

Layout (little-endian)::

    magic "KVLB" | version u8 | dtype u8 | ndim u8 | name_len u8 | shape u32 x ndim
    | codec name (utf-8) | params_len u16 | params (JSON) | payload_len u64 | checksum u64 | payload

The checksum is xxh3-64 over every header byte before it plus the payload, so a flipped bit
anywhere (shape, codec, parameters or data) is caught.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from kvlayer.codec.buffers import POOL
from kvlayer.errors import CorruptBlobError

MAGIC = b"KVLB"
FORMAT_VERSION = 1
MAX_NDIM = 8
MAX_DIM = 1 << 30

_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.uint8: 4,
    torch.int8: 5,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}

_FIXED = struct.Struct("<4sBBBB")
_TAIL = struct.Struct("<QQ")


@dataclass(frozen=True)
class BlobHeader:
    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    params: dict[str, Any]
    payload_len: int
    header_len: int
    checksum: int

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored; supported: {sorted(map(str, _DTYPE_CODES))}") from None


def pack_header(codec: str, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any], payload_len: int) -> bytes:
    """Header bytes *without* the trailing checksum (it is computed over these plus the payload)."""
    name = codec.encode("utf-8")
    pjson = json.dumps(params, sort_keys=True, separators=(",", ":")).encode("utf-8") if params else b""
    if len(shape) > MAX_NDIM or len(name) > 255 or len(pjson) > 0xFFFF:
        raise ValueError("header field too large")
    return b"".join(
        (
            _FIXED.pack(MAGIC, FORMAT_VERSION, dtype_code(dtype), len(shape), len(name)),
            struct.pack(f"<{len(shape)}I", *shape),
            name,
            struct.pack("<H", len(pjson)),
            pjson,
            struct.pack("<Q", payload_len),
        )
    )


def checksum(header_wo_sum: bytes | memoryview, payload: bytes | bytearray | memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(header_wo_sum)
    h.update(payload)
    return h.intdigest()


def parse_header(blob: bytes | bytearray | memoryview, *, whole: bool = True) -> BlobHeader:
    """Parse and bounds-check the header; does not verify the checksum (see ``verify``).

    ``whole=False`` accepts a prefix of a blob (to learn its announced length cheaply)."""
    mv = memoryview(blob)
    try:
        if len(mv) < _FIXED.size:
            raise CorruptBlobError(f"blob too short ({len(mv)} bytes) to hold a header")
        magic, version, dcode, ndim, name_len = _FIXED.unpack_from(mv, 0)
        if magic != MAGIC:
            raise CorruptBlobError("bad magic: not a kvlayer blob")
        if version != FORMAT_VERSION:
            raise CorruptBlobError(f"blob format version {version} is not supported (this build reads {FORMAT_VERSION})")
        if dcode not in _CODE_DTYPES:
            raise CorruptBlobError(f"unknown dtype code {dcode}")
        if ndim > MAX_NDIM:
            raise CorruptBlobError(f"ndim {ndim} exceeds {MAX_NDIM}")
        off = _FIXED.size
        shape = struct.unpack_from(f"<{ndim}I", mv, off)
        off += 4 * ndim
        if any(d > MAX_DIM for d in shape):
            raise CorruptBlobError(f"implausible shape {shape}")
        name = bytes(mv[off : off + name_len]).decode("utf-8")
        off += name_len
        (plen,) = struct.unpack_from("<H", mv, off)
        off += 2
        pbytes = bytes(mv[off : off + plen])
        if len(pbytes) != plen:
            raise CorruptBlobError("truncated header parameters")
        params = json.loads(pbytes) if plen else {}
        if not isinstance(params, dict):
            raise CorruptBlobError("codec parameters are not an object")
        off += plen
        payload_len, csum = _TAIL.unpack_from(mv, off)
        off += _TAIL.size
    except CorruptBlobError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise CorruptBlobError(f"malformed header: {e}") from None
    if whole and len(mv) != off + payload_len:
        raise CorruptBlobError(f"blob length {len(mv)} != header {off} + payload {payload_len}: truncated or padded")
    return BlobHeader(name, tuple(shape), _CODE_DTYPES[dcode], params, payload_len, off, csum)


def verify(blob: bytes | bytearray | memoryview) -> BlobHeader:
    """Parse the header and check the checksum; raise CorruptBlobError on any mismatch."""
    hdr = parse_header(blob)
    mv = memoryview(blob)
    got = checksum(mv[: hdr.header_len - 8], mv[hdr.header_len :])
    if got != hdr.checksum:
        raise CorruptBlobError("checksum mismatch: blob corrupted")
    return hdr


def assemble(header_wo_sum: bytes, payload: bytes | bytearray | memoryview) -> memoryview:
    """header + checksum + payload in one writable buffer, with a single copy of the payload.

    The buffer comes from the recycled pool (:mod:`kvlayer.codec.buffers`: memory already faulted
    in) or ``np.empty`` (no zero-fill pass; plain malloc: torch's CPU allocator uses
    posix_memalign, which fragments glibc's heap so a churning LRU tier held ~2x its budget in
    RSS) and the copy uses torch's parallel copy, so encoding a raw chunk costs one memcpy plus
    one xxh3 pass."""
    hl = len(header_wo_sum) + 8
    src = memoryview(payload).cast("B")
    arr = POOL.take(hl + src.nbytes)
    out = torch.from_numpy(arr)
    mv = arr.data  # a memoryview (typed as one, unlike memoryview(ndarray))
    mv[: hl - 8] = header_wo_sum
    if src.nbytes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only sources are only read
            out[hl:].copy_(torch.frombuffer(src, dtype=torch.uint8))
    struct.pack_into("<Q", mv, hl - 8, checksum(header_wo_sum, mv[hl:]))
    return mv
