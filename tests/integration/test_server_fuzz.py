"""A hostile client against a real ``kvlayer serve``: random bytes and absurd-but-valid messages to
every RPC, oversized payloads, truncated, abandoned and stalled upload streams, wrong tokens and
tenants, and pins and documents until the quota says no. Afterwards the server is up, every
channel the traffic went through still works, a put/get round trip is byte-identical, no answer
was INTERNAL or UNKNOWN (those mean a bug of ours), and the server's RSS is within its budget + 10%.

Run with ``-s`` to see the figures (RSS above start, status codes returned)."""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

grpc = pytest.importorskip("grpc")
pytest.importorskip("psutil")

from google.protobuf.descriptor import Descriptor, FieldDescriptor  # noqa: E402
from google.protobuf.message import Message  # noqa: E402

from kvlayer.codec import encode  # noqa: E402
from kvlayer.rpc import wire  # noqa: E402
from kvlayer.rpc._gen import kvlayer_pb2 as pb  # noqa: E402
from kvlayer.units import parse_size  # noqa: E402
from tests.fixtures.kvlayer_server import kvlayer_server_factory_fixture  # noqa: E402,F401

TOKEN, TEAM_TOKEN = "fuzz-admin", "fuzz-team"
ADMIN = (("authorization", f"Bearer {TOKEN}"),)
TEAM = (("authorization", f"Bearer {TEAM_TOKEN}"),)
BAD_AUTH: list[tuple[tuple[str, str], ...]] = [
    (),
    (("authorization", "Bearer wrong"),),
    (("authorization", "Bearer " + "x" * 4000),),
    (("authorization", f"Bearer {TEAM_TOKEN}"), ("x-kvlayer-tenant", "someone-else")),
    (("authorization", f"Bearer {TOKEN}"), ("x-kvlayer-tenant", "../../etc bad tenant")),
]
SERVICE = pb.DESCRIPTOR.services_by_name["KVLayer"]
BUDGET = "64MiB"
OURS = {"INTERNAL", "UNKNOWN"}  # a handler bug; never the client's fault


def ident(x: bytes) -> bytes:
    return x


def key(i: int, tag: str) -> str:
    return hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()


def blob(i: int, tokens: int = 16) -> bytes:
    g = torch.Generator().manual_seed(i)
    return bytes(encode(torch.randn(2, 2, tokens, 2, 8, generator=g).half(), "raw"))


class Channel:
    """One HTTP/2 connection (its own subchannel) with a raw-bytes callable per RPC."""

    def __init__(self, url: str) -> None:
        self.ch = grpc.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1),
                                                      ("grpc.max_send_message_length", 8 << 20),
                                                      ("grpc.max_receive_message_length", 8 << 20)])
        self.calls: dict[str, Any] = {}
        for m in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{m.name}"
            if m.client_streaming:
                self.calls[m.name] = self.ch.stream_unary(path, request_serializer=ident, response_deserializer=ident)
            elif m.server_streaming:
                self.calls[m.name] = self.ch.unary_stream(path, request_serializer=ident, response_deserializer=ident)
            else:
                self.calls[m.name] = self.ch.unary_unary(path, request_serializer=ident, response_deserializer=ident)

    def call(self, name: str, payload: bytes | Iterator[bytes], md: Any = ADMIN, timeout: float = 20) -> Any:
        fn = self.calls[name]
        if name == "Get":
            return list(fn(payload, timeout=timeout, metadata=md))
        return fn(payload, timeout=timeout, metadata=md)

    def put(self, items: list[tuple[str, bytes]], md: Any = ADMIN) -> pb.PutResponse:
        frames = [wire.encode_put_frame(k, len(b), memoryview(b), False) for k, b in items]
        return pb.PutResponse.FromString(self.call("Put", iter(frames), md))

    def get(self, keys: list[str], md: Any = ADMIN) -> list[bytes | None]:
        out: list[bytearray | None] = [None] * len(keys)
        for raw in self.call("Get", pb.GetRequest(keys=keys).SerializeToString(), md):
            fr = wire.decode_get_frame(raw)
            if fr.found:
                if fr.total_len:
                    out[fr.index] = bytearray()
                out[fr.index] += bytes(fr.data)  # type: ignore[operator]
        return [None if b is None else bytes(b) for b in out]


