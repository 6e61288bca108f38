"""SGLang HiCache storage backend: ``kvlayer.connectors.sglang.KVLayerStore``.

``KVLayerStore`` is imported lazily (it subclasses SGLang's ``HiCacheStorage``), so the key and
layout helpers in this package import without SGLang installed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVLayerStore"]


def __getattr__(name: str) -> Any:
    if name == "KVLayerStore":
        from .backend import KVLayerStore

        return KVLayerStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
