"""Prefill/decode disaggregation through real processes: two vLLM OpenAI servers (a
``kv_producer`` and a ``kv_consumer``) sharing one real ``kvlayer serve``, and ``kvlayer proxy``
in front of them (all in their own process groups, stopped by group id).

- Through the proxy, greedy tokens equal the decode engine's own answer to the whole request
  without kvlayer (one engine doing both), streamed or not, and the
  decode engine computes one prompt token per request: vLLM's own
  ``vllm:prompt_tokens_by_source`` counter on its ``/metrics`` (``local_compute`` +1,
  ``external_kv_transfer`` + the rest).
- The producer announces what it saved (``kv_transfer_params``); the consumer finds it even when
  it asks before the save has landed (it waits for the hand-off).
- A hand-off whose chunks are gone (the shared tier cleared: evicted) is recomputed by the
  consumer after ``pd_wait_s``: same tokens, every prompt token computed.
- The producer stopped and then killed while the request is in it: the proxy sends the request
  on to the decode engine, which computes the prompt; same tokens, status 200.
- An error from the prefill engine (a prompt longer than the model's context) comes back with
  its status.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.test_vllm import CHUNK, engine_env  # noqa: E402
from tests.integration.test_vllm_server import _metric  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 12
PD_WAIT_S = 5.0


def _prompt(seed: int, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from tests.fixtures.tiny_model import sample_text, tiny_model_dir

    ids = AutoTokenizer.from_pretrained(tiny_model_dir())(sample_text(n, seed=seed))["input_ids"]
    assert len(ids) >= n
    return list(ids[:n])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("vllm")
    pytest.importorskip("aiohttp")
    from kvlayer.testing import KVLayerServer, ProxyServer, VLLMServer
    from tests.fixtures.tiny_model import tiny_model_dir

    tmp = tmp_path_factory.mktemp("pd")
    model = tiny_model_dir()
    env = engine_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's default: engine core in its own process
    env["VLLM_SERVER_DEV_MODE"] = "1"  # /reset_prefix_cache
    # Two engines on one host: vLLM's CPU workers each pin their main thread, and every thread it
    # starts (kvlayer's saves included), to core 0 by default. The decode engine's worker spinning
    # there while it waits for a hand-off then starved the prefill engine's save for seconds, so
    # the hand-off never landed (measured: a 3.7 s stall ending when the wait did). Separate hosts
    # share nothing; here the kernel places the threads.
    env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    args = ("--max-model-len", "2048", "--dtype", "float32")
    srv = KVLayerServer(tmp / "kvlayer", cpu_bytes="256MiB", disk=False)
    started: list[Any] = []
    try:
        started.append(srv.start())
        # cpu_bytes 0: the shared server is each engine's only tier (a producer's save is then
        # durable when the server has acknowledged it)
        common = {"chunk_size": CHUNK, "cpu_bytes": 0, "server_url": srv.url}
        prefill = VLLMServer(model, tmp / "prefill", role="kv_producer", extra=common, args=args, env=env,
                             name="prefill")
        decode = VLLMServer(model, tmp / "decode", role="kv_consumer", extra={**common, "pd_wait_s": PD_WAIT_S},
                            args=args, env=env, name="decode")
        for s in (prefill, decode):  # one at a time: two start-ups at once starve each other on 2 cores
            started.append(s.start(timeout=400))
        proxy = ProxyServer([prefill.url], [decode.url], tmp / "proxy", env=env)
        started.append(proxy.start(timeout=60))
        # one request end to end first: each engine process opens its channels to the server on
        # first use, and on a loaded machine that first connection can outlast the remote tier's
        # 1 s call timeout (a miss, recomputed: correct, but not what the tests below count)
        from kvlayer.testing import http_json

        warm = {"model": model, "prompt": _prompt(99, 600), "max_tokens": 2}
        assert http_json("POST", proxy.url + "/v1/completions", warm)[0] == 200
        yield {"model": model, "server": srv, "prefill": prefill, "decode": decode, "proxy": proxy}
    finally:
        for s in reversed(started):
            s.stop()


def _body(model: str, prompt: list[int], **more: Any) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            **more}


def _text(status_body: tuple[int, Any]) -> str:
    status, body = status_body
    assert status == 200, body
    return str(body["choices"][0]["text"])


def _metrics(url: str) -> str:
    from kvlayer.testing import http_json

    return str(http_json("GET", url + "/metrics")[1])


def _sources(url: str) -> dict[str, float]:
    text = _metrics(url)
    out = {}
    for src in ("local_compute", "local_cache_hit", "external_kv_transfer"):
        out[src] = sum(_metric(line, "vllm:prompt_tokens_by_source_total") for line in text.splitlines()
                       if f'source="{src}"' in line)
    return out


def _kvlayer_series(fleet: dict[str, Any]) -> str:
    """Both engines' non-zero kvlayer counters, for a failure's message: which side lost the KV."""
    out = []
    for role in ("prefill", "decode"):
        out += [f"{role}: {line.split('{')[0]} {line.split()[-1]}" for line in _metrics(fleet[role].url).splitlines()
                if line.startswith("vllm:kvlayer") and line.split("{")[0].endswith("_total")
                and float(line.split()[-1]) != 0]
    return "\n".join(out)


def _handoff_timeouts(url: str) -> float:
    return _metric(_metrics(url), "vllm:kvlayer_handoff_timeouts_total")


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def _settled(url: str, before: dict[str, float], total: int) -> dict[str, float]:
    """The decode engine's prompt-token counters once ``total`` more prompt tokens are counted
    (vLLM publishes them a moment after the answer)."""
    deadline = time.monotonic() + 20
    while True:
        d = _delta(_sources(url), before)
        if sum(d.values()) >= total or time.monotonic() > deadline:
            return d
        time.sleep(0.25)


def _writes_settled(client: Any, above: int) -> None:
    """Wait until the server holds more than ``above`` keys and the count has not changed for a
    second: the prefill engine answers before its background save lands (by design), so a test
    that evicts a hand-off must let it land first."""
    deadline, last, same = time.monotonic() + 20, -1, 0
    while (same < 4 or last <= above) and time.monotonic() < deadline:
        n = len(client.keys(timeout=10))
        same, last = (same + 1, n) if n == last else (0, n)
        time.sleep(0.25)


def _reference(fleet: dict[str, Any], prompt: list[int]) -> str:
    """One engine doing both: the decode engine computes the whole request without kvlayer
    (``kvlayer_skip``), then forgets it (vLLM's own prefix cache reset)."""
    from kvlayer.testing import http_json

    url = fleet["decode"].url
    text = _text(http_json("POST", url + "/v1/completions",
                           _body(fleet["model"], prompt, kv_transfer_params={"kvlayer_skip": True})))
    assert http_json("POST", url + "/reset_prefix_cache")[0] == 200
    return text


def _sse_text(raw: str) -> str:
    out = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(out)


def _stream(url: str, body: dict[str, Any]) -> tuple[int, str]:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, r.read().decode()


@pytest.mark.parametrize("n", [1100, 1024], ids=["tail", "whole-chunks"])
def test_proxy_answers_as_one_engine_and_decode_computes_one_prompt_token(fleet, n):
    from kvlayer.testing import http_json

    model, proxy, decode = fleet["model"], fleet["proxy"], fleet["decode"]
    prompts = [_prompt(100 + n + i, n) for i in range(2)]
    refs = [_reference(fleet, p) for p in prompts]
    before = _sources(decode.url)
    got = _text(http_json("POST", proxy.url + "/v1/completions", _body(model, prompts[0])))
    status, raw = _stream(proxy.url + "/v1/completions", _body(model, prompts[1], stream=True))
    assert status == 200
    assert [got, _sse_text(raw)] == refs
    assert raw.rstrip().endswith("data: [DONE]")
    d = _settled(decode.url, before, 2 * n)
    # the decode engine computed only each prompt's last token and loaded the rest from kvlayer
    assert d["local_compute"] == 2, f"{d}\n{_kvlayer_series(fleet)}"
    assert d["external_kv_transfer"] == 2 * (n - 1), f"{d}\n{_kvlayer_series(fleet)}"


def test_producer_announces_what_it_saved(fleet):
    from kvlayer.testing import http_json

    prompt = _prompt(7, 700)
    status, body = http_json("POST", fleet["prefill"].url + "/v1/completions",
                             _body(fleet["model"], prompt, max_tokens=1))
    assert status == 200, body
    assert body["kv_transfer_params"] == {"kvlayer_pd": {"tokens": 700}}


def test_handoff_whose_chunks_are_gone_is_recomputed_by_the_consumer(fleet):
    from kvlayer.testing import http_json

    model, decode = fleet["model"], fleet["decode"]
    prompt = _prompt(8, 900)
    ref = _reference(fleet, prompt)
    with fleet["server"].client() as c:  # one connection, made before the engines are busy
        c.health(timeout=30, wait_for_ready=True)
        held = len(c.keys(timeout=10))
        status, body = http_json("POST", fleet["prefill"].url + "/v1/completions", _body(model, prompt, max_tokens=1))
        assert status == 200, body
        handoff = body["kv_transfer_params"]
        # Evicted before the decode engine asks. The producer's save runs behind its answer (by
        # design): one chunk landing after clear() was a hit of 256 tokens (CI, 2026-11-29).
        _writes_settled(c, above=held)
        c.clear(timeout=10)
    before, timeouts = _sources(decode.url), _handoff_timeouts(decode.url)
    t0 = time.monotonic()
    got = _text(http_json("POST", decode.url + "/v1/completions", _body(model, prompt, kv_transfer_params=handoff)))
    waited = time.monotonic() - t0
    assert got == ref
    d = _settled(decode.url, before, 900)
    assert d["local_compute"] == 900 and d["external_kv_transfer"] == 0, d
    assert waited >= PD_WAIT_S  # it waited for the hand-off before computing
    assert _handoff_timeouts(decode.url) == timeouts + 1  # and says so on vLLM's /metrics


def test_prefill_error_comes_back_with_its_status(fleet):
    from kvlayer.testing import http_json

    status, body = http_json("POST", fleet["proxy"].url + "/v1/completions",
                             _body(fleet["model"], _prompt(9, 2100)))  # longer than --max-model-len 2048
    assert status == 400, body
    assert "error" in body


def test_producer_killed_mid_request_the_consumer_recomputes_and_the_proxy_answers(fleet):
    """Last in this module: the producer is gone afterwards."""
    from kvlayer.testing import http_json

    model, proxy, decode, prefill = fleet["model"], fleet["proxy"], fleet["decode"], fleet["prefill"]
    prompt = _prompt(10, 1000)
    ref = _reference(fleet, prompt)
    before = _sources(decode.url)
    prefill.signal(signal.SIGSTOP)  # the request will be inside the producer when it dies
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=http_json("POST", proxy.url + "/v1/completions",
                                                                  _body(model, prompt))))
    t.start()
    time.sleep(2.0)
    prefill.kill()
    t.join(120)
    assert not t.is_alive()
    assert _text(result["r"]) == ref
    d = _settled(decode.url, before, 1000)
    assert d["local_compute"] == 1000, d
    status, health = http_json("GET", proxy.url + "/health")
    assert status == 200 and health["counters"]["prefill_fallbacks"] >= 1, health
