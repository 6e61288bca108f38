"""Loading cached KV while the first layers are being recomputed.

The layers before the check layer are recomputed for every token and need no cached KV except
the exact prefix, so the fetch of document KV from a slower tier (decode, disk or network) can run
in a background thread meanwhile; each later layer's buffer (documents placed and their keys
re-rotated to the prompt's positions) is then prepared one layer ahead of the recompute that
consumes it. The runner asks for layer ``l`` through :meth:`LayerwiseLoader.layer`, which waits
only if that layer is not ready yet. ``waited_s`` records how long the compute stalled on I/O.

The store keeps a chunk's layers together, so a fetch brings all layers of a chunk at once; the
overlap is therefore with whole-chunk fetches, and per-layer work after that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kvlayer.blend.rope import rerotate
from kvlayer.blend.segments import Segment


@dataclass
class Placement:
    """One run of cached tokens: prompt ``[start, end)`` <- source tokens ``[src_start, ...)``."""

    source: str  # "prefix" or a document id
    start: int
    end: int
    src_start: int
    rotate: bool  # documents are re-rotated, the exact prefix is not


@dataclass
class LoadStats:
    fetch_s: float = 0.0
    prepare_s: float = 0.0
    waited_s: float = 0.0
    fetched_tokens: dict[str, int] = field(default_factory=dict)


class LayerwiseLoader:
    """Per-layer cached K/V for one prompt, fetched and prepared in order (optionally in background)."""

    def __init__(self, fetch: Callable[[str], tuple[int, torch.Tensor | None]], placements: list[Placement], *,
                 num_tokens: int, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 cos_new: torch.Tensor, sin_new: torch.Tensor, cos_old: torch.Tensor, sin_old: torch.Tensor,
                 sources: dict[str, torch.Tensor] | None = None, reused: np.ndarray | None = None) -> None:
        self.fetch = fetch
        self.reused = reused  # positions whose KV does not arrive are cleared here (then computed)
        self.placements = placements
        self.n, self.num_layers = num_tokens, num_layers
        self.shape = (num_tokens, kv_heads, head_dim)
        self.dtype = dtype
        self.cos_new, self.sin_new, self.cos_old, self.sin_old = cos_new, sin_new, cos_old, sin_old
        self.sources: dict[str, torch.Tensor] = dict(sources or {})
        self.available: dict[str, int] = {k: int(v.shape[2]) for k, v in self.sources.items()}
        self._fetched = threading.Event()
        self._ready = [threading.Event() for _ in range(num_layers)]
        self._buf: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.stats = LoadStats()

    # ----------------------------------------------------------------- fetch
    def fetch_all(self) -> None:
        t0 = time.perf_counter()
        for name in dict.fromkeys(p.source for p in self.placements):
            if name in self.sources:
                continue
            got, kv = self.fetch(name)
            self.available[name] = got if kv is not None else 0
            if kv is not None:
                self.sources[name] = kv
            self.stats.fetched_tokens[name] = self.available[name]
        if self.reused is not None:
            for p in self.placements:
                m = max(0, min(p.end - p.start, self.available.get(p.source, 0) - p.src_start))
                self.reused[p.start + m:p.end] = False
        self.stats.fetch_s = time.perf_counter() - t0
        self._fetched.set()

    def wait_fetched(self) -> None:
        self._fetched.wait()
        if self._error is not None:
            raise self._error

    def usable(self, p: Placement) -> int:
        """How many of the placement's tokens have cached KV (a document may be partly evicted)."""
        self.wait_fetched()
        return max(0, min(p.end - p.start, self.available.get(p.source, 0) - p.src_start))

    # ----------------------------------------------------------------- per layer
    def _prepare(self, layer: int) -> None:
        t0 = time.perf_counter()
        keys = torch.zeros(self.shape, dtype=self.dtype)
        values = torch.zeros(self.shape, dtype=self.dtype)
        for p in self.placements:
            m = max(0, min(p.end - p.start, self.available.get(p.source, 0) - p.src_start))
            if m == 0:
                continue
            src = self.sources[p.source][layer]
            k = src[0, p.src_start:p.src_start + m]
            if p.rotate:
                k = rerotate(k, self.cos_old[p.src_start:p.src_start + m], self.sin_old[p.src_start:p.src_start + m],
                             self.cos_new[p.start:p.start + m], self.sin_new[p.start:p.start + m])
            keys[p.start:p.start + m] = k
            values[p.start:p.start + m] = src[1, p.src_start:p.src_start + m]
        self._buf[layer] = (keys, values)
        self.stats.prepare_s += time.perf_counter() - t0
        self._ready[layer].set()

    def _work(self) -> None:
        try:
            if not self._fetched.is_set():
                self.fetch_all()
            for li in range(self.num_layers):
                self._prepare(li)
        except BaseException as e:  # surfaced to the consumer in layer()
            self._error = e
            self._fetched.set()
            for ev in self._ready:
                ev.set()

    def start(self) -> LayerwiseLoader:
        """Fetch and prepare in a background thread."""
        self._thread = threading.Thread(target=self._work, name="kvlayer-blend-load", daemon=True)
        self._thread.start()
        return self

    def run(self) -> LayerwiseLoader:
        """Fetch and prepare everything now (the sequential baseline)."""
        self._work()
        if self._error is not None:
            raise self._error
        return self

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._ready[li].is_set():
            t0 = time.perf_counter()
            self._ready[li].wait()
            self.stats.waited_s += time.perf_counter() - t0
        if self._error is not None:
            raise self._error
        buf = self._buf[li]
        assert buf is not None
        self._buf[li] = None  # the runner copies it; free early
        return buf

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()


def placements_for(segments: list[Segment]) -> list[Placement]:
    out = []
    for s in segments:
        if s.kind == "prefix":
            out.append(Placement("prefix", s.start, s.end, 0, rotate=False))
        elif s.kind == "doc" and s.doc_id is not None:
            out.append(Placement(s.doc_id, s.start, s.end, s.doc_start, rotate=True))
    return out
