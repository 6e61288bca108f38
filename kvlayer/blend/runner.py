"""Reference runner: a layer-by-layer prefill that can recompute only some tokens.

Written against the model's own modules (embedding, each layer's input_layernorm, q/k/v/o
projections, optional q/k norms, post_attention_layernorm, MLP, the final norm, lm_head and the
shared rotary embedding), so the weights and numerics are the model's; only the loop is ours. The
loop is what a stock forward cannot do: at each layer it computes Q/K/V for a chosen subset of
positions, writes their fresh K/V into a full-length KV buffer that holds cached values for the
rest, and lets only that subset attend over the mixed buffer.

Supported: Hugging Face Llama, Qwen2, Qwen3 and Mistral families (same block structure). Anything
else is refused with :class:`~kvlayer.errors.UnsupportedModelError` rather than run wrongly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kvlayer.blend.rope import Rope, apply_rope
from kvlayer.blend.select import QUERY_MODES, Selector, kv_deviation
from kvlayer.errors import UnsupportedModelError
from kvlayer.spec import KVSpec, dtype_name

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

#: layer -> (K, V), each ``[tokens, kv_heads, head_dim]`` covering the whole prompt (cached values
#: where known, anything elsewhere: positions that are computed get overwritten).
LayerKV = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RunOutput:
    kv: torch.Tensor  # [layers, 2, tokens, kv_heads, head_dim], K post-RoPE at prompt positions
    logits: torch.Tensor  # [logits_last, vocab] for the last positions
    computed: np.ndarray  # positions computed in the last layer
    history: list[tuple[int, int]] = field(default_factory=list)


def weights_fingerprint(model: Any) -> str:
    """A digest of a loaded model's config and a strided sample of every weight: cheap (no full
    hash of the weights) but different for different checkpoints in practice; stable across
    processes and devices. Unlike :func:`kvlayer.spec.model_fingerprint` (a digest of a model's
    name, revision and dtype, what an engine knows), it needs the weights in memory, and it names
    the checkpoint itself: a fine-tune under the same name gets another fingerprint."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype", "_attn_implementation",
              "_attn_implementation_autoset", "use_cache", "architectures"):
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return f"{model.config.model_type}-{h.hexdigest()[:24]}"


def _mask(reused: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(reused, dtype=bool)).to(device)


