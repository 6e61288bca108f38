"""``python -m kvlayer.server serve|stats|lookup|pin|unpin|evict|clear`` (same as ``kvlayer ...``,
without the commands of other extras, so it starts faster)."""

from __future__ import annotations

import argparse
import sys

from kvlayer.cli import run_command
from kvlayer.server.app import add_serve_arguments, run_serve
from kvlayer.server.commands import add_client_commands


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvlayer.server", description="kvlayer cache server and its client commands")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("serve", help="run the cache server (gRPC)", description="Run the kvlayer cache server.")
    add_serve_arguments(sp)
    sp.set_defaults(func=run_serve)
    add_client_commands(sub)
    return run_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
