"""The ``kvlayer`` command line.

Sub-commands come from the modules that own them (server, demo, blend); each is registered
lazily so a missing optional dependency disables one command with a hint instead of breaking
the whole CLI.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from kvlayer import __version__
from kvlayer.config import KVLayerConfig, load_config
from kvlayer.errors import ConfigError, KVLayerError

EPILOG = """\
examples:
  kvlayer bench                      measure the CPU and disk tiers on this machine
  kvlayer demo                       vLLM twice over the same long text: cold vs warm TTFT
  kvlayer serve --cpu-bytes 8GiB     a shared cache server for several engines
  kvlayer stats --server localhost:50051
  kvlayer proxy --prefill http://p:8100 --decode http://d:8200   prefill/decode disaggregation
  kvlayer info                       versions, codecs, kernels and the effective config

Configuration: a YAML/TOML/JSON file (--config or KVLAYER_CONFIG), KVLAYER_* environment
variables (e.g. KVLAYER_CPU_BYTES=8GiB), then flags; later sources win.
"""

# Flat config fields exposed as flags on commands that build a cache.
_CONFIG_FLAGS: dict[str, str] = {
    "chunk_size": "tokens per chunk (a multiple of the engine's block size)",
    "cpu_bytes": "CPU tier budget, e.g. 4GiB (0 disables the CPU tier)",
    "cpu_codec": "codec of the CPU tier: raw, lz4, int8, int4, int2, fp8, and '+lz4' forms",
    "disk_path": "directory of the disk tier (no disk tier unless given)",
    "disk_bytes": "disk tier budget, e.g. 100GiB",
    "disk_codec": "codec of the disk tier",
    "redis_url": "Redis tier: redis://[user:pass@]host:port/db, rediss:// (TLS) or unix://",
    "redis_codec": "codec of the Redis tier",
    "server_url": "a shared `kvlayer serve`: host:port",
    "auth_token": "token for the kvlayer server",
    "salt": "extra namespace salt: caches with different salts never share chunks",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cache configuration (overrides file and KVLAYER_* env)")
    g.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON config file (default: $KVLAYER_CONFIG)")
    for field, help_ in _CONFIG_FLAGS.items():
        g.add_argument("--" + field.replace("_", "-"), dest=field, default=None, help=help_)


def config_from_args(args: argparse.Namespace) -> KVLayerConfig:
    cli = {f: getattr(args, f, None) for f in _CONFIG_FLAGS}
    return load_config(getattr(args, "config", None), cli=cli)


# ------------------------------------------------------------------ built-in commands
def _redacted(cfg: dict[str, Any]) -> dict[str, Any]:
    """Config for display: no passwords in URLs, no tokens."""
    import re

    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if k in ("auth_token", "password") and v:
            v = "***"
        elif isinstance(v, str):
            v = re.sub(r"(://[^:/@]*:)[^@]+@", r"\1***@", v)
        elif isinstance(v, dict):
            v = _redacted(v)
        elif isinstance(v, list):
            v = [_redacted(x) if isinstance(x, dict) else x for x in v]
        out[k] = v
    return out


def _cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from kvlayer.codec import available_codecs

    info: dict[str, Any] = {
        "kvlayer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "codecs": available_codecs(),
    }
    try:
        from kvlayer.codec import backend_info  # type: ignore[attr-defined]

        info["codec_backend"] = backend_info()
    except ImportError:
        info["codec_backend"] = {"backend": "torch"}
    for mod in ("vllm", "sglang", "redis", "grpc", "transformers"):
        try:
            m = importlib.import_module(mod)
            info[f"{mod}_version"] = getattr(m, "__version__", "installed")
        except Exception:
            info[f"{mod}_version"] = None
    try:
        info["config"] = _redacted(config_from_args(args).model_dump())
    except ConfigError as e:
        info["config_error"] = str(e)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="kvlayer", show_header=False)
        for k, v in info.items():
            t.add_row(k, json.dumps(v, default=str) if isinstance(v, dict | list) else str(v))
        Console().print(t)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvlayer import bench

    chunks = 6 if args.quick else args.chunks
    res = bench.run(num_chunks=chunks, repeat=2 if args.quick else args.repeat, workdir=args.dir,
                    progress=not args.json)
    if args.json:
        print(json.dumps(res))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"kvlayer store benchmark: {res['num_chunks']} chunks of {res['chunk_mib']} MiB "
                    "(256 tokens, SmolLM2-135M KV shape)")
    for col in ("path", "store GB/s", "retrieve GB/s", "baseline write GB/s", "baseline read GB/s", "vs baseline"):
        t.add_column(col)
    for name, r in res["paths"].items():
        t.add_row(escape(name), str(r["store_gbps"]), str(r["retrieve_gbps"]), str(r["baseline_write_gbps"]),
                  str(r["baseline_read_gbps"]), f"{r['vs_baseline']}x")
    c = Console()
    c.print(t)
    c.print("baselines: torch tensor copy (cpu), plain file write + read of the same bytes (disk); "
            "'vs baseline' compares round trips (store + retrieve).")
    return 0


def _add_builtin(sub: Any) -> None:
    p = sub.add_parser("info", help="versions, codecs, kernel backend and the effective config")
    add_config_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="measure store/retrieve speed of the CPU and disk tiers here",
                       description="Stores and retrieves real-model-shaped chunks (SmolLM2-135M: 30 layers x 3 kv "
                                   "heads x 64 dims, 256 tokens, fp16) through the CPU tier and a disk tier in a "
                                   "temporary directory, next to memcpy and plain-file baselines.")
    p.add_argument("--chunks", type=int, default=24, help="chunks per run (default 24, ~140 MB)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions; the best is reported")
    p.add_argument("--dir", help="work directory for the disk tier (default: a temp dir, removed after)")
    p.add_argument("--quick", action="store_true", help="a few seconds, fewer chunks")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_bench)


def _register_server(sub: Any) -> None:
    from kvlayer.server import add_client_commands, add_serve_arguments, run_serve

    p = sub.add_parser("serve", help="run the shared cache server (gRPC) for several engines",
                       description="A kvlayer cache server: CPU and disk tiers (optionally a Redis tier below) "
                                   "shared by engine processes that use a `remote` tier (server_url).")
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    add_client_commands(sub)


def _register_demo(sub: Any) -> None:
    from kvlayer.demo import add_demo_arguments, run_demo

    p = sub.add_parser("demo", help="vLLM twice over the same long real text: cold vs warm TTFT, same tokens",
                       description="Runs a real small model on vLLM's CPU build twice over one long text with "
                                   "kvlayer attached and prints cold and warm time-to-first-token and both outputs.")
    add_demo_arguments(p)
    p.set_defaults(func=run_demo)


def _register_blend(sub: Any) -> None:
    from kvlayer.blend.cli import add_blend_arguments

    add_blend_arguments(sub)


def _register_proxy(sub: Any) -> None:
    from kvlayer.proxy import add_proxy_arguments, run_proxy

    p = sub.add_parser("proxy", help="one OpenAI endpoint over prefill and decode engines (P/D disaggregation)",
                       description="Sends each completion request to a prefill engine (kv_producer) with "
                                   "max_tokens=1, then to a decode engine (kv_consumer) that loads the prompt's KV "
                                   "from the shared tier; answers and streams as the decode engine does.")
    add_proxy_arguments(p)
    p.set_defaults(func=run_proxy)


def _register_doc(sub: Any) -> None:
    from kvlayer.doc_cli import add_doc_arguments

    add_doc_arguments(sub)


# Optional command providers: (register function, extra to install, command names).
_PROVIDERS: list[tuple[Callable[[Any], None], str, tuple[str, ...]]] = [
    (_register_server, "server", ("serve",)),
    (_register_demo, "vllm", ("demo",)),
    (_register_blend, "blend", ("blend",)),
    (_register_doc, "vllm", ("doc",)),
    (_register_proxy, "proxy", ("proxy",)),
]


def _missing(name: str, extra: str, err: Exception) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"kvlayer {name}: unavailable ({type(err).__name__}: {err}). "
              f"Install it with: pip install 'kvlayer[{extra}]'", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvlayer",
        description="kvlayer: store, move and reuse the KV cache of LLM inference engines (vLLM, SGLang).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvlayer {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_builtin(sub)
    for register, extra, names in _PROVIDERS:
        try:
            register(sub)
        except Exception as e:  # a missing or broken optional module must not break the CLI
            for name in names:
                if name not in sub.choices:
                    p = sub.add_parser(name, help=f"(unavailable: pip install 'kvlayer[{extra}]')")
                    p.set_defaults(func=_missing(name, extra, e))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "allow_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return run_command(args)


EXIT_ERROR = 2  # kvlayer refused: a bad config or a server that cannot start (argparse uses 2 too)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command. kvlayer's own errors (``ConfigError`` and the rest of
    ``KVLayerError``) become one line on stderr and exit code 2, never a traceback; commands
    raise them instead of calling ``sys.exit`` themselves."""
    try:
        return int(args.func(args) or 0)
    except KVLayerError as e:
        print(f"kvlayer {args.command}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
