"""The memory and disk tiers on their own: budgets, LRU, restart, start-up cleanup, atomic writes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from kvlayer.codec import decode, encode
from kvlayer.codec.header import verify
from kvlayer.config import TierConfig
from kvlayer.errors import ConfigError
from kvlayer.storage import build_tier
from kvlayer.storage.base import EvictionGuard, Tier
from kvlayer.storage.disk import DiskTier
from kvlayer.storage.memory import MemoryTier
from tests.fixtures.tier_data import blob, files_on_disk, key, tensor

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


class Pins(EvictionGuard):
    """A minimal guard: a fixed pin set, records evictions."""

    def __init__(self, pinned: set[str]) -> None:
        self.pinned = pinned
        self.dropped: list[str] = []  # not "evicted": EvictionGuard.evicted is a hook

    def is_pinned(self, key: str) -> bool:
        return key in self.pinned

    def on_evict(self, tier: Tier, key: str, blob) -> None:
        self.dropped.append(key)


@pytest.fixture(params=["memory", "disk"])
def make_tier(request, tmp_path):
    def make(capacity: int) -> Tier:
        if request.param == "memory":
            return MemoryTier("cpu", capacity)
        return DiskTier(tmp_path / "disk", capacity)

    return make


# ---------------------------------------------------------------------------------- both tiers
def test_put_get_delete_roundtrip(make_tier):
    t = make_tier(1 * MiB)
    b = blob(1)
    assert t.get(key(1)) is None and not t.contains(key(1))
    assert t.put(key(1), b)
    assert t.contains(key(1)) and t.keys() == [key(1)]
    assert bytes(t.get(key(1))) == b
    assert t.used_bytes() == len(b)
    assert t.put(key(1), b)  # replacing a key does not count it twice
    assert t.used_bytes() == len(b)
    assert t.delete(key(1)) and not t.delete(key(1))
    assert t.get(key(1)) is None and t.used_bytes() == 0
    s = t.stats()
    assert (s.hits, s.misses, s.puts, s.num_keys) == (1, 2, 2, 0)
    assert s.bytes_read == len(b) and s.bytes_written == 2 * len(b)


def test_lru_order_and_budget_under_10x_overload(make_tier):
    cap = 1 * MiB
    t = make_tier(cap)
    size = len(blob(0))
    per_tier = cap // size
    for i in range(per_tier):
        assert t.put(key(i), blob(i))
    assert t.get(key(0)) is not None  # touch: key 0 becomes most recent
    written = 0
    i = per_tier
    while written < 10 * cap:
        assert t.put(key(i), blob(i))
        written += size
        assert t.used_bytes() <= cap
        i += 1
        if i == per_tier + 1:
            assert t.contains(key(0)) and not t.contains(key(1))  # LRU, not FIFO
    assert t.used_bytes() <= cap
    assert len(t.keys()) == per_tier
    assert t.stats().evictions >= 10 * per_tier - per_tier
    if isinstance(t, DiskTier):
        on_disk = files_on_disk(t.root)
        assert set(on_disk) == set(t.keys()) and sum(on_disk.values()) <= cap


def test_blob_larger_than_budget_is_refused(make_tier):
    t = make_tier(100 << 10)
    assert t.put(key(0), blob(0, 32 << 10))
    assert not t.put(key(1), blob(1, 256 << 10))
    assert t.contains(key(0)) and not t.contains(key(1))
    assert t.stats().dropped_writes == 1


def test_pinned_keys_are_not_evicted_and_a_full_tier_refuses(make_tier):
    t = make_tier(256 << 10)
    size = len(blob(0))
    n = (256 << 10) // size
    guard = Pins({key(i) for i in range(n)})
    t.set_eviction_guard(guard)
    for i in range(n):
        assert t.put(key(i), blob(i))
    for j in range(n, n + 10):  # every resident key is pinned: refuse rather than evict
        assert not t.put(key(j), blob(j))
    assert sorted(t.keys()) == sorted(guard.pinned) and guard.dropped == []
    guard.pinned = {key(0)}
    assert t.put(key(100), blob(100))
    assert t.contains(key(0)) and t.contains(key(100))
    assert guard.dropped == [key(1)]  # the oldest unpinned key went, and the guard heard of it


def test_clear(make_tier):
    t = make_tier(1 * MiB)
    for i in range(4):
        t.put(key(i), blob(i))
    t.clear()
    assert t.keys() == [] and t.used_bytes() == 0 and t.get(key(0)) is None


# ---------------------------------------------------------------------------------- RSS budget
def _rss(trim: bool = False) -> int:
    """Resident bytes; ``trim`` first hands memory freed by earlier tests back to the OS, so the
    baseline is honest whatever ran before in this process."""
    gc.collect()
    if trim:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc
            pass
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_rss_stays_within_budget_under_10x_overload(kind, tmp_path):
    budget = 64 * MiB if kind == "memory" else 32 * MiB  # disk: 10x of it is real I/O, keep it modest
    chunk = tensor(7, 1 * MiB)
    tier: Tier = MemoryTier("cpu", budget) if kind == "memory" else DiskTier(tmp_path / "d", budget)
    tier.put(key("warm"), encode(chunk))
    tier.delete(key("warm"))
    base = _rss(trim=True)
    peak = base
    for i in range(10 * budget // MiB):
        assert tier.put(key(i), encode(chunk))
        assert tier.used_bytes() <= budget
        if i % 8 == 0:
            peak = max(peak, psutil.Process().memory_info().rss)
    peak = max(peak, _rss())
    held = budget if kind == "memory" else 0
    # The tier holds its budget; everything else is a few chunks in flight plus allocator slack.
    assert peak - base <= held + 24 * MiB, f"RSS grew {(peak - base) / MiB:.1f} MiB"
    assert tier.stats().evictions >= 9 * budget // MiB - 2


# ---------------------------------------------------------------------------------- disk only
def test_startup_removes_temp_truncated_and_garbage_files(tmp_path):
    root = tmp_path / "disk"
    t = DiskTier(root, 8 * MiB)
    good = blob(1)
    for i in range(4):
        assert t.put(key(i), good)
    del t
    (root / "tmp" / "leftover.123.tmp").write_bytes(b"half a blob")
    p_trunc = root / key(1)[:2] / f"{key(1)}.kvb"
    p_trunc.write_bytes(good[: len(good) // 2])
    p_garbage = root / key(2)[:2] / f"{key(2)}.kvb"
    p_garbage.write_bytes(os.urandom(len(good)))
    bad_name = root / "zz" / "not-a-key.kvb"
    bad_name.parent.mkdir()
    bad_name.write_bytes(good)
    wrong_version = bytearray(good)
    wrong_version[4] = 99
    p_ver = root / key(3)[:2] / f"{key(3)}.kvb"
    p_ver.write_bytes(wrong_version)

    t = DiskTier(root, 8 * MiB)
    assert t.keys() == [key(0)]
    assert t.used_bytes() == len(good)
    for p in (p_trunc, p_garbage, bad_name, p_ver):
        assert not p.exists()
    assert list((root / "tmp").iterdir()) == []
    assert t.stats().corrupt == 4
    assert bytes(t.get(key(0))) == good


def test_restart_with_smaller_budget_trims_oldest(tmp_path):
    root = tmp_path / "disk"
    t = DiskTier(root, 8 * MiB)
    size = len(blob(0))
    for i in range(8):
        assert t.put(key(i), blob(i))
        # distinct, increasing modification times, the LRU order a restart recovers
        p = root / key(i)[:2] / f"{key(i)}.kvb"
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
    t2 = DiskTier(root, 4 * size)
    assert sorted(t2.keys()) == sorted(key(i) for i in range(4, 8))
    assert t2.used_bytes() <= 4 * size
    assert set(files_on_disk(root)) == set(t2.keys())


@pytest.mark.parametrize("cached", ["none", "head", "tail", "all"])
def test_disk_reads_cold_warm_and_partly_cached_files_bit_exact(cached, tmp_path):
    """A read copies what the page cache holds and reads the rest with O_DIRECT (page-aligned
    buffers, whole pages); whatever part of a file is cached, and at any size, it reads back
    exactly. Sizes straddle page boundaries; ``cached`` is what is left in the page cache."""
    t = DiskTier(tmp_path / "d", 1 << 30)
    sizes = [70_000, 4096 * 300, 4096 * 300 + 1] + [3 << 20] * 8  # same sizes share pooled buffers
    blobs = {f"{i:064x}": os.urandom(n) for i, n in enumerate(sizes)}
    for k, b in blobs.items():
        assert t.put(k, b)
    for k, b in blobs.items():
        p = tmp_path / "d" / k[:2] / f"{k}.kvb"
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            if cached != "all":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if cached in ("head", "tail"):  # page part of it back in
                half = len(b) // 2 // 4096 * 4096
                os.pread(fd, half if cached == "head" else len(b) - half, 0 if cached == "head" else half)
        finally:
            os.close(fd)
    got = t.get_many(list(blobs))
    gc.collect()
    again = t.get_many(list(blobs))  # a buffer still read must never be handed out again
    assert [bytes(g) for g in got] == list(blobs.values())  # type: ignore[arg-type]
    assert [bytes(g) for g in again] == list(blobs.values())  # type: ignore[arg-type]
    assert all(memoryview(g).nbytes == len(b) for g, b in zip(got, blobs.values(), strict=True))
    t.close()


def test_disk_batch_reads_give_back_their_cpu_slots_whatever_the_check_does(tmp_path):
    """Copies out of the page cache and checks hold one of a few CPU slots; a check that raises,
    or finds a corrupt blob, must give its slot back, or later batches would wait forever."""
    t = DiskTier(tmp_path / "d", 1 << 30)
    keys = [key(i) for i in range(12)]
    for i, k in enumerate(keys):
        assert t.put(k, blob(i, 256 << 10))

    def boom(k: str, b: object) -> object:
        raise RuntimeError("a check that fails for its own reasons")

    failed: list[BaseException] = []
    done: list[object] = []

    def run() -> None:
        for _ in range(3):  # more failed reads than there are slots
            try:
                t.get_opened(keys, boom)
            except RuntimeError as e:
                failed.append(e)
        done.append(t.get_opened(keys, lambda k, b: verify(b)))

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(60)
    if not done:  # free the stuck readers, so this fails instead of hanging at exit
        deadline = time.monotonic() + 60
        while reader.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(ValueError):
                t._cpu_slots.release()
            time.sleep(0.01)
        pytest.fail("a batch read waited for CPU slots that failed reads never gave back")
    assert len(failed) == 3
    got = done[0]
    assert isinstance(got, list) and all(g is not None and not isinstance(g[1], Exception) for g in got)
    t.close()


def test_disk_rejects_non_hex_keys_without_failing(tmp_path):
    """A bad key is the caller's error, not a disk failure (raising would take the tier down)."""
    t = DiskTier(tmp_path / "d", MiB)
    assert not t.put("../../etc/passwd", blob(1))
    assert not t.delete("../x") and t.get("../x") is None and not t.contains("../x")
    assert t.stats().dropped_writes == 1 and t.keys() == []
    assert not (tmp_path / "etc").exists()


