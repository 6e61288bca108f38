"""vLLM's ``kv_connector_extra_config`` -> a validated KVLayerConfig plus connector options, and
the KVSpec of this engine's KV cache (both through ``kvlayer.connectors.core``).

Precedence (lowest first): a kvlayer config file (``"config_file"`` in the extra config, else
``KVLAYER_CONFIG``), ``KVLAYER_*`` environment variables, the extra config's kvlayer settings.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt

from kvlayer.config import KVLayerConfig
from kvlayer.errors import ConfigError
from kvlayer.spec import KVSpec

from ..core import AdapterOptions, engine_spec, split_extra_config
from .blend_config import BlendOptions


class ConnectorOptions(AdapterOptions):
    """Settings of the vLLM connector itself (not of the store)."""

    #: Save the KV of generated tokens too (multi-turn chat reuses answers); prompt only by default.
    save_generated: bool = False
    #: Ignore hits shorter than this many tokens (a load has a fixed cost).
    min_hit_tokens: NonNegativeInt = 0
    #: Set vLLM's kv_load_failure_policy to "recompute" so a failed load never fails a request.
    recompute_on_load_failure: bool = True
    #: Safety TTL of the pins that hold chunks between lookup and load.
    pin_ttl_s: float = Field(default=600.0, gt=0)
    #: CacheBlend (``KVLayerBlendConnector``): ``{"enabled": true, ...}``, see ``blend_config``.
    blend: BlendOptions = Field(default_factory=BlendOptions)
    #: A lookup in tiers outside this process runs on a thread; vLLM's scheduler waits this long
    #: for it on a request's first ask, then asks again each step until ``lookup_deadline_s``,
    #: after which the request is a miss (a hung tier never stalls the engine's steps).
    lookup_wait_s: float = Field(default=0.005, ge=0)
    lookup_deadline_s: float = Field(default=0.5, gt=0)
    #: How hits load. "auto": synchronously (inside the step) when every claimed chunk is in
    #: process memory, else in the background while the batch keeps running (vLLM's async path);
    #: "always" / "never" force one way.
    async_loads: Literal["auto", "always", "never"] = "auto"
    #: An async load that gets no chunk for this many seconds is abandoned: its blocks are
    #: recomputed and its pin released (a hung tier costs one deadline, never a stuck request).
    load_deadline_s: float = Field(default=2.0, gt=0)
    #: Threads that fetch and decode async loads (a hung tier holds one each until it answers).
    load_threads: int = Field(default=4, ge=1)
    #: Share of its time a background load may be busy: after each chunk it rests, so a load takes
    #: a little from many steps instead of a lot from one (1 = no rests).
    background_duty: float = Field(default=0.5, gt=0, le=1)
    #: Nice value of kvlayer's background threads (loads, saves): the engine's forward threads go
    #: first on a busy CPU (Linux; 0 = unchanged).
    background_nice: int = Field(default=10, ge=0, le=19)
    #: Claim a hit only where its estimated load time beats recomputing it (running estimates of
    #: each tier's load latency/bandwidth and of the engine's prefill time at the request's length).
    load_or_recompute: bool = True
    #: A tier whose hits were declined gets one load again after this many seconds, so its
    #: estimate follows a tier that became fast again.
    estimate_refresh_s: float = Field(default=30.0, gt=0)
    #: Save and reuse the last partial chunk of a request at vLLM block granularity.
    partial_chunks: bool = True
    #: ``kv_consumer`` (prefill/decode disaggregation, ``roles.py``): how long a request handed
    #: off by a producer waits for the producer's save to land in the store before the tokens
    #: still missing are computed here (a producer that died or an evicted chunk costs this much).
    pd_wait_s: float = Field(default=5.0, ge=0)
    #: ... and how often it asks the store meanwhile.
    pd_poll_s: float = Field(default=0.01, gt=0)
    #: Test only: seconds added per chunk read from the named tier (makes a tier slower than
    #: recompute, or keeps a load in flight long enough to stop its server).
    test_tier_delay_s: dict[str, NonNegativeFloat] = Field(default_factory=dict)


def parse_extra_config(extra: dict[str, Any] | None, env: dict[str, str] | None = None
                       ) -> tuple[KVLayerConfig, ConnectorOptions]:
    return split_extra_config(extra, ConnectorOptions, env=env)


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
    mc = vllm_config.model_config
    return engine_spec(model=str(mc.model), revision=getattr(mc, "revision", None), dtype=spec.dtype,
                       num_layers=len(groups[0].layer_names), num_kv_heads=int(spec.num_kv_heads),
                       head_dim=int(spec.head_size), tp_rank=tp_rank,
                       tp_size=int(vllm_config.parallel_config.tensor_parallel_size),
                       fingerprint=options.model_fingerprint)
