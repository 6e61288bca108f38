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


# Files whose tests start engines or hammer servers for a minute or more: marked ``slow`` so
# ``pytest -m "not slow"`` is the quick loop while editing (CI runs everything).
_SLOW_FILES = {"test_server_stress.py", "test_server_fuzz.py", "test_vllm_demo.py", "test_codec_quality.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("vllm") is not None or item.path.name in _SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def spec():
    from kvlayer import KVSpec

    return KVSpec(model="test-model", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")