def random_message(desc: Descriptor, rnd: random.Random, depth: int = 0) -> Any:
    """A valid message with absurd contents: random strings and bytes, long repeated fields,
    extreme numbers, one random member of each oneof."""
    msg = getattr(pb, desc.name)() if desc.containing_type is None else None
    if msg is None:  # nested (map entry): not built directly
        return None
    chosen = {o.name: rnd.choice(o.fields).name for o in desc.oneofs}
    for f in desc.fields:
        if f.containing_oneof is not None and chosen[f.containing_oneof.name] != f.name:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            continue
        n = rnd.choice([0, 1, 2, 50, 3000]) if f.is_repeated else 1
        values = [_value(f, rnd, depth) for _ in range(n)]
        if f.is_repeated:
            if f.message_type is not None:
                for v in values:
                    getattr(msg, f.name).add().CopyFrom(v)
            else:
                getattr(msg, f.name).extend(values)
        elif f.message_type is not None:
            getattr(msg, f.name).CopyFrom(values[0])
        else:
            setattr(msg, f.name, values[0])
    return msg


def _value(f: FieldDescriptor, rnd: random.Random, depth: int) -> Any:
    t = f.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        return random_message(f.message_type, rnd, depth + 1)
    if t == FieldDescriptor.TYPE_STRING:
        return rnd.choice(["", "ab" * 8, "0" * 112, "A" * 40, "é☃\U0001F600" * rnd.randint(1, 300),
                           key(rnd.randrange(10), "fuzz"), "x" * rnd.randint(1, 2000)])
    if t == FieldDescriptor.TYPE_BYTES:
        return rnd.randbytes(rnd.choice([0, 31, 32, 33, 5000]))
    if t == FieldDescriptor.TYPE_BOOL:
        return rnd.random() < 0.5
    if t == FieldDescriptor.TYPE_DOUBLE:
        return rnd.choice([0.0, -1.0, 1e-9, 1e300, math.inf, -math.inf, math.nan, 3.5])
    if t == FieldDescriptor.TYPE_ENUM:
        return rnd.choice([0, 1, 2])
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return rnd.choice([0, 1, 7, 255, 2**31, 2**32 - 1])
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return rnd.choice([0, 1, 2**40, 2**64 - 1])
    return rnd.choice([0, 1, -1, 2**31 - 1])


