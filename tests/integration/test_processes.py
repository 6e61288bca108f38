"""Behaviour that only shows across processes: keys that agree between interpreters with
different hash seeds, and settings read from the environment at import time."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from kvlayer.keys import prefix_keys
from kvlayer.spec import KVSpec

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
