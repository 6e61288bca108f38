"""Shared pytest set-up. Fixture modules live in tests/fixtures/ and are imported by the tests
that need them (one module per real dependency: redis, kvlayer serve, the tiny model, ...)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Keep every cache a test run writes inside the work tree (ignored by git).
CACHE = REPO / ".cache" / "test"
CACHE.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KVLAYER_EXT_CACHE", str(REPO / ".cache" / "ext"))
os.environ.setdefault("KVLAYER_CACHE_DIR", str(REPO / ".cache"))  # models: .cache/models, as CI caches them


@pytest.fixture
def spec():
    from kvlayer import KVSpec

    return KVSpec(model="test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
