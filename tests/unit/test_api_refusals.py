"""The Python API refuses what it cannot mean, with a kvlayer error that names the argument, and
loses nothing: token ids that are not integers, KVSpec fields that are not whole numbers, sizes
that are not finite, pin TTLs that never (or already) expire, unknown documents, a disk_path that
cannot hold a disk tier."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kvlayer import KVCache, KVSpec
from kvlayer.config import load_config
from kvlayer.errors import ConfigError, DocumentNotFound, KVLayerError, SpecMismatchError, UsageError
from kvlayer.storage.pins import PinRegistry
from kvlayer.units import parse_size

CS = 8
SPEC = KVSpec(model="refusals", num_layers=2, num_kv_heads=2, head_dim=8)


def kv_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(SPEC.chunk_shape(n), generator=torch.Generator().manual_seed(seed)).half()


@pytest.fixture
def cache():
    with KVCache(SPEC, load_config(env={}, chunk_size=CS, cpu_bytes=1 << 20)) as c:
        yield c


# ---------------------------------------------------------------------------------- token ids
BAD_TOKENS = [[500.7, 3.0], np.array([1.0, 2.0]), ["12", "3"], [True, False], "123", [1, 2.5]]


@pytest.mark.parametrize("bad", BAD_TOKENS, ids=["floats", "float-array", "digit-strings", "bools", "str", "mixed"])
def test_every_entry_point_refuses_non_integer_token_ids(cache, bad):
    good = list(range(2 * CS))
    kv = kv_for(2 * CS)
    assert cache.store(good, kv) == 2
    calls = {
        "lookup": lambda: cache.lookup(bad),
        "keys": lambda: cache.keys(bad),
        "store": lambda: cache.store(bad, kv),
        "retrieve": lambda: cache.retrieve(bad),
        "put_document": lambda: cache.put_document("d", bad, kv),
        "register_document": lambda: cache.register_document("d", bad),
        "document context": lambda: cache.register_document("d", good, context=bad),
        "document_keys": lambda: cache.document_keys(bad),
        "pin": lambda: cache.pin(bad),
        "evict": lambda: cache.evict(bad),
    }
    for name, call in calls.items():
        with pytest.raises((TypeError, ValueError), match="tokens|context") as ei:
            call()
        assert "context" in str(ei.value) if name == "document context" else "tokens" in str(ei.value), name
    # nothing was lost or registered on the way
    assert cache.documents() == [] and cache.stats()["store"]["pinned_keys"] == 0
    n, got = cache.retrieve(good)
    assert n == 2 * CS and torch.equal(got, kv)


def test_float_prompt_never_hits_the_chunks_of_its_truncation(cache):
    """The bug: ``lookup([500.7, ...])`` hit the chunks of ``[500, ...]``."""
    ids = list(range(500, 500 + CS))
    cache.store(ids, kv_for(CS))
    with pytest.raises(TypeError, match="tokens"):
        cache.lookup([t + 0.7 for t in ids])
    assert cache.lookup(np.array(ids, dtype=np.int32)).hit_tokens == CS  # integer arrays of any width are fine


# ---------------------------------------------------------------------------------- KVSpec
@pytest.mark.parametrize(("field", "value"), [("num_layers", 2.7), ("num_layers", "abc"), ("num_kv_heads", True),
                                              ("head_dim", float("nan")), ("tp_size", None), ("is_mla", "false")])
def test_kvspec_refuses_fields_it_would_have_to_round_or_guess(field, value):
    kw = {"model": "m", "num_layers": 2, "num_kv_heads": 2, "head_dim": 8, field: value}
    with pytest.raises(SpecMismatchError, match=f"KVSpec.{field} must be") as ei:
        KVSpec(**kw)
    assert isinstance(ei.value, KVLayerError) and isinstance(ei.value, ValueError)


def test_kvspec_still_takes_whole_numbers_in_any_form():
    ref = KVSpec(model="m", num_layers=4, num_kv_heads=2, head_dim=8)
    for v in (4, np.int64(4), 4.0, "4"):
        assert KVSpec(model="m", num_layers=v, num_kv_heads=2, head_dim=8) == ref  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1, "-1GiB", "lots", True])
@pytest.mark.parametrize("setting", ["cpu_bytes", "disk_bytes", "write_queue_bytes"])
def test_sizes_that_are_not_byte_counts_are_config_errors_naming_the_setting(setting, value):
    with pytest.raises(ConfigError, match=setting):
        KVCache(SPEC, **{setting: value})
    with pytest.raises(ValueError):
        parse_size(value)


def test_overrides_of_a_given_config_are_validated_too():
    cfg = load_config(env={}, chunk_size=CS, cpu_bytes=1 << 20)
    with pytest.raises(ConfigError, match="cpu_bytes"):
        KVCache(SPEC, cfg, cpu_bytes=math.inf)
    with pytest.raises(ConfigError, match="chunk_size"):
        KVCache(SPEC, cfg, chunk_size=True)


# ---------------------------------------------------------------------------------- documents
def test_unknown_documents_raise_document_not_found(cache):
    for call in (lambda: cache.document("nope"), lambda: cache.get_document("nope"),
                 lambda: cache.pin(doc_id="nope"), lambda: cache.evict(doc_id="nope")):
        with pytest.raises(DocumentNotFound) as ei:
            call()
        assert isinstance(ei.value, KeyError) and isinstance(ei.value, KVLayerError)
        assert str(ei.value) == "unknown document 'nope'; register it with put_document first"


# ---------------------------------------------------------------------------------- pin TTLs
@pytest.mark.parametrize("ttl", [-1.0, math.nan, math.inf, -math.inf, "10", True])
def test_pin_ttls_that_never_or_already_expire_are_refused(cache, ttl):
    cache.store(list(range(CS)), kv_for(CS))
    with pytest.raises(UsageError, match="ttl_s") as ei:
        cache.pin(list(range(CS)), ttl_s=ttl)
    assert isinstance(ei.value, ValueError)
    assert cache.stats()["store"]["leases"] == 0  # nothing half-pinned
    reg = PinRegistry()
    with pytest.raises(UsageError, match="ttl_s"):
        reg.pin(["k"], ttl_s=ttl)
    assert reg.leases() == [] and not reg.is_pinned("k")


def test_valid_ttls_still_pin(cache):
    lease = cache.pin(list(range(CS)), ttl_s=60)
    forever = cache.pin(list(range(CS)), ttl_s=0)  # 0 and None: no expiry
    assert {le.lease_id: le.expires_at is None for le in cache._store.pins.leases()} == {lease: False, forever: True}


# ---------------------------------------------------------------------------------- disk_path
def test_disk_path_that_is_a_file_is_a_config_error_at_construction(tmp_path):
    f = tmp_path / "a-file"
    f.write_bytes(b"x")
    with pytest.raises(ConfigError, match="disk_path .* is a file"):
        KVCache(SPEC, cpu_bytes=0, disk_path=str(f))
    with pytest.raises(ConfigError, match="disk_path"):
        KVCache(SPEC, cpu_bytes=0, disk_path=str(f / "below"))
    assert f.read_bytes() == b"x"


def _unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        return d
    # root writes through permission bits; sysfs refuses everyone
    d = Path("/sys/fs")
    if not d.is_dir():
        pytest.skip("running as root without /sys: no directory root cannot write")
    return d


def test_unwritable_disk_path_is_a_config_error_at_construction(tmp_path):
    d = _unwritable_dir(tmp_path)
    try:
        with pytest.raises(ConfigError, match="disk_path .* cannot be written"):
            KVCache(SPEC, cpu_bytes=0, disk_path=str(d))
    finally:
        if d.is_relative_to(tmp_path):
            d.chmod(0o700)
