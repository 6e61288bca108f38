"""kvlayer through vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server
--kv-transfer-config ...``): the engine runs in its own process, as in production.

The server is started with ``setsid`` on a free loopback port and stopped by its process group
id, also when the test fails. A cold request stores the prompt's chunks, the server's prefix
cache is reset (dev endpoint), and the same request again must be answered identically with
the prompt's KV loaded from kvlayer (vLLM's own ``external_prefix_cache_hits`` counter).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.integration.test_vllm import CHUNK, engine_env  # noqa: E402

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    from tests.fixtures.tiny_model import tiny_model_dir

    model = tiny_model_dir()
    port = _free_port()
    kv = {"kv_connector": "KVLayerConnector", "kv_connector_module_path": "kvlayer.connectors.vllm",
          "kv_role": "kv_both", "kv_connector_extra_config": {"chunk_size": CHUNK, "cpu_bytes": "128MiB"}}
    env = engine_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's default: engine in its own process
    env["VLLM_SERVER_DEV_MODE"] = "1"  # /reset_prefix_cache
    env["KVLAYER_DISK_PATH"] = str(tmp_path / "disk")  # KVLAYER_* env reaches the connector too
    cmd = ["setsid", sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--max-model-len", "2048",
           "--kv-transfer-config", json.dumps(kv)]
    log = tmp_path / "server.log"
    fh = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{log.read_text()[-5000:]}")
            try:
                if _http("GET", base + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready:\n{log.read_text()[-5000:]}")
            time.sleep(1)
        yield base, model, tmp_path
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        fh.close()


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