def mutate(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        op = rnd.random()
        if op < 0.4 and b:
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        elif op < 0.7:
            b[rnd.randrange(len(b) + 1):rnd.randrange(len(b) + 1)] = rnd.randbytes(rnd.randint(1, 12))
        elif b:
            del b[rnd.randrange(len(b)):]
    return bytes(b)


def test_fuzz_every_rpc_then_server_is_up_exact_and_within_budget(kvlayer_server_factory) -> None:
    srv = kvlayer_server_factory("--auth-token", TOKEN, "--tenant-token", f"team={TEAM_TOKEN}", cpu_bytes=BUDGET)
    budget = parse_size(BUDGET)
    rnd = random.Random(17)
    chans = [Channel(srv.url) for _ in range(3)]
    codes: Counter[str] = Counter()
    ours: list[str] = []

    def record(what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            code = "OK"
        except grpc.FutureCancelledError:
            code = "CANCELLED"
        except grpc.RpcError as e:
            code = e.code().name
            if code in OURS:
                ours.append(f"{what}: {code}: {e.details()}")
        codes[code] += 1

    # warm every code path once, then take the baseline
    good = [(key(i, "warm"), blob(i)) for i in range(8)]
    for c in chans:
        assert all(c.put(good).stored) and c.get([k for k, _ in good]) == [b for _, b in good]
    time.sleep(0.5)
    baseline = srv.rss()
    unary = [m.name for m in SERVICE.methods if not m.client_streaming]

    # 1. random bytes and mutated valid messages to every RPC, with good and bad credentials
    valid = {m.name: random_message(m.input_type, random.Random(1)).SerializeToString() for m in SERVICE.methods
             if not m.client_streaming}
    for i in range(1200):
        c = chans[i % len(chans)]
        name = unary[i % len(unary)]
        md = ADMIN if i % 3 else rnd.choice(BAD_AUTH + [TEAM])
        payload = rnd.randbytes(rnd.choice([1, 7, 64, 700])) if i % 2 else mutate(valid[name], rnd)
        record(f"{name} bytes", lambda c=c, name=name, p=payload, md=md: c.call(name, p, md))
        frames = [rnd.randbytes(rnd.randint(1, 300)) for _ in range(rnd.randint(1, 4))]
        if i % 4 == 0:
            record("Put bytes", lambda c=c, f=frames, md=md: c.call("Put", iter(f), md))

    # 2. absurd but valid messages to every RPC
    for i in range(400):
        c = chans[i % len(chans)]
        m = SERVICE.methods[i % len(SERVICE.methods)]
        if m.client_streaming:
            continue
        payload = random_message(m.input_type, rnd).SerializeToString()
        record(f"{m.name} absurd", lambda c=c, n=m.name, p=payload: c.call(n, p, rnd.choice([ADMIN, TEAM])))

    # 3. pins and documents until the quota says no; then give them back
    ns = hashlib.sha256(b"fuzz").digest()
    exhausted: dict[str, int] = {}

    def until_refused(what: str, name: str, requests: Iterator[Message], md: Any) -> None:
        for i, req in enumerate(requests):
            try:
                chans[i % 3].call(name, req.SerializeToString(), md)
                codes["OK"] += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                codes[e.code().name] += 1
                exhausted[what] = i
                return

    for who, md in (("admin", ADMIN), ("team", TEAM)):
        until_refused(f"documents {who}", "RegisterDocument", (pb.RegisterDocumentRequest(
            doc_id=f"doc-{i}", tokens=pb.TokenPrefix(namespace=ns, tokens=range(i, i + 64 * 1000), chunk_size=64))
            for i in range(400)), md)
        chans[0].call("Clear", pb.ClearRequest().SerializeToString(), md)  # gives the quota back
        until_refused(f"pins {who}", "Pin", (pb.PinRequest(target=pb.Target(keys=pb.KeyList(
            keys=[key(j, f"pin{i}") for j in range(2000)]))) for i in range(400)), md)
    assert set(exhausted) == {"pins admin", "pins team", "documents admin", "documents team"}, exhausted
    assert min(exhausted.values()) > 0, exhausted  # the quota refused late, not at once
    stats = pb.StatsResponse.FromString(chans[2].call("Stats", b"", ADMIN)).counters
    assert stats["metadata_bytes"] <= stats["metadata_limit"]
    for md in (ADMIN, TEAM):
        chans[2].call("Clear", pb.ClearRequest().SerializeToString(), md)
    stats = pb.StatsResponse.FromString(chans[2].call("Stats", b"", ADMIN)).counters
    assert stats["metadata_bytes"] == 0 and stats["leases"] == 0 and stats["documents"] == 0

    # 4. uploads: oversized, lying, truncated, abandoned and stalled streams; oversized messages
    ok = blob(99)
    k0 = key(0, "put")
    enc = wire.encode_put_frame
    lying: list[list[bytes]] = [
        [enc(k0, 2**62, memoryview(ok), False)],  # absurd total_len
        [enc(k0, 10, memoryview(ok), False)],  # more bytes than announced
        [enc(k0, len(ok), memoryview(ok)[:100], False)],  # truncated: the stream ends inside the blob
        [enc("", 0, memoryview(ok), False)],  # data before any header
        [enc(k0, 5000, memoryview(rnd.randbytes(5000)), False)],  # not a kvlayer blob
        [enc(k0, len(ok), memoryview(ok)[:10], False), enc(key(1, "put"), len(ok), memoryview(ok), False)],
        [enc("Z" * 64, len(ok), memoryview(ok), True)],  # bad key
    ]
    tiny = bytes(encode(torch.zeros(1, 1, 1, 1, 1).half(), "raw"))  # the smallest valid blob
    absurd = [(key(i % 1500, "tiny"), tiny) for i in range(3000)]  # 3000 blobs, each key twice, one stream
    record("Put absurd", lambda: chans[2].put(absurd))
    record("Put durable", lambda: chans[2].call("Put", iter([enc(key(2, "put"), len(ok), memoryview(ok), True)])))
    for frames in lying:
        for md in (ADMIN, BAD_AUTH[0]):
            record("Put lying", lambda f=frames, md=md: chans[0].call("Put", iter(f), md))
    for name in unary:  # one message above the server's limit (1 MiB frame + 64 KiB)
        record(f"{name} oversized", lambda n=name: chans[1].call(n, rnd.randbytes(2 << 20)))
    record("Put oversized", lambda: chans[1].call("Put", iter([enc(k0, 3 << 20, memoryview(bytes(3 << 20)), False)])))

    release = threading.Event()

    def held(first: bytes) -> Iterator[bytes]:
        yield first
        release.wait(30)

    half = enc(key(5, "put"), len(ok), memoryview(ok)[:50], False)
    abandoned = [chans[i % 3].calls["Put"].future(held(half), timeout=60, metadata=ADMIN) for i in range(6)]
    time.sleep(0.5)
    for f in abandoned:
        f.cancel()  # the client goes away mid-blob
    record("Put stalled", lambda: chans[2].call("Put", held(half), ADMIN, timeout=1))  # deadline mid-blob
    release.set()
    for f in abandoned:
        record("Put abandoned", lambda f=f: f.result())

    # afterwards: the server is up, every fuzzed channel works and round-trips bytes exactly
    assert srv.proc is not None and srv.proc.poll() is None, srv.log_text()[-3000:]
    for i, c in enumerate(chans):
        health = pb.HealthResponse.FromString(c.call("Health", b""))
        assert health.status == pb.HealthResponse.SERVING
        items = [(key(i * 10 + j, "after"), blob(1000 + i * 10 + j, tokens=64)) for j in range(4)]
        assert list(c.put(items).stored) == [True] * 4
        assert c.get([k for k, _ in items] + [key(9, "absent")]) == [b for _, b in items] + [None]
        assert c.get([k for k, _ in items], md=TEAM) == [None] * 4  # another tenant's namespace
    with srv.client(token=TOKEN) as cl:
        deadline = time.monotonic() + 30
        while cl.stats().counters["inflight_bytes"] and time.monotonic() < deadline:
            time.sleep(0.1)
        counters = cl.stats().counters
        assert counters["inflight_bytes"] == 0  # every abandoned upload gave its reservation back
    time.sleep(0.5)
    grown = srv.rss() - baseline
    print("\n" + json.dumps({"rss_above_start_mib": round(grown / 2**20, 1), "budget_mib": budget >> 20,
                             "codes": dict(sorted(codes.items())), "quota_reached_after": dict(exhausted),
                             "malloc_trims": counters.get("malloc_trims")}))
    assert not ours, ours[:5]
    assert "Traceback" not in srv.log_text()
    assert codes["INVALID_ARGUMENT"] > 500 and codes["UNAUTHENTICATED"] > 100 and codes["RESOURCE_EXHAUSTED"] > 10
    assert grown <= 1.1 * budget, f"RSS grew {grown >> 20} MiB over a {budget >> 20} MiB budget"


def test_a_flood_of_tiny_blobs_evicts_instead_of_outgrowing_the_budget(kvlayer_server_factory) -> None:
    """Per-key bookkeeping is charged: 100k blobs of ~83 bytes cost ~87 MiB of RSS when only
    their bytes counted (8 MiB), far over a 32 MiB budget; charged, the CPU tier evicts."""
    from kvlayer.rpc.client import KVLayerClient

    budget = 32 << 20
    srv = kvlayer_server_factory(cpu_bytes="32MiB", disk=False)
    client = KVLayerClient(srv.url)
    x = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float16)
    baseline = srv.rss()
    n = 100_000
    for i in range(0, n, 1000):
        keys = [key(j, "tiny") for j in range(i, i + 1000)]
        assert all(client.put([(k, bytes(encode(x, key=k))) for k in keys]))
    grown = srv.rss() - baseline
    cpu = next(t for t in client.stats().tiers if t.kind == "memory")
    assert cpu.used_bytes <= cpu.capacity_bytes and cpu.evictions > 0 and cpu.num_keys < n
    assert client.get([key(n - 1, "tiny")])[0] is not None  # the newest are kept
    assert grown <= 1.1 * budget, f"RSS grew {grown >> 20} MiB over a {budget >> 20} MiB budget"
    client.close()


def test_connections_past_the_cap_are_closed_and_cost_no_memory(kvlayer_server_factory) -> None:
    """2000 connections that send the HTTP/2 preface and then sit: uncapped they held ~33 MiB of
    a server (17 KiB each); with ``--max-connections 16`` all but 16 are closed at once, the RSS
    stays flat, and once they go a client is served again."""
    import resource
    import socket

    from kvlayer.rpc.client import KVLayerClient

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 2000
    if soft < n + 100:
        if hard != resource.RLIM_INFINITY and hard < n + 100:
            pytest.skip(f"needs {n + 100} open files (ulimit -n hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 100, hard))
    srv = kvlayer_server_factory("--max-connections", "16", cpu_bytes="64MiB", disk=False)
    host, port = srv.url.split("//")[-1].rsplit(":", 1)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS
    baseline = srv.rss()
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, int(port)), timeout=5)
            try:
                s.sendall(preface)
            except OSError:  # closed by the server before the preface went out
                pass
            socks.append(s)
        time.sleep(2)
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                alive += 1 if s.recv(1 << 16) else 0  # EOF: the server closed it
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        grown = srv.rss() - baseline
        print(json.dumps({"connections": n, "alive": alive, "rss_above_start_mib": round(grown / 2**20, 1)}))
        assert alive <= 16, f"{alive} connections stayed open past --max-connections 16"
        assert grown < 8 << 20, f"RSS grew {grown >> 20} MiB holding {alive} connections"
    finally:
        for s in socks:
            s.close()
    client = KVLayerClient(srv.url)
    deadline = time.monotonic() + 30
    while True:  # the server notices the closed connections; then a new one gets in
        try:
            assert client.stats().tiers
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert "Traceback" not in srv.log_text()
    client.close()