def test_disk_index_matches_files_under_concurrent_put_get_delete(tmp_path):
    """Readers, deleters and two writers at once: afterwards the index and the files agree and the
    budget holds (a reader racing a write once dropped the key from the index, orphaning the file)."""
    cap = 2 * MiB
    t = DiskTier(tmp_path / "d", cap)
    b = blob(3, 128 << 10)
    keys = [key(i) for i in range(120)]
    cur = [keys[0]]
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # surface thread failures in the test
                errors.append(e)
        return run

    @guarded
    def reader():
        while not stop.is_set():
            got = t.get(cur[0])
            if got is not None:
                verify(got)  # never a partial blob

    @guarded
    def deleter():
        i = 0
        while not stop.is_set():
            t.delete(keys[i % len(keys)])
            i += 7
            time.sleep(0.0005)

    def writer(offset: int):
        @guarded
        def run():
            for k in keys[offset:] + keys[:offset]:
                cur[0] = k
                t.put(k, b)
                assert t.used_bytes() <= cap
        return run

    threads = [threading.Thread(target=f) for f in (reader, deleter)]
    writers = [threading.Thread(target=writer(o)) for o in (0, 60)]
    for th in threads + writers:
        th.start()
    for th in writers:
        th.join()
    stop.set()
    for th in threads:
        th.join()
    assert errors == []
    on_disk = files_on_disk(t.root)
    assert set(on_disk) == set(t.keys())
    assert sum(on_disk.values()) == t.used_bytes() <= cap
    assert list((t.root / "tmp").iterdir()) == []


