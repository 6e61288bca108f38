"""``python -m kvlayer.demo`` (what ``kvlayer demo`` runs) end to end on the tiny model: the warm
run loads the prompt's KV from kvlayer and generates the same tokens as the cold run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.integration.test_vllm import engine_env

pytestmark = pytest.mark.vllm


def test_demo_tiny_model_identical_tokens_and_a_real_load(tmp_path):
    pytest.importorskip("vllm")
    from tests.fixtures.tiny_model import tiny_model_dir

    model = tiny_model_dir()
    env = engine_env()
    cmd = [sys.executable, "-m", "kvlayer.demo", "--model", model, "--tokens", "1500", "--max-tokens", "8", "--json",
           "--disk-path", str(tmp_path / "disk")]
    proc = subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["identical"] is True
    assert result["prompt_tokens"] == 1500
    # 5 whole chunks of 256 and the partial chunk's whole block of 128; the last 92 tokens are computed
    assert result["loaded_tokens"] == 5 * 256 + 128
    assert "tokens identical" in proc.stdout
