"""``kvlayer proxy``: how a client request is split into a prefill and a decode request, and what
the client gets back when an engine fails.

The rewriting is tested on its own. The routing runs the real proxy app (aiohttp, in process)
against two small stand-in engines, in process too, that record what they were sent and answer
like vLLM's OpenAI server (a JSON answer with ``kv_transfer_params``, an SSE stream, an error
status). The real engines are in tests/integration/test_vllm_pd.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from kvlayer.errors import ConfigError  # noqa: E402
from kvlayer.proxy import Proxy, decode_request, parse_urls, prefill_request  # noqa: E402

HANDOFF = {"kvlayer_pd": {"tokens": 7}}


# ------------------------------------------------------------------ rewriting
def test_prefill_request_asks_one_unstreamed_token_and_keeps_the_prompt():
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 50, "stream": True, "stream_options": {"x": 1},
            "n": 3, "best_of": 3, "min_tokens": 5, "temperature": 0.0,
            "kv_transfer_params": {"kvlayer_skip": True, "kvlayer_pd": {"tokens": 3}}}
    out = prefill_request(body)
    assert out == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 1, "stream": False, "temperature": 0.0,
                   "kv_transfer_params": {"kvlayer_skip": True}}  # the client's own params, no hand-off
    assert body["max_tokens"] == 50 and body["stream"] is True  # the client's request is not changed


def test_prefill_request_of_a_chat_caps_both_length_fields():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}
    out = prefill_request(body)
    assert out["max_completion_tokens"] == 1 and out["max_tokens"] == 1
    assert out["messages"] == body["messages"] and out["messages"] is not body["messages"]


def test_decode_request_is_the_clients_plus_the_handoff():
    body = {"model": "m", "prompt": "x", "max_tokens": 5, "stream": True}
    assert decode_request(body, HANDOFF) == {**body, "kv_transfer_params": HANDOFF}
    # no hand-off (the prefill engine failed): a client cannot announce one itself
    assert decode_request({**body, "kv_transfer_params": {"kvlayer_pd": {"tokens": 9}}}, None) == body
    # the client's own params go along, beside the hand-off
    assert decode_request({**body, "kv_transfer_params": {"x": 1}}, HANDOFF)["kv_transfer_params"] == {
        "x": 1, **HANDOFF}


def test_urls_are_parsed_and_checked():
    assert parse_urls("http://a:1/, http://b:2", "prefill") == ["http://a:1", "http://b:2"]
    assert parse_urls(["http://a:1", "http://b:2,http://c:3"], "decode") == ["http://a:1", "http://b:2", "http://c:3"]
    with pytest.raises(ConfigError, match="http://"):
        parse_urls("a:1", "decode")
    with pytest.raises(ConfigError, match="at least one"):
        parse_urls(" , ", "prefill")


# ------------------------------------------------------------------ routing, in process
class Engine:
    """A stand-in OpenAI server: records requests, answers as told."""

    def __init__(self, name: str, status: int = 200) -> None:
        self.name = name
        self.status = status
        self.seen: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({})

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": self.name}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.seen.append(body)
        if self.status != 200:
            return web.json_response({"error": {"message": f"{self.name} says no"}}, status=self.status)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for tok in ("a", "b"):
                await resp.write(f"data: {json.dumps({'choices': [{'text': tok}]})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"choices": [{"text": self.name}], "kv_transfer_params": HANDOFF})


def run(prefill: list[Engine | str], decode: list[Engine | str],
        scenario: Callable[[TestClient], Awaitable[Any]]) -> Any:
    """Start the engines and the proxy in one event loop, run ``scenario`` against the proxy."""

    async def main() -> Any:
        servers: list[TestServer] = []
        urls: dict[int, str] = {}
        for e in [*prefill, *decode]:
            if isinstance(e, Engine):
                srv = TestServer(e.app())
                await srv.start_server()
                servers.append(srv)
                urls[id(e)] = str(srv.make_url("")).rstrip("/")
        proxy = Proxy([urls[id(e)] if isinstance(e, Engine) else e for e in prefill],
                      [urls[id(e)] if isinstance(e, Engine) else e for e in decode], connect_timeout_s=2)
        client = TestClient(TestServer(proxy.app()))
        await client.start_server()
        try:
            return await scenario(client)
        finally:
            await client.close()
            for s in servers:
                await s.close()

    return asyncio.run(main())


def test_request_goes_to_prefill_with_one_token_then_to_decode_with_the_handoff():
    p, d = Engine("p"), Engine("d")

    async def scenario(c: TestClient) -> Any:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": [5, 6], "max_tokens": 4})
        return r.status, await r.json()

    status, body = run([p], [d], scenario)
    assert (status, body["choices"][0]["text"]) == (200, "d")
    assert p.seen == [{"model": "m", "prompt": [5, 6], "max_tokens": 1, "stream": False}]
    assert d.seen == [{"model": "m", "prompt": [5, 6], "max_tokens": 4, "kv_transfer_params": HANDOFF}]


def test_stream_is_passed_through_and_engines_are_taken_in_turn():
    p0, p1, d0, d1 = Engine("p0"), Engine("p1"), Engine("d0"), Engine("d1")

    async def scenario(c: TestClient) -> Any:
        texts = []
        for _ in range(4):
            r = await c.post("/v1/chat/completions", json={"model": "m", "messages": [], "stream": True})
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            texts.append(await r.text())
        return texts

    texts = run([p0, p1], [d0, d1], scenario)
    assert all(t.endswith("data: [DONE]\n\n") and t.count("data: ") == 3 for t in texts)
    assert [len(e.seen) for e in (p0, p1, d0, d1)] == [2, 2, 2, 2]
    assert all(s["stream"] is False for s in p0.seen + p1.seen)
    assert all(s["stream"] is True for s in d0.seen + d1.seen)


def test_prefill_rejection_comes_back_with_its_status_and_decode_is_not_asked():
    p, d = Engine("p", status=400), Engine("d")

    async def scenario(c: TestClient) -> Any:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        return r.status, await r.json()

    status, body = run([p], [d], scenario)
    assert status == 400 and body["error"]["message"] == "p says no"
    assert d.seen == []


@pytest.mark.parametrize("broken", ["500", "down"])
def test_failed_prefill_engine_leaves_the_prompt_to_decode(broken):
    from kvlayer.testing import free_port

    p: Engine | str = Engine("p", status=500) if broken == "500" else f"http://127.0.0.1:{free_port()}"
    d = Engine("d")

    async def scenario(c: TestClient) -> Any:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 3})
        h = await c.get("/health")
        return r.status, await r.json(), h.status, await h.json()

    status, body, hstatus, health = run([p], [d], scenario)
    assert (status, body["choices"][0]["text"]) == (200, "d")
    assert d.seen == [{"model": "m", "prompt": "x", "max_tokens": 3}]  # no hand-off: decode computes it
    assert hstatus == 200 and health["counters"]["prefill_fallbacks"] == 1
    assert list(health["prefill"].values()) == [broken == "500"]


def test_decode_errors_come_back_with_their_status_and_an_unreachable_decode_is_502():
    from kvlayer.testing import free_port

    async def scenario(c: TestClient) -> Any:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
        return r.status, await r.json()

    status, body = run([Engine("p")], [Engine("d", status=422)], scenario)
    assert status == 422 and body["error"]["message"] == "d says no"
    status, body = run([Engine("p")], [f"http://127.0.0.1:{free_port()}"], scenario)
    assert status == 502 and "unreachable" in body["error"]["message"]


def test_bad_json_is_a_400_and_models_come_from_a_decode_engine():
    async def scenario(c: TestClient) -> Any:
        r = await c.post("/v1/completions", data=b"{nope", headers={"Content-Type": "application/json"})
        m = await c.get("/v1/models")
        return r.status, await r.json(), await m.json()

    status, body, models = run([Engine("p")], [Engine("d")], scenario)
    assert status == 400 and "not JSON" in body["error"]["message"]
    assert models == {"data": [{"id": "d"}]}
