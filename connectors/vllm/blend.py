"""CacheBlend through the vLLM connector: documents registered by the engine, blended prefills.

Registration: a request whose ``kv_transfer_params`` hold ``{"kvlayer_document": {"id": "faq",
"context_tokens": C}}`` is served normally (send it with ``max_tokens=1``); once its prompt is
computed, the worker reads the KV of prompt tokens ``[C, n)`` from vLLM's blocks, re-rotates K
back to positions from 0 and stores it as document ``faq`` after context ``prompt[:C]``
(``KVCache.put_document``), then publishes the record to the shared tiers.

Blending: for a request whose prompt holds registered documents (found by their tokens, or named
with ``"kvlayer_spans": [["faq", start], ...]``), the scheduler side claims every prompt token but
the last one; the worker side, before the forward pass, runs the reference runner's loop
(:class:`~kvlayer.blend.Blender`) over the serving model's own modules
(:class:`~.blend_runner.VllmRunner`): documents' KV re-rotated to their positions, the selected
tokens and the new text recomputed, and writes the result into the request's blocks. vLLM then
computes the last token over them. Per request: ``"kvlayer_blend": false`` turns it off,
``"kvlayer_blend_ratio": r`` asks for a ratio (never below the calibrated one).

Correctness: blended KV is never saved under prefix keys (a blended request has no state in the
prefix scheduler, so nothing of it is saved). vLLM's own prefix cache would register the full
blocks of a blended request under the hashes of their tokens and serve them to the next request
with that prefix as if exact; so the hashes of the blocks from the first blended position on are
salted (:func:`salt_block_hashes`): only a later request blended the same way can hit them.
Every refusal (gate, ``kvlayer_blend: false``, a document not fully cached, no model handle) is a
log line and an ordinary request; a failure at load time (document evicted after scheduling,
corrupt blob, dead tier) reports the claimed blocks as failed and vLLM recomputes them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from kvlayer.blend.blend import BlendConfig, Blender
from kvlayer.blend.gate import CalibrationStore
from kvlayer.blend.rope import rerotate
from kvlayer.blend.segments import DocumentIndex, plan
from kvlayer.engine import KVCache
from kvlayer.errors import KVLayerError

from ..core import Counters, FailureGuard
from .blend_config import BlendOptions
from .metadata import ConnectorMeta

log = logging.getLogger("kvlayer.vllm")

#: vLLM versions whose ``Request.block_hashes`` chaining :func:`salt_block_hashes` was checked on
#: (tests/unit/test_vllm_blend_hooks.py fails when a new vLLM changes it)
SALT_CHECKED_VERSIONS = ("0.32.", "0.33.")


class BlendUnavailable(KVLayerError):
    """Blending cannot run for this request; it is served without it."""


# ============================================================================ plain data
@dataclass
class DocOp:
    """Store prompt ``tokens[context_len:]`` as document ``doc_id`` (KV read from ``block_ids``)."""

    req_id: str
    doc_id: str
    tokens: list[int]
    context_len: int
    block_ids: list[int]


@dataclass
class BlendOp:
    """Blend ``tokens``: exact ``[0, computed)`` in the blocks already, write ``[write_from, end)``.

    ``write_from`` > ``computed`` only for a resumed request: its blocks up to ``write_from`` are
    its own earlier blend, found in vLLM's prefix cache; the blend is run again from ``computed``
    (the same inputs as the first time, so the same KV) and only the missing blocks are written."""

    req_id: str
    tokens: list[int]
    spans: list[tuple[str, int]]
    docs: list[tuple[str, list[int], list[int]]]  # (id, tokens, context) of every document used
    computed: int
    end: int
    block_ids: list[int]
    ratio: float
    write_from: int


@dataclass
class BlendConnectorMeta(ConnectorMeta):
    """The prefix scheduler's metadata plus this step's blend and registration ops."""

    docs: list[DocOp] = field(default_factory=list)
    blends: list[BlendOp] = field(default_factory=list)

    @classmethod
    def extend(cls, meta: ConnectorMeta, docs: list[DocOp], blends: list[BlendOp]) -> ConnectorMeta:
        if not docs and not blends:
            return meta
        base = {f.name: getattr(meta, f.name) for f in fields(meta)}
        return cls(**base, docs=docs, blends=blends)


@dataclass
class BlendCounters(Counters):
    blend_requests: int = 0  # requests claimed for blending
    blend_refused: int = 0  # requests with documents served without blending (gate, params, eviction)
    blended: int = 0  # blended prefills written into vLLM's blocks
    blend_failures: int = 0  # claimed, then failed at load time: vLLM recomputed the blocks
    doc_tokens_reused: int = 0  # document tokens whose cached KV was kept
    tokens_recomputed: int = 0  # reused-candidate tokens recomputed by selection
    documents_registered: int = 0


# ============================================================================ vLLM block hashes
def salt_block_hashes(request: Any, first_block: int, salt: bytes) -> int:
    """Replace ``request.block_hashes[first_block:]`` by salted digests so that vLLM's prefix cache
    files this request's blocks from ``first_block`` on under hashes no ordinary request has.

    vLLM chains each new block hash from ``request.block_hashes[-1]``, so the blocks of generated
    tokens are salted too. Returns how many hashes were salted."""
    import vllm

    if not vllm.__version__.startswith(SALT_CHECKED_VERSIONS):
        raise BlendUnavailable(f"vLLM {vllm.__version__}: block-hash salting is checked only on "
                               f"{SALT_CHECKED_VERSIONS}; not blending (its blocks could be served as exact)")
    hashes = request.block_hashes
    for i in range(first_block, len(hashes)):
        h = hashes[i]
        hashes[i] = type(h)(hashlib.sha256(b"kvlayer-blend/v1" + salt + bytes(h)).digest())
    return max(0, len(hashes) - first_block)


# ============================================================================ scheduler side
@dataclass
class _Blend:
    request: Any
    op: BlendOp
    salted: Any = None  # the request's first salted block hash (None: no full block was salted)
    allocated: bool = False
    emitted: bool = False


@dataclass
class _Preempted:
    """A blended request vLLM preempted: how to blend it the same way when it resumes."""

    computed: int  # the exact prefix its blend started from
    salted: Any  # its first salted block hash, to tell whether its hashes are still salted


@dataclass
class _Register:
    request: Any
    doc_id: str
    context_len: int
    block_ids: list[int] = field(default_factory=list)
    emitted: bool = False


def _params(request: Any) -> dict[str, Any]:
    p = getattr(request, "kv_transfer_params", None)
    return p if isinstance(p, dict) else {}


class BlendScheduler:
    """Decides which requests blend (claims, hash salting) and which register documents."""

    def __init__(self, cache: KVCache, options: BlendOptions, *, block_size: int,
                 calibration: CalibrationStore | None = None) -> None:
        self.cache = cache
        self.options = options
        self.block_size = block_size
        self.calibration = calibration or CalibrationStore()
        self.counters = BlendCounters()
        self.index = DocumentIndex(options.ngram)
        self._indexed: dict[str, int] = {}
        self._synced = float("-inf")
        self._blends: dict[str, _Blend] = {}
        self._preempted: dict[str, _Preempted] = {}  # until the request finishes
        self._refused: set[str] = set()  # requests refused (counted once), until they finish
        self._registers: dict[str, _Register] = {}
        self._lock = threading.Lock()
        self._said: set[str] = set()

    # ------------------------------------------------------------------ helpers
    def _say(self, reason: str) -> None:
        """Log a refusal reason once at INFO, later ones at DEBUG (one line per request is noise)."""
        (log.debug if reason in self._said else log.info)("kvlayer blend: %s", reason)
        self._said.add(reason)

    def _refuse(self, req_id: str, reason: str) -> None:
        if req_id not in self._refused:  # vLLM asks again each step a request waits for blocks
            self._refused.add(req_id)
            self.counters.add(blend_refused=1)
        self._say(f"request {req_id}: prefix reuse + recompute instead of blending: {reason}")

    def _sync(self) -> None:
        now = time.monotonic()
        if now - self._synced >= self.options.sync_s:
            self._synced = now
            self.cache.sync_documents()
        docs = {d.doc_id: d for d in self.cache.documents()}
        for gone in set(self._indexed) - set(docs):
            self.index.remove(gone)
            del self._indexed[gone]
        for doc_id, d in docs.items():
            if self._indexed.get(doc_id) != id(d):
                self.index.add(doc_id, d.tokens)
                self._indexed[doc_id] = id(d)

    def _ratio(self, params: dict[str, Any]) -> tuple[float | None, str]:
        want = params.get("kvlayer_blend_ratio")
        if want is not None and not (isinstance(want, (int, float)) and 0.0 <= float(want) <= 1.0):
            return None, f"kvlayer_blend_ratio must be a number in [0, 1], got {want!r}"
        if not self.options.gate:
            return (self.options.ungated_ratio if want is None else float(want)), "ungated"
        safe, reason = self.calibration.verdict(self.options.calibration_key or self.cache.spec.model)
        if safe is None:
            return None, reason
        return (safe if want is None else max(safe, float(want))), "calibrated"

    # ------------------------------------------------------------------ vLLM hooks
    def match(self, request: Any, num_computed_tokens: int) -> int | None:
        """Tokens claimed for a blended prefill, or None: the request is not blended."""
        with self._lock:
            return self._match(request, num_computed_tokens)

    def _match(self, request: Any, num_computed: int) -> int | None:
        req_id = request.request_id
        params = _params(request)
        reg = params.get("kvlayer_document")
        if reg is not None:
            self._register(request, reg)
            return None
        if not self.options.enabled:
            return None
        known = self._blends.get(req_id)
        if known is not None and known.request is request and known.op.write_from == num_computed:
            return known.op.end - num_computed  # asked again (allocation failed last step)
        prompt = np.asarray(request.prompt_token_ids or [], dtype=np.int64)
        n = len(prompt)
        if n < 2 or num_computed >= n - 1:
            return None
        # A preempted blend resumes from the exact prefix it started from, whatever part of its
        # own blended blocks vLLM's prefix cache still holds: the same blend, so the same tokens.
        # (Blending again from where the cache ends selected other tokens: other answers.)
        was = self._preempted.get(req_id)
        prefix_len = was.computed if was is not None and num_computed >= was.computed else num_computed
        self._sync()
        if not self.index.docs and "kvlayer_spans" not in params:
            return None
        docs = {d.doc_id: d for d in self.cache.documents()}
        spans = params.get("kvlayer_spans")
        try:
            if spans is not None:
                spans = [(str(d), int(s)) for d, s in spans]
                unknown = [d for d, _ in spans if d not in docs]
                if unknown:
                    raise ValueError(f"unknown documents {unknown}")
            segs = plan(prompt[:n - 1], prefix_len=prefix_len, index=self.index, spans=spans,
                        docs={k: d.tokens for k, d in docs.items()}, min_len=self.options.min_match)
        except (ValueError, KeyError, TypeError) as e:
            self._refuse(req_id, f"bad kvlayer_spans ({e})")
            return None
        found = [s for s in segs if s.kind == "doc" and s.doc_id is not None]
        if not found:
            return None
        if params.get("kvlayer_blend") is False:
            self._refuse(req_id, "kvlayer_blend is false in kv_transfer_params")
            return None
        ratio, why = self._ratio(params)
        if ratio is None:
            self._refuse(req_id, why)
            return None
        used = []
        for s in found:
            doc = docs[s.doc_id or ""]
            if s.doc_start != 0:
                self._say(f"request {req_id}: document {s.doc_id!r} is cut at its start; its tokens are computed")
                continue
            need = -(-(s.doc_start + s.length) // self.cache.chunk_size)
            if self.cache.cached_run(doc.keys[:need]) < need:
                self._refuse(req_id, f"document {s.doc_id!r} is not fully cached (partly evicted)")
                return None
            if s.length >= self.options.min_match:
                used.append(s)
        if not used:
            return None
        if len(getattr(request, "block_hashes", [])) != n // self.block_size:
            self._refuse(req_id, "vLLM's block hashes do not follow the block size (hybrid cache?)")
            return None
        salt = hashlib.sha256(repr((ratio, [(s.doc_id, s.start) for s in used])).encode()).digest()
        first = prefix_len // self.block_size
        hashes = request.block_hashes
        resumed = was is not None and prefix_len == was.computed and first < len(hashes) \
            and hashes[first] == was.salted  # its hashes still carry its first salt: kept
        if not resumed:
            try:
                salt_block_hashes(request, first, salt)
            except BlendUnavailable as e:
                self._refuse(req_id, str(e))
                return None
        salted = hashes[first] if first < len(hashes) else None
        op = BlendOp(req_id, [int(t) for t in prompt], [(s.doc_id or "", s.start) for s in used],
                     [(s.doc_id or "", docs[s.doc_id or ""].tokens.tolist(), docs[s.doc_id or ""].context.tolist())
                      for s in used], prefix_len, n - 1, [], ratio, num_computed)
        if known is None or known.request is not request:  # not a re-claim of a waiting request
            self.counters.add(blend_requests=1)
        self._blends[req_id] = _Blend(request, op, salted)
        return op.end - num_computed

    def _register(self, request: Any, reg: Any) -> None:
        req_id = request.request_id
        if req_id in self._registers:
            return
        if not isinstance(reg, dict) or not isinstance(reg.get("id"), str) or not reg["id"]:
            log.warning("request %s: kvlayer_document must be {\"id\": str, \"context_tokens\": int}; ignored", req_id)
            return
        ctx = reg.get("context_tokens", 0)
        n = len(request.prompt_token_ids or [])
        if not isinstance(ctx, int) or not 0 <= ctx < n:
            log.warning("request %s: context_tokens must be in [0, %d); document %r not registered", req_id, n,
                        reg["id"])
            return
        self._registers[req_id] = _Register(request, reg["id"], ctx)

    def owns(self, request: Any) -> bool:
        """Whether ``request`` is blended (the prefix scheduler must leave it alone: no loads, no saves)."""
        with self._lock:
            b = self._blends.get(request.request_id)
            return b is not None and b.request is request

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        with self._lock:
            b = self._blends.get(request.request_id)
            if b is None:
                return
            if num_external_tokens != b.op.end - b.op.write_from:
                log.warning("request %s: vLLM allocated %d external tokens, the blend claimed %d; not blending",
                            b.op.req_id, num_external_tokens, b.op.end - b.op.write_from)
                del self._blends[b.op.req_id]
                return
            b.allocated = True

    def ops(self, so: Any) -> tuple[list[DocOp], list[BlendOp]]:
        """This step's registration and blend ops (from vLLM's SchedulerOutput)."""
        docs: list[DocOp] = []
        blends: list[BlendOp] = []
        with self._lock:
            num_sched = so.num_scheduled_tokens
            for req_id in getattr(so, "preempted_req_ids", None) or ():
                b = self._blends.pop(req_id, None)
                if b is not None and b.emitted:  # its blocks were written: it may find them again
                    self._preempted[req_id] = _Preempted(b.op.computed, b.salted)
                self._registers.pop(req_id, None)
            for req_id in getattr(so, "finished_req_ids", None) or ():
                self._forget(req_id)
            seen: list[tuple[str, list[int] | None, bool, int]] = []
            for nr in so.scheduled_new_reqs:
                seen.append((nr.req_id, list(nr.block_ids[0]) if nr.block_ids else None, True,
                             nr.num_computed_tokens + num_sched.get(nr.req_id, 0)))
            cr = so.scheduled_cached_reqs
            resumed: set[str] = getattr(cr, "resumed_req_ids", set()) or set()
            for i, req_id in enumerate(cr.req_ids):
                nb = cr.new_block_ids[i]
                seen.append((req_id, list(nb[0]) if nb else None, req_id in resumed,
                             cr.num_computed_tokens[i] + num_sched.get(req_id, 0)))
            for req_id, blocks, fresh, after in seen:
                b = self._blends.get(req_id)
                if b is not None and b.allocated and not b.emitted and fresh and blocks is not None:
                    b.emitted = True
                    b.op.block_ids = blocks
                    blends.append(b.op)
                r = self._registers.get(req_id)
                if r is not None and not r.emitted:
                    if blocks is not None:
                        r.block_ids = blocks if fresh else r.block_ids + blocks
                    n = len(r.request.prompt_token_ids or [])
                    if after >= n:
                        r.emitted = True
                        docs.append(DocOp(req_id, r.doc_id, list(r.request.prompt_token_ids), r.context_len,
                                          list(r.block_ids)))
        return docs, blends

    def finished(self, request: Any) -> None:
        with self._lock:
            self._forget(request.request_id)

    def _forget(self, req_id: str) -> None:
        """Under the lock: drop every trace of a finished request."""
        self._blends.pop(req_id, None)
        self._preempted.pop(req_id, None)
        self._refused.discard(req_id)
        self._registers.pop(req_id, None)

    def num_requests(self) -> int:
        with self._lock:
            return len(self._blends) + len(self._preempted) + len(self._refused) + len(self._registers)


# ============================================================================ worker side
class BlendWorker:
    """Runs blend and registration ops against vLLM's paged cache with the serving model."""

    def __init__(self, cache: KVCache, *, block_size: int, guard: FailureGuard) -> None:
        self.cache = cache
        self.block_size = block_size
        self.guard = guard
        self.counters = BlendCounters()
        self.adapter: Any = None
        self.attention: list[Any] = []
        self._runner: Any = None
        self._errors: set[int] = set()
        self.blend_seconds = 0.0

    def register(self, adapter: Any, attention_modules: list[Any]) -> None:
        self.adapter = adapter
        self.attention = attention_modules

    def runner(self) -> Any:
        """The serving model as a :class:`VllmRunner` (found once, through the plugin's record)."""
        if self._runner is None:
            from . import plugin
            from .blend_runner import VllmRunner
            from .models import model_for

            model = model_for(self.attention)
            if model is None:
                why = ("the kvlayer vLLM plugin is disabled (KVLAYER_VLLM_PLUGIN=0)" if not plugin.enabled() else
                       "the model is not one of kvlayer's recorded Llama/Mistral/Qwen2/Qwen3 classes (is the "
                       "kvlayer entry point installed and allowed by VLLM_PLUGINS?)")
                raise BlendUnavailable(f"no handle on the serving model: {why}")
            self._runner = VllmRunner(model, self.cache.spec.model)
        return self._runner

    def _blocks(self, n: int) -> int:
        return -(-n // self.block_size)

    # ------------------------------------------------------------------ ops
    def load(self, meta: ConnectorMeta) -> None:
        for op in getattr(meta, "blends", ()):
            t0 = time.perf_counter()
            try:
                self._blend(op)
            except Exception as e:
                first, last = op.write_from // self.block_size, self._blocks(op.end)
                self._errors.update(op.block_ids[first:last])
                self.counters.add(blend_failures=1)
                self.guard.record("blend", e, then=f"request {op.req_id}: vLLM recomputes its claimed blocks")
            self.blend_seconds += time.perf_counter() - t0

    def _blend(self, op: BlendOp) -> None:
        if self.adapter is None:
            raise BlendUnavailable("the KV cache layout is not mapped")
        runner = self.runner()
        for doc_id, toks, ctx in op.docs:
            try:
                d = self.cache.document(doc_id)
                same = d.tokens.tolist() == toks and d.context.tolist() == ctx
            except KVLayerError:
                same = False
            if not same:
                self.cache.register_document(doc_id, toks, context=ctx)
        bs = self.block_size
        prefix = None
        if op.computed:
            kv = self.adapter.gather(op.block_ids[:op.computed // bs])
            prefix = (op.computed, kv[:, :, :op.computed])
        cfg = BlendConfig(gate=False, min_match=1, use_prefix_cache=True, pipeline=False)
        blender = Blender(None, self.cache, cfg, runner=runner)
        res = blender.blend(op.tokens, spans=op.spans, prefix=prefix, recompute_ratio=op.ratio)
        if res.mode != "blend":
            raise BlendUnavailable(f"the blend fell back to a full prefill ({res.reason})")
        # every document run must come from the store in full (a document under the exact prefix
        # is cut to its tail by the plan; one missing from the plan was dropped as unreadable)
        placed = {g.doc_id for g in res.segments if g.kind == "doc"}
        sizes = {i: len(t) for i, t, _ in op.docs}
        for g in res.segments:
            if g.kind == "doc" and res.load.fetched_tokens.get(g.doc_id or "", 0) < g.doc_start + g.length:
                raise BlendUnavailable(f"document {g.doc_id!r} could not be read in full (evicted, corrupt or tier down)")
        for doc_id, start in op.spans:
            if doc_id not in placed and start + sizes[doc_id] > res.prefix_tokens:
                raise BlendUnavailable(f"document {doc_id!r} could not be read (evicted, corrupt or tier down)")
        first, last = op.write_from // bs, self._blocks(op.end)
        region = res.kv[:, :, first * bs:last * bs]
        if region.shape[2] < (last - first) * bs:  # the last block is partial: vLLM fills the rest
            pad = torch.zeros(*region.shape[:2], (last - first) * bs - region.shape[2], *region.shape[3:],
                              dtype=region.dtype, device=region.device)
            region = torch.cat([region, pad], dim=2)
        self.adapter.scatter(op.block_ids[first:last], region)
        self.counters.add(blended=1, doc_tokens_reused=res.reused_tokens, tokens_recomputed=res.recomputed_tokens)

    def save(self, meta: ConnectorMeta) -> None:
        ops: list[DocOp] = list(getattr(meta, "docs", ()))
        for op in ops:
            try:
                self._register(op)
            except Exception as e:
                self.guard.record("register document", e, then=f"document {op.doc_id!r} not registered")

    def _register(self, op: DocOp) -> None:
        if self.adapter is None:
            raise BlendUnavailable("the KV cache layout is not mapped")
        n, c = len(op.tokens), op.context_len
        kv = self.adapter.gather(op.block_ids[:self._blocks(n)])[:, :, :n]
        doc = kv[:, :, c:].clone()
        if c:
            rope = self.runner().rope
            cos_old, sin_old = rope.cos_sin(torch.arange(c, n))
            cos_new, sin_new = rope.cos_sin(torch.arange(n - c))
            for li in range(doc.shape[0]):
                doc[li, 0] = rerotate(doc[li, 0], cos_old, sin_old, cos_new, sin_new)
        self.cache.put_document(op.doc_id, op.tokens[c:], doc.contiguous(), context=op.tokens[:c], source="vllm")
        self.cache.publish_document(op.doc_id)
        self.counters.add(documents_registered=1)
        log.info("kvlayer: document %r registered (%d tokens after %d context tokens)", op.doc_id, n - c, c)

    def take_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out
