"""The tiered store: corruption as misses, failing tiers, bounded background writes, demotion,
promotion, pins against eviction, and lookups that move no data."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest
import torch

from kvlayer.codec import Codec, decode, get_codec
from kvlayer.codec.header import FORMAT_VERSION, KEY_DIGEST_AT, KEY_DIGEST_LEN, checksum, parse_header, seal
from kvlayer.errors import CorruptBlobError
from kvlayer.storage.base import Tier
from kvlayer.storage.blobstore import BlobStore, Formats
from kvlayer.storage.breaker import Breaker, RetryPolicy
from kvlayer.storage.disk import DiskTier
from kvlayer.storage.hierarchy import TieredStore
from kvlayer.storage.memory import MemoryTier

SHAPE = (2, 2, 16, 2, 8)  # [layers, 2, tokens, heads, dim] fp16 = 2 KiB raw


def key(i: int | str) -> str:
    return hashlib.sha256(f"chunk{i}".encode()).hexdigest()


def chunk(seed: int, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).half()


RAW = get_codec("raw")
LZ4 = get_codec("lz4")
BLOB = len(RAW.encode(chunk(0)))


class FlakyTier(MemoryTier):
    """A memory tier that raises from every data method while ``broken`` (a dead remote, a full
    disk); counts the calls that reach it."""

    kind = "flaky"

    def __init__(self, name: str = "flaky", capacity: int = 1 << 20) -> None:
        super().__init__(name, capacity)
        self.broken = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.broken:
            raise ConnectionError("tier is down")

    def get(self, key):
        self._check()
        return super().get(key)

    def put(self, key, blob):
        self._check()
        return super().put(key, blob)

    def delete(self, key):
        self._check()
        return super().delete(key)

    def contains(self, key):
        self._check()
        return super().contains(key)

    def used_bytes(self):
        self._check()
        return super().used_bytes()


class GatedTier(MemoryTier):
    """A memory tier whose puts wait for ``gate``: a slow lower tier, deterministically."""

    kind = "gated"

    def __init__(self, name: str = "slow", capacity: int = 1 << 20) -> None:
        super().__init__(name, capacity)
        self.gate = threading.Event()

    def put(self, key, blob):
        assert self.gate.wait(timeout=60), "test never opened the gate"
        return super().put(key, blob)


def _store(levels: list[tuple[Tier, Codec]], **kw) -> TieredStore:
    return TieredStore(levels, **kw)


@pytest.fixture
def closing():
    stores: list[TieredStore] = []

    def add(s: TieredStore) -> TieredStore:
        stores.append(s)
        return s

    yield add
    for s in stores:
        for lv in s.levels:
            gate = getattr(lv.tier, "gate", None)
            if gate is not None:
                gate.set()
            if isinstance(lv.tier, FlakyTier):
                lv.tier.broken = False
        s.close()


# ---------------------------------------------------------------------------------- corruption
def _corruptions(good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[len(good) - 7] ^= 0x10  # one bit in the payload
    header_flip = bytearray(good)
    header_flip[12] ^= 0x01  # one bit in the shape
    version = bytearray(good)
    version[4] = FORMAT_VERSION + 1
    return {
        "bitflip": bytes(flipped),
        "header_bitflip": bytes(header_flip),
        "truncated": good[: len(good) - 100],
        "garbage": bytes(range(256)) * (len(good) // 256),
        "wrong_version": bytes(version),
        "empty": b"",
    }


CORRUPTIONS = list(_corruptions(bytes(RAW.encode(chunk(0)))))


def _plant(tier: Tier, k: str, bad: bytes) -> None:
    """Overwrite a stored blob the way real damage would: in memory, or in the file on disk."""
    if isinstance(tier, DiskTier):
        p = tier.root / k[:2] / f"{k}.kvb"
        assert p.exists()
        p.write_bytes(bad)
    else:
        assert tier.put(k, bad)


@pytest.mark.parametrize("damage", CORRUPTIONS)
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_corrupt_blob_is_a_miss_and_is_deleted(kind, damage, tmp_path, closing):
    if kind == "memory" and damage == "bitflip":
        pytest.skip("an in-process blob's payload is not hashed on read (test_in_process_blobs_are_sealed_when_they_leave)")
    tier: Tier = MemoryTier("cpu", 1 << 20) if kind == "memory" else DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(tier, RAW)]))
    x = chunk(1)
    assert s.put([key(1)], [x]) == 1
    _plant(tier, key(1), _corruptions(bytes(tier.get(key(1))))[damage])
    assert s.get([key(1)]) == [None]
    assert not tier.contains(key(1))
    if kind == "disk":
        assert not (tier.root / key(1)[:2] / f"{key(1)}.kvb").exists()
    st = s.stats()
    # in memory nothing is hashed on read, so the flipped shape bit is caught by the key digest next to it
    what = "misplaced" if kind == "memory" and damage == "header_bitflip" else "corrupt"
    assert st["store"][what] == 1 and st["store"]["misses"] == 1 and st["tiers"][0][what] == 1
    # the key can be stored again and reads back exactly
    s.put([key(1)], [x])
    assert torch.equal(s.get([key(1)])[0], x)


@pytest.mark.parametrize("damage", ["truncated", "wrong_version", "garbage"])
def test_corrupt_hot_copy_falls_back_to_a_good_cold_copy(damage, tmp_path, closing):
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, LZ4)]))
    x = chunk(2)
    s.put([key(2)], [x])
    assert s.flush(timeout=30)
    _plant(cpu, key(2), _corruptions(bytes(cpu.get(key(2))))[damage])
    got = s.get([key(2)])[0]
    assert got is not None and torch.equal(got, x)  # never the damaged data
    assert s.stats()["store"]["hits_by_tier"] == {"disk": 1}
    # the damaged copy was replaced by a promotion of the good one
    assert torch.equal(decode(seal(cpu.get(key(2)))), x)


def test_in_process_blobs_are_sealed_when_they_leave(tmp_path, closing):
    """The CPU tier stores blobs unsealed (no hash pass: their bytes never left the process) and
    reads them back unhashed, the key still checked; a blob that leaves (write-through here) is
    sealed first, and an unsealed blob read from anywhere else is refused as corrupt."""
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, RAW)]))
    x = chunk(4)
    assert s.put([key(4)], [x]) == 1
    assert s.flush(timeout=30)
    on_disk = bytes(disk.get(key(4)))
    assert torch.equal(decode(on_disk, key=key(4)), x)  # sealed on its way down
    # (the write-through sealed the CPU copy in place; a fresh unsealed one shows the other side)
    unsealed = bytes(RAW.encode(x, key=key(4), sealed=False))
    with pytest.raises(CorruptBlobError):
        decode(unsealed, key=key(4))
    assert decode(seal(bytearray(unsealed)), key=key(4)).equal(x)
    cpu.put(key(4), unsealed)
    got = s.get([key(4)])[0]
    assert got is not None and torch.equal(got, x) and s.stats()["store"]["hits_by_tier"] == {"cpu": 1}
    # an unsealed blob planted on disk (bytes that never went through seal) is a miss, and deleted
    cpu.delete(key(4))
    _plant(disk, key(4), unsealed)
    assert s.get([key(4)]) == [None] and not disk.contains(key(4))
    # the key binding holds in memory too: another key's blob is never served
    cpu.put(key(5), bytes(RAW.encode(x, key=key(4), sealed=False)))
    assert s.get([key(5)]) == [None] and s.stats()["store"]["misplaced"] == 1


def test_remote_top_tier_gets_bounded_batches_while_the_next_is_encoded(closing, monkeypatch):
    """A put to a tier outside the process goes out in batches of at most PUT_BATCH_BYTES (one
    put_many each, so a remote tier pipelines them); all but the last leave on the sender thread
    while the next batch is encoded, and put returns only once every batch is stored."""
    import kvlayer.storage.hierarchy as hier

    class Remoteish(MemoryTier):
        kind = "redis"  # not this process's memory: blobs sealed, batches sent in the background

        def __init__(self) -> None:
            super().__init__("remote", 1 << 24)
            self.batches: list[tuple[int, str]] = []

        def put_many(self, items):
            self.batches.append((len(items), threading.current_thread().name))
            return super().put_many(items)

    xs = [chunk(i) for i in range(7)]
    monkeypatch.setattr(hier, "PUT_BATCH_BYTES", 2 * len(bytes(RAW.encode(xs[0]))))
    tier = Remoteish()
    s = closing(_store([(tier, RAW)]))
    assert s.put([key(i) for i in range(7)], xs) == 7
    assert [n for n, _ in tier.batches] == [2, 2, 2, 1]
    assert all(name.startswith("kvlayer-put") for _, name in tier.batches[:-1])
    got = s.get([key(i) for i in range(7)])
    assert all(g is not None and torch.equal(g, x) for g, x in zip(got, xs, strict=True))
    assert torch.equal(decode(bytes(tier.get(key(3))), key=key(3)), xs[3])  # sealed: it left the process


def test_corrupt_cold_copy_is_a_miss_and_deleted_from_disk(tmp_path, closing):
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, LZ4)]))
    s.put([key(3)], [chunk(3)])
    assert s.flush(timeout=30)
    cpu.delete(key(3))
    _plant(disk, key(3), _corruptions(bytes(disk.get(key(3))))["bitflip"])
    assert s.get([key(3)]) == [None]
    assert not disk.contains(key(3)) and not cpu.contains(key(3))


# ---------------------------------------------------------------------------------- failing tiers
def test_failing_hot_tier_degrades_to_the_next_one(closing):
    flaky, cpu = FlakyTier(), MemoryTier("cpu", 1 << 20)
    s = closing(_store([(flaky, RAW), (cpu, RAW)], retry_after_s=3600))
    flaky.broken = True
    xs = [chunk(i) for i in range(3)]
    # nothing raises; the write-through queue still lands the chunks in the healthy tier
    assert s.put([key(i) for i in range(3)], xs) == 0
    assert s.flush(timeout=30)
    assert s.lookup([key(i) for i in range(3)]) == ["cpu"] * 3
    got = s.get([key(i) for i in range(3)])
    assert all(g is not None and torch.equal(g, x) for g, x in zip(got, xs, strict=True))
    st = s.stats()
    assert st["store"]["tier_errors"] == 1 and st["tiers"][0]["errors"] == 1
    assert st["tiers"][0]["available"] is False
    # the broken tier is skipped, not hammered, until retry_after_s passes
    calls = flaky.calls
    s.get([key(0)])
    s.put([key(9)], [chunk(9)])
    s.lookup([key(0)])
    assert flaky.calls == calls


def test_failing_tier_is_retried_after_retry_after_s(closing):
    flaky, cpu = FlakyTier(), MemoryTier("cpu", 1 << 20)
    s = closing(_store([(flaky, RAW), (cpu, RAW)], retry_after_s=0.05))
    flaky.broken = True
    assert s.put([key(1)], [chunk(1)]) == 0
    flaky.broken = False
    time.sleep(0.2)
    assert s.put([key(2)], [chunk(2)]) == 1  # tried again, and it works now
    assert flaky.contains(key(2))
    assert s.stats()["tiers"][0]["available"] is True
    assert torch.equal(s.get([key(2)])[0], chunk(2))


def test_failing_cold_tier_drops_background_writes_and_reads_still_work(closing):
    cpu, flaky = MemoryTier("cpu", 1 << 20), FlakyTier()
    s = closing(_store([(cpu, RAW), (flaky, RAW)], retry_after_s=3600))
    flaky.broken = True
    s.put([key(i) for i in range(4)], [chunk(i) for i in range(4)])
    assert s.flush(timeout=30)
    st = s.stats()
    assert st["store"]["dropped_writes"] >= 4 and st["store"]["tier_errors"] >= 1
    assert st["tiers"][1]["errors"] >= 1
    assert [torch.equal(g, chunk(i)) for i, g in enumerate(s.get([key(i) for i in range(4)]))] == [True] * 4
    # a lookup of keys the hot tier lacks asks the broken tier: still an answer, not an exception
    assert s.lookup([key(0), key(77)]) == ["cpu"]
    assert s.get([key(77)]) == [None]


def test_every_tier_broken_is_just_misses(closing):
    a, b = FlakyTier("a"), FlakyTier("b")
    s = closing(_store([(a, RAW), (b, RAW)], retry_after_s=3600))
    a.broken = b.broken = True
    assert s.put([key(1)], [chunk(1)]) == 0
    assert s.get([key(1)]) == [None]
    assert s.lookup([key(1)]) == []
    assert s.delete([key(1)]) == 0
    st = s.stats()  # stats of a tier that raises still render
    assert [t["name"] for t in st["tiers"]] == ["a", "b"]
    s.clear()


def test_breaker_windows_grow_per_failure_in_a_row_and_a_success_closes_it():
    b = Breaker(RetryPolicy(after_s=1.0, max_s=5.0, multiplier=2.0))
    assert b.allow()
    assert [b.failure() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert not b.allow() and b.failures == 5
    assert b.success() == 5 and b.failures == 0 and b.success() == 0
    assert b.failure() == 1.0  # a new streak starts from after_s again
    b.reset()
    assert b.allow()
    flat = Breaker(RetryPolicy(after_s=3.0))  # no max_s: a flat window
    assert [flat.failure() for _ in range(3)] == [3.0, 3.0, 3.0]


def test_each_tier_has_its_own_breaker_policy(closing):
    """One store, two policies: the tier with a long window is skipped after its failure, the one
    with a zero window is asked again on the next call."""
    patient, eager = FlakyTier("patient"), FlakyTier("eager")
    s = closing(_store([(patient, RAW), (eager, RAW)], retry=[RetryPolicy(3600), RetryPolicy(0)]))
    patient.broken = eager.broken = True
    assert s.lookup([key(1)]) == []
    calls = (patient.calls, eager.calls)
    assert s.get([key(1)]) == [None]
    assert patient.calls == calls[0] and eager.calls == calls[1] + 1
    st = s.stats()
    assert [t["available"] for t in st["tiers"]] == [False, True]
    assert st["store"]["tier_errors"] >= 2 and st["store"]["misses"] == 1


# ---------------------------------------------------------------------------------- write queue
def test_write_queue_is_bounded_and_drops_when_not_blocking(closing):
    cpu, slow = MemoryTier("cpu", 1 << 20), GatedTier()
    limit = 3 * BLOB
    s = closing(_store([(cpu, RAW), (slow, RAW)], write_queue_bytes=limit))
    n = 12
    assert s.put([key(i) for i in range(n)], [chunk(i) for i in range(n)], block=False) == n
    st = s.stats()["store"]
    assert st["write_queue_bytes"] <= limit
    assert st["dropped_writes"] >= n - 4  # at most the queue plus the one in flight got through
    assert st["queued_writes"] + st["dropped_writes"] == n
    slow.gate.set()
    assert s.flush(timeout=30)
    assert len(slow.keys()) == st["queued_writes"]
    assert len(cpu.keys()) == n  # the hot tier took every chunk regardless


def test_write_queue_applies_back_pressure_when_blocking(closing):
    cpu, slow = MemoryTier("cpu", 1 << 20), GatedTier()
    limit = 2 * BLOB
    s = closing(_store([(cpu, RAW), (slow, RAW)], write_queue_bytes=limit))
    n = 8
    done = threading.Event()

    def producer():
        for i in range(n):
            s.put([key(i)], [chunk(i)], block=True)
        done.set()

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    # The slow tier accepts nothing until the gate opens. The limit covers queued and in-flight
    # jobs (2 chunks), so the producer stalls in its third put, after the hot tier took it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(cpu.keys()) < 3:
        time.sleep(0.01)
    time.sleep(0.2)
    assert not done.is_set()
    assert len(cpu.keys()) == 3
    assert s.stats()["store"]["write_queue_bytes"] <= limit
    slow.gate.set()
    assert done.wait(timeout=30)
    assert s.flush(timeout=30)
    st = s.stats()["store"]
    assert st["dropped_writes"] == 0
    assert sorted(slow.keys()) == sorted(key(i) for i in range(n))


def test_background_write_keeps_the_data_as_stored(closing):
    """The caller may reuse its buffer as soon as put returns: the lower tier must get the data
    as it was at put time, not whatever the buffer holds when the background writer runs."""
    cpu, slow = MemoryTier("cpu", 1 << 20), GatedTier()
    s = closing(_store([(cpu, RAW), (slow, RAW)]))
    buf = chunk(5)
    want = buf.clone()
    s.put([key(5)], [buf])
    buf.zero_()  # an engine reusing its staging buffer
    slow.gate.set()
    assert s.flush(timeout=30)
    assert torch.equal(decode(slow.get(key(5))), want)
    assert torch.equal(decode(seal(cpu.get(key(5)))), want)


# ---------------------------------------------------------------------------------- demotion
def test_on_demotion_evicted_blobs_land_on_disk_and_hits_promote(tmp_path, closing):
    cap = 4 * BLOB
    cpu, disk = MemoryTier("cpu", cap), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, LZ4)], write_policy="on_demotion"))
    n = 10
    xs = [chunk(i) for i in range(n)]
    for i in range(n):
        s.put([key(i)], [xs[i]])
    assert s.flush(timeout=30)
    assert cpu.used_bytes() <= cap
    in_cpu = set(cpu.keys())
    on_disk = set(disk.keys())
    assert in_cpu == {key(i) for i in range(n - 4, n)}
    assert on_disk == {key(i) for i in range(n - 4)}  # exactly the evicted ones, nothing more
    assert s.stats()["store"]["demotions"] == n - 4
    assert s.lookup([key(i) for i in range(n)]) == ["disk"] * (n - 4) + ["cpu"] * 4
    # a disk hit comes back bit-exact and is promoted to the CPU tier
    got = s.get([key(0)])[0]
    assert torch.equal(got, xs[0])
    assert cpu.contains(key(0))
    assert s.stats()["store"]["promotions"] == 1
    assert s.lookup([key(0)]) == ["cpu"]
    assert torch.equal(decode(seal(cpu.get(key(0)))), xs[0])


def test_write_through_writes_every_tier_and_promotion_reencodes(tmp_path, closing):
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, LZ4)]))
    xs = [chunk(i) for i in range(5)]
    s.put([key(i) for i in range(5)], xs)
    assert s.flush(timeout=30)
    assert set(disk.keys()) == set(cpu.keys()) == {key(i) for i in range(5)}
    # each tier holds its own codec's blob
    assert b"lz4" in bytes(disk.get(key(0)))[:128] and b"lz4" not in bytes(cpu.get(key(0)))[:128]
    cpu.clear()
    got = s.get([key(i) for i in range(5)])
    assert all(torch.equal(g, x) for g, x in zip(got, xs, strict=True))
    assert torch.equal(decode(seal(cpu.get(key(3)))), xs[3])
    assert b"lz4" not in bytes(cpu.get(key(3)))[:128]  # promoted in the CPU tier's codec


def test_promote_on_hit_can_be_disabled(tmp_path, closing):
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, RAW)], promote_on_hit=False))
    s.put([key(1)], [chunk(1)])
    assert s.flush(timeout=30)
    cpu.clear()
    assert torch.equal(s.get([key(1)])[0], chunk(1))
    assert not cpu.contains(key(1))


# ---------------------------------------------------------------------------------- pins
@pytest.mark.parametrize("policy", ["write_through", "on_demotion"])
def test_tier_full_of_pins_refuses_and_lower_tier_gets_the_write(policy, tmp_path, closing):
    cap = 3 * BLOB
    cpu, disk = MemoryTier("cpu", cap), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, RAW)], write_policy=policy))
    s.put([key(i) for i in range(3)], [chunk(i) for i in range(3)])
    lease = s.pins.pin([key(i) for i in range(3)])
    assert s.put([key(10)], [chunk(10)]) == 0  # refused, nothing pinned evicted
    assert s.flush(timeout=30)
    assert sorted(cpu.keys()) == sorted(key(i) for i in range(3))
    assert disk.contains(key(10))
    assert torch.equal(s.get([key(10)], promote=False)[0], chunk(10))
    assert cpu.stats().evictions == 0
    s.pins.unpin(lease)
    assert s.put([key(11)], [chunk(11)]) == 1
    assert cpu.used_bytes() <= cap


def test_pins_survive_10x_overload(closing, tmp_path):
    cap = 8 * BLOB
    cpu, disk = MemoryTier("cpu", cap), DiskTier(tmp_path / "d", 4 * cap)
    s = closing(_store([(cpu, RAW), (disk, RAW)]))
    pinned = [key(f"p{i}") for i in range(3)]
    s.put(pinned, [chunk(100 + i) for i in range(3)])
    s.pins.pin(pinned)
    for i in range(80):  # 10x the CPU budget
        s.put([key(i)], [chunk(i)])
        assert cpu.used_bytes() <= cap
    assert s.flush(timeout=30)
    assert all(cpu.contains(k) for k in pinned)
    assert all(disk.contains(k) for k in pinned)  # pinned on disk too, which was also overloaded
    assert disk.used_bytes() <= 4 * cap
    got = s.get(pinned)
    assert all(torch.equal(g, chunk(100 + i)) for i, g in enumerate(got))
    assert s.delete(pinned) == 0  # delete respects pins ...
    assert s.delete(pinned, force=True) == 3  # ... unless forced


# ---------------------------------------------------------------------------------- lookup
def test_lookup_moves_no_data(tmp_path, closing):
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, LZ4)]))
    keys = [key(i) for i in range(6)]
    s.put(keys[:4], [chunk(i) for i in range(4)])
    assert s.flush(timeout=30)
    cpu.delete(keys[0])
    before = [(t["bytes_read"], t["hits"], t["misses"], t["puts"]) for t in s.stats()["tiers"]]
    assert s.lookup(keys) == ["disk", "cpu", "cpu", "cpu"]
    assert s.locate(keys) == ["disk", "cpu", "cpu", "cpu", None, None]
    after = [(t["bytes_read"], t["hits"], t["misses"], t["puts"]) for t in s.stats()["tiers"]]
    assert after == before
    assert not cpu.contains(keys[0])  # and promotes nothing
    assert s.stats()["store"]["lookups"] == 1


def test_store_needs_a_tier():
    with pytest.raises(ValueError):
        TieredStore([])


def test_close_is_idempotent_and_flushes(tmp_path):
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    s = TieredStore([(cpu, RAW), (disk, RAW)])
    s.put([key(1)], [chunk(1)])
    s.close()
    assert disk.contains(key(1))
    s.close()
    assert Path(disk.root).exists()


def test_delete_cancels_queued_background_writes(closing):
    """An evicted key must not reappear in a lower tier from a write that was still queued."""
    cpu, slow = MemoryTier("cpu", 1 << 20), GatedTier()
    s = closing(_store([(cpu, RAW), (slow, RAW)]))
    s.put([key(1), key(2), key(3)], [chunk(1), chunk(2), chunk(3)])  # 1 in flight, 2 and 3 queued
    s.pins.pin([key(3)])
    deleted = []
    th = threading.Thread(target=lambda: deleted.append(s.delete([key(1), key(2), key(3)])), daemon=True)
    th.start()
    time.sleep(0.1)
    slow.gate.set()  # let the in-flight write finish; delete waits for it
    th.join(timeout=30)
    assert deleted == [2]
    assert s.flush(timeout=30)
    assert not slow.contains(key(1)) and not slow.contains(key(2))
    assert slow.contains(key(3))  # pinned: kept, and its queued write still ran
    assert s.stats()["store"]["write_queue_bytes"] == 0


def test_write_through_does_not_read_evicted_disk_blobs(tmp_path, closing):
    """Nothing below the last tier: a disk eviction need not read the victim back (it did)."""
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 4 * BLOB)
    s = closing(_store([(cpu, RAW), (disk, RAW)]))
    for i in range(12):
        s.put([key(i)], [chunk(i)])
    assert s.flush(timeout=30)
    st = disk.stats()
    assert st.evictions == 8
    assert not s.blobs.wants_evicted(disk) and not s.blobs.wants_evicted(cpu)
    s2 = closing(_store([(MemoryTier("c2", 1 << 20), RAW), (DiskTier(tmp_path / "e", 1 << 20), RAW)],
                        write_policy="on_demotion"))
    assert s2.blobs.wants_evicted(s2.levels[0].tier) and not s2.blobs.wants_evicted(s2.levels[1].tier)


def test_on_demotion_applies_back_pressure_instead_of_losing_evicted_chunks(closing):
    """Under on_demotion an evicted chunk may live nowhere else: a full queue must make put wait
    (block=True), not drop it (it dropped 30 of 37 demotions in a burst)."""
    cpu, slow = MemoryTier("cpu", 2 * BLOB), GatedTier()
    s = closing(_store([(cpu, RAW), (slow, RAW)], write_policy="on_demotion", write_queue_bytes=BLOB))
    n = 8
    done = threading.Event()

    def producer():
        for i in range(n):
            s.put([key(i)], [chunk(i)])
        done.set()

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    time.sleep(0.3)
    assert not done.is_set()  # stalled on the full queue while the lower tier is slow
    slow.gate.set()
    assert done.wait(timeout=30)
    assert s.flush(timeout=30)
    st = s.stats()["store"]
    assert st["dropped_writes"] == 0 and st["demotions"] == n - 2
    assert set(slow.keys()) == {key(i) for i in range(n - 2)}
    assert all(torch.equal(g, chunk(i)) for i, g in enumerate(s.get([key(i) for i in range(n)])))


def test_on_demotion_without_blocking_drops_and_counts(closing):
    cpu, slow = MemoryTier("cpu", 2 * BLOB), GatedTier()
    s = closing(_store([(cpu, RAW), (slow, RAW)], write_policy="on_demotion", write_queue_bytes=BLOB))
    for i in range(8):
        s.put([key(i)], [chunk(i)], block=False)  # returns at once even though nothing drains
    st = s.stats()["store"]
    assert st["dropped_writes"] >= 4 and st["demotions"] + st["dropped_writes"] == 6


def test_pin_registry_counts_and_iterators():
    from kvlayer.storage.pins import PinRegistry

    r = PinRegistry()
    a = r.pin(iter(["x", "y", "x"]))  # an iterator, with a duplicate
    b = r.pin(["x"], label="doc:d")
    assert r.pinned_keys() == {"x", "y"}
    assert r.unpin(a) and not r.unpin(a)
    assert r.pinned_keys() == {"x"} and r.is_pinned("x") and not r.is_pinned("y")
    assert r.unpin_label("doc:d") == 1 and r.unpin_label("doc:d") == 0
    assert r.pinned_keys() == set() and r.leases() == []
    assert not r.unpin(b)


# ---------------------------------------------------------------------------------- key binding
def v1_blob(good: bytes) -> bytes:
    """``good`` as kvlayer wrote it before blobs were bound to keys: format 1, no key digest."""
    h = parse_header(good)
    head = bytearray(good[:KEY_DIGEST_AT]) + good[KEY_DIGEST_AT + KEY_DIGEST_LEN : h.header_len - 8]
    head[4] = 1
    payload = good[h.header_len :]
    return bytes(head) + checksum(bytes(head), payload).to_bytes(8, "little") + payload


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_old_format_blobs_are_misses_with_a_clear_message(kind, tmp_path, closing):
    good = bytes(RAW.encode(chunk(0), key=key(0)))
    with pytest.raises(CorruptBlobError, match=r"version 1 \(kvlayer before blobs were bound to their keys\) is no "
                                               r"longer read.*recomputed.*Upgrading"):
        decode(v1_blob(good))
    tier: Tier = MemoryTier("cpu", 1 << 20) if kind == "memory" else DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(tier, RAW)]))
    s.put([key(0)], [chunk(0)])
    _plant(tier, key(0), v1_blob(good))
    assert s.get([key(0)]) == [None] and not tier.contains(key(0))
    assert s.stats()["store"]["corrupt"] == 1
    if kind == "disk":  # and a restarted disk tier drops old files when it indexes them
        _plant_file = tier.root / key(1)[:2] / f"{key(1)}.kvb"  # type: ignore[attr-defined]
        _plant_file.parent.mkdir(exist_ok=True)
        _plant_file.write_bytes(v1_blob(bytes(RAW.encode(chunk(1), key=key(1)))))
        assert key(1) not in DiskTier(tmp_path / "d", 1 << 20).keys() and not _plant_file.exists()


def _swap(tier: Tier, a: str, b: str) -> None:
    """Give two valid blobs each other's key, as a restore gone wrong or a hostile writer would."""
    ba, bb = bytes(tier.get(a)), bytes(tier.get(b))  # type: ignore[arg-type]
    _plant(tier, a, bb)
    _plant(tier, b, ba)


