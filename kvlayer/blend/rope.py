"""Moving cached keys to new positions with the model's own rotary embedding.

A document's keys are stored post-RoPE at positions 0..n-1. RoPE is a per-frequency rotation, so
a key can be un-rotated at its old position and rotated at its new one. The cos/sin tables come
from the model's own ``rotary_emb`` module, so every scaling transformers implements (linear,
dynamic NTK, llama3, yarn's attention factor, partial rotary dims) is applied exactly as the model
applies it; we never re-derive the frequencies. Only the "rotate half" layout is supported, and
it is checked numerically against the model's own ``apply_rotary_pos_emb`` when available.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from kvlayer.errors import UnsupportedModelError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # tables are [tokens, rot]; x is [tokens, heads, dim]
    return t.to(x.dtype).unsqueeze(-2) if x.dim() == t.dim() + 1 else t.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x ``[tokens, heads, dim]`` (rest passes through)."""
    rd = cos.shape[-1]
    c, s = _bcast(cos, x), _bcast(sin, x)
    rot = x[..., :rd] * c + rotate_half(x[..., :rd]) * s
    return rot if rd == x.shape[-1] else torch.cat((rot, x[..., rd:]), dim=-1)


def unapply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope`, including an attention scaling folded into cos/sin."""
    rd = cos.shape[-1]
    c, s = _bcast(cos, x), _bcast(sin, x)
    norm = c * c + s * s  # = attention_scaling**2 per dim (1 for plain RoPE)
    rot = (x[..., :rd] * c - rotate_half(x[..., :rd]) * s) / norm
    return rot if rd == x.shape[-1] else torch.cat((rot, x[..., rd:]), dim=-1)


def rerotate(k: torch.Tensor, cos_old: torch.Tensor, sin_old: torch.Tensor, cos_new: torch.Tensor,
             sin_new: torch.Tensor) -> torch.Tensor:
    """Keys ``[tokens, heads, dim]`` rotated at the old positions -> rotated at the new ones.

    Computed in float32 and returned in k's dtype.
    """
    k32 = k.float()
    out = apply_rope(unapply_rope(k32, cos_old.float(), sin_old.float()), cos_new.float(), sin_new.float())
    return out.to(k.dtype)


_NO_ROPE_TYPES = {"gpt2", "opt", "bloom", "mpt", "falcon_alibi", "bert", "t5", "gpt_bigcode"}


class Rope:
    """The model's rotary embedding as cos/sin tables for arbitrary positions."""

    def __init__(self, model: Any) -> None:
        base = getattr(model, "model", model)
        cfg = model.config
        rotary = getattr(base, "rotary_emb", None)
        rope_params = getattr(cfg, "rope_parameters", None)
        if rotary is None or (rope_params is None and getattr(cfg, "rope_theta", None) is None) \
                or cfg.model_type in _NO_ROPE_TYPES:
            raise UnsupportedModelError(
                f"model type {cfg.model_type!r} has no rotary position embedding (rotary_emb); blending moves "
                "cached keys to new positions by re-rotating them, which needs RoPE"
            )
        if isinstance(rope_params, dict) and rope_params and all(isinstance(v, dict) for v in rope_params.values()):
            raise UnsupportedModelError(
                f"model type {cfg.model_type!r} uses per-layer-type RoPE ({sorted(rope_params)}); not supported"
            )
        self.rotary = rotary
        self.model_type = cfg.model_type
        self.rope_type = getattr(rotary, "rope_type", "default")
        self._check_convention(model)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables ``[len(positions), rotary_dim]`` exactly as the model computes them.

        Dynamic-NTK rotary modules resize themselves from the largest position they see, so call
        this once per prompt with all of its positions (as the model's forward does). Computed on
        the model's device, returned on the device of ``positions``.
        """
        dev = self.rotary.inv_freq.device
        pos = positions.reshape(1, -1).to(device=dev, dtype=torch.long)
        x = torch.zeros(1, dtype=dtype, device=dev)
        cos, sin = self.rotary(x, pos)
        return cos[0].to(positions.device, dtype), sin[0].to(positions.device, dtype)

    @property
    def rotary_dim(self) -> int:
        return int(self.rotary.inv_freq.numel() * 2)

    def _check_convention(self, model: Any) -> None:
        mod = sys.modules.get(type(getattr(model, "model", model)).__module__)
        ref = getattr(mod, "apply_rotary_pos_emb", None)
        if ref is None:
            return
        head_dim = int(getattr(model.config, "head_dim", None)
                       or model.config.hidden_size // model.config.num_attention_heads)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, 5, head_dim, generator=g)
        cos, sin = self.cos_sin(torch.arange(3, 8))
        try:
            ref_q, _ = ref(q, q, cos[None], sin[None])
        except Exception as e:  # signature we do not know: refuse rather than guess
            raise UnsupportedModelError(f"cannot verify the RoPE layout of {self.model_type!r}: {e}") from e
        mine = apply_rope(q[0].transpose(0, 1), cos, sin).transpose(0, 1)[None]
        if not torch.allclose(ref_q, mine, atol=1e-5, rtol=1e-5):
            raise UnsupportedModelError(
                f"model type {self.model_type!r} applies RoPE in a layout other than rotate-half; not supported"
            )
