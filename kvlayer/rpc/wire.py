"""Fast path for the two data messages, ``PutFrame`` and ``GetFrame``, in protobuf wire format.

Python protobuf copies a ``bytes`` field on every build and parse; for frames that are nearly all
payload this doubled the copies per byte. Here a frame is built with one copy (header + payload
joined) and parsed into a memoryview of the received message (no copy). The bytes on the wire
are exactly the generated messages' (a test checks both directions against ``kvlayer_pb2``), so
clients in other languages use the generated code unchanged; the parser accepts any field order
and skips unknown fields, as protobuf does.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvlayer.codec.base import Buffer

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(mv: memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(mv):
            raise ValueError("truncated varint")
        b = mv[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: Buffer) -> dict[int, int | memoryview]:
    """Last value of each field (protobuf's rule for singular fields)."""
    mv = memoryview(buf).cast("B")
    pos = 0
    out: dict[int, int | memoryview] = {}
    n = len(mv)
    while pos < n:
        tag, pos = _read_varint(mv, pos)
        field, wt = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("field number 0")
        if wt == _VARINT:
            out[field], pos = _read_varint(mv, pos)
        elif wt == _LEN:
            ln, pos = _read_varint(mv, pos)
            if pos + ln > n:
                raise ValueError("truncated length-delimited field")
            out[field] = mv[pos : pos + ln]
            pos += ln
        elif wt == _I64:
            pos += 8
        elif wt == _I32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        if pos > n:
            raise ValueError("truncated field")
    return out


def _int(f: dict[int, int | memoryview], k: int) -> int:
    v = f.get(k, 0)
    if isinstance(v, memoryview):
        raise ValueError(f"field {k} has the wrong wire type")
    return v


def _bytes(f: dict[int, int | memoryview], k: int) -> memoryview:
    v = f.get(k, memoryview(b""))
    if not isinstance(v, memoryview):
        raise ValueError(f"field {k} has the wrong wire type")
    return v


@dataclass(frozen=True, slots=True)
class PutFrameView:
    key: str
    total_len: int
    data: memoryview
    durable: bool


@dataclass(frozen=True, slots=True)
class GetFrameView:
    index: int
    found: bool
    total_len: int
    data: memoryview


def encode_put_frame(key: str, total_len: int, data: Buffer, durable: bool) -> bytes:
    parts: list[Buffer] = []
    if key:
        kb = key.encode("utf-8")
        parts += [b"\x0a", _varint(len(kb)), kb]
    if total_len:
        parts += [b"\x10", _varint(total_len)]
    n = memoryview(data).nbytes
    if n:
        parts += [b"\x1a", _varint(n), data]
    if durable:
        parts.append(b"\x20\x01")
    return b"".join(parts)


def decode_put_frame(buf: Buffer) -> PutFrameView:
    f = _fields(buf)
    try:
        key = bytes(_bytes(f, 1)).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("key is not valid utf-8") from None
    return PutFrameView(key, _int(f, 2), _bytes(f, 3), bool(_int(f, 4)))


def encode_get_frame(index: int, found: bool, total_len: int, data: Buffer) -> bytes:
    parts: list[Buffer] = []
    if index:
        parts += [b"\x08", _varint(index)]
    if found:
        parts.append(b"\x10\x01")
    if total_len:
        parts += [b"\x18", _varint(total_len)]
    n = memoryview(data).nbytes
    if n:
        parts += [b"\x22", _varint(n), data]
    return b"".join(parts)


def decode_get_frame(buf: Buffer) -> GetFrameView:
    f = _fields(buf)
    return GetFrameView(_int(f, 1), bool(_int(f, 2)), _int(f, 3), _bytes(f, 4))


def identity(x: bytes) -> bytes:
    return x
