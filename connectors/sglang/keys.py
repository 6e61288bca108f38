"""SGLang page keys -> kvlayer keys.

SGLang names page ``i`` of a sequence ``d_i = sha256(d_{i-1} || uint32-LE page tokens)`` with no
seed for ``d_0`` (or a seed derived from the request's ``cache_salt``/``extra_key``). The hash
carries no model, dtype, layer count or TP shard: two models serving the same text produce the
same ``d_i``. kvlayer's own chunk keys chain the same way but start from the namespace digest of
the KVSpec, ``k_i = sha256(k_{i-1} || tokens)``, ``k_{-1} = KVSpec.namespace_digest()``.

A chain cannot be re-seeded without its tokens, and SGLang (0.5.x) hands a storage backend only
the page hashes, never the tokens (``HiCacheStorageExtraInfo.prefix_keys`` are hashes too). So:

1. **Tokens known** (``extra_info.extra_info["token_ids"]``: the sequence's token ids from its
   start through the call's last page): the backend recomputes SGLang's unseeded chain from those
   tokens and, only if it equals the keys it was handed (so a salted request or a wrong token list
   can never borrow unsalted data), uses kvlayer's own keys ``prefix_keys(namespace, tokens,
   page_size)``. These are exactly the keys the vLLM connector and ``KVCache.store`` use, so with
   page size == chunk size and the same model a page is a cross-engine hit both ways.
2. **Tokens unknown** (what stock SGLang does): ``k = sha256(namespace || d)`` (64 bytes in; a
   non-hex key is hashed as its UTF-8 bytes). Deterministic in every process, adds the model/TP
   namespace SGLang's hash lacks, and lets SGLang instances share pages through any kvlayer tier
   (Redis, ``kvlayer serve``, a shared disk). It is not the vLLM key: vLLM-stored chunks are not
   visible this way. Making them visible needs kvlayer's own chain to be computable from
   ``d_i`` alone, i.e. ``k_i = sha256(namespace || d_i)`` with ``d_i`` SGLang's unseeded chain;
   if ``kvlayer.keys.prefix_keys`` ever adopts that scheme, case 2 becomes equal to case 1 with
   no change here.

A process-local "page hash -> kvlayer key" memo is deliberately not used: it would make a page's
key depend on the process's history, and keys must be the same in every process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kvlayer.keys import prefix_keys

TOKEN_IDS_FIELD = "token_ids"


def sglang_page_hashes(tokens: Sequence[int] | np.ndarray, page_size: int, seed_hex: str | None = None) -> list[str]:
    """SGLang's storage page hashes of full pages (its ``get_hash_str`` recipe, unseeded by default)."""
    data = np.asarray(tokens, dtype=np.int64)
    if data.size and (data.min() < 0 or data.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in uint32")
    raw = data.astype("<u4").tobytes()
    prior = bytes.fromhex(seed_hex) if seed_hex else b""
    out: list[str] = []
    step = 4 * page_size
    for s in range(0, (len(raw) // step) * step, step):
        prior = hashlib.sha256(prior + raw[s : s + step]).digest()
        out.append(prior.hex())
    return out


def derived_key(namespace: bytes, sglang_key: str) -> str:
    """Case 2: ``sha256(namespace || d)``, d as its 32 raw bytes when it is 64 hex characters."""
    try:
        raw = bytes.fromhex(sglang_key) if len(sglang_key) == 64 else sglang_key.encode("utf-8")
    except ValueError:
        raw = sglang_key.encode("utf-8")
    return hashlib.sha256(namespace + raw).hexdigest()


def sglang_bridge_keys(namespace: bytes, tokens: Sequence[int] | np.ndarray, page_size: int) -> list[str]:
    """Case-2 keys of ``tokens``' full pages: what ``KVLayerStore`` looks up for stock SGLang's bare
    page hashes. An engine that has the tokens (the vLLM connector, ``KVCache`` users) can store or
    look up chunks under these to share with an SGLang that passes no tokens, until kvlayer's own
    chain is made computable from SGLang's hashes (see the module docstring)."""
    return [derived_key(namespace, d) for d in sglang_page_hashes(tokens, page_size)]


def _token_ids(extra_info: Any) -> Any:
    inner = getattr(extra_info, "extra_info", None)
    if isinstance(inner, Mapping):
        return inner.get(TOKEN_IDS_FIELD)
    return None


class KeyMapper:
    """Maps the page keys of one SGLang call to kvlayer keys (see the module docstring)."""

    def __init__(self, namespace: bytes, page_size: int) -> None:
        self.namespace = namespace
        self.page_size = page_size
        self.token_mapped = 0
        self.token_rejected = 0

    def map(self, keys: Sequence[str], extra_info: Any = None) -> list[str]:
        keys = list(keys)
        tokens = _token_ids(extra_info) if extra_info is not None else None
        if tokens is not None and keys:
            mapped = self._from_tokens(keys, tokens, getattr(extra_info, "prefix_keys", None))
            if mapped is not None:
                self.token_mapped += len(keys)
                return mapped
            self.token_rejected += len(keys)
        return [derived_key(self.namespace, k) for k in keys]

    def _from_tokens(self, keys: list[str], tokens: Any, prefix: Sequence[str] | None) -> list[str] | None:
        try:
            toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            return None
        P = self.page_size
        off = len(prefix) if prefix is not None else None
        if off is None:  # no prefix list: the call's pages are the last ones the tokens cover
            off = len(toks) // P - len(keys)
        end = (off + len(keys)) * P
        if off < 0 or len(toks) < end:
            return None
        try:
            chain = sglang_page_hashes(toks[:end], P)
        except ValueError:
            return None
        if chain[off:] != keys or (prefix is not None and list(prefix) != chain[:off]):
            return None  # salted request, or tokens that are not these pages: never borrow another chain
        return prefix_keys(self.namespace, toks[:end], P, full_only=True)[off:]
