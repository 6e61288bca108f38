"""Encode one chunk tensor into one self-describing, checksummed blob, and back.

    blob = encode(kv, "int4+lz4", group_size=32)
    kv2 = decode(blob)          # raises CorruptBlobError on any damage, never returns wrong data

Codec names are ``transform[+lz4]``: transforms are ``raw`` (lossless), ``int8``/``int4``/``int2``
(Hadamard-rotated, keys per channel, values per token, outlier tokens exact: kvlayer.codec.rotq),
``mixed`` (retired: its blobs still decode), ``fp8`` (e4m3); ``lz4`` alone means ``raw+lz4``.
"""

from __future__ import annotations

from typing import Any

import torch

from kvlayer.codec import header as _hdr
from kvlayer.codec.base import Buffer, Compressor, Transform
from kvlayer.codec.lz4 import LZ4Compressor
from kvlayer.codec.raw import RawTransform
from kvlayer.errors import ConfigError, CorruptBlobError

TRANSFORMS: dict[str, type[Transform]] = {"raw": RawTransform}
COMPRESSORS: dict[str, type[Compressor]] = {"lz4": LZ4Compressor}


def register_transform(cls: type[Transform]) -> type[Transform]:
    TRANSFORMS[cls.name] = cls
    return cls


def _load_optional() -> None:
    # Quantizers live in their own modules; importing them registers them.
    for mod in ("kvlayer.codec.quant", "kvlayer.codec.rotq", "kvlayer.codec.fp8"):
        try:
            __import__(mod)
        except ImportError:  # pragma: no cover - module not built yet
            pass


def backend_info() -> dict[str, Any]:
    """Which kernels run the quantized codecs and the byte-shuffle: C++ (built on first use) or torch."""
    from kvlayer.codec import _ext

    return _ext.backend_info()


class Codec:
    """A parsed codec name with its parameters; thread-safe and reusable."""

    def __init__(self, name: str = "raw", **params: Any) -> None:
        parts = [p.strip() for p in name.lower().split("+") if p.strip()]
        if parts == ["lz4"]:
            parts = ["raw", "lz4"]
        if not parts or len(parts) > 2:
            raise ConfigError(f"codec {name!r}: expected 'transform[+lz4]', e.g. 'raw', 'lz4', 'int4+lz4'")
        _load_optional()
        if parts[0] not in TRANSFORMS:
            raise ConfigError(f"codec {name!r}: unknown transform {parts[0]!r}; choose from {_writable()}")
        if not TRANSFORMS[parts[0]].writable:
            raise ConfigError(f"codec {name!r}: {parts[0]!r} is retired (its blobs still decode, nothing writes "
                              f"them); choose from {_writable()}, see docs/codecs.md")
        comp_cls = None
        if len(parts) == 2:
            if parts[1] not in COMPRESSORS:
                raise ConfigError(f"codec {name!r}: unknown compressor {parts[1]!r}; choose from {sorted(COMPRESSORS)}")
            comp_cls = COMPRESSORS[parts[1]]
        self.name = "+".join(parts)
        self.transform = TRANSFORMS[parts[0]](**params)
        self.compressor = comp_cls(**params) if comp_cls else None

    @property
    def lossless(self) -> bool:
        return self.transform.lossless

    def __repr__(self) -> str:
        return f"Codec({self.name!r}, {self.transform.params})"

    def encode(self, x: torch.Tensor, *, key: str | None = None, sealed: bool = True) -> memoryview:
        """One blob of ``x`` bound to ``key`` (the store always names it; None: unbound, which
        only ``decode`` without a key accepts). ``sealed=False``: no checksum yet, for a blob that
        stays in this process until ``header.seal`` (``decode`` refuses it before that)."""
        if self.compressor is None:
            got = self.transform.encode_into(x, _hdr.HEAD_ROOM)
            if got is not None:
                buf, length, tparams = got
                head = _hdr.pack_header(self.name, tuple(x.shape), x.dtype, {"t": tparams} if tparams else {},
                                        length, key)
                return _hdr.place(buf, head, length, sealed=sealed)
        payload, tparams, typesize = self.transform.encode(x)
        params: dict[str, Any] = {}
        if tparams:
            params["t"] = tparams
        if self.compressor is not None:
            payload, cparams = self.compressor.compress(payload, typesize)
            params["c"] = cparams
        pay_len = memoryview(payload).nbytes
        head = _hdr.pack_header(self.name, tuple(x.shape), x.dtype, params, pay_len, key)
        return _hdr.assemble(head, payload, sealed=sealed)


def decode(blob: Buffer, *, key: str | None = None) -> torch.Tensor:
    """Validate and decode a blob produced by any codec; the codec is read from the header. With
    ``key``, a blob not encoded for it raises ``MisplacedBlobError`` (a ``CorruptBlobError``)."""
    hdr = _hdr.verify(blob, key)
    return decode_verified(blob, hdr)


def decode_verified(blob: Buffer, hdr: _hdr.BlobHeader) -> torch.Tensor:
    parts = hdr.codec.split("+")
    _load_optional()
    try:
        transform = TRANSFORMS[parts[0]]()
        payload: Buffer = memoryview(blob)[hdr.header_len :]
        if len(parts) == 2:
            payload = COMPRESSORS[parts[1]]().decompress(memoryview(payload), hdr.params.get("c", {}))
        elif len(parts) != 1:
            raise ValueError(f"bad codec name {hdr.codec!r}")
        return transform.decode(memoryview(payload), hdr.shape, hdr.dtype, hdr.params.get("t", {}))
    except CorruptBlobError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CorruptBlobError(f"cannot decode {hdr.codec!r} blob: {e}") from None


def with_rope(name: str, params: dict[str, Any], rope_theta: float | None) -> dict[str, Any]:
    """``params`` plus the model's RoPE base where the codec can use it and was not given one:
    the engine knows the model, a tier's codec settings should not have to repeat it."""
    if not rope_theta or "rope_theta" in params:
        return params
    _load_optional()
    transform = TRANSFORMS.get(name.lower().split("+")[0].strip())
    if transform is None or not transform.takes_rope(params):
        return params
    return {**params, "rope_theta": float(rope_theta)}


_CACHE: dict[tuple[str, tuple[tuple[str, Any], ...]], Codec] = {}


def get_codec(name: str = "raw", **params: Any) -> Codec:
    key = (name, tuple(sorted(params.items())))
    c = _CACHE.get(key)
    if c is None:
        c = _CACHE[key] = Codec(name, **params)
    return c


def encode(x: torch.Tensor, codec: str = "raw", *, key: str | None = None, **params: Any) -> memoryview:
    return get_codec(codec, **params).encode(x, key=key)


def _writable() -> list[str]:
    return sorted(n for n, cls in TRANSFORMS.items() if cls.writable)


def available_codecs() -> list[str]:
    """The codec names a tier can be configured with (retired transforms only decode)."""
    _load_optional()
    names = _writable()
    return names + [f"{n}+lz4" for n in names if n != "raw"] + ["lz4"]


__all__ = [
    "Codec",
    "CorruptBlobError",
    "available_codecs",
    "backend_info",
    "decode",
    "encode",
    "get_codec",
    "register_transform",
    "with_rope",
]
