"""kvlayer serve against a real server subprocess: round trips, lookup, control ops, errors,
tenants, CLI, metrics and graceful shutdown."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

grpc = pytest.importorskip("grpc")

from kvlayer import KVSpec  # noqa: E402
from kvlayer.codec import decode, encode  # noqa: E402
from kvlayer.engine import KVCache  # noqa: E402
from kvlayer.rpc import wire  # noqa: E402
from kvlayer.rpc._gen import kvlayer_pb2 as pb  # noqa: E402
from kvlayer.rpc.client import KVLayerClient  # noqa: E402
from tests.fixtures.kvlayer_server import (  # noqa: E402,F401
    REPO,
    kvlayer_server_factory_fixture,
    kvlayer_server_fixture,
)
from tests.fixtures.redis_server import redis_server  # noqa: E402,F401

SPEC = KVSpec(model="server-test", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16")


def key(i: int, tag: str = "") -> str:
    return hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()


def blob(i: int, n_tokens: int = 32, tag: str = "") -> memoryview:
    g = torch.Generator().manual_seed(int(key(i, tag)[:8], 16))
    return encode(torch.randn(2, 2, n_tokens, 2, 8, generator=g).half(), "raw")


def server_bytes_read(c: KVLayerClient) -> int:
    return sum(t.bytes_read for t in c.stats().tiers)


def code_of(fn) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code()


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("codec", ["raw", "lz4", "int8"])
def test_kvcache_round_trip_through_remote_tier_is_bit_exact(kvlayer_server, codec) -> None:
    tokens = list(range(1000, 1000 + 3 * 64 + 17))  # 3 full chunks + a partial one
    kv = torch.randn(2, 2, len(tokens), 2, 8).half()
    cfg = {"chunk_size": 64, "cpu_bytes": 0, "server_url": kvlayer_server.url, "server_codec": codec,
           "salt": codec, "retry_after_s": 0.2}
    with KVCache(SPEC, **cfg) as writer:
        assert writer.store(tokens, kv) == 4
        keys = writer.keys(tokens)
    # A second "engine process": its own client, nothing local.
    with KVCache(SPEC, **cfg) as reader:
        n, got = reader.retrieve(tokens)
        assert n == len(tokens) and got is not None
        expect = torch.cat([decode(encode(kv[:, :, s:s + 64].contiguous(), codec)) for s in range(0, len(tokens), 64)], 2)
        assert torch.equal(got, expect)  # bit-exact w.r.t. what the codec stored
        if codec != "int8":
            assert torch.equal(got, kv)
        assert reader.lookup(tokens).hit_tokens == len(tokens)
    with kvlayer_server.client() as c:
        raw = c.get(keys)
        assert all(b is not None for b in raw)
        assert bytes(raw[0]) == bytes(encode(kv[:, :, :64].contiguous(), codec, key=keys[0]))  # the client's blob, byte for byte


def test_multi_megabyte_blobs_stream_in_frames(kvlayer_server) -> None:
    # 5.2 MB blobs: above gRPC's default 4 MiB message limit; they travel as 1 MiB frames.
    big = [encode(torch.randn(10, 2, 256, 8, 64, generator=torch.Generator().manual_seed(i)).half(), "raw")
           for i in range(2)]
    assert len(big[0]) > 5 << 20
    ks = [key(i, "big") for i in range(2)]
    with kvlayer_server.client() as c:
        assert c.put(list(zip(ks, big, strict=True))) == [True, True]
        got = c.get([ks[1], key(99, "absent"), ks[0]])
    assert got[1] is None
    assert bytes(got[0]) == bytes(big[1]) and bytes(got[2]) == bytes(big[0])


def test_lookup_and_exists_move_no_data(kvlayer_server) -> None:
    tokens = np.arange(5000, 5000 + 256 * 3)
    with KVCache(SPEC, cpu_bytes=0, server_url=kvlayer_server.url, salt="lookup") as cache, \
            kvlayer_server.client() as c:
        cache.store(tokens, torch.randn(2, 2, len(tokens), 2, 8).half())
        keys = cache.keys(tokens)
        before = server_bytes_read(c)
        out_before = c.stats().counters["bytes_out"]
        assert cache.lookup(tokens).hit_tokens == len(tokens)
        # the server computes the same chained keys from tokens + namespace
        r = c.lookup(tokens=tokens.tolist(), namespace=cache.namespace, chunk_size=256)
        assert (r.hit_chunks, r.hit_tokens, list(r.tiers)) == (3, len(tokens), ["cpu"] * 3)
        longer = c.lookup(keys=keys + [key(7, "missing")] + keys)
        assert (longer.hit_chunks, longer.num_chunks) == (3, 7)
        assert c.exists(keys + [key(8, "missing")]) == [True, True, True, False]
        assert server_bytes_read(c) == before
        assert c.stats().counters["bytes_out"] == out_before
        assert c.get(keys[:1])[0] is not None
        assert server_bytes_read(c) > before  # the probe is able to see a read


# ---------------------------------------------------------------------- control ops
def test_pin_evict_and_documents(kvlayer_server) -> None:
    ns = hashlib.sha256(b"pin-test").digest()
    from kvlayer.keys import document_keys, prefix_keys

    tokens = list(range(300))
    pkeys = prefix_keys(ns, tokens, 64)
    with kvlayer_server.client(tenant="pins") as c:
        assert all(c.put([(k, blob(i, tag="pin")) for i, k in enumerate(pkeys)]))
        lease = c.pin(tokens=tokens, namespace=ns, chunk_size=64)
        assert lease.num_keys == len(pkeys)
        assert c.evict(tokens=tokens, namespace=ns, chunk_size=64) == 0  # pinned
        assert c.unpin(lease.lease_id) == 1 and c.unpin(lease.lease_id) == 0  # releasing twice is a no-op
        assert c.evict(keys=pkeys[:2]) == 2
        assert c.exists(pkeys[:3]) == [False, False, True]
        # documents: registered by tokens, keys computed server-side like kvlayer.keys.document_keys
        dtoks = list(range(7000, 7000 + 128))
        dkeys = document_keys(ns, dtoks, 64)
        assert c.put([(k, blob(i, tag="doc")) for i, k in enumerate(dkeys)]) == [True, True]
        assert c.register_document("doc-1", tokens=dtoks, namespace=ns, chunk_size=64) == 2
        c.pin(doc_id="doc-1")
        c.pin(doc_id="doc-1", ttl_s=60)
        assert c.evict(doc_id="doc-1") == 0
        assert c.unpin(doc_id="doc-1") == 2
        assert c.evict(doc_id="doc-1") == 2 and c.exists(dkeys) == [False, False]
        assert code_of(lambda: c.pin(doc_id="nope")) == grpc.StatusCode.NOT_FOUND
        # force evicts through a pin
        c.pin(keys=pkeys[2:3])
        assert c.evict(keys=pkeys[2:3], force=True) == 1
        assert c.clear() >= 1 and c.keys() == []


def test_tenants_cannot_see_each_other(kvlayer_server) -> None:
    ks = [key(i, "tenant") for i in range(3)]
    with kvlayer_server.client(tenant="alice") as a, kvlayer_server.client(tenant="bob") as b:
        assert a.put([(k, blob(i, tag="alice")) for i, k in enumerate(ks)]) == [True] * 3
        # read
        assert b.get(ks) == [None, None, None]
        assert b.exists(ks) == [False] * 3 and b.lookup(keys=ks).hit_chunks == 0
        assert b.keys() == [] and sorted(a.keys()) == sorted(ks)
        # evict / clear
        assert b.evict(keys=ks, force=True) == 0 and b.clear() == 0
        assert a.exists(ks) == [True] * 3
        # pin: bob's pin does not protect alice's chunk, bob cannot release alice's lease
        b.pin(keys=ks[:1])
        assert a.evict(keys=ks[:1]) == 1
        lease = a.pin(keys=ks[1:2]).lease_id
        assert b.unpin(lease) == 0
        assert a.evict(keys=ks[1:2]) == 0  # still pinned by alice's lease
        # the same key written by bob is bob's own chunk
        assert b.put([(ks[2], blob(0, tag="bob"))]) == [True]
        assert bytes(a.get(ks[2:])[0]) == bytes(blob(2, tag="alice"))
        assert bytes(b.get(ks[2:])[0]) == bytes(blob(0, tag="bob"))
        assert a.stats().tenant == "alice" and b.stats().tenant_keys == 1
        # bad tenant names are refused
        with kvlayer_server.client(tenant="bad tenant!") as x:
            assert code_of(lambda: x.exists(ks)) == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------- errors
def test_malformed_requests_get_invalid_argument_and_server_keeps_serving(kvlayer_server) -> None:
    good = blob(1, tag="bad")
    corrupt = bytearray(good)
    corrupt[-3] ^= 0xFF
    with kvlayer_server.client() as c:
        assert code_of(lambda: c.put([(key(1, "bad"), b"not a kvlayer blob at all")])) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: c.put([(key(2, "bad"), corrupt)])) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: c.put([("NOT-HEX", good)])) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: c.get(["zz"])) == grpc.StatusCode.INVALID_ARGUMENT
        bad_ns = pb.LookupRequest(target=pb.Target(prefix=pb.TokenPrefix(namespace=b"short", tokens=[1, 2])))
        assert code_of(lambda: c.stub.Lookup(bad_ns)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: c.stub.Lookup(pb.LookupRequest())) == grpc.StatusCode.INVALID_ARGUMENT
        # a data frame before any blob header, and a blob that ends early
        frames = [pb.PutFrame(data=b"xx")]
        assert code_of(lambda: c.stub.Put(iter(frames))) == grpc.StatusCode.INVALID_ARGUMENT
        frames = [pb.PutFrame(key=key(3, "bad"), total_len=len(good), data=bytes(good[:10]))]
        assert code_of(lambda: c.stub.Put(iter(frames))) == grpc.StatusCode.INVALID_ARGUMENT
        # nothing of the refused uploads was stored, and the next good request works
        assert c.exists([key(1, "bad"), key(2, "bad"), key(3, "bad")]) == [False] * 3
        assert c.put([(key(4, "bad"), good)]) == [True]
        assert bytes(c.get([key(4, "bad")])[0]) == bytes(good)
        assert c.stats().counters["inflight_bytes"] == 0  # refused uploads released their reservations

        def stalled():  # an upload whose client gives up (deadline) half-way
            yield wire.encode_put_frame(key(5, "bad"), len(good), memoryview(good)[:10], False)
            time.sleep(3)

        assert code_of(lambda: c._puts[0](stalled(), timeout=1)) == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 30
        while c.stats().counters["inflight_bytes"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.stats().counters["inflight_bytes"] == 0 and c.exists([key(5, "bad")]) == [False]


def test_one_channel_survives_malformed_traffic(kvlayer_server) -> None:
    """Undecodable requests used to leave their HTTP/2 stream open (grpcio's deserializer path):
    after max_concurrent_streams (64) of them every call on the connection got UNAVAILABLE."""
    good = blob(7, tag="wedge")
    with kvlayer_server.client(channels=1) as c:
        ch = c._channels[0]
        raw = {m: ch.unary_unary(f"/kvlayer.v1.KVLayer/{m}", request_serializer=lambda x: x,
                                 response_deserializer=lambda x: x)
               for m in ("Health", "Stats", "Lookup", "Exists", "Pin", "Unpin", "Evict", "RegisterDocument", "Keys")}
        raw_get = ch.unary_stream("/kvlayer.v1.KVLayer/Get", request_serializer=lambda x: x,
                                  response_deserializer=lambda x: x)
        codes = set()
        for i in range(200):  # 3x the server's streams per connection
            name = list(raw)[i % len(raw)]
            codes.add(code_of(lambda n=name, i=i: raw[n](b"\xff\xff\xff" + bytes([i % 256]), timeout=10)))
            if i % 10 == 0:
                codes.add(code_of(lambda: list(raw_get(b"\x0a\x05ab", timeout=10))))
        assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
        # the same connection still serves every kind of call
        assert c.health().status == pb.HealthResponse.SERVING
        assert c.put([(key(1, "wedge"), good)]) == [True]
        assert bytes(c.get([key(1, "wedge")])[0]) == bytes(good)
        assert c.exists([key(1, "wedge")]) == [True] and c.evict(keys=[key(1, "wedge")]) == 1


def test_pins_and_documents_are_bounded_per_tenant(kvlayer_server_factory) -> None:
    srv = kvlayer_server_factory("--auth-token", "adm", "--tenant-token", "a=ta", "--tenant-token", "b=tb",
                                 "--metadata-bytes", "1MiB", disk=False)  # a third of it per tenant
    ks = [key(i, "quota") for i in range(1000)]  # ~257 KB of pins or document per 1000 keys
    with srv.client(token="ta") as a, srv.client(token="tb") as b, srv.client(token="adm") as adm:
        lease = a.pin(keys=ks).lease_id
        with pytest.raises(grpc.RpcError) as ei:
            a.pin(keys=ks)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in ei.value.details()
        assert b.pin(keys=ks).num_keys == 1000  # another tenant has its own share
        assert a.unpin(lease) == 1
        a.pin(keys=ks, ttl_s=0.2)  # the room came back; an expiring lease gives it back on its own
        deadline = time.monotonic() + 30
        while True:
            try:
                a.pin(keys=ks)
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
        for bad in (float("nan"), float("inf"), -1.0):
            assert code_of(lambda t=bad: a.pin(keys=ks[:1], ttl_s=t)) == grpc.StatusCode.INVALID_ARGUMENT
        # documents share the quota; replacing a document gives its old keys back first
        assert code_of(lambda: a.register_document("d", keys=ks)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert a.clear() == 0
        assert a.register_document("d", keys=ks) == 1000 and a.register_document("d", keys=ks) == 1000
        assert code_of(lambda: a.register_document("x" * 300, keys=ks[:1])) == grpc.StatusCode.INVALID_ARGUMENT
        counters = adm.stats().counters
        assert 0 < counters["metadata_bytes"] <= counters["metadata_limit"] == 1 << 20
        assert a.clear() == 0 and b.clear() == 0
        assert adm.stats().counters["metadata_bytes"] == 0


def test_oversized_unauthenticated_and_wrong_tenant(kvlayer_server_factory, tmp_path: Path) -> None:
    sock = tmp_path / "kvl.sock"
    srv = kvlayer_server_factory("--auth-token", "s3cret", "--tenant-token", "team-a=tok-a", "--max-blob-bytes", "1MiB",
                                 "--max-request-bytes", "3MiB", "--unix-socket", str(sock), "--max-concurrent-rpcs", "2",
                                 disk=False)
    ok = blob(5, tag="limits")
    with KVLayerClient(f"unix://{sock}", token="s3cret") as uds:  # same server over a Unix socket
        assert uds.put([(key(4), ok)]) == [True] and bytes(uds.get([key(4)])[0]) == bytes(ok)
        assert uds.evict(keys=[key(4)]) == 1
    with srv.client() as anon, srv.client(token="wrong") as wrong, srv.client(token="s3cret") as admin, \
            srv.client(token="tok-a", tenant="team-b") as liar, srv.client(token="tok-a") as team_a:
        assert anon.health().status == pb.HealthResponse.SERVING  # probes need no token
        assert code_of(lambda: anon.stats()) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: wrong.put([(key(0), ok)])) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: wrong.get([key(0)])) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: liar.exists([key(0)])) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: team_a.clear(all_tenants=True)) == grpc.StatusCode.PERMISSION_DENIED
        assert team_a.stats().tenant == "team-a"
        # oversized: one blob above --max-blob-bytes; a request above --max-request-bytes
        big = encode(torch.zeros(4, 2, 256, 8, 64, dtype=torch.float16), "raw")  # 2 MiB
        assert code_of(lambda: admin.put([(key(1), big)])) == grpc.StatusCode.RESOURCE_EXHAUSTED
        many = [(key(i, "many"), encode(torch.zeros(2, 2, 256, 8, 64, dtype=torch.float16), "raw")) for i in range(4)]
        assert code_of(lambda: admin.put(many)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # a single message above the server's message limit (4 MiB) is refused by gRPC itself
        with KVLayerClient(srv.url, token="s3cret", frame_bytes=6 << 20) as fat:
            huge = encode(torch.zeros(12, 2, 256, 8, 64, dtype=torch.float16), "raw")
            assert code_of(lambda: fat.put([(key(2), huge)])) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # more concurrent RPCs than --max-concurrent-rpcs: refused, not queued without bound
        release = threading.Event()

        def held() -> None:
            def gen():  # an upload that stays open until released
                yield wire.encode_put_frame(key(7), len(ok), memoryview(ok)[:10], False)
                release.wait(60)
                yield wire.encode_put_frame("", 0, memoryview(ok)[10:], False)

            admin._puts[0](gen(), timeout=90, metadata=admin.metadata)

        holders = [threading.Thread(target=held) for _ in range(2)]
        for t in holders:
            t.start()
        try:
            deadline = time.monotonic() + 60
            while _metric(srv.metrics_url, "kvlayer_server_active_rpcs") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            with srv.client(token="s3cret") as other:  # another connection (this one's HTTP/2 streams are used up)
                assert code_of(lambda: other.exists([key(0)])) == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            release.set()
            for t in holders:
                t.join(60)
        # and the server still serves the next good request
        assert admin.put([(key(3), ok)]) == [True]
        assert bytes(admin.get([key(3)])[0]) == bytes(ok)
        assert admin.clear(all_tenants=True) == 2  # key(3) and the two held uploads of key(7)
    # the remote tier with a wrong token degrades to misses, never raises
    with KVCache(SPEC, cpu_bytes=0, server_url=srv.url, auth_token="wrong") as cache:
        toks = list(range(64))
        cache.store(toks, torch.randn(2, 2, 64, 2, 8).half())
        assert cache.retrieve(toks) == (0, None)
        assert cache.stats()["store"]["tier_errors"] >= 1
    with KVCache(SPEC, cpu_bytes=0, server_url=srv.url, auth_token="tok-a", tenant="team-a") as cache:
        toks = list(range(64))
        kv = torch.randn(2, 2, 64, 2, 8).half()
        cache.store(toks, kv)
        n, got = cache.retrieve(toks)
        assert n == 64 and torch.equal(got, kv)


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{"))


# ---------------------------------------------------------------------- CLI and metrics
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "kvlayer.server", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=REPO)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    from kvlayer.server.__main__ import main

    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_client_commands(kvlayer_server, capsys) -> None:
    ks = [key(i, "cli") for i in range(3)]
    with kvlayer_server.client(tenant="cli") as c:
        c.put([(k, blob(i, tag="cli")) for i, k in enumerate(ks)])
    common = ["--server", kvlayer_server.url, "--tenant", "cli"]
    r = _cli("stats", *common, "--json")  # the real entry point, once
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["tenant"] == "cli" and s["tenant_keys"] == 3 and s["tiers"][0]["name"] == "cpu"
    rc, out, _ = _main(capsys, "stats", *common)
    assert rc == 0 and "cpu" in out and "disk" in out and "bytes_in" in out
    rc, out, _ = _main(capsys, "lookup", *common, "--keys", ",".join(ks + [key(9, "none")]), "--json")
    assert json.loads(out) == {"hit_chunks": 3, "num_chunks": 4, "hit_tokens": 0, "tiers": ["cpu"] * 3}
    rc, out, _ = _main(capsys, "lookup", *common, "--keys", ",".join(ks))
    assert "3 of 3 chunks" in out
    lease = json.loads(_main(capsys, "pin", *common, "--keys", ks[0], "--ttl", "60", "--json")[1])["lease_id"]
    assert json.loads(_main(capsys, "evict", *common, "--keys", ",".join(ks[:2]), "--json")[1]) == {"removed": 1}
    assert json.loads(_main(capsys, "unpin", *common, "--lease", lease, "--json")[1]) == {"released": 1}
    rc, out, _ = _main(capsys, "unpin", *common, "--lease", lease)
    assert rc == 1 and "released 0" in out
    # ks[0] (was pinned) and ks[2] are left
    assert json.loads(_main(capsys, "clear", *common, "--json")[1]) == {"removed": 2}
    rc, _, err = _main(capsys, "stats", "--server", "127.0.0.1:1", "--timeout", "1")
    assert rc == 2 and "UNAVAILABLE" in err
    for cmd in ("serve", "stats", "lookup", "pin", "unpin", "evict", "clear"):
        with pytest.raises(SystemExit) as ei:
            _main(capsys, cmd, "--help")
        assert ei.value.code == 0 and "--" in capsys.readouterr().out, cmd


def test_metrics_endpoint(kvlayer_server) -> None:
    with kvlayer_server.client() as c:
        c.put([(key(0, "metrics"), blob(0))])
        c.get([key(0, "metrics"), key(1, "metrics")])
    text = urllib.request.urlopen(kvlayer_server.metrics_url, timeout=10).read().decode()
    for name in ('kvlayer_server_requests_total{code="OK",rpc="Put"}', 'kvlayer_server_rpc_latency_seconds_bucket',
                 'rpc="Get"', "kvlayer_server_hits_total", "kvlayer_server_misses_total",
                 'kvlayer_server_bytes_total{direction="in"}', 'kvlayer_tier_evictions_total{tier="cpu"}',
                 'kvlayer_tier_used_bytes{tier="disk"}'):
        assert name in text, name
    hits = [ln for ln in text.splitlines() if ln.startswith("kvlayer_server_hits_total")]
    assert float(hits[0].split()[-1]) >= 1


# ---------------------------------------------------------------------- lifecycle
def test_sigterm_finishes_writes_and_restart_finds_them_on_disk(kvlayer_server_factory) -> None:
    srv = kvlayer_server_factory(cpu_bytes="32MiB")
    items = [(key(i, "term"), blob(i, n_tokens=256, tag="term")) for i in range(40)]
    late = (key(0, "late"), blob(0, n_tokens=256, tag="late"))
    with srv.client() as c:
        assert all(c.put(items))  # not durable: disk writes are queued behind the ack
        assert c.register_document("handbook", keys=[k for k, _ in items[:3]]) == 3

        def frames():  # SIGTERM arrives while this upload is half sent: it must still complete
            mv = memoryview(late[1])
            yield wire.encode_put_frame(late[0], len(mv), mv[:100], False)
            deadline = time.monotonic() + 30  # the upload must be running on the server before SIGTERM
            while _metric(srv.metrics_url, "kvlayer_server_active_rpcs") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            yield wire.encode_put_frame("", 0, mv[100:], False)

        assert c._puts[0](frames(), timeout=30).stored == [True]
    assert srv.proc.wait(30) == 0  # graceful: exit code 0 after flushing the queue
    items.append(late)
    assert "stopped in" in srv.log_text()
    srv.start()
    with srv.client() as c:
        got = c.get([k for k, _ in items])
        tiers = {t.name: t for t in c.stats().tiers}
        assert c.pin(doc_id="handbook").num_keys == 3  # documents survive a restart (with a disk tier)
        assert c.evict(doc_id="handbook") == 0 and c.unpin(doc_id="handbook") == 1
    assert tiers["cpu"].num_keys == 0 or tiers["disk"].num_keys >= len(items)
    assert [bytes(b) if b else None for b in got] == [bytes(b) for _, b in items]


def test_blobs_swapped_on_the_server_disk_are_misplaced_misses_in_stats_and_metrics(kvlayer_server_factory) -> None:
    """Two values swapped on the server's disk (intact blobs under the other's key): misses, counted
    as ``misplaced`` per tier in Stats and in /metrics, and deleted."""
    srv = kvlayer_server_factory(cpu_bytes="32MiB")
    x = torch.randn(2, 2, 32, 2, 8).half()
    items = [(k, encode(x + i, "raw", key=k)) for i, k in enumerate(key(i, "swap") for i in range(2))]  # key-bound
    with srv.client() as c:
        assert all(c.put(items))
    srv.stop()  # SIGTERM: the disk writes are flushed
    files = sorted(srv.disk_dir.rglob("*.kvb"))  # named by the server's (tenant-bound) keys
    assert len(files) == 2 and {f.read_bytes() for f in files} == {bytes(v) for _, v in items}
    a, b = (f.read_bytes() for f in files)
    files[0].write_bytes(b)
    files[1].write_bytes(a)
    srv.start()
    with srv.client() as c:
        assert c.get([k for k, _ in items]) == [None, None]
        disk = {t.name: t for t in c.stats().tiers}["disk"]
        assert (disk.misplaced, disk.corrupt) == (2, 0)
        assert c.get([k for k, _ in items]) == [None, None]  # deleted: not read again
        assert {t.name: t for t in c.stats().tiers}["disk"].misplaced == 2
    assert _metric(srv.metrics_url, "kvlayer_tier_misplaced_total") == 2


@pytest.mark.parametrize("flags,message", [
    (["--cpu-bytes", "0", "--no-disk"], "no storage tier"),
    (["--no-disk", "--durable"], "--durable needs a disk tier"),
    (["--no-disk", "--tenant-token", "no-equals-sign"], "expected TENANT=TOKEN"),
    (["--no-disk", "--auth-token-file", "/nonexistent/token"], "--auth-token-file /nonexistent/token"),
    (["--no-disk", "--host", "203.0.113.7"], "cannot bind 203.0.113.7:0"),  # TEST-NET-3: not this host's
])
def test_server_start_up_errors_are_one_clear_line(tmp_path: Path, flags: list[str], message: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "kvlayer.server", "serve", "--port", "0", "--metrics-port", "0", *flags],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and message in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("kvlayer serve: ")], r.stderr


def test_a_write_outlasting_the_call_timeout_lands_within_put_timeout_s(kvlayer_server_factory) -> None:
    """Writes run in the background: one held up longer than ``timeout_s`` (here: the server
    stopped for 1.5 s) is late, not failed, unless it outlasts ``put_timeout_s``."""
    from kvlayer.config import TierConfig
    from kvlayer.errors import TierError
    from kvlayer.storage import build_tier

    srv = kvlayer_server_factory(disk=False)
    tiers = {t: build_tier(TierConfig(kind="remote", name="remote", url=srv.url,
                                      options={"timeout_s": 0.5, "put_timeout_s": t, "channels": 1}))
             for t in (30.0, 0.5)}
    try:
        for t, tier in tiers.items():
            assert tier.put(key(0, f"warm{t}"), blob(0, tag=f"warm{t}"))  # connected before the stop
        for t, tier in tiers.items():
            os.kill(srv.pid, signal.SIGSTOP)
            threading.Timer(1.5, os.kill, (srv.pid, signal.SIGCONT)).start()
            if t > 1.5:
                assert tier.put(key(1, "late"), blob(1, tag="late"))
            else:
                with pytest.raises(TierError, match="DEADLINE_EXCEEDED"):
                    tier.put(key(2, "late"), blob(2, tag="late"))
                time.sleep(1.6)  # the server is running again before the next test
        with srv.client() as c:
            assert c.exists([key(1, "late")]) == [True]
    finally:
        for tier in tiers.values():
            tier.close()


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("redis-server") is None,
                    reason="needs openssl and redis-server")
def test_tls_durable_server_with_redis_lower_tier(kvlayer_server_factory, redis_server, tmp_path: Path) -> None:  # noqa: F811
    cert, keyf = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(keyf), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    srv = kvlayer_server_factory("--tls-cert", str(cert), "--tls-key", str(keyf), "--durable", "--redis-url",
                                 redis_server.url, cpu_bytes="48MiB", tls_ca=str(cert))
    items = [(key(i, "tls"), blob(i, tag="tls")) for i in range(6)]
    with srv.client() as c:
        assert c.put(items) == [True] * 6  # --durable: acknowledged once on disk, the client did not ask
        assert [bytes(b) for b in c.get([k for k, _ in items])] == [bytes(b) for _, b in items]
        assert [t.name for t in c.stats().tiers] == ["cpu", "disk", "redis"]
    with KVLayerClient(srv.url.replace("grpcs://", "grpc://"), timeout_s=2) as plain:
        assert code_of(lambda: plain.exists([items[0][0]])) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    srv.kill()
    srv.start()
    with srv.client() as c:
        r = c.lookup(keys=[k for k, _ in items])
        assert list(r.tiers) == ["disk"] * 6  # the CPU tier died with the process; disk kept every acked blob
        assert [bytes(b) for b in c.get([k for k, _ in items])] == [bytes(b) for _, b in items]
        c.put([(key(9, "tls"), blob(9, tag="tls"))])
    assert srv.stop() == 0  # graceful stop flushes the write-through queue to Redis
    import redis

    r = redis.Redis.from_url(redis_server.url)
    try:
        stored = [k.decode() for k in r.scan_iter(match="*", count=1000)]
    finally:
        r.close()
    assert any(key(9, "tls") in k for k in stored), stored[:5]