@pytest.mark.parametrize("codec", ["raw", "int4+lz4"])
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_blobs_swapped_between_keys_are_misses_never_the_other_keys_kv(kind, codec, tmp_path, closing):
    tier: Tier = MemoryTier("cpu", 1 << 20) if kind == "memory" else DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(tier, get_codec(codec))]))
    xa, xb = chunk(10), chunk(11)
    assert s.put([key("a"), key("b")], [xa, xb]) == 2
    _swap(tier, key("a"), key("b"))
    assert s.get([key("a"), key("b")]) == [None, None]
    assert not tier.contains(key("a")) and not tier.contains(key("b"))  # deleted
    st = s.stats()
    assert st["store"]["misplaced"] == 2 and st["store"]["corrupt"] == 0 and st["tiers"][0]["misplaced"] == 2
    # a copy under a third key is a miss too, and the original stays a hit
    assert s.put([key("a")], [xa]) == 1
    assert tier.put(key("c"), bytes(tier.get(key("a"))))  # type: ignore[arg-type]
    got = s.get([key("c"), key("a")])
    assert got[0] is None and got[1] is not None
    assert torch.equal(got[1], decode(get_codec(codec).encode(xa)))


def test_a_misplaced_cold_blob_is_never_promoted(tmp_path, closing):
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    s = closing(_store([(cpu, RAW), (disk, LZ4)]))
    s.put([key("a"), key("b")], [chunk(20), chunk(21)])
    assert s.flush(timeout=30)
    _swap(disk, key("a"), key("b"))
    cpu.clear()
    assert s.get([key("a"), key("b")]) == [None, None]
    assert cpu.keys() == [] and disk.keys() == []
    assert s.stats()["store"]["misplaced"] == 2 and s.stats()["tiers"][1]["misplaced"] == 2


