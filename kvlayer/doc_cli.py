"""``kvlayer doc add``: register a document through a running vLLM OpenAI server.

The document's KV must come from the serving model, so the command does not compute anything
itself: it tokenizes the context and the document with the server's own tokenizer (``/tokenize``),
then sends one completion request whose prompt is the token ids ``context + document``, with
``max_tokens=1`` and ``kv_transfer_params = {"kvlayer_document": {"id": ID, "context_tokens":
len(context)}}``. The engine's ``KVLayerBlendConnector`` stores the document's KV and publishes its
record to the shared tiers (docs/blend_vllm.md). Standard library only (no HTTP client needed).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kvlayer.errors import KVLayerError, UsageError


class EngineError(KVLayerError):
    """The engine refused or could not be reached."""


def _call(url: str, body: dict[str, Any] | None = None, timeout: float = 600.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        raise EngineError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EngineError(f"{url}: {e}") from None


def tokenize(engine: str, model: str, text: str, *, special: bool) -> list[int]:
    out = _call(f"{engine}/tokenize", {"model": model, "prompt": text, "add_special_tokens": special})
    return [int(t) for t in out["tokens"]]


def add_document(engine: str, doc_id: str, text: str, *, context: str = "", model: str | None = None,
                 timeout: float = 600.0) -> dict[str, Any]:
    """Register ``text`` as document ``doc_id`` (computed after ``context``) on the engine at
    ``engine`` (``http://host:port``). Returns what was sent (token counts) and the engine's reply."""
    if not doc_id:
        raise UsageError("a document id is required")
    engine = engine.rstrip("/")
    if model is None:
        models = _call(f"{engine}/v1/models", timeout=timeout)["data"]
        if not models:
            raise EngineError(f"{engine} serves no model")
        model = str(models[0]["id"])
    ctx = tokenize(engine, model, context, special=True) if context else []
    # no BOS or other special tokens in the document: it is matched inside prompts, where they are
    # not; whatever a prompt starts with belongs in the context
    doc = tokenize(engine, model, text, special=False)
    if not doc:
        raise UsageError(f"document {doc_id!r} is empty")
    reply = _call(f"{engine}/v1/completions", {
        "model": model, "prompt": ctx + doc, "max_tokens": 1, "temperature": 0.0,
        "kv_transfer_params": {"kvlayer_document": {"id": doc_id, "context_tokens": len(ctx)}},
    }, timeout=timeout)
    return {"id": doc_id, "model": model, "document_tokens": len(doc), "context_tokens": len(ctx),
            "request_id": reply.get("id")}


def add_doc_arguments(sub: Any) -> None:
    p = sub.add_parser("doc", help="documents for CacheBlend on a running engine")
    dsub = p.add_subparsers(dest="doc_command", metavar="SUBCOMMAND", required=True)
    a = dsub.add_parser("add", help="register a document through a vLLM OpenAI server (KVLayerBlendConnector)")
    a.add_argument("--engine", required=True, help="the server's base URL, e.g. http://localhost:8000")
    a.add_argument("--id", required=True, dest="doc_id", help="the document id")
    a.add_argument("--file", required=True, type=Path, help="the document's text")
    a.add_argument("--context-file", type=Path, help="text the document is computed after (e.g. the system prompt)")
    a.add_argument("--model", help="model name on the server (default: the first it serves)")
    a.set_defaults(func=run_doc_add)


def run_doc_add(args: argparse.Namespace) -> int:
    try:
        text = args.file.read_text()
        context = args.context_file.read_text() if args.context_file else ""
    except OSError as e:
        raise UsageError(f"cannot read {e.filename}: {e.strerror}") from None
    out = add_document(args.engine, args.doc_id, text, context=context, model=args.model)
    print(json.dumps(out))
    return 0
