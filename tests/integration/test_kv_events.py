"""KV events: what kvlayer's tiers gain and lose, as a router sees it.

- ``kvlayer serve``: a real server process, its ``WatchEvents`` stream through ``KVLayerClient``:
  a stored chunk, then the same chunk evicted from the CPU tier by later puts, arrive as stored
  then removed, in order; tenants see only their own keys; auth as every RPC.
- vLLM: a real CPU engine (single process, tiny model) publishing its KV events over ZMQ, read
  back through vLLM's replay socket like a router would: kvlayer's chunks appear as
  ``BlockStored`` (medium CPU, ownership ``kvlayer:cpu``) and, once later prompts evicted them
  from the small CPU tier, as ``BlockRemoved``, in that order.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

grpc = pytest.importorskip("grpc")

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kvlayer.codec import encode  # noqa: E402
from kvlayer.events import StoreEvent  # noqa: E402
from kvlayer.rpc.client import KVLayerClient  # noqa: E402
from tests.fixtures.kvlayer_server import kvlayer_server_factory_fixture  # noqa: E402,F401

CHUNK = 256
TOKEN = "events-admin"


def key(i: int, tag: str = "ev") -> str:
    return hashlib.sha256(f"{tag}/{i}".encode()).hexdigest()


def blob(i: int, tag: str = "ev", nbytes: int = 256 << 10) -> bytes:
    g = torch.Generator().manual_seed(i)
    return bytes(encode(torch.randn(nbytes // 2, generator=g).half().reshape(-1, 64), "raw", key=key(i, tag)))


class Collector:
    """Reads a stream on a thread until told to stop; keeps every event."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.events: list[StoreEvent] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.stream:
                with self.cond:
                    self.events.append(ev)
                    self.cond.notify_all()
        except grpc.RpcError:
            pass  # cancelled

    def wait_for(self, pred: Any, timeout: float = 30.0) -> list[StoreEvent]:
        with self.cond:
            self.cond.wait_for(lambda: pred(self.events), timeout)
            return list(self.events)

    def stop(self) -> None:
        self.stream.cancel()
        self.thread.join(10)


def _index(events: list[StoreEvent], kind: str, tier: str, k: str) -> int:
    return next((i for i, e in enumerate(events) if e.kind == kind and e.tier == tier and k in e.keys), -1)