def test_blob_store_checks_the_binding_of_blobs_it_keeps_as_they_are(tmp_path):
    """The server's store: blobs stay byte for byte, stored under ``<prefix><client key>``; a blob
    encoded for another key is a miss in every level, one encoded without a key passes (whoever
    reads it under a key refuses it)."""
    cpu, disk = MemoryTier("cpu", 1 << 20), DiskTier(tmp_path / "d", 1 << 20)
    bs = BlobStore([cpu, disk], formats=Formats(key_of=lambda k: k[4:]))
    try:
        a, b, c = "0000" + key("a"), "0000" + key("b"), "0000" + key("c")
        assert bs.put(a, RAW.encode(chunk(1), key=key("a")), durable=True)
        assert bs.put(b, RAW.encode(chunk(2), key=key("a")), durable=True)  # bound to a, stored under b
        assert bs.put(c, RAW.encode(chunk(3)), durable=True)  # unbound
        assert bs.flush(timeout=30)
        hit = bs.get_blob(a)
        assert hit is not None and hit[1] == "cpu"
        assert bs.get_blob(b) is None  # hottest level: the 40-byte check, then the disk copy
        assert not cpu.contains(b) and not disk.contains(b) and bs.stats()["store"]["misplaced"] == 2
        assert bs.get_blob(c) is not None
        cpu.clear()
        assert disk.put(c, bytes(disk.get(a)))  # type: ignore[arg-type]
        assert bs.get_blob(c) is None  # lower level: checksum and binding
        assert bs.get_blob(a) is not None
        assert bs.stats()["store"]["misplaced"] == 3 and not disk.contains(c)
    finally:
        bs.close()
