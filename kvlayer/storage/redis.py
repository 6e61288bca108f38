"""Redis / Redis Cluster / Valkey tier on redis-py (+hiredis): the shared, scale-out level.

URLs: ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS), ``unix:///path.sock?db=0``.
Cluster mode: the scheme ``redis+cluster://`` / ``rediss+cluster://`` or ``options={"cluster": true}``
(``options["nodes"] = ["host:port", ...]`` adds more seed nodes). Username and password come from
the URL or from ``options`` (``username``, ``password``). Other options (all optional)::

    prefix            key prefix, default "kvlayer:<tier name>:"   (no "{" or "}")
    ttl_s             expire every value after this many seconds   (default: never)
    max_value_bytes   larger values are split into equal parts of at most this size (default 64 MiB)
    connections       parallel connections a big batch is split across (default 4)
    socket_timeout, connect_timeout   seconds (defaults 2.0, 0.5): a hung server costs at most that
    retries           redis-py retries of a failed command, exponential backoff (default 1)
    packer            "python" (default: sends values from memoryviews, no copy) or "hiredis"
                      (redis-py's default, which copies every value twice: 4-8x the client CPU per GB)
    ssl_*             passed to redis-py (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs...)

Nothing connects at construction: a server (or Cluster) that is down when the engine starts only
makes the first operations fail. Batches are redis-py pipelines split across ``connections``
pooled connections (per Cluster node) run by a small thread pool; a dead Cluster node costs only
its own keys, and MOVED/ASK replies are redone through redis-py's Cluster pipeline, which follows
them. Replies are parsed by redis-py's hiredis parser (``redis[hiredis]``; a warning is logged if
it is missing): a value of 64 KiB or more is copied, on its connection's thread, from the
``bytes`` object hiredis builds into a recycled buffer of ``kvlayer.codec.buffers`` (memory already
faulted in; the ``bytes`` is freed at once, so the next reply reuses it), and the caller gets a
writable memoryview of that buffer; a split value is joined into one such buffer. No client
library offered here receives a value into a buffer of the caller's (hiredis copies each reply
twice: into its read buffer, then into the ``bytes``), which is what LMCache's native RESP client
does, and why it reads with less client CPU (0.2 vs 0.5 s/GB on the test box).
Writes send memoryviews through redis-py's Python command packer: no copy of the value in the
client (0.25 vs ~1.1 client CPU s/GB with redis-py's default hiredis packer on the test box).

Layout: a value lives at ``<prefix>{<key>}``. A value above ``max_value_bytes`` is stored as parts
``<prefix>{<key>}:<nonce>:<i>`` plus a 36-byte manifest under the main key (magic, total length,
part count, part size, nonce); the hash tag keeps all of a value on one Cluster slot so its parts
travel in one pipeline. Parts are written before the manifest and a reader only follows the
manifest's nonce, so a reader never mixes two writers' parts; a missing or short part is a miss
(the manifest is then removed), never a partial blob. Blob headers/checksums are verified by the
store (``get_opened``: on the thread of the connection that read the value; the store deletes
what fails). A stored value that is exactly 36 bytes and
starts with the manifest magic ``\\x00kvlPRT1`` would be read as a manifest; kvlayer blobs start
with ``KVLB``, so only foreign values could.

Failures raise ``TierError``; the store's breaker for this tier (``retry_after_s``, ``retry_max_s``,
``retry_multiplier`` of its TierConfig) turns them into misses / dropped writes and counts them. Eviction is Redis's job: run it with ``maxmemory`` and ``maxmemory-policy allkeys-lru``;
``capacity`` only refuses single values larger than it, and pins are not enforced inside Redis
(other processes share it). ``used_bytes`` is Redis's own ``used_memory`` (summed over Cluster
primaries, cached for a second): the whole server, an approximation of this tier's share.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
from pydantic import ConfigDict, Field, field_validator, model_validator
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import (
    Connection,
    PythonRespSerializer,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from kvlayer.codec.base import Buffer
from kvlayer.codec.buffers import MIN_POOLED, POOL
from kvlayer.config import TierConfig
from kvlayer.errors import ConfigError, CorruptBlobError, TierError
from kvlayer.storage.base import Tier, TierOptions, TierStats, opened
from kvlayer.units import parse_size

log = logging.getLogger(__name__)
T = TypeVar("T")
J = TypeVar("J")
R = TypeVar("R")

MANIFEST_MAGIC = b"\x00kvlPRT1"
_MANIFEST = struct.Struct("<8sQIQ8s")  # magic, total_len, n_parts, part_size, nonce
MANIFEST_LEN = _MANIFEST.size  # 36
_DEL_IF_EQUAL = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_REDIRECTS = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError)
_NET_ERRORS: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)
_CLUSTER_DOWN: tuple[type[BaseException], ...] = (redis.exceptions.ClusterDownError, redis.exceptions.ClusterError,
                                                  redis.exceptions.RedisClusterException)

_SOCKET_READ_SIZE = 1 << 20
_REPLY_WINDOW = 8 << 20  # bytes of GET replies a connection asks for per round trip

if not HIREDIS_AVAILABLE:
    log.warning("hiredis is not installed: redis-py parses replies in Python (pip install 'redis[hiredis]')")


# --- connections for multi-MiB values ----------------------------------------------------------------
#: reply buffer hiredis keeps between replies. Its default (16 KiB) frees the buffer after every
#: reply, so each multi-MiB GET regrew it from nothing in fresh pages: 1.3k page faults and 0.82
#: client CPU s/GB for 5.6 MiB values, 0.66 kept (redis-py alone, test box).
_READER_KEEP = 16 << 20


class _BlobConn:
    """Mixin for redis-py connections: hiredis keeps its reply buffer (``_READER_KEEP``), and with
    ``python_packer`` large values are sent as they are (redis-py's hiredis packer turns every
    memoryview into bytes and then packs a joined copy: two copies of a multi-MB value)."""

    python_packer = True

    def _construct_command_packer(self, packer: Any) -> Any:
        if packer is not None or not self.python_packer:
            return super()._construct_command_packer(packer)  # type: ignore[misc]
        return PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)  # type: ignore[attr-defined]

    def on_connect_check_health(self, check_health: bool = True) -> None:
        super().on_connect_check_health(check_health)  # type: ignore[misc]
        reader = getattr(getattr(self, "_parser", None), "_reader", None)
        if reader is not None and hasattr(reader, "setmaxbuf"):
            reader.setmaxbuf(_READER_KEEP)


class _Conn(_BlobConn, Connection):
    pass


class _SSLConn(_BlobConn, SSLConnection):
    pass


class _UnixConn(_BlobConn, UnixDomainSocketConnection):
    pass


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


_FAILED: Any = object()  # a key whose connection failed (as opposed to a key Redis does not have)


def _pooled(v: Any) -> Any:
    """A large reply copied into a recycled blob buffer (``kvlayer.codec.buffers``), its ``bytes``
    dropped at once; anything else as it is. Why a copy: hiredis builds each reply as a fresh
    ``bytes`` object, and glibc serves multi-MiB ones from fresh pages and gives them back when
    the caller frees a batch, so every GET faulted its value in again (page faults and zeroing
    were half the client's CPU: 30k faults and ~0.8-1.2 CPU s/GB for 32 x 5.6 MiB values). A
    ``bytes`` freed right after its copy is reused by the next reply of the same connection,
    and the blob lives in memory that is already faulted in: 0.7 CPU s/GB, no faults."""
    if not isinstance(v, bytes) or len(v) < MIN_POOLED:
        return v
    arr = POOL.take(len(v))
    np.copyto(arr, np.frombuffer(v, dtype=np.uint8))  # numpy's copy lets the GIL go
    return arr.data  # a memoryview of the pooled view: the buffer goes back when no reader is left


def _pool_each_reply(pipe: Any) -> None:
    """Make a redis-py pipeline move each GET reply into a pooled buffer as soon as it is parsed
    (``Pipeline.parse_response`` runs once per reply), so a pipeline of 1 MiB GETs frees each
    ``bytes`` before the next arrives: converted after the whole pipeline, 8 were alive at once
    and glibc still handed their pages back and forth (20k faults per 128 MiB). A pipeline
    without that method (redis-py's Cluster pipeline, only used to follow redirects) is left as
    it is; its replies are converted afterwards."""
    parse = getattr(pipe, "parse_response", None)
    if parse is None:
        return

    def parse_pooled(connection: Any, command_name: Any, **options: Any) -> Any:
        r = parse(connection, command_name, **options)
        return _pooled(r) if command_name == "GET" else r

    pipe.parse_response = parse_pooled


def _joined(parts: Sequence[Buffer], total: int) -> memoryview:
    """The parts of a split value, one after the other, in one (pooled, writable) buffer."""
    arr = POOL.take(total)
    mv, pos = arr.data, 0
    for p in parts:
        n = len(p)
        mv[pos:pos + n] = p
        pos += n
    return mv


class RedisTier(Tier):
    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        name: str = "redis",
        capacity_bytes: int = 0,
        prefix: str | None = None,
        cluster: bool | None = None,
        nodes: Sequence[str] = (),
        ttl_s: float | None = None,
        max_value_bytes: int = 64 << 20,
        connections: int = 4,
        socket_timeout: float = 2.0,
        connect_timeout: float = 0.5,
        retries: int = 1,
        packer: str = "python",
        username: str | None = None,
        password: str | None = None,
        **ssl_options: Any,
    ) -> None:
        super().__init__(name, capacity_bytes)
        self.prefix = f"kvlayer:{name}:" if prefix is None else str(prefix)
        if "{" in self.prefix or "}" in self.prefix:
            raise ConfigError(f"redis tier {name!r}: prefix {self.prefix!r} must not contain '{{' or '}}'")
        bad = [k for k in ssl_options if not k.startswith("ssl_")]
        if bad:
            raise ConfigError(f"redis tier {name!r}: unknown option(s) {sorted(bad)}; "
                              f"valid: {sorted(Options.model_fields)} and ssl_* (passed to redis-py)")
        if packer not in ("python", "hiredis"):
            raise ConfigError(f"redis tier {name!r}: packer must be 'python' or 'hiredis', got {packer!r}")
        self.ttl_ms = int(ttl_s * 1000) if ttl_s else None
        self.max_value_bytes = int(max_value_bytes)
        if self.max_value_bytes < 1024:
            raise ConfigError(f"redis tier {name!r}: max_value_bytes must be >= 1024, got {max_value_bytes}")
        self.connections = max(1, int(connections))
        self.retries = max(0, int(retries))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._mem_cache: tuple[float, int] = (0.0, 0)
        self._keys_cache: tuple[float, int] = (0.0, 0)

        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme.endswith("+cluster"):
            cluster = True if cluster is None else cluster
            scheme = scheme[: -len("+cluster")]
            url = urlunsplit((scheme, *parts[1:]))
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"redis tier {name!r}: url scheme {parts.scheme!r} not supported; use redis://, "
                              "rediss://, unix://, redis+cluster:// or rediss+cluster://")
        self.cluster = bool(cluster)
        if self.cluster and scheme == "unix":
            raise ConfigError(f"redis tier {name!r}: Redis Cluster needs TCP nodes, not a unix socket")
        host = parts.hostname or ""
        self.url_redacted = urlunsplit((parts.scheme, f"{host}:{parts.port}" if parts.port else host, parts.path, "", ""))
        # RESP2 (redis-py 8 defaults to RESP3): every server and proxy speaks it (no HELLO needed).
        # socket_read_size: redis-py feeds hiredis in chunks of this size (default 32 KiB); 1 MiB
        # took a quarter to a third off the client CPU per GB read of 1-8 MiB values.
        common: dict[str, Any] = dict(protocol=2, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                                      socket_read_size=_SOCKET_READ_SIZE,
                                      retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), int(retries)),
                                      **ssl_options)
        if username is not None:
            common["username"] = username
        if password is not None:
            common["password"] = password
        conn_cls: type[Connection] = {"redis": _Conn, "rediss": _SSLConn, "unix": _UnixConn}[scheme]  # type: ignore[assignment]
        if packer != "python":
            conn_cls = type(conn_cls.__name__ + "Hiredis", (conn_cls,), {"python_packer": False})
        max_conns = 2 * self.connections + 8
        if self.cluster:
            kw = dict(common, connection_class=conn_cls)
            extra = [ClusterNode(*_host_port(n)) for n in nodes]
            # RedisCluster connects in its constructor: build it on first use, so a cluster that is
            # down when the engine starts is a miss, not a start-up failure.
            self._factory: Callable[[], redis.Redis | RedisCluster] = lambda: RedisCluster.from_url(
                url, max_connections=max_conns, require_full_coverage=False,
                **({"startup_nodes": extra} if extra else {}), **kw)
            self._client: redis.Redis | RedisCluster | None = None
        else:
            kw = dict(common, connection_class=conn_cls)
            pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_conns, timeout=socket_timeout, **kw)
            self._client = redis.Redis(connection_pool=pool)
        self._client_lock = threading.Lock()

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The redis-py client (``RedisCluster`` in Cluster mode), created on first use."""
        c = self._client
        if c is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._factory()
                c = self._client
        return c

    # ------------------------------------------------------------------ naming
    def rkey(self, key: str) -> str:
        """The Redis key a content key is stored under."""
        return f"{self.prefix}{{{key}}}"

    def _part_key(self, key: str, nonce: bytes, i: int) -> str:
        return f"{self.prefix}{{{key}}}:{nonce.hex()}:{i}"

    # ------------------------------------------------------------------ failure handling
    def healthy(self) -> bool:
        """Whether the server (in a Cluster: some primary) answers a PING now."""
        try:
            self._call("ping", lambda: self._per_server(lambda r: r.ping()))
        except TierError:
            return False
        return True

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, turning redis-py's and the network's errors into ``TierError``."""
        try:
            return fn()
        except (*_NET_ERRORS, *_CLUSTER_DOWN) as e:
            raise TierError(f"redis tier {self.name} ({self.url_redacted}): {op} failed: {type(e).__name__}: {e}") from e
        except redis.RedisError as e:
            raise TierError(f"redis tier {self.name}: {op} failed: {type(e).__name__}: {e}") from e

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.connections, thread_name_prefix=f"kvlayer-{self.name}")
            return self._pool

    def _fanout(self, jobs: list[J], fn: Callable[[J], R], *, tolerant: bool = False) -> list[Any]:
        """Run ``fn`` per job, in parallel (one connection each) when there is more than one.
        ``tolerant``: a job's exception is returned in its place instead of raised."""
        def run(j: J) -> Any:
            if not tolerant:
                return fn(j)
            try:
                return fn(j)
            except Exception as e:
                return e

        if len(jobs) <= 1:
            return [run(j) for j in jobs]
        futs = [self._executor().submit(run, j) for j in jobs]
        return [f.result() for f in futs]

    @staticmethod
    def _groups_by_count(idx: list[int], k: int) -> list[list[int]]:
        k = min(k, len(idx))
        return [idx[i::k] for i in range(k)]

    @staticmethod
    def _groups_by_size(idx: list[int], k: int, sizes: Sequence[int], min_parallel: int = 1 << 20) -> list[list[int]]:
        """Balance the bytes of ``idx`` over at most ``k`` groups; small batches stay in one."""
        if len(idx) <= 1 or sum(sizes[i] for i in idx) < min_parallel:
            return [idx] if idx else []
        k = min(k, len(idx))
        loads = [0] * k
        groups: list[list[int]] = [[] for _ in range(k)]
        for i in sorted(idx, key=lambda i: -sizes[i]):
            j = loads.index(min(loads))
            groups[j].append(i)
            loads[j] += sizes[i]
        return [sorted(g) for g in groups if g]

    def _jobs(self, rkeys: Sequence[str], split: Callable[[list[int], int], list[list[int]]],
              ) -> list[tuple[Any, list[int]]]:
        """(pipeline source, positions in ``rkeys``) per connection, ``split`` cutting a list of
        positions into at most k groups. In a Cluster one node's client per job, so a dead node
        costs only its own keys; before redis-py knows the nodes, one Cluster pipeline does all."""
        client = self.client
        if not isinstance(client, RedisCluster):
            return [(client, g) for g in split(list(range(len(rkeys))), self.connections)]
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for j, rk in enumerate(rkeys):
            node = client.get_node_from_key(rk)
            conn = node.redis_connection if node is not None else None
            if conn is None:
                return [(client, list(range(len(rkeys))))]
            by_node.setdefault(node.name, (conn, []))[1].append(j)
        per = max(1, self.connections // len(by_node))
        return [(conn, g) for conn, idx in by_node.values() for g in split(idx, per)]

    def _pipe(self) -> Any:
        return self.client.pipeline(transaction=False)

    # ------------------------------------------------------------------ manifest
    @staticmethod
    def _manifest(total: int, n_parts: int, part_size: int, nonce: bytes) -> bytes:
        return _MANIFEST.pack(MANIFEST_MAGIC, total, n_parts, part_size, nonce)

    @staticmethod
    def _parse_manifest(v: Any) -> tuple[int, int, int, bytes] | None:
        if not isinstance(v, bytes | bytearray | memoryview) or len(v) != MANIFEST_LEN:
            return None
        if bytes(v[:len(MANIFEST_MAGIC)]) != MANIFEST_MAGIC:
            return None
        _, total, n, size, nonce = _MANIFEST.unpack(v)
        if n < 1 or size < 1 or n > (1 << 20) or (n - 1) * size >= total or n * size < total:
            return None
        return total, n, size, nonce

    # ------------------------------------------------------------------ reads
    def get(self, key: str) -> Buffer | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        return [None if h is None else h[0] for h in self._get(list(keys), None)]

    def get_opened(self, keys: Sequence[str], open_: Callable[[str, Buffer], T],
                   ) -> list[tuple[Buffer, T | CorruptBlobError] | None]:
        """Each connection's thread opens (checks) the values it has just parsed: xxh3 releases
        the GIL, so one connection's check overlaps the others' reads, and the bytes are still in
        cache. A split value is joined, then opened here."""
        return self._get(list(keys), open_)

    def _get(self, keys: list[str], open_: Callable[[str, Buffer], Any] | None) -> list[tuple[Buffer, Any] | None]:
        """(value, ``open_(key, value)`` or what it raised; None without ``open_``) per key, None
        for a miss."""
        if not keys:
            return []
        rkeys = [self.rkey(k) for k in keys]
        key_of = dict(zip(rkeys, keys, strict=True))
        then = None if open_ is None else (lambda rk, v: (v, opened(open_, key_of[rk], v)))
        vals = self._call("get", lambda: self._fetch(rkeys, then=then))
        out: list[tuple[Buffer, Any] | None] = [None] * len(keys)
        split: list[tuple[int, tuple[int, int, int, bytes]]] = []
        for i, v in enumerate(vals):
            if isinstance(v, tuple):  # opened on its connection's thread
                out[i] = v
            elif v is not None and v is not _FAILED:
                m = self._parse_manifest(v) if len(v) == MANIFEST_LEN else None
                if m is None:
                    out[i] = (v, None if open_ is None else opened(open_, keys[i], v))
                else:
                    split.append((i, m))
        if split:
            joined: list[Buffer | None] = [None] * len(keys)
            self._read_parts(keys, split, joined)
            for i, _ in split:
                b = joined[i]
                if b is not None:
                    out[i] = (b, None if open_ is None else opened(open_, keys[i], b))
        hits = sum(h is not None for h in out)
        self.count(hits=hits, misses=len(keys) - hits, bytes_read=sum(len(h[0]) for h in out if h is not None))
        return out

    def _fetch(self, rkeys: list[str], cmd: str = "GET", then: Callable[[str, Buffer], Any] | None = None,
               ) -> list[Any]:
        """GET (or EXISTS) Redis keys through redis-py pipelines, split across connections and
        Cluster nodes in parallel: ``bytes`` (or ints), None for a missing key or an error reply
        (e.g. WRONGTYPE); with ``then``, ``then(rkey, value)`` in place of each value that is not
        manifest-sized, run on the connection's thread. If some connections fail and others
        answer (a dead Cluster node), the failed keys read as ``_FAILED`` and the tier counts an
        error; only when all fail does it raise."""
        # values: spread over connections; existence replies are tiny: one pipeline a node
        jobs = self._jobs(rkeys, self._groups_by_count if cmd == "GET" else lambda idx, k: [idx])
        results = self._fanout(jobs, lambda job: self._read_job(job[0], cmd, [rkeys[i] for i in job[1]], then),
                               tolerant=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            if len(failed) == len(results):
                raise failed[0]
            self.count(errors=len(failed))
            log.warning("redis tier %s: %d of %d connections failed (%s); their keys read as misses",
                        self.name, len(failed), len(results), failed[0])
        out: list[Any] = [None] * len(rkeys)
        redirected: list[int] = []
        for (_, idx), res in zip(jobs, results, strict=True):
            if isinstance(res, BaseException):
                for i in idx:
                    out[i] = _FAILED
                continue
            for i, r in zip(idx, res, strict=True):
                if isinstance(r, _REDIRECTS):
                    redirected.append(i)
                elif isinstance(r, bytes | memoryview | int | tuple):
                    out[i] = r
        if redirected:
            # Slots moved (resharding, failover): redis-py's Cluster pipeline follows MOVED/ASK.
            again = self._read_job(self.client, cmd, [rkeys[i] for i in redirected], then)
            for i, r in zip(redirected, again, strict=True):
                out[i] = r if isinstance(r, bytes | memoryview | int | tuple) else None
        return out

    def _read_job(self, target: Any, cmd: str, rkeys: list[str], then: Callable[[str, Buffer], Any] | None = None,
                  ) -> list[Any]:
        """One connection's share of a read. GETs go in pipelines sized so about ``_REPLY_WINDOW``
        bytes of replies come back per round trip (learnt from the values read so far): Redis
        buffers every pipelined reply, and on the 2-core test box 32 pipelined 1 MiB GETs ran
        slower than 4-8 per round trip. EXISTS replies are tiny and go in one pipeline."""
        out: list[Any] = []
        step = 2 if cmd == "GET" else max(1, len(rkeys))
        while len(out) < len(rkeys):
            pipe = target.pipeline(transaction=False)
            batch = rkeys[len(out):len(out) + step]
            for rk in batch:
                pipe.get(rk) if cmd == "GET" else pipe.exists(rk)
            if cmd == "GET":
                _pool_each_reply(pipe)
            res = pipe.execute(raise_on_error=False)
            biggest = max((len(r) for r in res if isinstance(r, bytes | memoryview)), default=0)
            if cmd == "GET":
                res = [_pooled(r) for r in res]  # what _pool_each_reply could not reach (a Cluster pipeline)
            if then is not None:
                res = [then(rk, r) if isinstance(r, bytes | memoryview) and len(r) != MANIFEST_LEN else r
                       for rk, r in zip(batch, res, strict=True)]
            out += res
            step = max(1, min(64, _REPLY_WINDOW // max(biggest, 1)))
        return out

    def _read_parts(self, keys: list[str], split: list[tuple[int, tuple[int, int, int, bytes]]],
                    out: list[Buffer | None]) -> None:
        """Fetch every part and join each value into one buffer; any missing or wrong-sized part
        makes the whole value a miss (and removes it), an unreachable one only a miss."""
        names = [self._part_key(keys[i], nonce, p) for i, (_, n, _, nonce) in split for p in range(n)]
        res = self._call("get parts", lambda: self._fetch(names))
        broken: list[tuple[str, int, bytes, bytes | None]] = []
        pos = 0
        for i, (total, n, size, nonce) in split:
            got = res[pos:pos + n]
            pos += n
            if any(v is _FAILED for v in got):
                continue  # unreachable, not gone: a miss, and the value stays
            want = [size] * (n - 1) + [total - (n - 1) * size]
            if all(isinstance(v, bytes | memoryview) and len(v) == w for v, w in zip(got, want, strict=True)):
                out[i] = _joined(got, total)
            else:
                broken.append((keys[i], n, nonce, self._manifest(total, n, size, nonce)))
        if broken:
            # A value with a missing/short part can never be read again: remove what is left of it.
            self.count(corrupt=len(broken))
            log.warning("redis tier %s: %d split value(s) with missing parts removed", self.name, len(broken))
            try:
                self._call("delete broken", lambda: self._delete_split(broken))
            except TierError:
                pass

    def contains(self, key: str) -> bool:
        return self.exists_many([key])[0]

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        keys = list(keys)
        if not keys:
            return []

        return [v == 1 for v in self._call("exists", lambda: self._fetch([self.rkey(k) for k in keys], cmd="EXISTS"))]

    # ------------------------------------------------------------------ writes
    def put(self, key: str, blob: Buffer) -> bool:
        return self.put_many([(key, blob)])[0]

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> list[bool]:
        items = list(items)
        if not items:
            return []
        views = [memoryview(b).cast("B") if not isinstance(b, bytes) else memoryview(b) for _, b in items]
        sizes = [v.nbytes for v in views]
        ok = [True] * len(items)
        todo: list[int] = []
        for i, s in enumerate(sizes):
            if self.capacity_bytes and s > self.capacity_bytes:
                ok[i] = False
            else:
                todo.append(i)
        px = self.ttl_ms
        part_px = px + max(5000, px // 10) if px else None  # parts outlive their manifest

        Victim = tuple[str, int, bytes, bytes | None]

        def write(job: tuple[Any, list[int]]) -> list[tuple[bool, bytes | None, Victim | None, bool]]:
            target, idx = job
            pipe = target.pipeline(transaction=False)
            layout = []
            for j in idx:
                i = todo[j]
                key, v = items[i][0], views[i]
                rk = self.rkey(key)
                pipe.getrange(rk, 0, MANIFEST_LEN - 1)  # an old manifest whose parts must go
                pipe.strlen(rk)
                n = 0
                manifest = None
                nonce = b""
                if v.nbytes > self.max_value_bytes:
                    n = -(-v.nbytes // self.max_value_bytes)
                    size = -(-v.nbytes // n)  # balanced: no tiny tail part
                    if (n - 1) * size >= v.nbytes:  # (only for absurdly many parts)
                        size = self.max_value_bytes
                    nonce = os.urandom(8)
                    for p in range(n):
                        pipe.set(self._part_key(key, nonce, p), v[p * size:(p + 1) * size], px=part_px)
                    manifest = self._manifest(v.nbytes, n, size, nonce)
                    pipe.set(rk, manifest, px=px)
                else:
                    pipe.set(rk, v, px=px)
                layout.append((key, n, nonce, manifest))
            res = pipe.execute(raise_on_error=False)
            out: list[tuple[bool, bytes | None, Victim | None, bool]] = []
            pos = 0
            for key, n, nonce, manifest in layout:
                old, old_len = res[pos], res[pos + 1]
                sets = res[pos + 2: pos + 3 + n]
                pos += 3 + n
                # a SET can fail alone (e.g. OOM under maxmemory noeviction): then the old value
                # stays as it was, and whatever this write left of a split value must go
                stored = all(s is True for s in sets)
                moved = not stored and any(isinstance(s, _REDIRECTS) for s in sets)
                stale = old if stored and old_len == MANIFEST_LEN and old != manifest else None
                failed = (key, n, nonce, manifest) if n and not stored and not moved else None
                out.append((stored, stale, failed, moved))
            return out

        stale: list[Victim] = []
        moved: list[int] = []

        def run(jobs: list[tuple[Any, list[int]]]) -> None:
            results = self._fanout(jobs, write, tolerant=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed and len(failed) == len(results):
                raise failed[0]
            if failed:  # a dead Cluster node: its writes are dropped, the others stand
                self.count(errors=len(failed))
                log.warning("redis tier %s: %d of %d connections failed (%s); their writes dropped",
                            self.name, len(failed), len(results), failed[0])
            for (_, idx), res in zip(jobs, results, strict=True):
                for j, r in zip(idx, res if not isinstance(res, BaseException) else [None] * len(idx), strict=True):
                    i = todo[j]
                    if r is None:
                        ok[i] = False
                        continue
                    stored, old, failed_split, was_moved = r
                    ok[i] = stored
                    if was_moved:
                        moved.append(j)
                    m = self._parse_manifest(old) if old is not None else None
                    if m is not None:
                        stale.append((items[i][0], m[1], m[3], None))
                    if failed_split is not None:
                        stale.append(failed_split)

        todo_sizes = [sizes[i] for i in todo]
        self._call("put", lambda: run(self._jobs(
            [self.rkey(items[i][0]) for i in todo],
            lambda idx, k: self._groups_by_size(idx, k, todo_sizes))))
        if moved:
            # Slots moved under us: redis-py's Cluster pipeline follows MOVED/ASK.
            again = list(moved)
            moved.clear()
            self._call("put", lambda: run([(self.client, again)]))
        if stale:
            try:
                self._call("delete stale parts", lambda: self._delete_split(stale))
            except TierError:
                pass
        n_ok = sum(ok)
        self.count(puts=n_ok, bytes_written=sum(s for s, o in zip(sizes, ok, strict=True) if o),
                   dropped_writes=len(items) - n_ok)
        return ok

    # ------------------------------------------------------------------ deletes
    def _delete_split(self, victims: list[tuple[str, int, bytes, bytes | None]]) -> None:
        """Delete the parts of (key, n_parts, nonce, manifest) values; where ``manifest`` is given,
        also the main key, but only while it still holds that manifest (a concurrent writer may
        have stored a fresh copy meanwhile)."""
        pipe = self._pipe()
        for key, n, nonce, _ in victims:
            for p in range(n):  # Cluster pipelines take one key per DEL
                pipe.delete(self._part_key(key, nonce, p))
        pipe.execute(raise_on_error=False)
        for key, _, _, manifest in victims:
            if manifest is not None:
                self.client.eval(_DEL_IF_EQUAL, 1, self.rkey(key), manifest)

    def delete(self, key: str) -> bool:
        return self.delete_many([key]) == 1

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        if not keys:
            return 0

        def run() -> list[Any]:
            pipe = self._pipe()
            for k in keys:
                rk = self.rkey(k)
                pipe.getrange(rk, 0, MANIFEST_LEN - 1)
                pipe.strlen(rk)
                pipe.delete(rk)
            return list(pipe.execute(raise_on_error=False))

        res = self._call("delete", run)
        removed = 0
        split: list[tuple[str, int, bytes, bytes | None]] = []
        for j, k in enumerate(keys):
            head, length, gone = res[3 * j: 3 * j + 3]
            removed += gone == 1
            m = self._parse_manifest(head) if length == MANIFEST_LEN else None
            if m is not None:
                split.append((k, m[1], m[3], None))
        if split:
            self._call("delete parts", lambda: self._delete_split(split))
        return removed

    def clear(self) -> None:
        """Remove every key under this prefix (parts included), nothing else, on every primary."""
        def run(r: redis.Redis) -> None:
            batch: list[Any] = []
            for k in r.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000):
                batch.append(k)
                if len(batch) >= 500:
                    self._unlink(r, batch)
                    batch = []
            if batch:
                self._unlink(r, batch)

        self._call("clear", lambda: self._per_server(run))

    @staticmethod
    def _unlink(r: redis.Redis, names: list[Any]) -> None:
        pipe = r.pipeline(transaction=False)
        for n in names:
            pipe.unlink(n)
        pipe.execute(raise_on_error=False)

    # ------------------------------------------------------------------ listing and sizes
    def _per_server(self, fn: Callable[[redis.Redis], T]) -> list[T]:
        """``fn`` on the server, or on every Cluster primary; unreachable primaries are skipped
        (all unreachable: the first error is raised)."""
        client = self.client
        if not isinstance(client, RedisCluster):
            return [fn(client)]
        out: list[T] = []
        errors: list[BaseException] = []
        for node in client.get_primaries():
            conn = node.redis_connection
            if conn is None:
                continue
            try:
                out.append(fn(conn))
            except (redis.RedisError, OSError) as e:
                errors.append(e)
        if errors and not out:
            raise errors[0]
        return out

    def keys(self) -> list[str]:
        """Content keys under this prefix (SCAN on every primary; parts excluded)."""
        pat = _glob_escape(self.prefix) + "{*}"
        plen = len(self.prefix)

        def scan(r: redis.Redis) -> list[str]:
            out = []
            for k in r.scan_iter(match=pat, count=1000):
                s = k.decode() if isinstance(k, bytes) else str(k)
                if s.endswith("}") and s[plen:plen + 1] == "{":
                    out.append(s[plen + 1:-1])
            return out

        return [k for part in self._call("keys", lambda: self._per_server(scan)) for k in part]

    def used_bytes(self) -> int:
        """Redis ``used_memory`` (summed over reachable Cluster primaries), refreshed at most once a
        second; the last known figure (0 at first) while the server is unreachable."""
        at, val = self._mem_cache
        if time.monotonic() - at < 1.0:
            return val
        try:
            val = sum(self._call("info", lambda: self._per_server(
                lambda r: int(r.info("memory").get("used_memory", 0)))))
        except TierError:
            return val
        self._mem_cache = (time.monotonic(), val)
        return val

    def stats(self) -> TierStats:
        """Like ``Tier.stats`` but the key count (a full SCAN) is refreshed at most every 10 s."""
        with self._stats_lock:
            s = TierStats(**self._stats.as_dict())  # type: ignore[arg-type]
        s.used_bytes = self.used_bytes()
        at, n = self._keys_cache
        if time.monotonic() - at >= 10.0:
            try:
                n = len(self.keys())
                self._keys_cache = (time.monotonic(), n)
            except TierError:
                pass
        s.num_keys = n
        return s

    def ping(self) -> bool:
        try:
            return bool(self._call("ping", lambda: self.client.ping()))
        except TierError:
            return False

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        try:
            if self._client is not None:
                self._client.close()
        except Exception:  # closing a dead connection must not raise
            pass

    def __repr__(self) -> str:
        return (f"RedisTier(name={self.name!r}, url={self.url_redacted!r}, cluster={self.cluster}, "
                f"prefix={self.prefix!r})")


def _host_port(node: str) -> tuple[str, int]:
    host, _, port = str(node).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"redis cluster node {node!r} must look like host:port")
    return host, int(port)


_MOVED = {"backoff_s": "retry_after_s", "backoff_max_s": "retry_max_s"}  # now the store's breaker


class Options(TierOptions):
    """The options documented at the top of this module; ``ssl_*`` ones go to redis-py as they are."""

    model_config = ConfigDict(extra="allow")

    prefix: str | None = None
    ttl_s: float | None = Field(default=None, gt=0)
    max_value_bytes: int = Field(default=64 << 20, ge=1024)
    connections: int = Field(default=4, ge=1)
    socket_timeout: float = Field(default=2.0, gt=0)
    connect_timeout: float = Field(default=0.5, gt=0)
    retries: int = Field(default=1, ge=0)
    packer: Literal["python", "hiredis"] = "python"
    cluster: bool | None = None
    nodes: list[str] = Field(default_factory=list)
    username: str | None = None
    password: str | None = None

    @field_validator("max_value_bytes", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        return parse_size(v)

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, v: Any) -> Any:
        return [n for n in v.split(",") if n] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _only_ssl_extras(self) -> Options:
        bad = sorted(k for k in self.model_extra or {} if not k.startswith("ssl_"))
        if bad:
            moved = [f"{k} is now the tier's {_MOVED[k]}" for k in bad if k in _MOVED]
            raise ValueError(f"unknown option(s) {bad}; valid: {sorted(type(self).model_fields)} and ssl_* "
                             f"(passed to redis-py){'; ' + ', '.join(moved) if moved else ''}")
        return self


def build(cfg: TierConfig, options: Options) -> Tier:
    """A RedisTier from a TierConfig (``url``, ``capacity``, ``options`` as documented above)."""
    if not cfg.url:
        raise ConfigError(f"tier {cfg.name!r} of kind 'redis' needs a url such as redis://127.0.0.1:6379/0")
    return RedisTier(cfg.url, name=cfg.name, capacity_bytes=cfg.capacity, **options.model_dump())  # ssl_* included
