"""Finding registered documents inside a prompt's token ids, with no separator strings.

Every registered document is indexed by its non-overlapping token n-grams (one every ``n``
tokens). A prompt is scanned left to right; each n-gram found in the index proposes an alignment
(document, offset) which is then verified and extended token by token in both directions, so a
match is never mis-aligned: every reused prompt token equals the document token whose KV it
takes. Any run of at least ``2n - 1`` prompt tokens copied from a document contains an indexed
n-gram, so documents that are cut at the prompt's edges, appear twice, or come in any order are
all found; shorter fragments are simply computed as new text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("kvlayer.blend")


@dataclass(frozen=True)
class Segment:
    """Prompt positions ``[start, end)``; for a document, they equal its tokens ``[doc_start, ...)``."""

    kind: str  # "prefix" (exact cached prefix), "doc" (reused, blended) or "new" (computed)
    start: int
    end: int
    doc_id: str | None = None
    doc_start: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


class DocumentIndex:
    """An n-gram index over registered documents' token ids."""

    def __init__(self, n: int = 8) -> None:
        if n < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n}")
        self.n = n
        self.docs: dict[str, np.ndarray] = {}
        self._index: dict[bytes, list[tuple[str, int]]] = {}

    def add(self, doc_id: str, tokens: Sequence[int] | np.ndarray) -> None:
        toks = np.asarray(tokens, dtype=np.int64)
        if doc_id in self.docs:
            self.remove(doc_id)
        self.docs[doc_id] = toks
        for j in range(0, len(toks) - self.n + 1, self.n):
            self._index.setdefault(toks[j:j + self.n].tobytes(), []).append((doc_id, j))

    def remove(self, doc_id: str) -> None:
        toks = self.docs.pop(doc_id, None)
        if toks is None:
            return
        for j in range(0, len(toks) - self.n + 1, self.n):
            key = toks[j:j + self.n].tobytes()
            hits = [h for h in self._index.get(key, []) if h[0] != doc_id]
            if hits:
                self._index[key] = hits
            else:
                self._index.pop(key, None)

    def __len__(self) -> int:
        return len(self.docs)

    def find(self, prompt: Sequence[int] | np.ndarray, *, start: int = 0, min_len: int | None = None) -> list[Segment]:
        """Document segments in ``prompt[start:]``, non-overlapping, left to right, each verified."""
        p = np.asarray(prompt, dtype=np.int64)
        n = self.n
        min_len = n if min_len is None else max(1, min_len)
        out: list[Segment] = []
        floor = start  # nothing before this may be claimed again
        i = start
        while i + n <= len(p):
            hits = self._index.get(p[i:i + n].tobytes())
            best: Segment | None = None
            for doc_id, j in hits or ():
                seg = self._extend(p, i, doc_id, j, floor)
                if best is None or seg.length > best.length:
                    best = seg
            if best is not None and best.length >= min_len:
                out.append(best)
                floor = i = best.end
            else:
                i += 1
        return out

    def _extend(self, p: np.ndarray, i: int, doc_id: str, j: int, floor: int) -> Segment:
        d = self.docs[doc_id]
        back = 0
        while i - back - 1 >= floor and j - back - 1 >= 0 and p[i - back - 1] == d[j - back - 1]:
            back += 1
        fwd = 0
        lim = min(len(p) - i, len(d) - j)
        # vectorised forward verification, token by token
        eq = p[i:i + lim] == d[j:j + lim]
        fwd = int(lim if eq.all() else np.argmin(eq))
        return Segment("doc", i - back, i + fwd, doc_id, j - back)


def verify_span(prompt: np.ndarray, start: int, doc_id: str, doc_tokens: np.ndarray) -> Segment | None:
    """An explicit (doc_id, start) span, checked token by token; cut at the first mismatch or edge."""
    if not 0 <= start < len(prompt):
        raise ValueError(f"span start {start} for document {doc_id!r} is outside the prompt (len {len(prompt)})")
    lim = min(len(prompt) - start, len(doc_tokens))
    eq = prompt[start:start + lim] == doc_tokens[:lim]
    length = int(lim if eq.all() else np.argmin(eq))
    if length < lim:
        log.warning("document %r at %d matches only %d of %d tokens; the rest is computed", doc_id, start, length,
                    len(doc_tokens))
    return Segment("doc", start, start + length, doc_id, 0) if length else None


def plan(prompt: Sequence[int] | np.ndarray, *, prefix_len: int = 0, index: DocumentIndex | None = None,
         spans: Iterable[tuple[str, int]] | None = None, docs: dict[str, np.ndarray] | None = None,
         min_len: int | None = None) -> list[Segment]:
    """Split a prompt into prefix / doc / new segments covering it exactly, in order.

    Documents come from explicit ``spans`` (needs ``docs``: id -> tokens) when given, else from
    ``index``. Overlapping explicit spans are cut so that every position has one owner.
    """
    p = np.asarray(prompt, dtype=np.int64)
    found: list[Segment] = []
    if spans is not None:
        docs = docs or (index.docs if index is not None else {})
        for doc_id, s in sorted(spans, key=lambda t: t[1]):
            if doc_id not in docs:
                raise KeyError(f"unknown document {doc_id!r} in spans")
            seg = verify_span(p, s, doc_id, docs[doc_id])
            if seg is not None:
                found.append(seg)
    elif index is not None:
        found = index.find(p, start=prefix_len, min_len=min_len)
    segs: list[Segment] = []
    if prefix_len:
        segs.append(Segment("prefix", 0, prefix_len))
    cur = prefix_len
    for seg in found:
        if seg.end <= cur:
            continue
        if seg.start < cur:  # overlaps the prefix or a previous span: keep the tail
            seg = Segment("doc", cur, seg.end, seg.doc_id, seg.doc_start + cur - seg.start)
        if seg.start > cur:
            segs.append(Segment("new", cur, seg.start))
        segs.append(seg)
        cur = seg.end
    if cur < len(p):
        segs.append(Segment("new", cur, len(p)))
    return segs
