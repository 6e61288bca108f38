"""The `kvlayer` command: help that lists every command, info that never prints secrets, bench;
`python -m kvlayer.blend` calibrating the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _kvlayer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvlayer.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    r = _kvlayer("--help")
    assert r.returncode == 0
    for cmd in ("info", "bench", "serve", "stats", "demo", "blend"):
        assert cmd in r.stdout


def test_info_redacts_secrets():
    r = _kvlayer("info", "--json", "--redis-url", "redis://user:s3cret@127.0.0.1:6379/0", "--auth-token", "tok3n")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config"]["redis_url"] == "redis://user:***@127.0.0.1:6379/0"
    assert "s3cret" not in r.stdout and "tok3n" not in r.stdout


def test_bad_config_is_a_clear_error():
    r = _kvlayer("info", "--cpu-bytes", "lots")
    info = json.loads(_kvlayer("info", "--json", "--cpu-bytes", "lots").stdout)
    assert r.returncode == 0 and "cpu_bytes" in info["config_error"] and "GiB" in info["config_error"]


def test_bench_quick_json():
    r = _kvlayer("bench", "--quick", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["cpu_vs_memcpy"] > 0 and res["disk_vs_file"] > 0
    assert set(res["paths"]) == {"cpu", "disk[raw]", "disk[lz4]"}


def test_calibrate_cli_on_the_tiny_model(tmp_path):
    from tests.fixtures.tiny_model import sample_text, tiny_model_dir

    model_dir = tiny_model_dir()
    text = tmp_path / "probe.txt"
    text.write_text(sample_text(3000, seed=3))
    calib = tmp_path / "c.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "kvlayer.blend", "calibrate", "--model", model_dir, "--text-file", str(text),
           "--probes", "2", "--docs", "2", "--doc-tokens", "60,90", "--tail-tokens", "8", "--ratios", "0.5,1",
           "--threshold", "0.001", "--calibration", str(calib)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["status"] == "ok" and rec["ratio"] in (0.5, 1.0)
    shown = subprocess.run([sys.executable, "-m", "kvlayer.blend", "show", "--calibration", str(calib)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert rec["fingerprint"] in json.loads(shown.stdout)
