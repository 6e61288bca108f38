"""SGLang page keys -> kvlayer keys.

SGLang names page ``i`` of a sequence ``d_i = sha256(d_{i-1} || uint32-LE page tokens)`` with no
seed for ``d_0`` (or a seed derived from the request's ``cache_salt``/``extra_key``). The hash
carries no model, dtype, layer count or TP shard. kvlayer's keys use the very same token chain and
bind each link to the KVSpec namespace: ``k_i = sha256(namespace || d_i)`` (``kvlayer.keys``). So
the backend computes kvlayer's key from SGLang's page hash alone (``derived_key``), and with page
size == chunk size and the same model, a page stored by stock SGLang is a hit for the vLLM
connector and the other way round, with no token ids crossing SGLang's interface.

When token ids do reach the backend (``extra_info.extra_info["token_ids"]``), the backend checks
that they reproduce the page hashes it was handed before using them (so a salted request or a wrong
token list can never borrow another sequence's data); the keys are the same either way. A salted
SGLang request has a seeded chain whose ``d_i`` differ, so it never shares with unsalted data.

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
    """``sha256(namespace || d)`` = ``kvlayer.keys.bind``; d as its 32 raw bytes when it is 64 hex
    characters (any other key string is hashed as its UTF-8 bytes)."""
    try:
        raw = bytes.fromhex(sglang_key) if len(sglang_key) == 64 else sglang_key.encode("utf-8")
    except ValueError:
        raw = sglang_key.encode("utf-8")
    return hashlib.sha256(namespace + raw).hexdigest()


def sglang_bridge_keys(namespace: bytes, tokens: Sequence[int] | np.ndarray, page_size: int) -> list[str]:
    """Keys of ``tokens``' full pages as the backend derives them from stock SGLang's page hashes;
    equal to ``kvlayer.keys.prefix_keys(namespace, tokens, page_size, full_only=True)``."""
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
