"""Client subcommands talking to a running server: ``kvlayer stats|lookup|pin|unpin|evict|clear``.

Every command takes ``--server URL`` (env KVLAYER_SERVER_URL), ``--token`` (env
KVLAYER_AUTH_TOKEN), ``--tenant`` (env KVLAYER_TENANT) and ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvlayer.errors import ConfigError, KVLayerError
from kvlayer.server.app import DEFAULT_PORT

_SERVER_HELP = f"server address: host:port, grpc://host:port or grpcs://host:port (env KVLAYER_SERVER_URL; default 127.0.0.1:{DEFAULT_PORT})"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("KVLAYER_SERVER_URL", f"127.0.0.1:{DEFAULT_PORT}"), help=_SERVER_HELP)
    p.add_argument("--token", default=os.environ.get("KVLAYER_AUTH_TOKEN"), help="auth token (env KVLAYER_AUTH_TOKEN)")
    p.add_argument("--tenant", default=os.environ.get("KVLAYER_TENANT"), help="tenant namespace (env KVLAYER_TENANT; default 'default')")
    p.add_argument("--tls-ca", help="PEM CA bundle to verify a grpcs:// server")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before giving up (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _target(p: argparse.ArgumentParser, *, doc: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--keys", help="comma-separated hex chunk keys (or @FILE with one key per line)")
    g.add_argument("--tokens", help="comma-separated token ids (or @FILE: JSON list or whitespace-separated); needs --namespace")
    if doc:
        g.add_argument("--doc", help="a document id registered on the server")
    p.add_argument("--namespace", help="hex KVSpec namespace digest (KVCache.stats()['namespace']) for --tokens")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk for --tokens (default 256)")


def _read_list(value: str) -> list[str]:
    if value.startswith("@"):
        text = Path(value[1:]).read_text()
        if text.lstrip().startswith("["):
            return [str(x) for x in json.loads(text)]
        return text.replace(",", " ").split()
    return [v.strip() for v in value.split(",") if v.strip()]


def _target_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    if args.keys:
        return {"keys": _read_list(args.keys)}
    if args.tokens:
        if not args.namespace:
            raise ConfigError("--tokens needs --namespace (the hex namespace digest of the model's KVSpec)")
        try:
            ns = bytes.fromhex(args.namespace)
        except ValueError:
            raise ConfigError("--namespace must be hex") from None
        return {"tokens": [int(t) for t in _read_list(args.tokens)], "namespace": ns, "chunk_size": args.chunk_size}
    return {"doc_id": args.doc}


def _client(args: argparse.Namespace) -> Any:
    from kvlayer.rpc.client import KVLayerClient

    return KVLayerClient(args.server, token=args.token, tenant=args.tenant, timeout_s=args.timeout, tls_ca=args.tls_ca)


def _emit(args: argparse.Namespace, data: dict[str, Any], render: Callable[[Any], None]) -> None:
    if args.json:
        print(json.dumps(data, sort_keys=True))
        return
    try:
        import shutil

        from rich.console import Console

        render(Console(width=shutil.get_terminal_size((140, 24)).columns))
    except ImportError:  # pragma: no cover - rich is a dependency
        for k, v in data.items():
            print(f"{k}: {v}")


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c not in ("name", "kind", "tier", "key", "counter") else "left")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _human(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1024
    return str(n)


def _run(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def wrapped(args: argparse.Namespace) -> int:
        import grpc

        try:
            return fn(args)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "ERROR"
            detail = e.details() if hasattr(e, "details") else str(e)
            if args.json:
                print(json.dumps({"error": code, "detail": detail}))
            else:
                print(f"error from {args.server}: {code}: {detail}", file=sys.stderr)
            return 2 if code == "UNAVAILABLE" else 1
        except KVLayerError:
            raise  # kvlayer.cli.run_command prints it
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return wrapped


# ---------------------------------------------------------------------- commands
@_run
def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as c:
        s = c.stats()
    tiers = [{f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields} for t in s.tiers]
    data = {"server": args.server, "tenant": s.tenant, "tenant_keys": s.tenant_keys, "tiers": tiers,
            "counters": dict(sorted(s.counters.items()))}

    def render(con: Any) -> None:
        cols = ["name", "kind", "used", "capacity", "keys", "hits", "misses", "evictions", "read", "written", "up"]
        rows = [[t["name"], t["kind"], _human(t["used_bytes"]), _human(t["capacity_bytes"]) if t["capacity_bytes"] else "-",
                 t["num_keys"], t["hits"], t["misses"], t["evictions"], _human(t["bytes_read"]),
                 _human(t["bytes_written"]), t["available"]] for t in tiers]
        con.print(_table(f"kvlayer server {args.server} (tenant {s.tenant}: {s.tenant_keys} keys)", cols, rows))
        con.print(_table("counters", ["counter", "value"], [[k, v] for k, v in data["counters"].items()]))

    _emit(args, data, render)
    return 0


@_run
def cmd_lookup(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.lookup(**_target_kwargs(args))
    data = {"hit_chunks": r.hit_chunks, "num_chunks": r.num_chunks, "hit_tokens": r.hit_tokens, "tiers": list(r.tiers)}

    def render(con: Any) -> None:
        con.print(f"[bold]{r.hit_chunks}[/bold] of {r.num_chunks} chunks cached as a prefix"
                  + (f" ({r.hit_tokens} tokens)" if r.hit_tokens else ""))
        if r.tiers:
            con.print(_table("", ["chunk", "tier"], [[i, t] for i, t in enumerate(r.tiers)]))

    _emit(args, data, render)
    return 0


@_run
def cmd_pin(args: argparse.Namespace) -> int:
    with _client(args) as c:
        r = c.pin(ttl_s=args.ttl or 0.0, **_target_kwargs(args))
    data = {"lease_id": r.lease_id, "num_keys": r.num_keys, "ttl_s": args.ttl}
    _emit(args, data, lambda con: con.print(
        f"pinned {r.num_keys} chunks; lease [bold]{r.lease_id}[/bold]"
        + (f" (expires in {args.ttl:g}s)" if args.ttl else "") + f"\nrelease with: kvlayer unpin --lease {r.lease_id}"))
    return 0


@_run
def cmd_unpin(args: argparse.Namespace) -> int:
    with _client(args) as c:
        n = c.unpin(args.lease) if args.lease else c.unpin(doc_id=args.doc)
    _emit(args, {"released": n}, lambda con: con.print(f"released {n} lease(s)"))
    return 0 if n or args.doc else 1


@_run
def cmd_evict(args: argparse.Namespace) -> int:
    with _client(args) as c:
        n = c.evict(force=args.force, **_target_kwargs(args))
    _emit(args, {"removed": n}, lambda con: con.print(f"removed {n} chunk(s)" + ("" if args.force else
                                                       " (pinned chunks kept; --force removes them too)")))
    return 0


@_run
def cmd_clear(args: argparse.Namespace) -> int:
    with _client(args) as c:
        n = c.clear(all_tenants=args.all_tenants)
    who = "all tenants" if args.all_tenants else f"tenant {args.tenant or 'default'}"
    _emit(args, {"removed": n}, lambda con: con.print(f"cleared {who}: {n} chunk(s) removed"))
    return 0


def add_client_commands(subparsers: Any) -> None:
    """Register stats/lookup/pin/unpin/evict/clear on an ``add_subparsers()`` object."""
    specs: list[tuple[str, str, str, Callable[[argparse.Namespace], int]]] = [
        ("stats", "show a server's tiers and counters",
         "Show the server's tiers (used/capacity, keys, hits, misses, evictions, bytes moved) and its counters.",
         cmd_stats),
        ("lookup", "how much of a prefix the server holds (moves no data)",
         "Report the longest cached prefix of a key chain or token sequence and the tier of each chunk.", cmd_lookup),
        ("pin", "pin chunks, a prefix or a document against eviction",
         "Pin chunks on the server; prints a lease id for `unpin`. Pins are leases: --ttl makes them expire.", cmd_pin),
        ("unpin", "release a pin lease (or every lease on a document)", "Release a lease from `pin`.", cmd_unpin),
        ("evict", "remove chunks, a prefix or a document from every tier",
         "Remove chunks from all server tiers. Pinned chunks stay unless --force.", cmd_evict),
        ("clear", "remove everything of your tenant (or of all tenants)",
         "Remove every chunk, pin and document of the tenant (--all-tenants: of the whole server; admin token).",
         cmd_clear),
    ]
    for name, short, desc, fn in specs:
        p = subparsers.add_parser(name, help=short, description=desc)
        _common(p)
        if name in ("lookup", "pin", "evict"):
            _target(p)
        if name == "pin":
            p.add_argument("--ttl", type=float, default=None, help="seconds until the pin expires (default: never)")
        if name == "unpin":
            g = p.add_mutually_exclusive_group(required=True)
            g.add_argument("--lease", help="lease id printed by `pin`")
            g.add_argument("--doc", help="release every lease on this document")
        if name == "evict":
            p.add_argument("--force", action="store_true", help="also remove pinned chunks")
        if name == "clear":
            p.add_argument("--all-tenants", action="store_true", help="clear the whole server (needs the admin token)")
        p.set_defaults(func=fn)
