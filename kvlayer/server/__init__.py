"""The standalone kvlayer cache server (``kvlayer serve``) and its client commands.

    python -m kvlayer.server serve --cpu-bytes 8GiB --disk-path /var/cache/kvlayer
    kvlayer stats --server 127.0.0.1:50051

Engines reach a server through the ``remote`` tier (``server_url=...`` in the config); the
client and wire format live in ``kvlayer.rpc``, below both.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_client_commands", "add_serve_arguments", "run_serve"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not pull in grpc for users who only read its docstring.
    if name in ("add_serve_arguments", "run_serve"):
        from kvlayer.server import app

        return getattr(app, name)
    if name == "add_client_commands":
        from kvlayer.server.commands import add_client_commands

        return add_client_commands
    raise AttributeError(name)
