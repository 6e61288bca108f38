"""``.ci/gpu`` and ``benchmarks/gpu.py`` on a machine without a GPU: what can be checked here is
checked (the offline install logic, the nvcc build when nvcc exists, the CPU codec floor), the GPU steps are skipped
with a clear line, and the benchmark refuses instead of measuring nothing. On a GPU machine these
two tests skip: ``.ci/gpu`` itself is the check there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs .ci/gpu for real")


def test_ci_gpu_without_a_gpu_checks_what_it_can_and_exits_0(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / ".ci" / "gpu")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[gpu] no GPU: torch.cuda.is_available() is false" in r.stdout
    summary = (out / "summary.txt").read_text()
    assert "install: ok" in summary and "cuda-build: ok" in summary and "FAILED" not in summary
    assert (out / "install.log").is_file() and (out / "cuda-build.log").is_file()
    assert "benchmark:" not in summary and "tests:" not in summary  # the GPU steps did not run
    # the CPU step before them: the rotated codecs' floor, as ratios to memcpy (None without AVX-512)
    assert "rotation-floor: ok" in summary
    floor = json.loads((out / "rotation_floor.json").read_text())["result"]
    if floor["memcpy_gbps"] is not None:
        assert 0 < floor["decode4_floor_vs_memcpy"] < floor["convert_vs_memcpy"]
        assert 0 < floor["rotate_vs_memcpy"] < floor["convert_vs_memcpy"]


def test_gpu_benchmark_refuses_without_a_gpu():
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--quick"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert "no CUDA GPU" in r.stderr and r.stdout == ""
