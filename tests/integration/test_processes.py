"""Behaviour that only shows across processes: keys that agree between interpreters with
different hash seeds, settings read from the environment at import time, a disk tier that
survives a writer killed mid-write."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvlayer.codec import decode
from kvlayer.codec.header import verify
from kvlayer.keys import prefix_keys
from kvlayer.spec import KVSpec
from kvlayer.storage.disk import DiskTier
from tests.fixtures.tier_data import files_on_disk, key, tensor

REPO = Path(__file__).resolve().parents[2]

SPEC = KVSpec(model="org/model@rev1", num_layers=4, num_kv_heads=2, head_dim=16, dtype="float16")

# Same script in two interpreters; prints keys and namespace as JSON.
_CHILD = """
import json, sys
from kvlayer.keys import document_keys, prefix_keys
from kvlayer.spec import KVSpec
spec = KVSpec(model="org/model@rev1", num_layers=4, num_kv_heads=2, head_dim=16, dtype="float16",
              extra=(("b", "2"), ("a", "1")))
toks = [(i * 7919) % 50000 for i in range(700)]
ns = spec.namespace_digest()
print(json.dumps({"ns": ns.hex(), "prefix": prefix_keys(ns, toks, 256),
                  "doc": document_keys(ns, toks[:300], 128), "hash_of_str": hash("probe")}))
"""


def test_keys_identical_in_processes_with_different_hash_seeds():
    procs = []
    for seed in ("1", "987654"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        procs.append(subprocess.Popen([sys.executable, "-c", _CHILD], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    a, b = outs
    # The seeds really differ (otherwise this test proves nothing) ...
    assert a["hash_of_str"] != b["hash_of_str"]
    # ... yet every key agrees, and agrees with this process too.
    assert a["ns"] == b["ns"]
    assert a["prefix"] == b["prefix"] and len(a["prefix"]) == 3
    assert a["doc"] == b["doc"] and len(a["doc"]) == 3
    spec = dataclasses.replace(SPEC, extra=(("a", "1"), ("b", "2")))  # order of extra must not matter
    ns = spec.namespace_digest()
    toks = [(i * 7919) % 50000 for i in range(700)]
    assert a["ns"] == ns.hex()
    assert a["prefix"] == prefix_keys(ns, toks, 256)


def test_pool_size_from_env_takes_units_and_refuses_garbage():
    code = "from kvlayer.codec.buffers import POOL; print(POOL.cap)"
    ok = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVLAYER_BLOB_POOL_BYTES": "64MiB"},
                        capture_output=True, text=True, check=True)
    assert ok.stdout.strip() == str(64 << 20)
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KVLAYER_BLOB_POOL_BYTES": "lots"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "KVLAYER_BLOB_POOL_BYTES" in bad.stderr and "unit" in bad.stderr


_WRITER = r"""
import sys, hashlib, time, torch
from kvlayer.codec import encode
from kvlayer.storage.disk import DiskTier
root, n = sys.argv[1], int(sys.argv[2])
t = DiskTier(root, 256 << 20)
def key(i): return hashlib.sha256(f"k{i}".encode()).hexdigest()
for i in range(n):
    g = torch.Generator().manual_seed(i)
    x = torch.randn(32 << 10, generator=g).half().reshape(-1, 64)
    assert t.put(key(i), encode(x, "lz4" if i % 2 else "raw"))
print("ready", flush=True)
# Keep rewriting a few big blobs until killed, so the kill lands in the middle of a write
# (a few keys only: the small blobs must never be evicted, however slow the parent is).
big = encode(torch.randn(4 << 20).half())
for i in range(400):
    t.put(key(f"big{i % 4}"), big)
time.sleep(600)
"""


def test_disk_survives_process_restart_and_kill_mid_write(tmp_path):
    root = tmp_path / "disk"
    n = 12
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(n)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read() if p.stderr else ""
        # wait until a temp file is being written, then kill -9 (a crash mid-write)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any((root / "tmp").iterdir()):
            time.sleep(0.001)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    # This process is the "restart": it rebuilds the index from the files.
    t = DiskTier(root, 256 << 20)
    assert list((root / "tmp").iterdir()) == []  # leftover temp files removed at start-up
    for i in range(n):
        got = t.get(key(i))
        assert got is not None, f"blob {i} lost across restart"
        x = tensor(i, 64 << 10)
        assert torch.equal(decode(got), x)  # bit-exact, raw and lz4
    # Every blob under a real key name is complete (atomic rename): no partial big blob.
    on_disk = files_on_disk(root)
    assert set(on_disk) == set(t.keys())
    for k in t.keys():
        verify(t.get(k))
    assert t.used_bytes() == sum(on_disk.values())
