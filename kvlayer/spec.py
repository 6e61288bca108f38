"""KVSpec: what a chunk of KV looks like, and the namespace digest that seeds every key.

Two processes that agree on the spec (model fingerprint, shapes, dtype, TP shard, salt) agree on
every key; anything that changes the bytes of the KV changes the namespace.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from kvlayer.errors import SpecMismatchError

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise SpecMismatchError(f"unsupported KV dtype {dtype}; expected one of {sorted(_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise SpecMismatchError(f"unsupported KV dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def _whole(name: str, value: object) -> int:
    """An integer field: ints, numpy ints, integral floats and digit strings; nothing rounded."""
    if isinstance(value, bool | np.bool_):
        raise SpecMismatchError(f"KVSpec.{name} must be an integer, got the bool {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(float(value))
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise SpecMismatchError(f"KVSpec.{name} must be an integer, got {type(value).__name__} {value!r}")


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool | np.bool_) or (isinstance(value, numbers.Integral) and int(value) in (0, 1)):
        return bool(value)
    raise SpecMismatchError(f"KVSpec.{name} must be True or False, got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class KVSpec:
    """Shape and identity of one TP shard's KV cache.

    ``model`` is a fingerprint of the weights (a name plus revision or a content digest); two
    different checkpoints must never share it, or their chunks would collide.
    """

    model: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    tp_rank: int = 0
    tp_size: int = 1
    is_mla: bool = False
    salt: str = ""
    extra: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Normalise types: the namespace is the JSON of these fields, so num_layers=np.int64(4),
        # "4" and 4 must serialise alike (numpy ints even made json.dumps raise). Nothing is
        # rounded: num_layers=2.7 would name another model's shapes.
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_rank", "tp_size"):
            object.__setattr__(self, name, _whole(name, getattr(self, name)))
        object.__setattr__(self, "is_mla", _flag("is_mla", self.is_mla))
        for name in ("model", "dtype", "salt"):
            if not isinstance(getattr(self, name), str):
                raise SpecMismatchError(f"KVSpec.{name} must be a string, got {type(getattr(self, name)).__name__} "
                                        f"{getattr(self, name)!r}")
        object.__setattr__(self, "extra", tuple((str(k), str(v)) for k, v in self.extra))
        if not self.model:
            raise SpecMismatchError("KVSpec.model must be a non-empty model fingerprint")
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size"):
            if int(getattr(self, name)) <= 0:
                raise SpecMismatchError(f"KVSpec.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise SpecMismatchError(f"KVSpec.tp_rank {self.tp_rank} must be in [0, tp_size={self.tp_size})")
        dtype_from_name(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def kv_planes(self) -> int:
        """2 for K and V; 1 for MLA's single latent."""
        return 1 if self.is_mla else 2

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        """Canonical chunk tensor shape: [layers, 2, tokens, kv_heads, head_dim] (MLA: [layers, 1, tokens, 1, latent])."""
        heads = 1 if self.is_mla else self.num_kv_heads
        return (self.num_layers, self.kv_planes, num_tokens, heads, self.head_dim)

    def bytes_per_token(self) -> int:
        heads = 1 if self.is_mla else self.num_kv_heads
        elem = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * self.kv_planes * heads * self.head_dim * elem

    def check_chunk(self, kv: torch.Tensor) -> None:
        want = self.chunk_shape(kv.shape[2] if kv.dim() == 5 else -1)
        if tuple(kv.shape) != want or kv.dtype != self.torch_dtype:
            raise SpecMismatchError(
                f"KV tensor {tuple(kv.shape)} {kv.dtype} does not match spec shape {want} {self.torch_dtype}"
            )

    def canonical_json(self) -> str:
        """Stable serialisation: sorted keys, no whitespace; the input of the namespace digest."""
        d = asdict(self)
        d["extra"] = [list(p) for p in sorted(self.extra)]
        d["kvlayer_key_scheme"] = 2
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def namespace_digest(self) -> bytes:
        """32 raw bytes that seed every chunk key of this spec."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).digest()

    def namespace(self) -> str:
        return self.namespace_digest().hex()


def model_fingerprint(model: str, revision: str | None, dtype: str) -> str:
    """Deterministic id of the weights: name or path + revision + KV dtype, plus, for a local
    folder, a digest of its config.json (so two different checkpoints at one path differ). Every
    engine adapter derives its default through ``kvlayer.connectors.core.engine_spec``, so one
    model served by vLLM and SGLang gets one namespace."""
    parts = {"model": model, "revision": revision or "", "dtype": dtype}
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        parts["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest()
        parts["model"] = os.path.basename(os.path.normpath(model))
    return parts["model"] + "@" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
