"""The ``kvlayer serve`` process: flags, tier set-up, the gRPC server, signals and /metrics.

Memory: ``--cpu-bytes`` is the budget for everything clients can make the server hold in RAM.
It is split (``kvlayer.server.memory``) between the CPU tier, the write-through queue to lower
tiers, the in-flight upload buffers, room for requests being received and decoded (one message
of at most ``--frame-bytes`` + 64 KiB per handler thread, twice over), and the quota of pins,
leases and documents (``--metadata-bytes``, per tenant ``--tenant-metadata-bytes``); each part
refuses with RESOURCE_EXHAUSTED when full, so the resident size stays near (baseline
interpreter) + budget however clients behave, and a ``MemoryGuard`` hands heap holes back to the
OS when fragmentation would push RSS past that.

Beside the budget, not in it: keys per request (``Limits.max_keys``), tokens per request
(``Limits.max_tokens``) and RPCs in progress (``--max-concurrent-rpcs``, also the HTTP/2 streams
one connection may open) are capped. Open connections are in the budget: gRPC's transport state
costs ~17 KiB per idle connection (measured), so ``--max-connections`` (default: as many as 1/32
of the budget pays for at 32 KiB each, 64-2048) caps them through gRPC core's
``grpc.max_allowed_incoming_connections`` (connections past it are closed at once; a client
retries on its next call), and idle ones are closed after ``--idle-timeout-s``. The CPU tier
charges each key's bookkeeping besides its bytes (``MemoryTier.SERVER_KEY_OVERHEAD``), so a
flood of tiny blobs evicts instead of outgrowing the budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

from kvlayer.config import default_cache_dir, load_config, parse_size
from kvlayer.errors import ConfigError
from kvlayer.server.memory import Budget, MemoryGuard, split_budget

log = logging.getLogger("kvlayer.server")

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464


def _size(v: str) -> int:
    try:
        return parse_size(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``kvlayer serve`` (also ``python -m kvlayer.server serve``)."""
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: loopback only; use 0.0.0.0 with --auth-token and TLS)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"gRPC port (default {DEFAULT_PORT}; 0 = any free port)")
    g.add_argument("--unix-socket", metavar="PATH",
                   help="also listen on this Unix domain socket (clients: unix:///PATH; same host, no TCP; "
                        "access controlled by the file's permissions, no TLS)")
    g.add_argument("--ready-file", help="write {port, metrics_port, pid} as JSON here once serving (for scripts/tests)")
    g.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (clients use grpcs://host:port)")
    g.add_argument("--tls-key", help="PEM private key for --tls-cert")
    g.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    g.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"Prometheus /metrics port on --host (default {DEFAULT_METRICS_PORT}; 0 = off; -1 = any free port)")

    g = p.add_argument_group("storage")
    g.add_argument("--config", help="kvlayer config file (YAML/TOML/JSON); flags below override it")
    g.add_argument("--cpu-bytes", type=_size, default=None,
                   help="RAM budget for blob data: CPU tier + write queue + in-flight uploads + frame buffers (default 4GiB)")
    g.add_argument("--disk-path", help=f"disk tier directory (default {default_cache_dir() / 'server'})")
    g.add_argument("--disk-bytes", type=_size, default=None, help="disk tier budget (default 16GiB)")
    g.add_argument("--no-disk", action="store_true", help="no disk tier")
    g.add_argument("--redis-url", help="Redis tier below the disk tier, e.g. redis://127.0.0.1:6379/0")
    g.add_argument("--durable", action="store_true",
                   help="acknowledge every Put only after the blob is in the disk tier (clients can also ask per Put)")
    g.add_argument("--fsync", action="store_true", help="fsync disk-tier files before acknowledging (power-loss safety)")

    g = p.add_argument_group("security and limits")
    g.add_argument("--auth-token", default=os.environ.get("KVLAYER_AUTH_TOKEN"),
                   help="require 'authorization: Bearer TOKEN' (any tenant, may clear all); env KVLAYER_AUTH_TOKEN")
    g.add_argument("--auth-token-file", help="read the auth token from this file")
    g.add_argument("--tenant-token", action="append", default=[], metavar="TENANT=TOKEN",
                   help="a token that grants only TENANT (repeatable)")
    g.add_argument("--max-blob-bytes", type=_size, default=_size("256MiB"), help="largest blob accepted (default 256MiB)")
    g.add_argument("--max-request-bytes", type=_size, default=_size("2GiB"),
                   help="most blob bytes one Put or Get may move (default 2GiB)")
    g.add_argument("--inflight-bytes", type=_size, default=None,
                   help="RAM for blobs being uploaded, part of --cpu-bytes (default 1/8 of it, 8MiB..512MiB)")
    g.add_argument("--write-queue-bytes", type=_size, default=None,
                   help="RAM for blobs queued for lower tiers, part of --cpu-bytes (default 1/8 of it, 8MiB..512MiB)")
    g.add_argument("--metadata-bytes", type=_size, default=None,
                   help="RAM for pins, leases and documents of all tenants, part of --cpu-bytes (default 1/16 of it, "
                        "4MiB..256MiB); more are refused with RESOURCE_EXHAUSTED")
    g.add_argument("--tenant-metadata-bytes", type=_size, default=None,
                   help="the share of --metadata-bytes one tenant may hold (default: all of it, or an equal share "
                        "per --tenant-token plus one)")
    g.add_argument("--max-tenants", type=int, default=1024, help="tenants holding pins or documents at once (default 1024)")
    g.add_argument("--idle-timeout-s", type=float, default=600.0,
                   help="close connections idle this long (clients reconnect on their next call; default 600)")
    g.add_argument("--max-concurrent-rpcs", type=int, default=64,
                   help="RPCs in progress at once; more are refused with RESOURCE_EXHAUSTED (default 64)")
    g.add_argument("--max-connections", type=int, default=None,
                   help="open client connections at once, 32 KiB of --cpu-bytes each; more are closed at once "
                        "(default: 1/32 of the budget's worth, 64..2048)")
    g.add_argument("--workers", type=int, default=16, help="handler threads (default 16)")
    g.add_argument("--frame-bytes", type=_size, default=_size("1MiB"), help="bytes per Get stream frame (default 1MiB)")
    g.add_argument("--grace-s", type=float, default=30.0, help="SIGTERM: seconds to finish in-flight RPCs (default 30)")
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


