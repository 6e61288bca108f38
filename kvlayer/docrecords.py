"""Document records: a document's id, tokens, context and chunk keys, stored beside its KV.

``KVCache.put_document`` keeps the record in the process that computed the document; an engine
replica sharing the same Redis or ``kvlayer serve`` needs it too, to find the document inside its
own prompts. So the record is also a blob in the store, under a key derived from the namespace
(same model and shard only) and the document id, with a per-namespace key prefix that lets a
replica list every record with one key scan (``KVCache.sync_documents``). The blob is a uint8
tensor of canonical JSON: lossless codecs (raw, lz4) carry it; a tier with a quantizing codec
cannot, so records need one lossless shared tier (docs/blend_vllm.md).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from kvlayer.errors import CorruptBlobError

RECORD_VERSION = 1


def record_prefix(namespace: bytes) -> str:
    """16 hex digits shared by every record key of one namespace (and by no chunk key in practice)."""
    return hashlib.sha256(namespace + b"kvlayer/document-record/v1").hexdigest()[:16]


def record_key(namespace: bytes, doc_id: str) -> str:
    return record_prefix(namespace) + hashlib.sha256(doc_id.encode()).hexdigest()[:48]


def context_digest(context: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(context, dtype="<u4").tobytes()).hexdigest()


def encode(doc_id: str, tokens: np.ndarray, context: np.ndarray, keys: list[str], meta: dict[str, Any]) -> torch.Tensor:
    rec = {"v": RECORD_VERSION, "id": doc_id, "tokens": [int(t) for t in tokens],
           "context": [int(t) for t in context], "context_digest": context_digest(context), "keys": list(keys),
           "meta": meta}
    raw = json.dumps(rec, sort_keys=True, separators=(",", ":"), default=str).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def decode(blob: torch.Tensor) -> dict[str, Any]:
    """The record as a dict; a blob that is not one raises ``CorruptBlobError``."""
    try:
        rec = json.loads(blob.numpy().tobytes().decode())
        if not isinstance(rec, dict) or rec.get("v") != RECORD_VERSION:
            raise ValueError("not a version-1 document record")
        for field, kind in (("id", str), ("tokens", list), ("context", list), ("keys", list)):
            if not isinstance(rec.get(field), kind):
                raise ValueError(f"field {field!r} missing or not a {kind.__name__}")
        return rec
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise CorruptBlobError(f"bad document record: {e}") from e
