"""Load or recompute: running estimates of what a hit costs to load and what it saves.

A hit is worth claiming only where loading it beats recomputing it: a Redis across a WAN or a
cold disk must never make TTFT worse than no cache. Both sides are measured, never configured:

- ``LoadModel``: per tier, ``seconds = latency + chunks * per_chunk`` fitted to the worker's timed
  reads (fetch + decode + copy into vLLM's blocks), with exponential forgetting so the estimate
  follows a tier whose speed changes.
- ``PrefillModel``: the engine's step time ``seconds = base + per_token * tokens + per_attn *
  attention`` (``attention`` = sum over the step's requests of new tokens x their mean context),
  so recomputing tokens ``[s, e)`` costs ``per_token * n + per_attn * n * (s + e) / 2``: a long
  request's tail is dearer than its head.

``best_claim`` picks the prefix of a hit (in whole chunks) with the largest estimated saving;
while a side has no estimate yet it claims everything (and so measures the tier).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class DecayedFit:
    """Least squares ``y ~ x . w`` over samples weighted by ``decay ** age``: a few numbers of
    state, no sample history. ``solve`` is None until ``min_samples`` were added."""

    def __init__(self, dims: int, *, decay: float = 0.95, min_samples: int = 3, ridge: float = 1e-12) -> None:
        self.dims = dims
        self.decay = decay
        self.min_samples = min_samples
        self.ridge = ridge
        self.xtx = np.zeros((dims, dims))
        self.xty = np.zeros(dims)
        self.n = 0

    def add(self, x: Sequence[float], y: float) -> None:
        v = np.asarray(x, dtype=np.float64)
        self.xtx = self.decay * self.xtx + np.outer(v, v)
        self.xty = self.decay * self.xty + v * y
        self.n += 1

    def solve(self) -> np.ndarray | None:
        """Non-negative weights (a negative one is dropped and the rest refitted), or None."""
        if self.n < self.min_samples:
            return None
        active = list(range(self.dims))
        w = np.zeros(self.dims)
        while active:
            a = self.xtx[np.ix_(active, active)] + self.ridge * np.eye(len(active))
            try:
                sol = np.linalg.solve(a, self.xty[active])
            except np.linalg.LinAlgError:
                sol = np.linalg.lstsq(a, self.xty[active], rcond=None)[0]
            if (sol >= 0).all():
                w[:] = 0
                w[active] = sol
                return w
            active.pop(int(np.argmin(sol)))
        return w


class LoadModel:
    """``seconds = latency + chunks * per_chunk`` for one tier."""

    def __init__(self) -> None:
        self.fit = DecayedFit(2, min_samples=1)
        self.last_sample = float("-inf")

    def add(self, chunks: int, seconds: float, now: float) -> None:
        if chunks > 0 and seconds >= 0:
            self.fit.add((1.0, float(chunks)), seconds)
            self.last_sample = now

    def estimate(self, chunks: int) -> float | None:
        w = self.fit.solve()
        return None if w is None else float(w[0] + w[1] * chunks)


class PrefillModel:
    """The engine's step time as a function of its tokens and its attention work."""

    def __init__(self) -> None:
        self.fit = DecayedFit(3, decay=0.98, min_samples=8)

    def add(self, tokens: int, attention: float, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.fit.add((1.0, float(tokens), attention), seconds)

    def recompute(self, start: int, end: int) -> float | None:
        """Estimated seconds to compute tokens ``[start, end)`` of one request."""
        w = self.fit.solve()
        if w is None or end <= start:
            return None if w is None else 0.0
        n = end - start
        return float(w[1] * n + w[2] * n * (start + end) / 2)


def step_attention(computed_before: int, scheduled: int) -> float:
    """A request's attention work in a step: new tokens x their mean context length."""
    return scheduled * (computed_before + scheduled / 2)


@dataclass
class Claim:
    """What ``best_claim`` decided: claim ``chunks`` leading chunks of the hit."""

    chunks: int
    load_s: float | None
    recompute_s: float | None
    probe: bool = False  # claimed to refresh a stale estimate, not because it wins


class Estimates:
    """Both models, fed from the worker's reports, read by the scheduler's lookups."""

    def __init__(self, *, refresh_s: float = 30.0) -> None:
        self.refresh_s = refresh_s
        self.prefill = PrefillModel()
        self.loads: dict[str, LoadModel] = {}
        self._probed: dict[str, float] = {}
        self._lock = threading.Lock()

    def add_load(self, tier: str, chunks: int, seconds: float) -> None:
        with self._lock:
            self.loads.setdefault(tier, LoadModel()).add(chunks, seconds, time.monotonic())

    def add_step(self, tokens: int, attention: float, seconds: float) -> None:
        with self._lock:
            self.prefill.add(tokens, attention, seconds)

    def load_time(self, tiers: Sequence[str]) -> float | None:
        """Estimated seconds to load chunks from ``tiers`` (one entry per chunk); None if a tier
        has no estimate yet."""
        total = 0.0
        with self._lock:
            for tier in dict.fromkeys(tiers):
                model = self.loads.get(tier)
                est = None if model is None else model.estimate(sum(1 for t in tiers if t == tier))
                if est is None:
                    return None
                total += est
        return total

    def best_claim(self, tiers: Sequence[str], bounds: Sequence[tuple[int, int]]) -> Claim:
        """How many leading chunks of a hit to claim. ``tiers[i]`` holds chunk ``i``, which would
        supply tokens ``bounds[i]`` (already cut to what the engine does not hold)."""
        n = len(tiers)
        if n == 0:
            return Claim(0, None, None)
        full_load = self.load_time(tiers)
        with self._lock:
            full_rec = self.prefill.recompute(bounds[0][0], bounds[-1][1])
        if full_load is None or full_rec is None:
            return Claim(n, full_load, full_rec)  # nothing to compare with yet: claim, and so measure
        best, best_gain, best_load, best_rec = 0, 0.0, 0.0, 0.0
        for k in range(1, n + 1):
            load = self.load_time(tiers[:k])
            with self._lock:
                rec = self.prefill.recompute(bounds[0][0], bounds[k - 1][1])
            if load is None or rec is None:
                continue
            if rec - load > best_gain:
                best, best_gain, best_load, best_rec = k, rec - load, load, rec
        if best == n:
            return Claim(n, best_load, best_rec)
        # Declined (in part): refresh a stale estimate of the slowest declined tier now and then.
        now = time.monotonic()
        with self._lock:
            for tier in dict.fromkeys(tiers[best:]):
                model = self.loads[tier]
                if now - max(model.last_sample, self._probed.get(tier, float("-inf"))) >= self.refresh_s:
                    self._probed[tier] = now
                    return Claim(n, full_load, full_rec, probe=True)
        return Claim(best, best_load if best else full_load, best_rec if best else full_rec)
