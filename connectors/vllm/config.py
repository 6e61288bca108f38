"""vLLM's ``kv_connector_extra_config`` -> a validated KVLayerConfig plus connector options.

Precedence (lowest first): a kvlayer config file (``"config_file"`` in the extra config, else
``KVLAYER_CONFIG``), ``KVLAYER_*`` environment variables, the extra config's kvlayer settings.
Connector-only keys are taken out before validation so that a typo in a kvlayer setting still
fails loudly with the list of valid names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvlayer.config import KVLayerConfig, load_config
from kvlayer.errors import ConfigError
from kvlayer.spec import KVSpec, dtype_name, model_fingerprint


@dataclass(frozen=True)
class ConnectorOptions:
    """Settings of the connector itself (not of the store)."""

    #: Save the KV of generated tokens too (multi-turn chat reuses answers); prompt only by default.
    save_generated: bool = False
    #: Ignore hits shorter than this many tokens (a load has a fixed cost).
    min_hit_tokens: int = 0
    #: Set vLLM's kv_load_failure_policy to "recompute" so a failed load never fails a request.
    recompute_on_load_failure: bool = True
    #: Overrides the model fingerprint derived from the model name/path, revision and dtype.
    model_fingerprint: str | None = None
    #: Safety TTL of the pins that hold chunks between lookup and load.
    pin_ttl_s: float = 600.0


_OPTION_KEYS = {"save_generated", "min_hit_tokens", "recompute_on_load_failure", "model_fingerprint", "pin_ttl_s"}
_META_KEYS = {"config_file"}


def parse_extra_config(extra: dict[str, Any] | None, env: dict[str, str] | None = None
                       ) -> tuple[KVLayerConfig, ConnectorOptions]:
    extra = dict(extra or {})
    file = extra.pop("config_file", None)
    opts = {k: extra.pop(k) for k in list(extra) if k in _OPTION_KEYS}
    try:
        options = ConnectorOptions(**opts)
    except TypeError as e:  # pragma: no cover - keys are filtered above
        raise ConfigError(f"invalid kvlayer connector option: {e}") from None
    if not isinstance(options.min_hit_tokens, int) or options.min_hit_tokens < 0:
        raise ConfigError(f"min_hit_tokens must be an integer >= 0, got {options.min_hit_tokens!r}")
    config = load_config(file=file, env=env, cli=extra)
    return config, options


def check_chunk_size(chunk_size: int, block_size: int) -> None:
    if chunk_size % block_size != 0:
        raise ConfigError(
            f"kvlayer chunk_size={chunk_size} must be a multiple of vLLM's block size {block_size} "
            f"(e.g. chunk_size={max(block_size, (chunk_size // block_size) * block_size or block_size)}); "
            "set it in kv_connector_extra_config or KVLAYER_CHUNK_SIZE"
        )


def build_spec(vllm_config: Any, kv_cache_config: Any, options: ConnectorOptions, *, tp_rank: int = 0) -> KVSpec:
    """KVSpec of this engine's KV cache (one TP shard), from vLLM's own KV cache config."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", []) or [])
    if len(groups) != 1:
        raise ConfigError(f"kvlayer's vLLM connector supports models with one KV cache group, got {len(groups)} "
                          "(hybrid / sliding-window models are not supported yet)")
    spec = groups[0].kv_cache_spec
    if not hasattr(spec, "num_kv_heads") or not hasattr(spec, "head_size"):
        raise ConfigError(f"unsupported KV cache spec {type(spec).__name__} (MLA / mamba not supported yet)")
    if getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
        raise ConfigError("kvlayer needs K and V with the same head size")
    cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
    if cache_dtype not in ("auto", None):
        raise ConfigError(f"kvlayer does not support quantized vLLM KV caches (kv_cache_dtype={cache_dtype!r}); "
                          "use kvlayer's own codecs (cpu_codec / disk_codec) to compress instead")
    dtype = dtype_name(spec.dtype)
    mc = vllm_config.model_config
    fp = options.model_fingerprint or model_fingerprint(str(mc.model), getattr(mc, "revision", None), dtype)
    tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
    return KVSpec(model=fp, num_layers=len(groups[0].layer_names), num_kv_heads=int(spec.num_kv_heads),
                  head_dim=int(spec.head_size), dtype=dtype, tp_rank=tp_rank, tp_size=tp_size)
