"""kvlayer: a KV-cache storage and transport layer for LLM inference engines."""

from kvlayer.config import KVLayerConfig, load_config
from kvlayer.engine import Document, KVCache, LookupResult
from kvlayer.errors import ConfigError, CorruptBlobError, KVLayerError, TierError
from kvlayer.spec import KVSpec

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "CorruptBlobError", "Document", "KVCache", "KVLayerConfig", "KVLayerError", "KVSpec",
    "LookupResult", "TierError", "__version__", "load_config",
]
