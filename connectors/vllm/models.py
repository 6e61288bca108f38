"""vLLM's Llama / Mistral / Qwen2 / Qwen3 classes, unchanged except that each instance is recorded.

Registered by :mod:`kvlayer.connectors.vllm.plugin` under vLLM's own architecture names. The
subclass adds no parameter, buffer or forward code: vLLM loads, compiles and runs it exactly as
its base class. :func:`model_for` finds the live model that owns given attention modules (the ones
vLLM hands the worker-side connector), so two engines in one process never get mixed up.
"""

from __future__ import annotations

import functools
import importlib
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from .plugin import ARCHITECTURES

_BASES = {
    "LlamaForCausalLM": "vllm.model_executor.models.llama",
    "MistralForCausalLM": "vllm.model_executor.models.mistral",
    "Qwen2ForCausalLM": "vllm.model_executor.models.qwen2",
    "Qwen3ForCausalLM": "vllm.model_executor.models.qwen3",
}
assert set(_BASES) == set(ARCHITECTURES)

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_classes: dict[str, type] = {}


def _tracked(name: str) -> type:
    base = getattr(importlib.import_module(_BASES[name]), name)

    @functools.wraps(base.__init__)  # vLLM reads the signature (``vllm_config=`` keyword)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        with _lock:
            _live.add(self)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                "__doc__": f"vLLM's {name}, recorded for kvlayer's CacheBlend."})


def __getattr__(name: str) -> type:
    if name not in _BASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _lock:
        if name not in _classes:
            _classes[name] = _tracked(name)
        return _classes[name]


def model_for(attention_modules: Iterable[Any]) -> Any | None:
    """The recorded model holding all of ``attention_modules`` (vLLM ``Attention`` layers), or None."""
    wanted = {id(m) for m in attention_modules}
    if not wanted:
        return None
    with _lock:
        models = list(_live)
    for model in models:
        if wanted <= {id(m) for m in model.modules()}:
            return model
    return None
