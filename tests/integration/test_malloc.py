"""Opt-in glibc malloc tuning: applied only when asked, in a subprocess (it is process-wide and
would change the RSS behaviour the budget tests measure)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
from kvlayer import KVCache, KVSpec
cache = KVCache(KVSpec(model="m", num_layers=1, num_kv_heads=1, head_dim=8), cpu_bytes="1MiB")
cache.close()
"""


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_malloc_tuning_is_opt_in_and_applied_when_asked():
    on = _run({"KVLAYER_MALLOC_TUNING": "1"})
    assert on.returncode == 0, on.stderr
    assert "malloc tuned for multi-MiB blobs: yes" in on.stdout
    off = _run({"KVLAYER_MALLOC_TUNING": "0"})
    assert off.returncode == 0, off.stderr
    assert "malloc tuned" not in off.stdout
    bad = _run({"KVLAYER_MALLOC_TUNING": "sometimes"})
    assert bad.returncode != 0 and "malloc_tuning" in bad.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tune_returns_malloc_trim():
    code = "from kvlayer.malloc import tune_for_blobs; t = tune_for_blobs(arena_max=4); print(t is not None, t(0) in (0, 1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True"]
