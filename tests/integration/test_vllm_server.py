"""kvlayer through vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server
--kv-transfer-config ...``): the engine runs in its own process, as in production.

The server is started with ``setsid`` on a free loopback port and stopped by its process group
id, also when the test fails. A cold request stores the prompt's chunks, the server's prefix
cache is reset (dev endpoint), and the same request again must be answered identically with
the prompt's KV loaded from kvlayer (vLLM's own ``external_prefix_cache_hits`` counter).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.integration.test_vllm import CHUNK, engine_env  # noqa: E402

pytestmark = pytest.mark.vllm


def _http(method: str, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def server(tmp_path):
    pytest.importorskip("vllm")
    from kvlayer.testing import VLLMServer
    from tests.fixtures.tiny_model import tiny_model_dir

    model = tiny_model_dir()
    env = engine_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's default: engine in its own process
    env["VLLM_SERVER_DEV_MODE"] = "1"  # /reset_prefix_cache
    env["KVLAYER_DISK_PATH"] = str(tmp_path / "disk")  # KVLAYER_* env reaches the connector too
    srv = VLLMServer(model, tmp_path, extra={"chunk_size": CHUNK, "cpu_bytes": "128MiB"},
                     args=("--max-model-len", "2048"), env=env, name="server")
    try:
        srv.start(timeout=240)
        yield srv.url, model, tmp_path
    finally:
        srv.stop()


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", line)
        if m:
            total += float(m.group(2))
    return total


def test_openai_server_warm_request_loads_from_kvlayer(server):
    base, model, tmp = server
    from tests.integration.test_vllm import make_prompts

    prompt = make_prompts()["long"]
    body = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True}
    code, cold = _http("POST", base + "/v1/completions", body)
    assert code == 200, cold
    assert _http("POST", base + "/reset_prefix_cache")[0] == 200
    hits0 = _metric(_http("GET", base + "/metrics")[1], "vllm:external_prefix_cache_hits_total")
    code, warm = _http("POST", base + "/v1/completions", body)
    assert code == 200, warm
    assert json.loads(warm)["choices"][0]["text"] == json.loads(cold)["choices"][0]["text"]
    want = (len(prompt) // CHUNK) * CHUNK
    deadline = time.monotonic() + 15  # metrics and background disk writes land asynchronously
    while True:
        hits1 = _metric(_http("GET", base + "/metrics")[1], "vllm:external_prefix_cache_hits_total")
        files = list((tmp / "disk").rglob("*.kvb"))
        if (hits1 - hits0 >= want and len(files) >= len(prompt) // CHUNK) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert hits1 - hits0 == want
    # the disk tier named only through KVLAYER_DISK_PATH received the chunks
    assert len(files) == len(prompt) // CHUNK
