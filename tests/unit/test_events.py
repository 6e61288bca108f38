"""Store events (``kvlayer.events``): the bounded subscriptions, what the blob store publishes per
tier (stored, evicted, deleted, corrupt, cleared), the server's tenant view, and their
translation into vLLM's KV events and metrics stats (``connectors/vllm/events.py``, ``metrics.py``)."""

from __future__ import annotations

import threading

import pytest

from kvlayer.events import EventHub, StoreEvent, only_prefix
from kvlayer.storage.blobstore import BlobStore
from kvlayer.storage.disk import DiskTier
from kvlayer.storage.memory import MemoryTier
from tests.fixtures.tier_data import blob, key

KiB = 1 << 10


def rows(events: list[StoreEvent]) -> list[tuple[str, str, tuple[str, ...], str]]:
    return [(e.kind, e.tier, e.keys, e.reason) for e in events]


# ---------------------------------------------------------------------------------- the queue
def test_no_subscriber_nothing_is_kept() -> None:
    hub = EventHub()
    hub.publish("stored", "cpu", "memory", ["a"], "put")
    sub = hub.subscribe()
    assert sub.take() == []
    hub.publish("stored", "cpu", "memory", ["b"], "put")
    assert [e.keys for e in sub.take()] == [("b",)]


def test_full_queue_drops_oldest_and_counts() -> None:
    hub = EventHub()
    sub = hub.subscribe(max_keys=3)
    for i in range(10):
        hub.publish("stored", "cpu", "memory", [f"k{i}"], "put")
    got = sub.take()
    assert [e.keys[0] for e in got] == ["k7", "k8", "k9"]
    assert sub.dropped == 7
    assert [e.seq for e in got] == [8, 9, 10]  # seq shows the gap too


def test_bound_counts_keys_and_keeps_the_newest_even_if_alone_too_big() -> None:
    hub = EventHub()
    sub = hub.subscribe(max_keys=4)
    hub.publish("stored", "cpu", "memory", ["a", "b", "c"], "put")
    hub.publish("stored", "cpu", "memory", ["d", "e"], "put")  # 5 keys > 4: the first event goes
    assert [e.keys for e in sub.take()] == [("d", "e")] and sub.dropped == 1
    hub.publish("removed", "cpu", "memory", [str(i) for i in range(10)], "evicted")
    assert len(sub.take()[0].keys) == 10  # one event over the bound is kept (never split)


def test_each_subscriber_has_its_own_queue_and_close_unsubscribes() -> None:
    hub = EventHub()
    a, b = hub.subscribe(max_keys=1), hub.subscribe()
    hub.publish("stored", "cpu", "memory", ["x"], "put")
    hub.publish("stored", "cpu", "memory", ["y"], "put")
    assert [e.keys for e in b.take()] == [("x",), ("y",)]
    assert [e.keys for e in a.take()] == [("y",)] and a.dropped == 1 and b.dropped == 0
    a.close()
    assert hub.subscribers == 1
    hub.publish("stored", "cpu", "memory", ["z"], "put")
    assert a.take() == [] and len(b.take()) == 1


def test_wait_returns_on_publish_and_on_close() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    t = threading.Timer(0.05, lambda: hub.publish("stored", "cpu", "memory", ["k"], "put"))
    t.start()
    assert [e.keys for e in sub.wait(30)] == [("k",)]
    t = threading.Timer(0.05, sub.close)
    t.start()
    assert sub.wait(30) == [] and sub.closed


def test_bad_bound_is_refused() -> None:
    with pytest.raises(ValueError):
        EventHub().subscribe(max_keys=0)


def test_tenant_view_strips_prefix_and_hides_other_keys() -> None:
    ev = [StoreEvent(1, "stored", "cpu", "memory", ("aaaakey1", "bbbbkey2"), "put", 0.0),
          StoreEvent(2, "removed", "cpu", "memory", ("bbbbkey3",), "evicted", 0.0),
          StoreEvent(3, "cleared", "redis", "redis", (), "cleared", 0.0)]
    mine = only_prefix(ev, "aaaa")
    assert rows(mine) == [("stored", "cpu", ("key1",), "put"), ("cleared", "redis", (), "cleared")]
    assert only_prefix(ev, "") == ev


