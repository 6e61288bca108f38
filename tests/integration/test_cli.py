"""The `kvlayer` command: help that lists every command, info that never prints secrets, bench."""

from __future__ import annotations

import json
import subprocess
import sys


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
