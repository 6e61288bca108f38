"""The blob header: everything needed to validate and decode a payload, checksummed with it.

Layout (little-endian)::

    magic "KVLB" | version u8 | dtype u8 | ndim u8 | name_len u8 | key digest (32 bytes)
    | shape u32 x ndim | codec name (utf-8) | params_len u16 | params (JSON) | payload_len u64
    | checksum u64 | payload

The checksum is xxh3-64 over every header byte before it plus the payload, so a flipped bit
anywhere (shape, codec, parameters or data) is caught. A blob that stays in this process (the
in-process CPU tier) may be *unsealed* (checksum field 0, no hash pass at encode): ``seal`` writes
the checksum when its bytes leave (write-through, demotion, a durable put), and ``verify`` refuses
an unsealed blob like any corrupt one, so bytes read from anywhere else are always checked.

The key digest binds a blob to the key it was encoded for (``sha256(key)``; all zeros = unbound,
what ``encode`` without a key writes): a valid blob moved or copied under another key (a buggy
client, a restore gone wrong, a hostile writer on a shared tier) passes its checksum, so every
read that knows its key also compares these 32 bytes (``MisplacedBlobError``). The namespace
needs no field of its own: every kvlayer key is already ``sha256(namespace || d_i)``, so a blob
bound to a key is bound to its model and shard too. The digest sits at a fixed offset, so the
check costs a 32-byte compare, never a pass over the payload. Version 1 blobs had no digest and
are refused (README, "Upgrading").
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from kvlayer.codec.buffers import POOL
from kvlayer.errors import CorruptBlobError, MisplacedBlobError

MAGIC = b"KVLB"
FORMAT_VERSION = 2
#: Where the key digest lives in every blob: right after the fixed fields.
KEY_DIGEST_AT = 8
KEY_DIGEST_LEN = 32
#: The key digest of a blob encoded without a key: no reader that names a key accepts it.
UNBOUND = bytes(KEY_DIGEST_LEN)
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

_FIXED = struct.Struct("<4sBBBB32s")
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
    key_digest: bytes = UNBOUND

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored; supported: {sorted(map(str, _DTYPE_CODES))}") from None


def key_digest(key: str) -> bytes:
    """The 32 bytes a blob stored under ``key`` carries: sha256 of the key's text."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def pack_header(codec: str, shape: tuple[int, ...], dtype: torch.dtype, params: dict[str, Any], payload_len: int,
                key: str | None = None) -> bytes:
    """Header bytes *without* the trailing checksum (it is computed over these plus the payload),
    bound to ``key`` (None: unbound, readable only where no key is named, e.g. codec tests)."""
    name = codec.encode("utf-8")
    pjson = json.dumps(params, sort_keys=True, separators=(",", ":")).encode("utf-8") if params else b""
    if len(shape) > MAX_NDIM or len(name) > 255 or len(pjson) > 0xFFFF:
        raise ValueError("header field too large")
    return b"".join(
        (
            _FIXED.pack(MAGIC, FORMAT_VERSION, dtype_code(dtype), len(shape), len(name),
                        UNBOUND if key is None else key_digest(key)),
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
        magic, version, dcode, ndim, name_len, kdig = _FIXED.unpack_from(mv, 0)
        _check_version(magic, version)
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
    return BlobHeader(name, tuple(shape), _CODE_DTYPES[dcode], params, payload_len, off, csum, kdig)


def _check_version(magic: bytes, version: int) -> None:
    if magic != MAGIC:
        raise CorruptBlobError("bad magic: not a kvlayer blob")
    if version == 1:
        raise CorruptBlobError("blob format version 1 (kvlayer before blobs were bound to their keys) is no "
                               f"longer read; this build reads version {FORMAT_VERSION}: the blob is dropped and "
                               "its KV is recomputed (README, 'Upgrading')")
    if version != FORMAT_VERSION:
        raise CorruptBlobError(f"blob format version {version} is not supported (this build reads {FORMAT_VERSION})")


def _check_key(found: bytes, key: str, unbound_ok: bool) -> None:
    if found == key_digest(key) or (unbound_ok and found == UNBOUND):
        return
    what = "without a key" if found == UNBOUND else f"for another key (key digest {found.hex()[:16]}...)"
    raise MisplacedBlobError(f"the blob under key {key[:16]}... was encoded {what}; a blob is valid only "
                             "under the key it was encoded for")


def check_key(blob: bytes | bytearray | memoryview, key: str, *, unbound_ok: bool = False) -> None:
    """Raise ``MisplacedBlobError`` unless ``blob`` was encoded for ``key`` (magic and version
    are checked too, nothing else): 40 header bytes read, the payload never touched."""
    mv = memoryview(blob)
    if mv.nbytes < _FIXED.size:
        raise CorruptBlobError(f"blob too short ({mv.nbytes} bytes) to hold a header")
    magic, version, *_, found = _FIXED.unpack_from(mv, 0)
    _check_version(magic, version)
    _check_key(found, key, unbound_ok)


def verify(blob: bytes | bytearray | memoryview, key: str | None = None, *, unbound_ok: bool = False) -> BlobHeader:
    """Parse the header and check the checksum, then, given ``key``, that the blob was encoded
    for it (``unbound_ok``: a blob encoded without a key passes too, as the server keeps its
    clients' blobs). Raises ``CorruptBlobError`` (``MisplacedBlobError`` for the key) on any
    mismatch. The checksum comes first, so a flipped bit in the digest reads as corruption."""
    hdr = parse_header(blob)
    mv = memoryview(blob)
    got = checksum(mv[: hdr.header_len - 8], mv[hdr.header_len :])
    if got != hdr.checksum:
        raise CorruptBlobError("checksum mismatch: blob corrupted")
    if key is not None:
        _check_key(hdr.key_digest, key, unbound_ok)
    return hdr


def open_local(blob: bytes | bytearray | memoryview, key: str | None) -> BlobHeader:
    """The header of a blob that never left this process (the in-process CPU tier's own, sealed
    or not): parsed, bounds-checked and, given ``key``, checked to be encoded for it; the payload
    is not hashed (nothing outside the process wrote it)."""
    hdr = parse_header(blob)
    if key is not None:
        _check_key(hdr.key_digest, key, False)
    return hdr


def seal(blob: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """``blob`` with its checksum written (in place; one xxh3 pass, none if already sealed), for
    bytes about to leave the process. Readers of the in-process copy never read the field, so
    sealing while they decode it is safe."""
    mv = memoryview(blob)
    at = parse_header(blob).header_len - 8
    if struct.unpack_from("<Q", mv, at)[0] == 0:
        if mv.readonly:
            blob = bytearray(blob)
            mv = memoryview(blob)
        struct.pack_into("<Q", mv, at, checksum(mv[:at], mv[at + 8:]))
    return blob


#: bytes a transform leaves free in front of its payload for the header (``Transform.encode_into``);
#: kvlayer's headers take ~130 (a key digest, a 5-d shape, a codec's parameters)
HEAD_ROOM = 512


def place(buf: np.ndarray, header_wo_sum: bytes, payload_len: int, *, sealed: bool = True) -> memoryview:
    """The blob of a payload written at ``buf[HEAD_ROOM:]``: header and checksum go right in front
    of it, no copy of the payload (``assemble`` copies one that lies elsewhere, or whose header is
    longer than the room). The blob is a view of ``buf`` and keeps it alive."""
    hl = len(header_wo_sum) + 8
    if hl > HEAD_ROOM:
        return assemble(header_wo_sum, buf.data[HEAD_ROOM:HEAD_ROOM + payload_len], sealed=sealed)
    mv = buf.data  # a memoryview of the array: it (and every slice of it) holds the array
    start = HEAD_ROOM - hl
    mv[start:HEAD_ROOM - 8] = header_wo_sum
    body = mv[HEAD_ROOM:HEAD_ROOM + payload_len]
    struct.pack_into("<Q", mv, HEAD_ROOM - 8, checksum(header_wo_sum, body) if sealed else 0)
    return mv[start:HEAD_ROOM + payload_len]


def assemble(header_wo_sum: bytes, payload: bytes | bytearray | memoryview, *, sealed: bool = True) -> memoryview:
    """header + checksum + payload in one writable buffer, with a single copy of the payload.

    The buffer comes from the recycled pool (:mod:`kvlayer.codec.buffers`: memory already faulted
    in) or ``np.empty`` (no zero-fill pass; plain malloc: torch's CPU allocator uses
    posix_memalign, which fragments glibc's heap so a churning LRU tier held ~2x its budget in
    RSS), so encoding a raw chunk costs one memcpy plus one xxh3 pass; ``sealed=False`` skips the
    pass and leaves the checksum 0 (``seal``). The copy is numpy's (one thread, GIL released):
    torch's parallel copy stalled in its thread pool whenever another thread of the process was
    busy (a batch on the wire, the background writer): 0.3 GB/s instead of 11."""
    hl = len(header_wo_sum) + 8
    src = memoryview(payload).cast("B")
    arr = POOL.take(hl + src.nbytes)
    mv = arr.data  # a memoryview (typed as one, unlike memoryview(ndarray))
    mv[: hl - 8] = header_wo_sum
    if src.nbytes:
        np.copyto(arr[hl:], np.frombuffer(src, dtype=np.uint8))
    struct.pack_into("<Q", mv, hl - 8, checksum(header_wo_sum, mv[hl:]) if sealed else 0)
    return mv
