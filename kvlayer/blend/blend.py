"""CacheBlend orchestration: reuse documents' KV anywhere in a prompt, recompute a few tokens.

    cache = KVCache(runner.kv_spec(), cpu_bytes="2GiB")
    blender = Blender(model, cache)
    blender.add_document("faq", faq_ids)          # KV computed once, at positions 0..n-1
    out = blender.blend(prompt_ids)                # faq found inside the prompt by its tokens
    out.logits, out.kv                              # last-position logits, blended KV of the prompt

Steps: the exact cached prefix (chained keys) is taken as is; registered documents are found in
the rest (n-gram index, verified token by token) or given as (doc_id, start) spans; their KV is
fetched (in the background, overlapping the first layers), keys re-rotated to the new positions;
the runner recomputes every token up to the check layer, keeps the ``recompute_ratio`` reused
tokens whose KV deviates most, and from then on computes only those plus the new text.

The quality gate: unless ``gate=False``, a model must have a passing calibration record
(:mod:`kvlayer.blend.gate`, written by :mod:`kvlayer.blend.calibrate`); otherwise ``blend`` logs why and does a full prefill.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kvlayer.blend.gate import CalibrationStore
from kvlayer.blend.pipeline import LayerwiseLoader, LoadStats, placements_for
from kvlayer.blend.rope import rerotate
from kvlayer.blend.runner import Runner, RunOutput
from kvlayer.blend.segments import DocumentIndex, Segment, plan
from kvlayer.blend.select import SelectionPolicy, Selector
from kvlayer.engine import Document, KVCache

log = logging.getLogger("kvlayer.blend")


@dataclass
class BlendConfig:
    """Knobs of one Blender. ``recompute_ratio=None`` uses the calibrated ratio (0.15 ungated)."""

    recompute_ratio: float | None = None
    check_layer: int = 1
    narrow_layers: int = 0
    narrow_start: float = 2.0
    deviation: str = "kv_query"
    lead_tokens: int = 0
    document_context: tuple[int, ...] = ()
    ngram: int = 8
    min_match: int = 16
    use_prefix_cache: bool = True
    pipeline: bool = True
    gate: bool = True


@dataclass
class BlendResult:
    kv: torch.Tensor  # [layers, 2, tokens, kv_heads, head_dim]
    logits: torch.Tensor  # [logits_last, vocab]
    mode: str  # "blend" or "full" (fallback or nothing to reuse)
    segments: list[Segment]
    recompute_ratio: float
    prefix_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    reason: str = ""
    seconds: float = 0.0
    load: LoadStats = field(default_factory=LoadStats)


def _ids(tokens: Iterable[int] | np.ndarray) -> np.ndarray:
    return np.asarray(tokens if isinstance(tokens, np.ndarray) else list(tokens), dtype=np.int64)


@contextlib.contextmanager
def scratch_cache(model: Any, **overrides: Any) -> Iterator[KVCache]:
    """A private in-memory KVCache for this model (calibration, examples)."""
    runner = Runner(model)
    kw = {"cpu_bytes": "4GiB", **overrides}
    cache = KVCache(runner.kv_spec(), **kw)
    try:
        yield cache
    finally:
        cache.close()


class Blender:
    """Blended prefill of one model over the documents registered in one KVCache."""

    def __init__(self, model: Any, cache: KVCache, config: BlendConfig | None = None, *,
                 calibration: CalibrationStore | None = None, runner: Runner | None = None) -> None:
        """``runner`` replaces ``Runner(model)`` (an engine's own modules, e.g. vLLM's; ``model``
        is then ignored)."""
        self.runner = runner if runner is not None else Runner(model)
        self.cache = cache
        self.config = config or BlendConfig()
        self.calibration = calibration or CalibrationStore()
        self.index = DocumentIndex(self.config.ngram)
        self._indexed: dict[str, int] = {}
        spec = cache.spec
        if (spec.num_layers, spec.num_kv_heads, spec.head_dim) != (
                self.runner.num_layers, self.runner.num_kv_heads, self.runner.head_dim):
            raise ValueError(f"cache spec {spec} does not match the model's KV shape")

    # ------------------------------------------------------------------ documents
    def add_document(self, doc_id: str, tokens: Iterable[int] | np.ndarray, *,
                     context: Iterable[int] | None = None, **meta: Any) -> Document:
        """Compute a document's KV once and store it under its document keys.

        The KV is computed after ``context`` (default ``config.document_context``; e.g. the
        system prompt your prompts start with) and rotated back to positions from 0. Computed
        alone, a document's first token becomes an attention sink that no real prompt has;
        computed after the prompt's real opening it reads like the text it will sit in.
        """
        toks = _ids(tokens)
        ctx = _ids(self.config.document_context if context is None else context)
        a = len(ctx)
        out = self.runner.prefill(np.concatenate([ctx, toks]) if a else toks)
        kv = out.kv[:, :, a:]
        if a:
            cos_old, sin_old = self.runner.rope.cos_sin(torch.arange(a, a + len(toks), device=kv.device))
            cos_new, sin_new = self.runner.rope.cos_sin(torch.arange(len(toks), device=kv.device))
            kv = kv.clone()
            for li in range(kv.shape[0]):
                kv[li, 0] = rerotate(kv[li, 0], cos_old, sin_old, cos_new, sin_new)
        doc = self.cache.put_document(doc_id, toks, kv.to(self.cache.spec.torch_dtype).contiguous(), context=ctx,
                                      **meta)
        self._sync_index()
        return doc

    def _sync_index(self) -> None:
        docs = {d.doc_id: d for d in self.cache.documents()}
        for gone in set(self._indexed) - set(docs):
            self.index.remove(gone)
            del self._indexed[gone]
        for doc_id, d in docs.items():
            if self._indexed.get(doc_id) != id(d):
                self.index.add(doc_id, d.tokens)
                self._indexed[doc_id] = id(d)

    # ------------------------------------------------------------------ prefill
    def full_prefill(self, tokens: Any, *, logits_last: int = 1) -> RunOutput:
        return self.runner.prefill(tokens, logits_last=logits_last)

    def _ratio(self, requested: float | None) -> tuple[float | None, str]:
        want = requested if requested is not None else self.config.recompute_ratio
        if not self.config.gate:
            return (0.15 if want is None else want), "ungated"
        safe, reason = self.calibration.verdict(self.runner.fingerprint)
        if safe is None:
            return None, reason
        if want is None:
            return safe, "calibrated ratio"
        if want < safe:
            log.warning("recompute_ratio %.3f is below the calibrated %.3f for this model: using %.3f", want, safe, safe)
            return safe, "raised to the calibrated ratio"
        return want, "calibrated"

    def blend(self, tokens: Any, *, spans: Iterable[tuple[str, int]] | None = None, logits_last: int = 1,
              recompute_ratio: float | None = None, prefix: tuple[int, torch.Tensor] | None = None) -> BlendResult:
        """Blended prefill of ``tokens``; ``spans`` = explicit (doc_id, start) placements;
        ``prefix`` = (tokens, exact KV) already known to the caller (an engine's own cached
        blocks), used instead of a prefix lookup in the store."""
        t0 = time.perf_counter()
        ids = np.asarray(tokens, dtype=np.int64)
        n = len(ids)
        ratio, reason = self._ratio(recompute_ratio)
        if ratio is None:
            log.warning("blending refused, doing a full prefill: %s", reason)
            return self._full(ids, logits_last, reason, t0)
        cfg = self.config
        limit = n - logits_last  # the scored tail is always computed
        prefix_len, prefix_kv = prefix if prefix is not None and prefix[0] > 0 else (0, None)
        if prefix is None and cfg.use_prefix_cache and limit > 0:
            prefix_len, prefix_kv = self.cache.retrieve(ids, max_tokens=limit)
            if prefix_kv is None:
                prefix_len = 0
        self._sync_index()
        docs = {d.doc_id: d.tokens for d in self.cache.documents()}
        if spans is not None:
            spans = [(d, s) for d, s in spans if s < limit]
        segs = plan(ids[:limit], prefix_len=prefix_len, index=self.index, spans=spans, docs=docs,
                    min_len=cfg.min_match)
        segs = [s for s in segs if s.kind != "new"]
        # how much of each document's KV is cached, without moving data
        avail = {d: self.cache.lookup(docs[d], keys=self.cache.document(d).keys).hit_tokens
                 for d in {s.doc_id for s in segs if s.kind == "doc" and s.doc_id is not None}}
        kept: list[Segment] = []
        for s in segs:
            if s.kind == "doc":
                m = min(s.length, avail.get(s.doc_id or "", 0) - s.doc_start)
                if m < cfg.min_match:
                    continue
                s = Segment("doc", s.start, s.start + m, s.doc_id, s.doc_start)
            kept.append(s)
        segs = kept
        reused = np.zeros(n, dtype=bool)
        for s in segs:
            if s.kind == "doc":
                reused[s.start:s.end] = True
        if not reused.any() and prefix_len == 0:
            return self._full(ids, logits_last, "nothing cached to reuse", t0, segments=self._fill(segs, n))
        rope = self.runner.rope
        max_src = max([s.doc_start + s.length for s in segs if s.kind == "doc"] + [1])
        # old tables first: a dynamic-NTK rotary module resizes to the last positions it saw
        cos_old, sin_old = rope.cos_sin(torch.arange(max_src))
        cos_new, sin_new = rope.cos_sin(torch.arange(n))
        sources = {"prefix": prefix_kv} if prefix_kv is not None else {}
        loader = LayerwiseLoader(
            self._fetch, placements_for(segs), num_tokens=n, num_layers=self.runner.num_layers,
            kv_heads=self.runner.num_kv_heads, head_dim=self.runner.head_dim, dtype=self.runner.dtype,
            cos_new=cos_new, sin_new=sin_new, cos_old=cos_old, sin_old=sin_old, sources=sources, reused=reused)
        forced = torch.zeros(n, dtype=torch.bool)
        for s in segs:
            if s.kind == "doc" and s.doc_start == 0:
                forced[s.start:s.start + cfg.lead_tokens] = True
        selector = Selector(SelectionPolicy(ratio, cfg.check_layer, cfg.narrow_layers, cfg.narrow_start,
                                            cfg.deviation, cfg.lead_tokens), int(reused.sum()), forced)
        if cfg.pipeline:
            loader.start()
        else:
            loader.run()
        try:
            out = self.runner.run(ids, layer_kv=loader.layer, prefix_len=prefix_len, reused=reused,
                                  selector=selector, logits_last=logits_last)
        finally:
            loader.join()
        n_reused = int(reused.sum())
        recomputed = int(np.isin(out.computed, np.flatnonzero(reused)).sum())
        return BlendResult(out.kv, out.logits, "blend", self._fill(segs, n), ratio, prefix_len, n_reused,
                           recomputed, reason, time.perf_counter() - t0, loader.stats)

    def _fetch(self, doc_id: str) -> tuple[int, torch.Tensor | None]:
        return self.cache.get_document(doc_id)

    @staticmethod
    def _fill(segs: list[Segment], n: int) -> list[Segment]:
        out, cur = [], 0
        for s in segs:
            if s.start > cur:
                out.append(Segment("new", cur, s.start))
            out.append(s)
            cur = s.end
        if cur < n:
            out.append(Segment("new", cur, n))
        return out

    def _full(self, ids: np.ndarray, logits_last: int, reason: str, t0: float,
              segments: list[Segment] | None = None) -> BlendResult:
        out = self.runner.prefill(ids, logits_last=logits_last)
        n = len(ids)
        return BlendResult(out.kv, out.logits, "full", segments or [Segment("new", 0, n)], 1.0, 0, 0, 0, reason,
                           time.perf_counter() - t0)