def test_restart_keeps_a_valid_blob_with_a_long_header(tmp_path):
    """Codec parameters may make a header longer than the 4 KiB start-up probe."""
    from kvlayer.codec.header import assemble, pack_header

    x = tensor(4, 8 << 10)
    payload = x.view(torch.uint8).reshape(-1).numpy().tobytes()
    params = {"t": {"note": "p" * 6000}}
    b = bytes(assemble(pack_header("raw", tuple(x.shape), x.dtype, params, len(payload)), payload))
    assert len(b) - len(payload) > 6000 and torch.equal(decode(b), x)
    t = DiskTier(tmp_path / "d", MiB)
    assert t.put(key(1), b)
    t2 = DiskTier(tmp_path / "d", MiB)
    assert t2.keys() == [key(1)] and torch.equal(decode(t2.get(key(1))), x)
    assert t2.stats().corrupt == 0


def test_startup_keeps_temp_files_of_a_live_writer(tmp_path):
    """A second process opening the same directory must not delete a write in progress."""
    root = tmp_path / "disk"
    DiskTier(root, MiB)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = root / "tmp" / f"{key(1)}.{sleeper.pid}.1.1.tmp"
        live.write_bytes(b"in progress")
        dead = root / "tmp" / f"{key(2)}.999999999.1.1.tmp"
        dead.write_bytes(b"abandoned")
        old = root / "tmp" / f"{key(3)}.{sleeper.pid}.1.2.tmp"
        old.write_bytes(b"stale")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        DiskTier(root, MiB)
        assert live.exists() and not dead.exists() and not old.exists()
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    DiskTier(root, MiB)
    assert not live.exists()


# ---------------------------------------------------------------------------------- typed options
@pytest.mark.parametrize(("kind", "options", "named"), [
    ("memory", {"fsync": True}, "options.fsync: unknown option"),  # memory takes none
    ("disk", {"fsynk": True}, "options.fsynk: unknown option; valid options: fsync"),
    ("disk", {"fsync": "maybe"}, "options.fsync: Input should be a valid boolean"),
    ("remote", {"timeout": 1}, "options.timeout: unknown option; valid options: .*timeout_s"),
    ("remote", {"channels": 0}, "options.channels: Input should be greater than or equal to 1"),
])
def test_bad_tier_options_are_config_errors_naming_them(kind, options, named, tmp_path):
    """Every tier kind checks its options the same way (never a raw TypeError from a constructor)."""
    cfg = TierConfig(kind=kind, path=str(tmp_path / "d"), url="grpc://127.0.0.1:1", options=options)
    with pytest.raises(ConfigError, match=named):
        build_tier(cfg)


def test_tier_options_reach_the_tier(tmp_path):
    t = build_tier(TierConfig(kind="disk", path=str(tmp_path / "d"), options={"fsync": "true"}))
    assert isinstance(t, DiskTier) and t.fsync is True
