"""Which reused tokens to recompute: the ones whose KV deviates most from the cached KV.

At the check layer the KV of every reused token is computed fresh (cheap: the layers before it
are recomputed fully, and only the Q/K/V projections are needed here) and compared with the
cached, re-rotated KV. Tokens whose cached KV is most wrong are those that attend most to text the
document never saw (CacheBlend, Yao et al. 2024); recomputing them restores most of the
cross-attention. Optionally the selection starts wider and narrows over the next layers, ranking
again at each layer, as the paper's gradual filtering does.

The default, ``kv_query``, weights that deviation by how much the question reads each token: a
probe pass runs only the new text (the question) through every layer over the cached KV and sums
its attention per token (cheap: a few dozen tokens). A token whose KV is wrong but never read does
not change the answer; one the question reads heavily does. On SmolLM2-135M this closes ~0.9 of
the quality gap at 15% where the paper's plain deviation (``kv``) closes ~0.3 (benchmarks/
blend_quality.py). Small models spread their attention thinly, so the plain deviation is spread
over most tokens and recomputing its top 15% fixes little of what the question reads.

Why the check layer defaults to 1 and not 0: layer 0's K/V of a token depend only on its own
embedding and position, so a re-rotated cached KV equals the fresh one there and the deviation is
zero; layer 1 is the first layer where the missing cross-attention shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEVIATIONS = ("kv", "k", "v", "kv_attn", "attn", "kv_query", "query")
#: modes that weight tokens by the question's attention measured in a probe pass over all layers
QUERY_MODES = ("kv_query", "query")


@dataclass(frozen=True)
class SelectionPolicy:
    recompute_ratio: float = 0.15
    check_layer: int = 1
    narrow_layers: int = 0
    narrow_start: float = 2.0
    deviation: str = "kv_query"
    lead_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.check_layer < 0 or self.narrow_layers < 0:
            raise ValueError("check_layer and narrow_layers must be >= 0")
        if self.narrow_start < 1.0:
            raise ValueError(f"narrow_start must be >= 1 (a multiple of the final budget), got {self.narrow_start}")
        if self.lead_tokens < 0:
            raise ValueError(f"lead_tokens must be >= 0, got {self.lead_tokens}")
        if self.deviation not in DEVIATIONS:
            raise ValueError(f"deviation must be one of {DEVIATIONS}, got {self.deviation!r}")


def kv_deviation(k_fresh: torch.Tensor, v_fresh: torch.Tensor, k_cached: torch.Tensor, v_cached: torch.Tensor,
                 mode: str = "kv") -> torch.Tensor:
    """Per-token squared deviation, K and V each normalised by their mean squared norm so that
    neither dominates just by scale. Inputs ``[tokens, heads, dim]``; returns ``[tokens]``."""
    def part(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        d = (fresh.float() - cached.float()).pow(2).sum(dim=(-1, -2))
        scale = cached.float().pow(2).sum(dim=(-1, -2)).mean().clamp_min(1e-12)
        return d / scale

    if mode == "k":
        return part(k_fresh, k_cached)
    if mode == "v":
        return part(v_fresh, v_cached)
    return part(k_fresh, k_cached) + part(v_fresh, v_cached)


class Selector:
    """Budget per layer and top-k selection for one prompt with ``num_reused`` reused tokens."""

    def __init__(self, policy: SelectionPolicy, num_reused: int, forced: torch.Tensor | None = None) -> None:
        self.policy = policy
        self.num_reused = num_reused
        # prompt positions ranked first whatever their deviation (e.g. each document's leading
        # tokens, which were attention sinks when the document was computed alone); they count
        # against the same budget, so ratio 0 still recomputes nothing
        self.forced = forced
        self.final = min(num_reused, math.ceil(policy.recompute_ratio * num_reused - 1e-9))
        self.history: list[tuple[int, int]] = []  # (layer, tokens kept)

    @property
    def check_layer(self) -> int:
        return self.policy.check_layer

    def active(self, layer: int) -> bool:
        p = self.policy
        return p.check_layer <= layer <= p.check_layer + p.narrow_layers

    def budget(self, layer: int) -> int:
        p = self.policy
        if p.narrow_layers == 0 or self.final == 0:
            return self.final
        start = min(self.num_reused, math.ceil(p.narrow_start * self.final))
        step = min(max(layer - p.check_layer, 0), p.narrow_layers) / p.narrow_layers
        return max(self.final, round(start + (self.final - start) * step))

    def select(self, layer: int, deviation: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (into ``deviation``) of the tokens to keep recomputing, ascending."""
        k = min(self.budget(layer), deviation.numel())
        if self.forced is not None and positions is not None:
            forced = self.forced.to(deviation.device)[positions]
            deviation = torch.where(forced, torch.full_like(deviation, float("inf")), deviation)
        self.history.append((layer, k))
        if k <= 0:
            return torch.empty(0, dtype=torch.long, device=deviation.device)
        if k >= deviation.numel():
            return torch.arange(deviation.numel(), device=deviation.device)
        return torch.topk(deviation, k, sorted=False).indices.sort().values