class Runner:
    """Prefill (full or selective) of one causal LM, one prompt at a time, no batching."""

    def __init__(self, model: Any) -> None:
        cfg = model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            # Check RoPE first so a model without it gets the more precise error.
            Rope(model)
            raise UnsupportedModelError(
                f"blending runner supports model types {SUPPORTED_MODEL_TYPES}, not {cfg.model_type!r}"
            )
        base: Any = getattr(model, "model", None)
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if base is None or not hasattr(base, attr):
                raise UnsupportedModelError(f"{type(model).__name__} lacks model.{attr}; not a Llama-family layout")
        if not hasattr(model, "lm_head"):
            raise UnsupportedModelError(f"{type(model).__name__} has no lm_head")
        self.model = model
        self.base = base
        self.rope = Rope(model)
        self.num_layers = len(base.layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device  # prompts run where the weights are; cached KV is moved there
        self.sliding_window = self._sliding_window(cfg)
        self._fingerprint: str | None = None

    @staticmethod
    def _sliding_window(cfg: Any) -> int | None:
        win = getattr(cfg, "sliding_window", None)
        if not win:
            return None
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            return int(win) if any(t == "sliding_attention" for t in types) else None
        if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            return None
        return int(win)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def kv_spec(self, dtype: torch.dtype | None = None, **extra: Any) -> KVSpec:
        """The KVSpec under which this model's chunks and documents are stored."""
        return KVSpec(model=self.fingerprint, num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                      head_dim=self.head_dim, dtype=dtype_name(dtype or self.dtype), **extra)

    # ------------------------------------------------------------------ pieces
    def _qkv(self, layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        m = x.shape[0]
        q = attn.q_proj(x).view(m, -1, self.head_dim)
        k = attn.k_proj(x).view(m, -1, self.head_dim)
        v = attn.v_proj(x).view(m, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, layer: Any, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """q ``[m, heads, D]`` over keys/values ``[n, kv_heads, D]``; causal by position."""
        causal = self.sliding_window is None and q.shape[0] == keys.shape[0]  # every position: plain causal
        mask = None
        if not causal:
            mask = kpos[None, :] <= qpos[:, None]
            if self.sliding_window is not None:
                mask &= kpos[None, :] > qpos[:, None] - self.sliding_window
            mask = mask[None, None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=mask, is_causal=causal, scale=float(layer.self_attn.scaling),
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return layer.self_attn.o_proj(out[0].transpose(0, 1).reshape(q.shape[0], -1))

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def run(self, tokens: Any, *, layer_kv: LayerKV | None = None, prefix_len: int = 0,
            reused: np.ndarray | None = None, selector: Selector | None = None, logits_last: int = 1,
            start_pos: int = 0, kv_dtype: torch.dtype | None = None) -> RunOutput:
        """Prefill ``tokens`` (positions ``start_pos + i``).

        ``prefix_len`` leading tokens are taken from ``layer_kv`` as exact and never computed.
        ``reused`` marks positions whose cached KV (from ``layer_kv``) may be kept: all are
        computed up to the selector's check layer, then only the selected ones. Without a
        selector every non-prefix position is computed (a full prefill).
        """
        device = self.device
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=device)
        n = int(ids.numel())
        if not 0 <= prefix_len < n:
            raise ValueError(f"prefix_len {prefix_len} must leave at least one token to compute (n={n})")
        if not 1 <= logits_last <= n - prefix_len:
            raise ValueError(f"logits_last must be in [1, {n - prefix_len}]")
        if (prefix_len or (reused is not None and reused.any())) and layer_kv is None:
            raise ValueError("cached positions need layer_kv")
        if reused is None:
            reused = np.zeros(n, dtype=bool)
        # ``reused`` is read at the check layer, not now: a background loader may still clear
        # positions whose KV turned out to be missing. The prefix and the positions whose logits
        # we return are never candidates.
        candidate = torch.zeros(n, dtype=torch.bool, device=device)
        candidate[prefix_len:n - logits_last] = True
        pos = torch.arange(n, device=device) + start_pos
        cos_all, sin_all = self.rope.cos_sin(pos)
        prior: torch.Tensor | None = None
        if selector is not None and selector.policy.deviation in QUERY_MODES and layer_kv is not None:
            prior, layer_kv = self._probe(ids, pos, cos_all, sin_all, layer_kv, prefix_len,
                                          _mask(reused, device) & candidate)
        comp = torch.arange(prefix_len, n, device=device)
        h = self.base.embed_tokens(ids[comp])
        kv_out = torch.empty(self.num_layers, 2, n, self.num_kv_heads, self.head_dim, dtype=kv_dtype or self.dtype,
                             device=device)
        for li, layer in enumerate(self.base.layers):
            if kv_out.dtype == self.dtype:  # work in the output buffer: no extra copy
                keys, values = kv_out[li, 0], kv_out[li, 1]
            else:
                keys = torch.empty(n, self.num_kv_heads, self.head_dim, dtype=self.dtype, device=device)
                values = torch.empty_like(keys)
            if layer_kv is not None:
                ck, cv = layer_kv(li)
                keys.copy_(ck)
                values.copy_(cv)
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(layer, x, cos_all[comp], sin_all[comp])
            if selector is not None and selector.active(li):
                is_r = _mask(reused, device)[comp] & candidate[comp]
                ridx = is_r.nonzero().squeeze(1)
                mode = selector.policy.deviation
                dev = kv_deviation(k[ridx], v[ridx], keys[comp[ridx]], values[comp[ridx]],
                                   mode if mode in ("k", "v") else "kv")
                if prior is not None:
                    dev = prior[comp[ridx]] if mode == "query" else dev * prior[comp[ridx]]
                if mode in ("kv_attn", "attn") and ridx.numel():
                    # weight by how much the final new text (the question) attends to each token
                    tail = (~is_r).nonzero().squeeze(1)
                    tail = tail[comp[tail] > comp[ridx[-1]]]
                    if tail.numel():
                        qt = q[tail].transpose(0, 1)  # [heads, T, D]
                        kr = k[ridx].transpose(0, 1).repeat_interleave(self.num_heads // self.num_kv_heads, 0)
                        w = torch.softmax(qt @ kr.transpose(1, 2) * float(layer.self_attn.scaling), -1)
                        att = w.mean(dim=(0, 1))
                        dev = att if mode == "attn" else dev * att
                keep_r = ridx[selector.select(li, dev, comp[ridx])]
                keep = ~is_r
                keep[keep_r] = True
                comp, h, q, k, v = comp[keep], h[keep], q[keep], k[keep], v[keep]
            keys[comp] = k
            values[comp] = v
            if kv_out.dtype != self.dtype:
                kv_out[li, 0] = keys
                kv_out[li, 1] = values
            last = int(comp[-1]) + 1
            h = h + self._attend(layer, q, keys[:last], values[:last], pos[comp], pos[:last])
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        hl = self.base.norm(h[-logits_last:])
        logits = self.model.lm_head(hl).float()
        return RunOutput(kv_out, logits, comp.cpu().numpy(), list(selector.history) if selector else [])

    def _probe(self, ids: torch.Tensor, pos: torch.Tensor, cos_all: torch.Tensor, sin_all: torch.Tensor,
               layer_kv: LayerKV, prefix_len: int, reused: torch.Tensor
               ) -> tuple[torch.Tensor | None, LayerKV]:
        """How much the question reads each reused token, before anything is recomputed.

        Only the new text runs (a few dozen tokens), through every layer, over the cached KV as it
        is (what naive reuse would do); the attention of the question (the new text after the
        last reused token, which always includes the positions whose logits are returned) to each
        token is summed over layers, heads and question tokens. The loaded KV is kept for the real
        pass, with the new text's fresh K/V already in place (the real pass recomputes those
        anyway). Returns ``(None, ...)`` when nothing is reused.
        """
        n = int(ids.numel())
        comp = (~reused).nonzero().squeeze(1)
        comp = comp[comp >= prefix_len]
        last_reused = int(reused.nonzero().max()) if reused.any() else -1
        tail = (comp > last_reused).nonzero().squeeze(1)  # indices into comp: the question
        if last_reused < 0 or tail.numel() == 0:  # nothing to rank (the loader is left untouched)
            return None, layer_kv
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        prior = torch.zeros(n, dtype=torch.float32, device=self.device)
        group = self.num_heads // self.num_kv_heads
        h = self.base.embed_tokens(ids[comp])
        for li, layer in enumerate(self.base.layers):
            ck, cv = layer_kv(li)
            keys, values = ck.to(self.device, self.dtype, copy=True), cv.to(self.device, self.dtype, copy=True)
            x = layer.input_layernorm(h)
            q, k, v = self._qkv(layer, x, cos_all[comp], sin_all[comp])
            keys[comp] = k
            values[comp] = v
            kept.append((keys, values))
            last = int(comp[-1]) + 1
            qt = q[tail].transpose(0, 1).float()  # [heads, T, D]
            kt = keys[:last].transpose(0, 1).float().repeat_interleave(group, 0)  # [heads, n, D]
            scores = qt @ kt.transpose(1, 2) * float(layer.self_attn.scaling)
            scores.masked_fill_(pos[:last][None, None, :] > pos[comp[tail]][None, :, None], float("-inf"))
            prior[:last] += torch.softmax(scores, -1).sum(dim=(0, 1))
            h = h + self._attend(layer, q, keys[:last], values[:last], pos[comp], pos[:last])
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return prior, kept.__getitem__

    def prefill(self, tokens: Any, *, start_pos: int = 0, logits_last: int = 1,
                kv_dtype: torch.dtype | None = None) -> RunOutput:
        """Plain full prefill (what a document's KV is computed with, at start_pos 0)."""
        return self.run(tokens, start_pos=start_pos, logits_last=logits_last, kv_dtype=kv_dtype)
