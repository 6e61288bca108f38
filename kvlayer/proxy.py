"""``kvlayer proxy``: one OpenAI-compatible endpoint in front of prefill and decode engines.

    kvlayer proxy --prefill http://p0:8100,http://p1:8100 --decode http://d0:8200 --port 8000

Each ``/v1/completions`` or ``/v1/chat/completions`` request goes first to a prefill engine
(round robin) as the same request with ``max_tokens=1`` and no streaming: that engine, a vLLM
with kvlayer as ``kv_producer``, computes the prompt and saves its KV to the shared tier. Its
answer's ``kv_transfer_params`` (kvlayer's hand-off: how many prompt tokens it saved) go with the
original request to a decode engine (``kv_consumer``), which loads the prompt instead of
computing it and streams or returns the answer; the client gets the decode engine's answer,
status and stream as they are.

Failures: a prefill engine that answers 4xx rejected the request itself (the decode engine would
too), so that answer goes back to the client as it is. A prefill engine that is down, times out
or answers 5xx only costs the decode engine the prefill: the request goes on to decode without a
hand-off and is computed there (counted as ``prefill_fallbacks``). A decode engine that cannot
be reached is a 502.

Built on aiohttp (server and client, streaming without buffering); it is in the ``proxy``
extra and already installed with vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvlayer.errors import ConfigError

log = logging.getLogger("kvlayer.proxy")

#: the OpenAI routes split into a prefill and a decode request
ROUTES = ("/v1/completions", "/v1/chat/completions")
#: request fields that only shape the answer's length or form: the prefill request must not
#: carry them (it answers one token, whole, once)
_PREFILL_DROP = ("stream_options", "min_tokens", "best_of", "n")
#: the hand-off's key in ``kv_transfer_params`` (``kvlayer.connectors.vllm.roles.PD_PARAM``; not
#: imported: the proxy runs without vLLM)
HANDOFF_KEY = "kvlayer_pd"
#: headers passed on to the engines (authentication, tracing)
_FORWARD_HEADERS = ("authorization", "x-request-id", "traceparent", "tracestate")


def parse_urls(text: str | Sequence[str], what: str) -> list[str]:
    """``"http://a:1,http://b:2"`` -> a list of base URLs without a trailing slash."""
    parts = text.split(",") if isinstance(text, str) else [p for t in text for p in t.split(",")]
    urls = [p.strip().rstrip("/") for p in parts if p.strip()]
    if not urls:
        raise ConfigError(f"kvlayer proxy: give at least one {what} engine URL")
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise ConfigError(f"kvlayer proxy: {what} engine URL {u!r} must start with http:// or https://")
    return urls


def _client_params(body: dict[str, Any]) -> dict[str, Any]:
    """The client's own ``kv_transfer_params`` (e.g. ``kvlayer_skip``), never a hand-off: only a
    prefill engine's answer may announce one."""
    params = body.get("kv_transfer_params")
    return {k: v for k, v in params.items() if k != HANDOFF_KEY} if isinstance(params, dict) else {}


