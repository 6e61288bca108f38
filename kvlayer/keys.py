"""Content keys for chunks of tokens.

Prefix keys: the token chain is exactly SGLang's page hash, ``d_i = sha256(d_{i-1} || uint32-LE
tokens of chunk i)`` with an empty ``d_{-1}``, and the key binds it to the KVSpec namespace:
``k_i = sha256(namespace || d_i)``. The key of chunk ``i`` names the whole prefix up to it and the
model/shard it belongs to. Binding the namespace per key (rather than seeding the chain with it)
means a key can be computed from SGLang's own page hash alone, so a chunk stored through vLLM is a
hit for a stock SGLang backend and the other way round, with no token ids crossing the interface.
Document keys are the same chain over a document's own tokens (no parent from the prompt).

A partial last chunk (fewer than ``chunk_size`` tokens) gets a key of its own kind,
``partial_key``: bound like a full link, it could be forged (a link after a parent hashes
``32 + 4n`` bytes, a first chunk ``4 * chunk_size``: equal when ``n = chunk_size - 8``, and the
first chunk's tokens can spell the parent digest), so it hashes a tag and the parent's length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

TokenIds = Sequence[int] | np.ndarray

DEFAULT_CHUNK_SIZE = 256


def token_array(tokens: TokenIds, name: str = "tokens") -> np.ndarray:
    """``tokens`` as a 1-D int64 array, refusing anything that is not integer token ids.

    Why strict: casting would key ``[500.7, ...]`` as ``[500, ...]`` and serve another prompt's
    KV; floats, bools and digit strings are caller bugs, so they fail loudly, naming ``name``.
    """
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of integer token ids, got {type(tokens).__name__}")
    arr = np.asarray(tokens)
    if arr.size == 0:
        arr = arr.astype(np.int64) if arr.dtype.kind in "iuf" else arr
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got {arr.dtype} values"
                        + (" (bools are not token ids)" if arr.dtype.kind == "b" else ""))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise ValueError(f"{name} must be token ids that fit in uint32, got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)


def _token_bytes(tokens: TokenIds, name: str = "tokens") -> bytes:
    return token_array(tokens, name).astype("<u4").tobytes()


def chunk_bounds(num_tokens: int, chunk_size: int, *, full_only: bool = False) -> list[tuple[int, int]]:
    """[start, end) of each chunk; the last one may be partial unless ``full_only``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    end = (num_tokens // chunk_size) * chunk_size if full_only else num_tokens
    return [(s, min(s + chunk_size, end)) for s in range(0, end, chunk_size)]


def chain_hash(parent: bytes, tokens: TokenIds) -> bytes:
    """One link of the token chain (SGLang's page hash): 32 raw bytes."""
    return hashlib.sha256(parent + _token_bytes(tokens)).digest()


def bind(namespace: bytes, chain_digest: bytes) -> str:
    """The storage key of a chain link: ``sha256(namespace || d_i)`` as hex."""
    return hashlib.sha256(namespace + chain_digest).hexdigest()


def token_chain(tokens: TokenIds, chunk_size: int = DEFAULT_CHUNK_SIZE, *, full_only: bool = False,
                seed: bytes = b"") -> list[bytes]:
    """``d_i`` for every chunk: SGLang's page-hash chain (raw digests), unseeded by default."""
    data = _token_bytes(tokens)
    out: list[bytes] = []
    parent = seed
    for s, e in chunk_bounds(len(data) // 4, chunk_size, full_only=full_only):
        parent = hashlib.sha256(parent + data[4 * s : 4 * e]).digest()
        out.append(parent)
    return out


PARTIAL_TAG = b"kvlayer/partial-chunk/v1"


def partial_key(namespace: bytes, parent: bytes, tokens: TokenIds) -> str:
    """Key of a partial chunk: ``tokens`` (fewer than a chunk) after the chain link ``parent``
    (``b""`` for the first chunk, a seed for a document after a context).

    Never a full chunk's key: those hash exactly 64 bytes (``namespace || d_i``), this hashes
    ``24 + 32 + 1 + len(parent) + 4 * len(tokens)`` bytes, never 64; the parent's length comes
    first, so two (parent, tokens) never hash the same bytes.
    """
    data = _token_bytes(tokens)
    return hashlib.sha256(PARTIAL_TAG + namespace + bytes([len(parent)]) + parent + data).hexdigest()


def _chunk_keys(namespace: bytes, tokens: TokenIds, chunk_size: int, *, full_only: bool, seed: bytes = b"") -> list[str]:
    if len(namespace) != 32:
        raise ValueError("namespace must be a 32-byte digest (KVSpec.namespace_digest())")
    toks = token_array(tokens)
    chain = token_chain(toks, chunk_size, full_only=True, seed=seed)
    keys = [bind(namespace, d) for d in chain]
    tail = len(chain) * chunk_size
    if not full_only and tail < len(toks):
        keys.append(partial_key(namespace, chain[-1] if chain else seed, toks[tail:]))
    return keys


def prefix_keys(
    namespace: bytes, tokens: TokenIds, chunk_size: int = DEFAULT_CHUNK_SIZE, *, full_only: bool = False
) -> list[str]:
    """Hex keys of every chunk of ``tokens``, each naming the prefix that ends with it."""
    return _chunk_keys(namespace, tokens, chunk_size, full_only=full_only)


def key_from_page_hash(namespace: bytes, page_hash_hex: str) -> str:
    """The kvlayer key of a chunk given SGLang's 64-hex page hash for it (same chunk boundaries)."""
    return bind(namespace, bytes.fromhex(page_hash_hex))


def document_keys(namespace: bytes, tokens: TokenIds, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
                  context: TokenIds | None = None) -> list[str]:
    """Hex keys of a document's chunks: no parent from the prompt, so position-independent.

    A document's KV is computed once from position 0 with nothing before it, which is exactly the
    KV of a prompt that starts with the document; so its keys are the chain seeded by the
    namespace alone. Consequences: the same text registered under two ids shares its chunks, and a
    prompt that *starts* with a registered document is an ordinary prefix hit.

    A document computed after a fixed ``context`` (e.g. the application's system prompt, so that
    its first tokens are not attention sinks) has different KV: its chain is seeded by a digest of
    the context, so the two never share keys.
    """
    if context is None or len(context) == 0:
        return prefix_keys(namespace, tokens, chunk_size)
    seed = hashlib.sha256(b"kvlayer/document-context/v1" + _token_bytes(context, "context")).digest()
    return _chunk_keys(namespace, tokens, chunk_size, full_only=False, seed=seed)