class ServerApp:
    """Builds and runs one server; ``stop()`` is the graceful path SIGTERM takes."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Raises ``ConfigError`` (the CLI prints it and exits 2) for anything that stops a start."""
        from kvlayer.server.service import client_key
        from kvlayer.storage import BlobStore, build_tier, retry_policy
        from kvlayer.storage.blobstore import Formats
        from kvlayer.storage.memory import MemoryTier

        self.args = args
        cli: dict[str, Any] = {"cpu_bytes": args.cpu_bytes, "disk_bytes": args.disk_bytes, "redis_url": args.redis_url,
                               "disk_path": None if args.no_disk else (args.disk_path or str(default_cache_dir() / "server"))}
        cfg = load_config(args.config, cli=cli)
        tcs = [tc for tc in cfg.tier_configs() if tc.kind != "remote"]
        mem_tcs = [tc for tc in tcs if tc.kind == "memory"]
        if not tcs:
            raise ConfigError("no storage tier: give --cpu-bytes > 0, a disk tier or --redis-url")
        budget = split_budget(cfg.cpu_bytes, args.inflight_bytes, args.write_queue_bytes,
                              lower_tiers=len(tcs) > len(mem_tcs), workers=args.workers, frame_bytes=args.frame_bytes,
                              metadata=args.metadata_bytes, max_connections=args.max_connections)
        tiers, retry = [], []
        for tc in tcs:
            if tc.kind == "memory":
                tc = tc.model_copy(update={"capacity": budget.memory_tier, "options": {
                    "key_overhead": MemoryTier.SERVER_KEY_OVERHEAD, **tc.options}})  # any client's blobs
                if budget.memory_tier <= 0:
                    continue
            if tc.kind == "disk":
                tc = tc.model_copy(update={"options": {**tc.options, "fsync": bool(args.fsync)}})
            try:
                tiers.append(build_tier(tc))
                retry.append(retry_policy(tc))
            except OSError as e:
                raise ConfigError(f"cannot open the {tc.kind} tier: {e}") from e
        if not tiers:
            raise ConfigError("no storage tier: give --cpu-bytes > 0, a disk tier or --redis-url")
        self.budget = budget
        self.store = BlobStore(tiers, formats=Formats(key_of=client_key),  # blobs are bound to clients' keys
                               write_queue_bytes=max(1, budget.write_queue), retry=retry)
        try:
            if args.durable and self.store.disk_level is None:
                raise ConfigError("--durable needs a disk tier (drop --no-disk)")
            self._build_server(args, budget)
        except BaseException:
            self.store.close()  # a refused start leaves no writer thread or open tier behind
            raise
        self.metrics_port = 0
        self._stop = threading.Event()

    def _build_server(self, args: argparse.Namespace, budget: Budget) -> None:
        import grpc

        from kvlayer.server.metrics import ServerMetrics
        from kvlayer.server.service import Auth, KVLayerServicer, Limits, add_to_server
        from kvlayer.server.tenants import TenantLimits
        from kvlayer.storage.disk import DiskTier

        self.metrics = ServerMetrics(self.store.stats)
        token = _read(args.auth_token_file, "--auth-token-file").decode().strip() if args.auth_token_file else args.auth_token
        tenant_tokens = {}
        for tt in args.tenant_token:
            t, sep, tok = tt.partition("=")
            if not sep or not t or not tok:
                raise ConfigError(f"--tenant-token {tt!r}: expected TENANT=TOKEN")
            tenant_tokens[t] = tok
        # One frame plus protobuf framing must fit a message; nothing larger is accepted or sent.
        max_msg = max(1 << 20, args.frame_bytes) + (64 << 10)
        share = budget.metadata // (len(tenant_tokens) + 1) if tenant_tokens else budget.metadata
        tenant_limits = TenantLimits(metadata_bytes=budget.metadata, max_tenants=max(1, args.max_tenants),
                                     tenant_bytes=min(budget.metadata, args.tenant_metadata_bytes or share))
        limits = Limits(max_blob_bytes=args.max_blob_bytes, max_request_bytes=args.max_request_bytes,
                        inflight_bytes=budget.inflight, frame_bytes=args.frame_bytes, max_message_bytes=max_msg,
                        tenants=tenant_limits)
        disk = next((lv.tier for lv in self.store.levels if isinstance(lv.tier, DiskTier)), None)
        docs_path = str(disk.root / "documents.json") if disk is not None else None
        self.servicer = KVLayerServicer(self.store, limits=limits, auth=Auth(token or None, tenant_tokens),
                                        durable=args.durable, metrics=self.metrics, docs_path=docs_path)
        options = [
            ("grpc.max_receive_message_length", max_msg),
            ("grpc.max_send_message_length", max_msg),
            ("grpc.max_metadata_size", 16 << 10),
            # Per connection. Safe only because no request can leave a stream open once its status
            # is sent (see ``kvlayer.server.service``: handlers decode, grpcio never does).
            ("grpc.max_concurrent_streams", max(1, args.max_concurrent_rpcs)),
            ("grpc.max_connection_idle_ms", max(1000, int(args.idle_timeout_s * 1000))),
            ("grpc.max_allowed_incoming_connections", budget.max_connections),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="kvlayer-rpc"),
                                  options=options, maximum_concurrent_rpcs=args.max_concurrent_rpcs)
        add_to_server(self.servicer, self.server)
        addr = f"{args.host}:{args.port}"
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                raise ConfigError("TLS needs both --tls-cert and --tls-key")
            ca = _read(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca else None
            creds = grpc.ssl_server_credentials([(_read(args.tls_key, "--tls-key"), _read(args.tls_cert, "--tls-cert"))],
                                                root_certificates=ca, require_client_auth=ca is not None)
            self.port = _bind(lambda: self.server.add_secure_port(addr, creds), addr)
        else:
            self.port = _bind(lambda: self.server.add_insecure_port(addr), addr)
        if args.unix_socket:
            sock = Path(args.unix_socket)
            try:
                if sock.is_socket():
                    sock.unlink()  # left by a killed server
                sock.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--unix-socket {sock}: {e}") from e
            _bind(lambda: self.server.add_insecure_port(f"unix:{sock.resolve()}"), f"unix socket {sock}")

    def start(self) -> None:
        self.server.start()
        a = self.args
        if a.metrics_port:
            self.metrics_port = self.metrics.serve(a.host, 0 if a.metrics_port < 0 else a.metrics_port)
        tiers = ", ".join(f"{lv.tier.kind}:{lv.name}({lv.tier.capacity_bytes >> 20}MiB)" for lv in self.store.levels)
        log.info("kvlayer serve on %s:%d (tls=%s, auth=%s, durable=%s) tiers [%s]; in-flight %dMiB, queue %dMiB, "
                 "frames %dMiB, metadata %dMiB, %d connections; metrics on port %s", a.host, self.port, bool(a.tls_cert),
                 self.servicer.auth.enabled, a.durable, tiers, self.budget.inflight >> 20, self.budget.write_queue >> 20,
                 self.budget.frames >> 20, self.budget.metadata >> 20, self.budget.max_connections,
                 self.metrics_port or "off")
        if a.host not in ("127.0.0.1", "localhost", "::1") and not self.servicer.auth.enabled:
            log.warning("serving on %s without --auth-token: anyone who can reach port %d can read, write and clear "
                        "this cache", a.host, self.port)
        if a.ready_file:
            tmp = Path(a.ready_file + ".tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"port": self.port, "metrics_port": self.metrics_port, "pid": os.getpid(),
                                       "host": a.host, "unix_socket": a.unix_socket}))
            os.replace(tmp, a.ready_file)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        """Refuse new RPCs, let in-flight ones finish (up to --grace-s), flush queued disk writes."""
        t0 = time.monotonic()
        self.servicer.draining = True
        log.info("stopping: finishing in-flight requests (grace %.0fs)", self.args.grace_s)
        self.server.stop(self.args.grace_s).wait()
        self.store.close()  # flushes the write-through queue and closes tiers
        self.metrics.close()
        log.info("stopped in %.2fs", time.monotonic() - t0)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror or e}") from e


def _bind(add_port: Any, what: str) -> int:
    """grpcio answers a failed bind with port 0 or (newer versions) a RuntimeError."""
    try:
        port = int(add_port())
    except RuntimeError as e:
        raise ConfigError(f"cannot bind {what}: {e}") from e
    if port == 0:
        raise ConfigError(f"cannot bind {what} (in use, or not an address of this host?)")
    return port


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of ``kvlayer serve``: runs until SIGTERM/SIGINT, then shuts down gracefully."""
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kvlayer").setLevel(level)  # also when the CLI configured logging before us
    for h in logging.getLogger().handlers:
        h.setLevel(min(h.level or level, level))
    app = ServerApp(args)
    signal.signal(signal.SIGTERM, app.request_stop)
    signal.signal(signal.SIGINT, app.request_stop)
    gc.collect()
    gc.freeze()  # start-up objects (torch, grpc, ...) are never garbage: keep them out of GC scans
    guard = MemoryGuard(app.budget.total)
    guard.start()
    app.servicer.memory_guard = guard
    app.start()
    app.wait()
    app.stop()
    guard.stop()
    return 0
