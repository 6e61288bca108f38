"""The reference runner's selective-recompute loop over the serving vLLM model's own modules.

:class:`kvlayer.blend.Runner` is written against Hugging Face module names; vLLM's Llama-family
models hold the same pieces under other shapes (one fused ``qkv_proj``, linear layers that return
``(out, bias)``, a rotary module per attention with a precomputed ``cos_sin_cache``, an LM head
that is an embedding). :func:`hf_view` exposes them under the runner's names without copying a
weight, and :class:`VllmRunner` overrides only the Q/K/V step, so the loop, the selection and the
numerics are the reference runner's and the weights are the engine's (no second copy).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from kvlayer.blend.rope import apply_rope
from kvlayer.blend.runner import Runner
from kvlayer.errors import UnsupportedModelError


class _Rotary:
    """HF-style rotary callable ``(x, positions [1, n]) -> (cos, sin) [1, n, rotary_dim]`` reading
    vLLM's ``cos_sin_cache`` (rows = positions, first half cos, second half sin)."""

    def __init__(self, rotary: Any) -> None:
        if not getattr(rotary, "is_neox_style", False) or not hasattr(rotary, "cos_sin_cache"):
            raise UnsupportedModelError(f"{type(rotary).__name__}: only neox-style (rotate-half) RoPE with a "
                                        "cos/sin cache can be re-rotated")
        self.rotary = rotary
        self.rope_type = type(rotary).__name__
        half = int(rotary.rotary_dim) // 2
        self.inv_freq = torch.zeros(half, device=rotary.cos_sin_cache.device)  # size and device only

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.rotary.cos_sin_cache.float()
        cos, sin = cache[pos.reshape(-1)].chunk(2, dim=-1)
        return torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]


def _out(linear: Any) -> Any:
    """A vLLM linear layer (returns ``(out, bias)``) as a plain callable."""
    return lambda x: linear(x)[0]


def hf_view(model: Any) -> Any:
    """The HF-named view of a vLLM Llama-family ``*ForCausalLM`` the reference runner reads."""
    base = model.model
    layers = []
    for layer in base.layers:
        a = layer.self_attn
        attn = SimpleNamespace(qkv_proj=a.qkv_proj, q_size=a.q_size, kv_size=a.kv_size, o_proj=_out(a.o_proj),
                               scaling=a.scaling, rotary=a.rotary_emb)
        if hasattr(a, "q_norm"):
            attn.q_norm, attn.k_norm = a.q_norm, a.k_norm
        layers.append(SimpleNamespace(self_attn=attn, input_layernorm=layer.input_layernorm,
                                      post_attention_layernorm=layer.post_attention_layernorm, mlp=layer.mlp))
    head = model.lm_head

    def lm_head(h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, head.weight[: model.config.vocab_size])

    view_base = SimpleNamespace(embed_tokens=base.embed_tokens, layers=layers, norm=base.norm,
                                rotary_emb=_Rotary(base.layers[0].self_attn.rotary_emb))
    return SimpleNamespace(config=model.config, model=view_base, lm_head=lm_head, parameters=model.parameters)


class VllmRunner(Runner):
    """A :class:`Runner` over a live vLLM model; ``fingerprint`` is the key of its calibration
    record (the engine's KVSpec model fingerprint: the weights are not HF-named to hash here)."""

    def __init__(self, model: Any, fingerprint: str) -> None:
        super().__init__(hf_view(model))
        self._fingerprint = fingerprint
        self._check_rope(model.model.layers[0].self_attn.rotary_emb)

    def _qkv(self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        m = x.shape[0]
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k, v = q.view(m, -1, self.head_dim), k.view(m, -1, self.head_dim), v.view(m, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _check_rope(self, rotary: Any) -> None:
        """Our cos/sin tables must rotate exactly as vLLM's own rotary module does."""
        g = torch.Generator().manual_seed(0)
        n, d = 5, int(rotary.head_size)
        pos = torch.arange(3, 3 + n, device=rotary.cos_sin_cache.device)
        q = torch.randn(n, 2 * d, generator=g).to(rotary.cos_sin_cache.device)
        ref, _ = rotary.forward_native(pos, q.clone(), q.clone())
        cos, sin = self.rope.cos_sin(pos)
        mine = apply_rope(q.view(n, 2, d), cos, sin).reshape(n, 2 * d)
        if not torch.allclose(ref.float(), mine.float(), atol=1e-4, rtol=1e-4):
            raise UnsupportedModelError(f"{type(rotary).__name__} does not rotate as rotate-half RoPE; not blending")
