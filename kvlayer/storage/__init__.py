"""Storage tiers and the tiered store. ``build_tier`` turns a TierConfig into a Tier."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from kvlayer.config import TierConfig, default_cache_dir
from kvlayer.errors import ConfigError
from kvlayer.storage.base import EvictionGuard, Tier, TierStats
from kvlayer.storage.disk import DiskTier
from kvlayer.storage.hierarchy import TieredStore
from kvlayer.storage.memory import MemoryTier

# kind -> "module:function(TierConfig) -> Tier"; optional tiers import their client lazily.
TIER_FACTORIES: dict[str, str] = {
    "memory": "kvlayer.storage:_memory",
    "disk": "kvlayer.storage:_disk",
    "redis": "kvlayer.storage.redis:from_config",
    "remote": "kvlayer.storage.remote:from_config",
}


def _memory(cfg: TierConfig) -> Tier:
    return MemoryTier(cfg.name, cfg.capacity or (4 << 30))


def _disk(cfg: TierConfig) -> Tier:
    path = cfg.path or str(default_cache_dir() / "disk")
    return DiskTier(path, cfg.capacity or (16 << 30), name=cfg.name, **cfg.options)


def build_tier(cfg: TierConfig) -> Tier:
    target = TIER_FACTORIES.get(cfg.kind)
    if target is None:
        raise ConfigError(f"unknown tier kind {cfg.kind!r}; choose from {sorted(TIER_FACTORIES)}")
    mod, _, fn = target.partition(":")
    try:
        factory: Callable[[TierConfig], Tier] = getattr(importlib.import_module(mod), fn)
    except ImportError as e:
        extra = {"redis": "redis", "remote": "server"}.get(cfg.kind, cfg.kind)
        raise ConfigError(f"tier kind {cfg.kind!r} needs an optional dependency: pip install 'kvlayer[{extra}]' ({e})") from None
    return factory(cfg)


__all__: list[Any] = ["DiskTier", "EvictionGuard", "MemoryTier", "Tier", "TierStats", "TieredStore", "build_tier"]
