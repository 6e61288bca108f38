"""kvlayer's ``vllm.general_plugins`` entry point: how CacheBlend reaches the serving model.

vLLM's connector API hands a connector KV tensors and attention modules, never the model, but a
blended prefill must run the model's own layers (projections, norms, MLPs) on the tokens it
recomputes. vLLM loads every ``vllm.general_plugins`` entry point in each of its processes
(engine core, every worker, the API server) before a model is built, and
``ModelRegistry.register_model`` is its documented way to map an architecture to a class. So this
plugin maps the supported architectures to subclasses that only record the instances vLLM
builds (:mod:`kvlayer.connectors.vllm.models`); the worker-side connector then finds the model
whose attention modules are the ones vLLM registered with it. Nothing else changes: same weights,
same forward, same compilation. See docs/blend_vllm.md.

Set ``KVLAYER_VLLM_PLUGIN=0`` (or leave kvlayer out of ``VLLM_PLUGINS``) to keep vLLM's own
classes; blending then falls back to prefix reuse with a log line.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("kvlayer.vllm")

#: vLLM architecture name -> class in kvlayer.connectors.vllm.models (same name: vLLM logs the arch)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def enabled() -> bool:
    return os.environ.get("KVLAYER_VLLM_PLUGIN", "1").strip().lower() not in ("0", "false", "no", "off")


def register() -> None:
    """Entry point (``[project.entry-points."vllm.general_plugins"]``); vLLM may call it many times."""
    if not enabled():
        return
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        # lazy "<module>:<class>" form: nothing is imported until vLLM builds that architecture
        ModelRegistry.register_model(arch, f"kvlayer.connectors.vllm.models:{arch}")
