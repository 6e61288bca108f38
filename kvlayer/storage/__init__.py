"""Storage tiers and the stores over them. ``build_tier`` turns a TierConfig into a Tier.

Tier kinds are registered in ``kvlayer.config.TIER_KINDS`` (the config validates kind names when
it loads); each kind's module defines ``Options`` (its typed ``options``) and ``build``.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from kvlayer.config import TIER_KINDS, TierConfig
from kvlayer.errors import ConfigError
from kvlayer.storage.base import EvictionGuard, Tier, TierOptions, TierStats
from kvlayer.storage.blobstore import BlobStore
from kvlayer.storage.breaker import Breaker, RetryPolicy
from kvlayer.storage.disk import DiskTier
from kvlayer.storage.hierarchy import TieredStore
from kvlayer.storage.memory import MemoryTier


def build_tier(cfg: TierConfig) -> Tier:
    kind = TIER_KINDS.get(cfg.kind)
    if kind is None:
        raise ConfigError(f"unknown tier kind {cfg.kind!r}; choose from {sorted(TIER_KINDS)}")
    try:
        mod = importlib.import_module(kind.module)
    except ImportError as e:
        extra = kind.extra or cfg.kind
        raise ConfigError(f"tier kind {cfg.kind!r} needs an optional dependency: pip install 'kvlayer[{extra}]' ({e})") from None
    model: type[TierOptions] = mod.Options
    try:
        options = model.model_validate(cfg.options)
    except ValidationError as e:
        raise ConfigError(_options_error(cfg, model, e)) from None
    try:
        tier: Tier = mod.build(cfg, options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # e.g. a url its client library cannot parse
        raise ConfigError(f"tier {cfg.name!r} of kind {cfg.kind!r}: {e}") from None
    return tier


def _options_error(cfg: TierConfig, model: type[TierOptions], e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown option; valid options: {', '.join(sorted(model.model_fields)) or 'none'}"
        lines.append(f"  options{'.' + where if where else ''}: {msg} (got {err.get('input')!r})")
    return f"tier {cfg.name!r} of kind {cfg.kind!r}: bad options:\n" + "\n".join(lines)


def retry_policy(cfg: TierConfig) -> RetryPolicy:
    """The breaker policy of a tier (unset fields: ``RetryPolicy``'s defaults)."""
    d = RetryPolicy()
    return RetryPolicy(d.after_s if cfg.retry_after_s is None else cfg.retry_after_s, cfg.retry_max_s,
                       d.multiplier if cfg.retry_multiplier is None else cfg.retry_multiplier)


__all__: list[Any] = ["BlobStore", "Breaker", "DiskTier", "EvictionGuard", "MemoryTier", "RetryPolicy", "Tier",
                      "TierStats", "TieredStore", "build_tier", "retry_policy"]