def test_server_stream_reports_stored_then_evicted_in_order(kvlayer_server_factory) -> None:
    srv = kvlayer_server_factory("--auth-token", TOKEN, "--tenant-token", f"team={TOKEN}-team", cpu_bytes="40MiB")
    with KVLayerClient(srv.url, token=TOKEN) as c, KVLayerClient(srv.url, token=f"{TOKEN}-team") as team:
        watch = Collector(c.watch_events())
        team_watch = Collector(team.watch_events())
        try:
            assert c.put([(key(0), blob(0))]) == [True]
            # what is left of 40 MiB for the CPU tier holds a few 256 KiB blobs: the later ones push
            # key 0 out of it (to disk)
            cap = next(t.capacity_bytes for t in c.stats().tiers if t.name == "cpu")
            n = cap // len(blob(0)) + 2
            assert c.put([(key(i), blob(i)) for i in range(1, n)]) == [True] * (n - 1)

            def evicted(evs: list[StoreEvent]) -> bool:
                return _index(evs, "removed", "cpu", key(0)) >= 0

            events = watch.wait_for(evicted)
            stored, removed = _index(events, "stored", "cpu", key(0)), _index(events, "removed", "cpu", key(0))
            assert 0 <= stored < removed, [(e.kind, e.tier, e.keys[:1]) for e in events]
            assert events[removed].reason == "evicted" and events[removed].medium == "memory"
            assert [e.seq for e in events] == sorted(e.seq for e in events)
            assert c.exists([key(0)]) == [True]  # still on disk: a removal is per tier
            assert watch.stream.dropped == 0

            # an explicit evict removes it from every tier holding it: a "deleted" event for the disk tier
            assert c.evict(keys=[key(0)]) == 1
            events = watch.wait_for(lambda evs: any(e.reason == "deleted" and key(0) in e.keys for e in evs))
            assert any(e.reason == "deleted" and e.tier == "disk" and key(0) in e.keys for e in events)

            # tenants: the team's stream saw none of the admin's keys, and sees its own
            assert team.put([(key(9, "team"), blob(9, "team"))]) == [True]
            tev = team_watch.wait_for(lambda evs: any(key(9, "team") in e.keys for e in evs))
            assert all(not (set(e.keys) & {key(i) for i in range(n)}) for e in tev)
        finally:
            watch.stop()
            team_watch.stop()

    with KVLayerClient(srv.url, token="wrong") as bad, pytest.raises(grpc.RpcError) as err:
        bad.watch_events(timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with KVLayerClient(srv.url, token=f"{TOKEN}-team") as team, pytest.raises(grpc.RpcError) as err:
        team.watch_events(all_tenants=True, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # each stream holds a handler thread: beyond max_watchers (8) the server says so, and a
    # cancelled stream gives its place back
    with KVLayerClient(srv.url, token=TOKEN) as c:
        streams = [c.watch_events(timeout=60) for _ in range(8)]
        with pytest.raises(grpc.RpcError) as err:
            c.watch_events(timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for st in streams:
            st.cancel()
        deadline = time.monotonic() + 30
        while True:
            try:
                c.watch_events(timeout=10).cancel()
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.2)


# ============================================================================ vLLM engine
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replay_events(endpoint: str, timeout_ms: int = 20000) -> list[Any]:
    """Every event batch vLLM's publisher still buffers, from its replay socket (ROUTER)."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    out: list[Any] = []
    try:
        sock.send_multipart((b"", (0).to_bytes(8, "big")))
        while True:
            _, _topic, seq, payload = sock.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:
                return out
            out.extend(decoder.decode(payload).events)
    finally:
        sock.close()


def scenario_events(args: dict[str, Any]) -> dict[str, Any]:
    from tests.integration.test_vllm import _connector, _engine, _gen, _kv_config, make_prompts

    P = make_prompts()
    # a CPU tier of ~5 chunks of the tiny model (float32: 2 layers x 2 x 256 tokens x 2 heads x 32 x 4 B
    # = 256 KiB per full chunk): the 'long' prompt fits, the 'pressure' prompts evict its chunks
    pub, replay = f"tcp://127.0.0.1:{args['pub_port']}", f"tcp://127.0.0.1:{args['replay_port']}"
    llm = _engine(_kv_config(None, cpu_bytes=args["cpu_bytes"]),
                  kv_events_config={"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": pub,
                                    "replay_endpoint": replay})
    conn = _connector(llm)
    cache = conn.cache
    keys = cache.keys(P["long"], full_only=True)
    _gen(llm, [P["long"]])
    conn.flush()
    stored_after_first = [k for k, w in zip(keys, cache.locate(keys), strict=True) if w is not None]
    for i in range(3):
        _gen(llm, [P[f"pressure{i}"]])
        conn.flush()
    gone = [k for k, w in zip(keys, cache.locate(keys), strict=True) if w is None]
    _gen(llm, [P["noise"][:40]], max_tokens=2)  # one more step carries the last events to the publisher
    events = replay_events(replay)
    rows = []
    for e in events:
        name = type(e).__name__
        rows.append({"type": name, "hashes": [h.hex() if isinstance(h, bytes) else h for h in
                                              getattr(e, "block_hashes", [])],
                     "medium": getattr(e, "medium", None), "ownership": getattr(e, "ownership", None),
                     "block_size": getattr(e, "block_size", None)})
    return {"keys": keys, "stored_after_first": stored_after_first, "gone": gone, "events": rows,
            "stats": conn.stats()["connector"], "chunk_size": cache.chunk_size}


@pytest.fixture(scope="module")
def engine_events(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("vllm")
    from tests.fixtures.tiny_model import tiny_model_dir
    from tests.integration.test_vllm import run_scenario

    tiny_model_dir()
    return run_scenario("events", tmp_path_factory.mktemp("events"), script=Path(__file__), cpu_bytes="1300KiB",
                        pub_port=_free_port(), replay_port=_free_port())


@pytest.mark.vllm
def test_engine_kv_events_show_kvlayer_chunks_stored_then_evicted(engine_events) -> None:
    r = engine_events
    ours = [e for e in r["events"] if (e["ownership"] or "").startswith("kvlayer:")]
    assert r["stored_after_first"] == r["keys"] and r["gone"], r  # the scenario really evicted
    for k in r["gone"]:
        stored = next(i for i, e in enumerate(ours) if e["type"] == "BlockStored" and k in e["hashes"])
        removed = next(i for i, e in enumerate(ours) if e["type"] == "BlockRemoved" and k in e["hashes"])
        assert stored < removed
        assert ours[stored]["medium"] == "CPU" and ours[stored]["ownership"] == "kvlayer:cpu"
        assert ours[stored]["block_size"] == r["chunk_size"]
    # vLLM's own block events still flow beside ours
    assert any(not (e["ownership"] or "").startswith("kvlayer:") for e in r["events"])


@pytest.mark.vllm
def test_openai_server_kv_events_carry_kvlayer_chunks(tmp_path: Path) -> None:
    """The OpenAI server: the worker (its own process) hands the events to the engine core, whose
    publisher a router reads."""
    pytest.importorskip("vllm")
    from kvlayer.testing import VLLMServer, http_json
    from tests.fixtures.tiny_model import tiny_model_dir
    from tests.integration.test_vllm import engine_env, make_prompts

    model = tiny_model_dir()
    env = engine_env()
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's default: engine in its own process
    replay = f"tcp://127.0.0.1:{_free_port()}"
    events_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{_free_port()}",
                  "replay_endpoint": replay}
    extra = {"chunk_size": CHUNK, "cpu_bytes": "128MiB"}
    prompt = make_prompts()["long"]
    with VLLMServer(model, tmp_path, extra=extra, env=env,
                    args=("--max-model-len", "2048", "--kv-events-config", json.dumps(events_cfg))) as srv:
        body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
        assert http_json("POST", srv.url + "/v1/completions", body)[0] == 200
        deadline = time.monotonic() + 60
        while True:
            # the saves land in the background; a later step carries their events to the publisher
            assert http_json("POST", srv.url + "/v1/completions", {**body, "prompt": prompt[:40]})[0] == 200
            events = replay_events(replay)
            ours = [e for e in events if (getattr(e, "ownership", None) or "").startswith("kvlayer:")]
            stored = {h for e in ours if type(e).__name__ == "BlockStored" for h in e.block_hashes}
            if len(stored) >= len(prompt) // CHUNK or time.monotonic() > deadline:
                break
    assert len(stored) >= len(prompt) // CHUNK, [type(e).__name__ for e in events]
    assert all(e.medium == "CPU" and e.block_size == CHUNK for e in ours if type(e).__name__ == "BlockStored")


if __name__ == "__main__":
    name, arg_file = sys.argv[1], sys.argv[2]
    a = json.loads(Path(arg_file).read_text())
    res = globals()[f"scenario_{name}"](a)
    Path(a["out"]).write_text(json.dumps(res))
