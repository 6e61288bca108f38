"""KVCache: the one object engines and users talk to.

    cache = KVCache(spec, chunk_size=256, cpu_bytes="2GiB", disk_path="/tmp/kv")
    cache.store(tokens, kv)                     # kv: [layers, 2, len(tokens), kv_heads, head_dim]
    hit = cache.lookup(tokens).hit_tokens       # moves no data
    n, kv2 = cache.retrieve(tokens)             # first n tokens' KV, bit-exact for lossless codecs

Token ids enter only through ``kvlayer.keys.token_array``: floats, bools and strings are refused
(``TypeError`` naming the argument), never cast, since ``[500.7]`` keyed as ``[500]`` would serve
another prompt's KV.

Chunks are keyed by content (``kvlayer.keys``): the same model + tokens give the same keys in any
process. Documents (``put_document``) are keyed by their own tokens (and the fixed context they
were computed after, if any) only, so they can be reused at any position (CacheBlend) and pinned
or evicted by id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvlayer import docrecords
from kvlayer.codec import get_codec, with_rope
from kvlayer.config import KVLayerConfig, load_config, make_config
from kvlayer.errors import CorruptBlobError, DocumentNotFound, KVLayerError, SpecMismatchError, UsageError
from kvlayer.events import EventHub
from kvlayer.keys import TokenIds, chunk_bounds, document_keys, prefix_keys, token_array
from kvlayer.malloc import tune_for_blobs
from kvlayer.spec import KVSpec
from kvlayer.storage import TieredStore, build_tier, retry_policy

log = logging.getLogger("kvlayer")


@dataclass
class LookupResult:
    """The cached prefix of a token sequence: ``hit_tokens`` tokens in ``len(tiers)`` chunks."""

    hit_tokens: int
    keys: list[str]
    tiers: list[str]
    num_chunks: int = 0

    @property
    def hit_chunks(self) -> int:
        return len(self.tiers)


@dataclass
class Document:
    doc_id: str
    tokens: np.ndarray
    keys: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    #: tokens the document's KV was computed after (positions then start at ``len(context)``,
    #: stored rotated back to 0); empty = computed alone
    context: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


class KVCache:
    """Content-keyed, tiered KV storage for one KVSpec (one model, one TP shard)."""

    def __init__(self, spec: KVSpec, config: KVLayerConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = load_config(**overrides)
        elif overrides:
            config = make_config({**config.model_dump(), **overrides})
        self.spec = spec
        self.config = config
        self.chunk_size = config.chunk_size
        if config.salt and not spec.salt:
            spec = KVSpec(**{**spec.__dict__, "salt": config.salt})
            self.spec = spec
        self.namespace = spec.namespace_digest()
        if config.malloc_tuning:
            tuned = tune_for_blobs() is not None
            log.info("malloc tuned for multi-MiB blobs: %s", "yes" if tuned else "not available here")
        tcs = config.tier_configs()
        if not tcs:
            raise KVLayerError("no storage tier configured: set cpu_bytes > 0, disk_path, redis_url or server_url")
        self._store = TieredStore(
            [(build_tier(tc), get_codec(tc.codec, **with_rope(tc.codec, tc.codec_params, config.rope_theta)))
             for tc in tcs],
            write_policy=config.write_policy,
            write_queue_bytes=config.write_queue_bytes,
            promote_on_hit=config.promote_on_hit,
            retry=[retry_policy(tc) for tc in tcs],
        )
        self._docs: dict[str, Document] = {}
        log.debug("KVCache ready: namespace %s, tiers %s", self.namespace.hex()[:12],
                  [lv.name for lv in self._store.levels])

    # ------------------------------------------------------------------ keys
    def keys(self, tokens: TokenIds, *, full_only: bool = False) -> list[str]:
        return prefix_keys(self.namespace, token_array(tokens), self.chunk_size, full_only=full_only)

    def document_keys(self, tokens: TokenIds, *, context: TokenIds | None = None) -> list[str]:
        ctx = None if context is None else token_array(context, "context")
        return document_keys(self.namespace, token_array(tokens), self.chunk_size, context=ctx)

    # ------------------------------------------------------------------ where chunks are
    @property
    def tier_names(self) -> list[str]:
        """Tier names hot -> cold (``cpu``, ``disk``, ``redis``, ``remote`` unless renamed)."""
        return [lv.name for lv in self._store.levels]

    @property
    def top_tier_in_process(self) -> bool:
        """Whether the hottest tier is this process's memory: a put there costs a memcpy, so
        engines can save synchronously; otherwise saves should leave the step's thread."""
        return self._store.levels[0].tier.kind == "memory"

    @property
    def events(self) -> EventHub:
        """What the tiers gain and lose (``kvlayer.events``); subscribe to follow it."""
        return self._store.blobs.events

    def locate(self, keys: Sequence[str]) -> list[str | None]:
        """For every key, the name of the hottest tier holding it (None = nowhere). Moves no data."""
        return self._store.locate(list(keys))

    def cached_run(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` are stored somewhere (existence checks only)."""
        return len(self._store.lookup(list(keys)))

    # ------------------------------------------------------------------ prefix API
    def lookup(self, tokens: TokenIds, *, keys: list[str] | None = None) -> LookupResult:
        """Longest cached prefix (whole chunks; a partial last chunk counts if stored as such)."""
        tokens = token_array(tokens)
        keys = self.keys(tokens) if keys is None else keys
        tiers = self._store.lookup(keys)
        bounds = chunk_bounds(len(tokens), self.chunk_size)
        hit = bounds[len(tiers) - 1][1] if tiers else 0
        return LookupResult(hit, keys, tiers, len(keys))

    def store(self, tokens: TokenIds, kv: torch.Tensor, *, full_only: bool = False, skip_cached: bool = True,
              block: bool = True, keys: list[str] | None = None) -> int:
        """Store the KV of ``tokens`` (``kv`` covers at least ``len(tokens)`` tokens on dim 2) under
        their prefix keys, or under ``keys`` (one per chunk, e.g. a document's).
        Returns the number of chunks written (already cached chunks are skipped)."""
        tokens = token_array(tokens)
        n = len(tokens)
        # Checked up front, not per written chunk: a wrong tensor must fail even when every chunk
        # is already cached (it was silently accepted then).
        if (kv.dim() != 5 or kv.shape[2] < n or tuple(kv.shape) != self.spec.chunk_shape(kv.shape[2])
                or kv.dtype != self.spec.torch_dtype):
            raise SpecMismatchError(f"kv must be {self.spec.torch_dtype} {self.spec.chunk_shape(n)} or longer on dim 2, "
                                    f"got {kv.dtype} {tuple(kv.shape)}")
        keys = self.keys(tokens, full_only=full_only) if keys is None else keys
        bounds = chunk_bounds(n, self.chunk_size, full_only=full_only)
        if len(keys) != len(bounds):
            raise UsageError(f"{len(keys)} keys given for {len(bounds)} chunks")
        present = self._store.locate(keys) if skip_cached else [None] * len(keys)
        todo = [(k, s, e) for k, (s, e), w in zip(keys, bounds, present, strict=True) if w is None]
        chunks = []
        for _, s, e in todo:
            c = kv[:, :, s:e]
            self.spec.check_chunk(c)
            chunks.append(c.contiguous())
        self._store.put([k for k, _, _ in todo], chunks, block=block)
        return len(todo)

    def store_chunks(self, keys: Sequence[str], chunks: Sequence[torch.Tensor], *, block: bool = True) -> int:
        """Low-level store of ready-made chunks under given keys (engine connectors)."""
        for c in chunks:
            self.spec.check_chunk(c)
        return self._store.put(list(keys), list(chunks), block=block)

    def retrieve_chunks(self, keys: Sequence[str]) -> list[torch.Tensor | None]:
        """Chunks by key (None = miss), for connectors that copy them straight into the engine's
        cache. Read-only: raw CPU hits are zero-copy views of the stored blob, so a write into one
        changes the stored chunk itself (in-process blobs are not hashed on read, so later reads
        would serve the changed values). Copy before modifying (``retrieve`` does)."""
        out = self._store.get(list(keys))
        for i, c in enumerate(out):
            if c is not None and (c.dim() != 5 or c.shape[:2] != self.spec.chunk_shape(0)[:2]
                                  or c.shape[3:] != self.spec.chunk_shape(0)[3:] or c.dtype != self.spec.torch_dtype):
                log.warning("chunk %s has shape %s, not spec %s: treated as a miss", keys[i][:16], tuple(c.shape),
                            self.spec.chunk_shape(c.shape[2] if c.dim() == 5 else 0))
                out[i] = None
        return out

    def retrieve(self, tokens: TokenIds, *, max_tokens: int | None = None,
                 keys: list[str] | None = None) -> tuple[int, torch.Tensor | None]:
        """KV of the longest retrievable prefix: (n_tokens, tensor [layers, 2, n, heads, dim]).
        ``keys`` overrides the prefix keys (a document's). The tensor is the caller's own memory
        (never a view of a stored blob), so writing into it changes nothing stored; connectors
        that only copy chunks out use ``retrieve_chunks`` and skip this copy."""
        tokens = token_array(tokens)
        limit = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
        keys = self.keys(tokens) if keys is None else keys
        bounds = chunk_bounds(len(tokens), self.chunk_size)
        want = [k for k, (_, e) in zip(keys, bounds, strict=True) if e <= limit]
        got = self.retrieve_chunks(want)
        parts: list[torch.Tensor] = []
        n = 0
        for c, (s, e) in zip(got, bounds, strict=False):
            if c is None or c.shape[2] != e - s:
                break
            parts.append(c)
            n = e
        if not parts:
            return 0, None
        return n, (parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=2))

    # ------------------------------------------------------------------ documents
    def put_document(self, doc_id: str, tokens: TokenIds, kv: torch.Tensor, *, context: TokenIds | None = None,
                     **meta: Any) -> Document:
        """Register a document and store its KV, computed at positions from 0 with nothing before
        it, or after ``context`` and rotated back to positions from 0 (see ``document_keys``)."""
        doc = self._document(doc_id, tokens, context, meta)
        self.store(doc.tokens, kv, keys=doc.keys)  # registered only once stored
        self._docs[doc_id] = doc
        return doc

    def register_document(self, doc_id: str, tokens: TokenIds, *, context: TokenIds | None = None,
                          **meta: Any) -> Document:
        """Register a document's tokens without KV (e.g. KV stored by another process)."""
        doc = self._document(doc_id, tokens, context, meta)
        self._docs[doc_id] = doc
        return doc

    def _document(self, doc_id: str, tokens: TokenIds, context: TokenIds | None, meta: dict[str, Any]) -> Document:
        toks = token_array(tokens)
        ctx = token_array([] if context is None else context, "context")
        return Document(doc_id, toks, self.document_keys(toks, context=ctx), dict(meta), ctx)

    def document(self, doc_id: str) -> Document:
        try:
            return self._docs[doc_id]
        except KeyError:
            raise DocumentNotFound(f"unknown document {doc_id!r}; register it with put_document first") from None

    def documents(self) -> list[Document]:
        return list(self._docs.values())

    def get_document(self, doc_id: str) -> tuple[int, torch.Tensor | None]:
        """The document's cached KV: (tokens available, tensor) — a prefix if some chunks are gone."""
        doc = self.document(doc_id)
        return self.retrieve(doc.tokens, keys=doc.keys)

    def remove_document(self, doc_id: str, *, evict: bool = True) -> int:
        doc = self._docs.pop(doc_id, None)
        if doc is None:
            return 0
        self._store.pins.unpin_label(f"doc:{doc_id}")
        self._store.delete([docrecords.record_key(self.namespace, doc_id)], force=True)
        return self._store.delete(doc.keys) if evict else 0

    def publish_document(self, doc_id: str) -> str:
        """Write a registered document's record (id, tokens, context, chunk keys) into the store,
        so that other processes on the same shared tiers find it (``sync_documents``). Returns its key."""
        doc = self.document(doc_id)
        key = docrecords.record_key(self.namespace, doc_id)
        self._store.put([key], [docrecords.encode(doc_id, doc.tokens, doc.context, doc.keys, doc.meta)])
        return key

    def sync_documents(self) -> list[str]:
        """Register every document whose record is in the store and not yet known here (one key
        scan per tier); records that do not decode are skipped. Returns the ids added."""
        keys = sorted(self._store.blobs.keys_with_prefix(docrecords.record_prefix(self.namespace)))
        known = {docrecords.record_key(self.namespace, d) for d in self._docs}
        todo = [k for k in keys if k not in known]
        added = []
        for key, blob in zip(todo, self._store.get(todo), strict=True):
            try:
                rec = None if blob is None else docrecords.decode(blob)
            except CorruptBlobError as e:
                log.warning("document record %s skipped: %s", key[:16], e)
                rec = None
            if rec is None:
                continue
            doc = self._document(rec["id"], rec["tokens"], rec["context"], dict(rec.get("meta") or {}))
            if doc.keys != rec["keys"]:
                log.warning("document record %r lists other chunk keys than its tokens give; skipped", rec["id"])
                continue
            self._docs[doc.doc_id] = doc
            added.append(doc.doc_id)
        return added

    # ------------------------------------------------------------------ control
    def _target_keys(self, tokens: TokenIds | None, doc_id: str | None, keys: Sequence[str] | None) -> tuple[list[str], str]:
        if sum(x is not None for x in (tokens, doc_id, keys)) != 1:
            raise UsageError("give exactly one of tokens=, doc_id= or keys=")
        if doc_id is not None:
            return list(self.document(doc_id).keys), f"doc:{doc_id}"
        if tokens is not None:
            return self.keys(tokens), ""  # refuses non-integer token ids
        return list(keys or []), ""

    def pin(self, tokens: TokenIds | None = None, *, doc_id: str | None = None, keys: Sequence[str] | None = None,
            ttl_s: float | None = None) -> str:
        """Pin a prefix, a document or keys against eviction; returns a lease id for ``unpin``."""
        ks, label = self._target_keys(tokens, doc_id, keys)
        return self._store.pins.pin(ks, ttl_s=ttl_s, label=label)

    def unpin(self, lease_id: str | None = None, *, doc_id: str | None = None) -> int:
        """Release one lease, or every lease on a document. Returns leases released."""
        if doc_id is not None:
            return self._store.pins.unpin_label(f"doc:{doc_id}")
        return int(self._store.pins.unpin(lease_id or ""))

    def evict(self, tokens: TokenIds | None = None, *, doc_id: str | None = None, keys: Sequence[str] | None = None,
              force: bool = False) -> int:
        """Remove chunks from every tier (pinned ones only with ``force``). Returns chunks removed."""
        ks, _ = self._target_keys(tokens, doc_id, keys)
        return self._store.delete(ks, force=force)

    def clear(self) -> None:
        self._store.clear()

    def hits_by_tier(self) -> dict[str, int]:
        """Chunks read from each tier since start (each read counts at the hottest tier holding
        it); unlike ``stats()`` it asks no tier anything, so engines can poll it every step."""
        return self._store.blobs.hits_by_tier()

    def stats(self) -> dict[str, Any]:
        s = self._store.stats()
        s["documents"] = len(self._docs)
        s["namespace"] = self.namespace.hex()
        s["chunk_size"] = self.chunk_size
        return s

    def flush(self, timeout: float | None = None) -> bool:
        return self._store.flush(timeout)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> KVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
