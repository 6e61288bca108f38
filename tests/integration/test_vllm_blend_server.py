"""CacheBlend across processes: documents registered through vLLM's OpenAI server with
``kvlayer doc add``, blended by that server (engine core and worker in their own processes) and by
another engine process, all sharing one real ``kvlayer serve``.

Tokens are compared with the same engine's answer with ``kvlayer_blend: false`` at ratio 1.0
(test_vllm_blend.py shows that answer equals vLLM without kvlayer and checks the default ratio).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.kvlayer_server import kvlayer_server_factory_fixture  # noqa: F401
from tests.integration.test_vllm import engine_env
from tests.integration.test_vllm_blend import _run
from tests.integration.test_vllm_server import _http, _metric

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _texts() -> dict[str, str]:
    from tests.fixtures.tiny_model import sample_text

    return {"pre": sample_text(40, seed=51), "a": sample_text(260, seed=52), "b": sample_text(220, seed=53),
            "q": sample_text(25, seed=54), "x": sample_text(30, seed=55)}


@pytest.fixture
def stack(tmp_path, kvlayer_server_factory):
    pytest.importorskip("vllm")
    from kvlayer.testing import VLLMServer
    from tests.fixtures.tiny_model import tiny_model_dir

    srv = kvlayer_server_factory(cpu_bytes="256MiB")
    model = tiny_model_dir()
    env = engine_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's default: engine core in its own process
    env["VLLM_SERVER_DEV_MODE"] = "1"  # /reset_prefix_cache
    env["PYTHONPATH"] = env.get("PYTHONPATH", "").replace(str(REPO), "").strip(os.pathsep)  # installed entry points
    engine = VLLMServer(model, tmp_path, connector="KVLayerBlendConnector", name="server",
                        extra={"chunk_size": 256, "cpu_bytes": "128MiB", "server_url": srv.url,
                               "blend": {"enabled": True, "gate": False, "sync_s": 0}},
                        args=("--max-model-len", "2048", "--dtype", "float32"), env=env)
    try:
        engine.start(timeout=300)
        yield engine.url, model, srv, tmp_path, engine.log_path
    finally:
        engine.stop()


def test_register_through_the_server_blend_in_the_server_and_in_a_replica(stack):
    from kvlayer.doc_cli import tokenize
    from kvlayer.rpc.client import KVLayerClient

    base, model, srv, tmp, log = stack
    t = _texts()
    for name, text in t.items():
        (tmp / f"{name}.txt").write_text(text)
    kvlayer = [sys.executable, "-m", "kvlayer.cli"]
    outs = []
    for args in (["--id", "a", "--file", str(tmp / "a.txt"), "--context-file", str(tmp / "pre.txt")],
                 ["--id", "b", "--file", str(tmp / "b.txt")]):
        p = subprocess.run([*kvlayer, "doc", "add", "--engine", base, *args], capture_output=True, text=True,
                           timeout=300, cwd=str(tmp))
        assert p.returncode == 0, p.stderr
        outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert outs[0]["context_tokens"] > 0 and outs[0]["document_tokens"] > 100 and outs[1]["context_tokens"] == 0

    # chunks and records reach kvlayer serve through the worker's background writer
    client = KVLayerClient(srv.url)
    deadline = time.monotonic() + 60
    while len(client.keys()) < 6 and time.monotonic() < deadline:  # 2 + 1 chunks, 2 records, prefix chunks
        time.sleep(0.5)

    pre = tokenize(base, model, t["pre"], special=True)
    a, b, q, x = (tokenize(base, model, t[k], special=False) for k in ("a", "b", "q", "x"))
    prompt = pre + b + a + q  # documents in another order than registered, after the context
    body = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True}

    def ask(params: dict) -> str:
        assert _http("POST", base + "/reset_prefix_cache")[0] == 200
        code, out = _http("POST", base + "/v1/completions", {**body, "kv_transfer_params": params}, timeout=300)
        assert code == 200, out
        return json.loads(out)["choices"][0]["text"]

    off = ask({"kvlayer_blend": False})
    hits0 = _metric(_http("GET", base + "/metrics")[1], "vllm:external_prefix_cache_hits_total")
    blended = ask({"kvlayer_blend_ratio": 1.0})
    assert blended == off
    deadline = time.monotonic() + 15  # metrics land asynchronously
    while True:
        hits1 = _metric(_http("GET", base + "/metrics")[1], "vllm:external_prefix_cache_hits_total")
        if hits1 - hits0 >= len(a) + len(b) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert hits1 - hits0 >= len(a) + len(b), (hits0, hits1, log.read_text()[-3000:])  # the blend's claim

    # another prefix and order: no exact prefix chunk of it is stored yet
    rep = _run("replica", tmp, server_url=srv.url, prompt=pre[:1] + x + a + b + q)
    assert rep["documents"] == ["a", "b"]  # found through the records on kvlayer serve
    assert rep["stats"]["blended"] == 1 and rep["stats"]["blend_failures"] == 0
    assert rep["stats"]["doc_tokens_reused"] == len(a) + len(b)
    assert rep["blend"]["tokens"] == rep["off"]["tokens"]