# ---------------------------------------------------------------------------------- the blob store
def test_store_reports_put_eviction_write_through_delete_and_clear(tmp_path) -> None:
    b = blob(0, 64 * KiB)
    mem, disk = MemoryTier("cpu", 3 * len(b)), DiskTier(tmp_path / "d", 100 * len(b))
    store = BlobStore([mem, disk])
    sub = store.events.subscribe()
    try:
        for i in range(4):
            assert store.put(key(i), blob(i, 64 * KiB))
        assert store.flush(30)
        evs = sub.take()
        cpu = [r for r in rows(evs) if r[1] == "cpu"]
        assert cpu[:4] == [("stored", "cpu", (key(0),), "put"), ("stored", "cpu", (key(1),), "put"),
                           ("stored", "cpu", (key(2),), "put"), ("removed", "cpu", (key(0),), "evicted")]
        assert cpu[4] == ("stored", "cpu", (key(3),), "put")
        on_disk = {k for kind, tier, ks, _ in rows(evs) if kind == "stored" and tier == "disk" for k in ks}
        assert on_disk == {key(i) for i in range(4)}
        assert all(e.medium == ("memory" if e.tier == "cpu" else "disk") for e in evs)

        # a read from disk promotes: stored in cpu (promoted), which evicts the LRU one
        assert store.get_blob(key(0)) is not None
        assert rows(sub.take()) == [("removed", "cpu", (key(1),), "evicted"), ("stored", "cpu", (key(0),), "promoted")]

        # delete: each tier reports only what it had
        assert store.delete([key(0), key(1)]) == 2
        got = rows(sub.take())
        assert ("removed", "cpu", (key(0),), "deleted") in got
        assert ("removed", "disk", (key(0), key(1)), "deleted") in got
        assert not any(r[1] == "cpu" and key(1) in r[2] for r in got)

        # clear: tiers that index their keys list them
        store.clear()
        got = rows(sub.take())
        assert [(kind, tier, set(ks), why) for kind, tier, ks, why in got] == [
            ("removed", "cpu", {key(2), key(3)}, "cleared"), ("removed", "disk", {key(2), key(3)}, "cleared")]
    finally:
        store.close()


def test_store_without_subscriber_publishes_nothing_and_asks_no_extra_exists() -> None:
    calls = []

    class Counting(MemoryTier):
        def exists_many(self, keys):  # type: ignore[override]
            calls.append(len(keys))
            return super().exists_many(keys)

    store = BlobStore([Counting("cpu", 1 << 20)])
    store.put(key(1), blob(1, 4 * KiB))
    store.delete([key(1)])
    assert calls == [1]  # the delete's own locate, no per-tier check for events
    store.close()


# ---------------------------------------------------------------------------------- vLLM's format
def test_translation_to_vllm_events() -> None:
    pytest.importorskip("vllm")
    from kvlayer.connectors.vllm.events import KVLayerKVEvents, SchedulerEvents, to_vllm
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

    k = key(1)
    st = to_vllm(StoreEvent(1, "stored", "cpu", "memory", (k,), "put", 0.0), block_size=256)
    assert isinstance(st, BlockStored)
    assert st.block_hashes == [bytes.fromhex(k)] and st.block_size == 256 and st.token_ids == []
    assert (st.medium, st.locality, st.ownership) == ("CPU", "LOCAL", "kvlayer:cpu")
    rm = to_vllm(StoreEvent(2, "removed", "shared", "redis", (k,), "deleted", 0.0), block_size=256)
    assert isinstance(rm, BlockRemoved) and (rm.medium, rm.locality, rm.ownership) == ("STORAGE", "REMOTE",
                                                                                      "kvlayer:shared")
    disk = to_vllm(StoreEvent(3, "removed", "disk", "disk", (k,), "evicted", 0.0), block_size=256)
    assert (disk.medium, disk.locality) == ("STORAGE", "LOCAL")
    assert isinstance(to_vllm(StoreEvent(4, "cleared", "r", "redis", (), "cleared", 0.0), block_size=256),
                      AllBlocksCleared)

    # two workers' events are all kept (each TP rank stores its own shard under its own key)
    a, b = KVLayerKVEvents([st]), KVLayerKVEvents([rm])
    a.merge(b)
    a.increment_workers()
    assert a.aggregate().get_all_events() == [st, rm] and a.get_number_of_workers() == 2

    pend = SchedulerEvents(limit=2)
    pend.add(a)
    pend.extend([disk])
    assert pend.take() == [rm, disk] and pend.dropped == 1 and pend.take() == []


def test_metrics_stats_aggregate_and_reduce() -> None:
    pytest.importorskip("vllm")
    from kvlayer.connectors.vllm.metrics import KVLayerConnectorStats, Reporter
    from kvlayer.connectors.vllm.stats import WorkerCounters

    c = WorkerCounters()
    r = Reporter(c, ("saved_chunks", "dropped_saves"), samples=c.samples)
    assert r.report() is None  # nothing happened
    c.add(saved_chunks=3)
    c.samples.observe("save_seconds", 0.5)
    first = r.report()
    assert first is not None and first.total("saved_chunks") == 3
    c.add(saved_chunks=2, dropped_saves=1)
    second = r.report()
    assert second is not None and second.total("saved_chunks") == 2 and second.total("dropped_saves") == 1
    first.aggregate(second)
    assert first.total("saved_chunks") == 5 == c.as_dict()["saved_chunks"]  # deltas add up to the counter
    red = first.reduce()
    assert red["saved_chunks"] == 5 and red["save_seconds_count"] == 1 and red["save_seconds_avg_ms"] == 500.0

    tiered = KVLayerConnectorStats()
    tiered.add("hit_tokens", 256, "cpu")
    tiered.add("hit_tokens", 512, "disk")
    again = KVLayerConnectorStats(data=tiered.data)  # as vLLM rebuilds it from the dict it shipped
    assert again.reduce() == {"hit_tokens[cpu]": 256, "hit_tokens[disk]": 512} and not again.is_empty()
