"""``python -m kvlayer.server serve|stats|lookup|pin|unpin|evict|clear`` (same as ``kvlayer ...``)."""

from __future__ import annotations

import argparse
import sys

from kvlayer.server.app import add_serve_arguments, run_serve
from kvlayer.server.commands import add_client_commands


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvlayer.server", description="kvlayer cache server and its client commands")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("serve", help="run the cache server (gRPC)", description="Run the kvlayer cache server.")
    add_serve_arguments(sp)
    sp.set_defaults(func=run_serve)
    add_client_commands(sub)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
