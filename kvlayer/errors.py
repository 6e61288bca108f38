"""Every error kvlayer raises on purpose, so callers can catch exactly what they mean."""

from __future__ import annotations


class KVLayerError(Exception):
    """Base class of all kvlayer errors."""


class ConfigError(KVLayerError, ValueError):
    """A configuration value is missing or invalid; the message names the field and the fix."""


class CorruptBlobError(KVLayerError, ValueError):
    """A stored blob failed validation (magic, version, header, length, checksum or key).

    Raised by decoding only; the store treats it as a miss and deletes the blob.
    """


class MisplacedBlobError(CorruptBlobError):
    """A valid blob read under a key it was not encoded for (moved or copied there).

    The store treats it like corruption (a miss plus a delete), counted as ``misplaced``.
    """


class DocumentNotFound(KVLayerError, KeyError):
    """No document is registered under this id (a ``KeyError`` too, as it always was)."""

    def __str__(self) -> str:  # KeyError's repr-quotes its message
        return str(self.args[0]) if self.args else ""


class TierError(KVLayerError):
    """A storage tier failed an operation (I/O error, connection loss, timeout)."""


class UsageError(KVLayerError, ValueError):
    """A call's arguments do not fit together (e.g. a different number of keys and chunks)."""


class SpecMismatchError(KVLayerError, ValueError):
    """A tensor does not match the KVSpec it is stored under."""


class UnsupportedModelError(KVLayerError, ValueError):
    """A model lacks a feature an operation needs (e.g. blending a model without RoPE)."""


class AssetUnavailableError(KVLayerError, FileNotFoundError):
    """A model or text (``kvlayer.assets``) needs a package that is not installed; the message says which."""