def _with_params(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    if params:
        out["kv_transfer_params"] = params
    return out


def prefill_request(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill engine's version of a client request: one token, not streamed, one choice."""
    out = _with_params({k: copy.deepcopy(v) for k, v in body.items() if k not in _PREFILL_DROP}, _client_params(body))
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:  # chat: the newer name wins in vLLM
        out["max_completion_tokens"] = 1
    out["stream"] = False
    return out


def decode_request(body: dict[str, Any], handoff: dict[str, Any] | None) -> dict[str, Any]:
    """The decode engine's version: the client's request plus the prefill engine's hand-off."""
    return _with_params(body, {**_client_params(body), **(handoff or {})})


def error_body(status: int, message: str) -> dict[str, Any]:
    """An error in the shape OpenAI clients parse."""
    return {"error": {"message": message, "type": "proxy_error", "code": status}}


@dataclass
class Counters:
    requests: int = 0
    prefill_fallbacks: int = 0  # prefill engine down or 5xx: decoded without a hand-off
    prefill_rejected: int = 0  # prefill engine answered 4xx: passed back
    decode_errors: int = 0  # decode engine unreachable (502) or answered an error status

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Pool:
    """Engines of one kind, taken in turn."""

    urls: list[str]
    _turn: Iterator[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._turn = itertools.cycle(self.urls)

    def next(self) -> str:
        return next(self._turn)


class Proxy:
    def __init__(self, prefill: Sequence[str], decode: Sequence[str], *, timeout_s: float = 600.0,
                 connect_timeout_s: float = 10.0) -> None:
        self.prefill = Pool(list(prefill))
        self.decode = Pool(list(decode))
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.counters = Counters()
        self._session: Any = None

    # ------------------------------------------------------------------ app
    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=64 << 20)
        for route in ROUTES:
            app.router.add_post(route, self.handle)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: Any) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)

    async def _stop(self, _app: Any) -> None:
        if self._session is not None:
            await self._session.close()

    @staticmethod
    def _json(status: int, data: dict[str, Any]) -> Any:
        from aiohttp import web

        return web.json_response(data, status=status)

    # ------------------------------------------------------------------ routes
    async def handle(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        self.counters.requests += 1
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._json(400, error_body(400, f"request body is not JSON: {e}"))
        if not isinstance(body, dict):
            return self._json(400, error_body(400, "request body must be a JSON object"))
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_HEADERS}
        path = request.path
        handoff, rejected = await self._prefill(path, body, headers)
        if rejected is not None:
            return rejected
        url = self.decode.next()
        log.debug("%s: decode on %s with hand-off %s", path, url, handoff)
        try:
            upstream = await self._session.post(url + path, json=decode_request(body, handoff), headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            self.counters.decode_errors += 1
            log.warning("decode engine %s unreachable: %s", url, e)
            return self._json(502, error_body(502, f"decode engine {url} unreachable: {type(e).__name__}: {e}"))
        async with upstream:
            if upstream.status >= 400:
                self.counters.decode_errors += 1
            if not body.get("stream") or upstream.status != 200:
                return web.Response(status=upstream.status, body=await upstream.read(),
                                    content_type=upstream.content_type)
            out = web.StreamResponse(status=200, headers={"Content-Type": upstream.headers.get(
                "Content-Type", "text/event-stream"), "Cache-Control": "no-cache"})
            await out.prepare(request)
            async for data in upstream.content.iter_any():
                await out.write(data)
            await out.write_eof()
            return out

    async def _prefill(self, path: str, body: dict[str, Any], headers: dict[str, str]
                       ) -> tuple[dict[str, Any] | None, Any]:
        """(the hand-off for the decode request, or the client's answer when prefill rejected it)."""
        import aiohttp
        from aiohttp import web

        url = self.prefill.next()
        try:
            async with self._session.post(url + path, json=prefill_request(body), headers=headers) as r:
                data = await r.read()
                if 400 <= r.status < 500:
                    self.counters.prefill_rejected += 1
                    return None, web.Response(status=r.status, body=data, content_type=r.content_type)
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status, message=data[:200].decode(
                        errors="replace"))
                params = json.loads(data).get("kv_transfer_params")
                return (params if isinstance(params, dict) else None), None
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, AttributeError) as e:
            self.counters.prefill_fallbacks += 1
            log.warning("prefill engine %s failed (%s: %s); the decode engine computes the prompt", url,
                        type(e).__name__, e)
            return None, None

    async def models(self, request: Any) -> Any:
        import aiohttp
        from aiohttp import web

        url = self.decode.next()
        try:
            async with self._session.get(url + "/v1/models") as r:
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return self._json(502, error_body(502, f"decode engine {url} unreachable: {e}"))

    async def health(self, request: Any) -> Any:
        """200 while at least one decode engine is healthy (prefill engines are optional: without
        them decode computes prompts itself); the body lists every engine's state."""
        import aiohttp

        async def ok(url: str) -> bool:
            try:
                async with self._session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    return bool(r.status == 200)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

        urls = self.prefill.urls + self.decode.urls
        states = dict(zip(urls, await asyncio.gather(*(ok(u) for u in urls)), strict=True))
        decode = {u: states[u] for u in self.decode.urls}
        data = {"prefill": {u: states[u] for u in self.prefill.urls}, "decode": decode,
                "counters": self.counters.as_dict()}
        return self._json(200 if any(decode.values()) else 503, data)


# ---------------------------------------------------------------------- command line
def add_proxy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", required=True, action="append", metavar="URL[,URL]",
                   help="prefill engines (vLLM OpenAI servers with kv_role kv_producer)")
    p.add_argument("--decode", required=True, action="append", metavar="URL[,URL]",
                   help="decode engines (vLLM OpenAI servers with kv_role kv_consumer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="longest an engine may take for one request")


def run_proxy(args: argparse.Namespace) -> int:
    from aiohttp import web

    proxy = Proxy(parse_urls(args.prefill, "prefill"), parse_urls(args.decode, "decode"), timeout_s=args.timeout_s)
    log.info("kvlayer proxy on %s:%d: prefill %s, decode %s", args.host, args.port, proxy.prefill.urls,
             proxy.decode.urls)
    web.run_app(proxy.app(), host=args.host, port=args.port, print=None, access_log=None)
    return 0
