"""Content keys: deterministic across processes, SGLang-compatible chain, namespace coverage."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from kvlayer.errors import SpecMismatchError
from kvlayer.keys import chain_hash, chunk_bounds, document_keys, key_from_page_hash, partial_key, prefix_keys
from kvlayer.spec import KVSpec

SPEC = KVSpec(model="org/model@rev1", num_layers=4, num_kv_heads=2, head_dim=16, dtype="float16")

def _sglang_style_chain(namespace_hex: str, tokens: list[int], page: int) -> list[str]:
    """The SGLang page-hash recipe written out independently: sha256(prior raw 32 bytes || uint32 LE ids)."""
    prior = namespace_hex
    out = []
    for start in range(0, len(tokens), page):
        h = hashlib.sha256()
        h.update(bytes.fromhex(prior))
        for t in tokens[start : start + page]:
            h.update(int(t).to_bytes(4, byteorder="little", signed=False))
        prior = h.hexdigest()
        out.append(prior)
    return out


def test_known_answer_two_chunks_matches_sglang_recipe():
    ns = SPEC.namespace_digest()
    # The namespace is sha256 of the spec's canonical JSON.
    assert ns == hashlib.sha256(SPEC.canonical_json().encode()).digest()
    assert json.loads(SPEC.canonical_json())["model"] == "org/model@rev1"
    tokens = list(range(1000, 1008)) + [0xFFFFFFFF, 0, 65536, 7]  # 12 tokens: 2 chunks of 8 and 4
    keys = prefix_keys(ns, tokens, 8)
    # The token chain is SGLang's unseeded page hash; the key binds it to the namespace.
    d0 = hashlib.sha256(b"".join(t.to_bytes(4, "little") for t in tokens[:8])).digest()
    d1 = hashlib.sha256(d0 + b"".join(t.to_bytes(4, "little") for t in tokens[8:])).digest()
    tail = b"".join(t.to_bytes(4, "little") for t in tokens[8:])
    # a full chunk binds its link to the namespace; the partial last one has a tagged key of its own
    partial = hashlib.sha256(b"kvlayer/partial-chunk/v1" + ns + bytes([32]) + d0 + tail).hexdigest()
    assert keys == [hashlib.sha256(ns + d0).hexdigest(), partial]
    sglang = _sglang_style_chain("", tokens, 8)
    assert sglang == [d0.hex(), d1.hex()]
    assert keys[:1] == [key_from_page_hash(ns, h) for h in sglang[:1]]  # SGLang stores full pages only
    assert chain_hash(b"", tokens[:8]) == d0
    # numpy input of any int dtype gives the same keys as a list
    assert prefix_keys(ns, np.asarray(tokens, dtype=np.int64), 8) == keys
    assert prefix_keys(ns, np.asarray(tokens, dtype=np.uint32), 8) == keys


def test_namespace_golden_value():
    """Stored data outlives releases: if this changes, bump ``kvlayer_key_scheme`` on purpose."""
    spec = KVSpec(model="golden", num_layers=1, num_kv_heads=1, head_dim=1)
    assert spec.canonical_json() == (
        '{"dtype":"float16","extra":[],"head_dim":1,"is_mla":false,"kvlayer_key_scheme":2,"model":"golden",'
        '"num_kv_heads":1,"num_layers":1,"salt":"","tp_rank":0,"tp_size":1}'
    )


@pytest.mark.parametrize(
    "change",
    [
        {"model": "org/model@rev2"},
        {"num_layers": 5},
        {"num_kv_heads": 4},
        {"head_dim": 32},
        {"dtype": "bfloat16"},
        {"tp_rank": 1, "tp_size": 2},
        {"tp_size": 2},
        {"is_mla": True},
        {"salt": "tenant-a"},
        {"extra": (("layout", "nhd"),)},
    ],
)
def test_namespace_changes_with_every_spec_field(change):
    other = dataclasses.replace(SPEC, **change)
    assert other.namespace_digest() != SPEC.namespace_digest()
    toks = list(range(40))
    assert set(prefix_keys(other.namespace_digest(), toks, 16)).isdisjoint(prefix_keys(SPEC.namespace_digest(), toks, 16))


def test_every_spec_field_is_covered_by_the_namespace_test():
    covered = {"model", "num_layers", "num_kv_heads", "head_dim", "dtype", "tp_rank", "tp_size", "is_mla", "salt",
               "extra"}
    assert {f.name for f in dataclasses.fields(KVSpec)} == covered


def test_prefix_keys_chain_names_the_whole_prefix():
    ns = SPEC.namespace_digest()
    a = list(range(64))
    b = list(range(64))
    b[3] = 999  # differs only in the first chunk
    ka, kb = prefix_keys(ns, a, 16), prefix_keys(ns, b, 16)
    assert all(x != y for x, y in zip(ka, kb, strict=True))  # every later key differs too
    # a longer sequence shares the keys of its prefix
    assert prefix_keys(ns, a + [1, 2, 3], 16)[:4] == ka
    # a chunk's key depends on its position (parent), document keys too past the first chunk
    assert prefix_keys(ns, a[16:32], 16)[0] != ka[1]


def test_chunking_edge_cases():
    ns = SPEC.namespace_digest()
    assert chunk_bounds(0, 4) == []
    assert chunk_bounds(3, 4) == [(0, 3)]
    assert chunk_bounds(3, 4, full_only=True) == []
    assert chunk_bounds(8, 4) == [(0, 4), (4, 8)]
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(10, 4, full_only=True) == [(0, 4), (4, 8)]
    assert prefix_keys(ns, [], 4) == []
    toks = list(range(10))
    full = prefix_keys(ns, toks, 4)
    assert len(full) == 3
    assert prefix_keys(ns, toks, 4, full_only=True) == full[:2]
    # the partial last chunk has its own key, different from the full chunk that extends it
    assert full[2] != prefix_keys(ns, list(range(12)), 4)[2]
    assert prefix_keys(ns, toks[:8], 4) == full[:2]
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_bounds(10, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        prefix_keys(ns, toks, -1)
    with pytest.raises(ValueError, match="uint32"):
        prefix_keys(ns, [1, -1], 4)
    with pytest.raises(ValueError, match="uint32"):
        prefix_keys(ns, [1 << 32], 4)
    with pytest.raises(ValueError, match="1-D"):
        prefix_keys(ns, np.zeros((2, 2), dtype=np.int64), 4)
    with pytest.raises(ValueError, match="32-byte"):
        prefix_keys(b"short", toks, 4)


def test_document_keys_are_position_independent():
    ns = SPEC.namespace_digest()
    doc = list(range(500, 540))
    dk = document_keys(ns, doc, 16)
    assert len(dk) == 3
    # same document keys whatever text surrounds it in a prompt
    assert document_keys(ns, doc, 16) == dk
    # a prompt that starts with the document is an ordinary prefix hit on its keys
    assert prefix_keys(ns, doc + [1, 2, 3, 4, 5], 16)[:2] == dk[:2]
    # but the document's chunks placed after other text have different prefix keys
    assert prefix_keys(ns, list(range(16)) + doc, 16)[1] != dk[0]
    other = dataclasses.replace(SPEC, salt="x").namespace_digest()
    assert document_keys(other, doc, 16) != dk


def test_spec_validation_names_the_field():
    with pytest.raises(SpecMismatchError, match="model"):
        KVSpec(model="", num_layers=1, num_kv_heads=1, head_dim=1)
    with pytest.raises(SpecMismatchError, match="num_layers"):
        KVSpec(model="m", num_layers=0, num_kv_heads=1, head_dim=1)
    with pytest.raises(SpecMismatchError, match="tp_rank"):
        KVSpec(model="m", num_layers=1, num_kv_heads=1, head_dim=1, tp_rank=2, tp_size=2)
    with pytest.raises(SpecMismatchError, match="float16"):
        KVSpec(model="m", num_layers=1, num_kv_heads=1, head_dim=1, dtype="int3")


def test_spec_field_types_do_not_change_the_namespace():
    ref = KVSpec(model="m", num_layers=4, num_kv_heads=2, head_dim=16, extra=(("a", "1"),))
    same = KVSpec(model="m", num_layers=np.int64(4), num_kv_heads="2", head_dim=np.int32(16),  # type: ignore[arg-type]
                  is_mla=0, extra=[["a", "1"]])  # type: ignore[arg-type]
    assert same.namespace_digest() == ref.namespace_digest()
    assert same == ref and hash(same) == hash(ref)


@pytest.mark.parametrize("bad", [[500.7, 3], np.array([1.0, 2.0]), ["12", "3"], [True, False], "123", b"12",
                                 [1, 2.5], [[1, 2]], [-1], [2**33]])
def test_non_integer_token_ids_are_refused_naming_the_argument(bad):
    ns = SPEC.namespace_digest()
    with pytest.raises((TypeError, ValueError), match="tokens"):
        prefix_keys(ns, bad, 2)
    with pytest.raises((TypeError, ValueError), match="context"):
        document_keys(ns, [1, 2, 3], 2, context=bad)


def test_float_ids_never_alias_their_truncation():
    """The bug this guards: [500.7, ...] used to key (and hit) the chunks of [500, ...]."""
    ns = SPEC.namespace_digest()
    with pytest.raises(TypeError):
        prefix_keys(ns, [500.7, 1.2], 2)
    assert prefix_keys(ns, np.array([500, 1], dtype=np.int32), 2) == prefix_keys(ns, [500, 1], 2)
    assert prefix_keys(ns, [], 2) == []


def test_a_partial_last_chunk_cannot_be_forged_by_a_full_first_chunk():
    """A link after a parent over ``chunk_size - 8`` tokens hashes as many bytes as a first chunk
    whose first 8 token ids spell the parent digest: bound like full links, the two keys were equal."""
    ns = SPEC.namespace_digest()
    cs = 16
    first = list(range(100, 100 + cs))
    tail = list(range(7, 7 + cs - 8))
    d0 = chain_hash(b"", first)
    forged = [int(v) for v in np.frombuffer(d0, dtype="<u4")] + tail  # a full first chunk
    assert chain_hash(d0, tail) == chain_hash(b"", forged)  # the chain itself collides (SGLang's hash)
    victim = prefix_keys(ns, first + tail, cs)  # [full, partial]
    assert victim[1] != prefix_keys(ns, forged, cs)[0]
    assert victim[1] == partial_key(ns, d0, tail)  # the vLLM connector's partial chunks share it
    assert victim[0] == prefix_keys(ns, first, cs)[0]  # full chunks keep SGLang-compatible keys
    doc = document_keys(ns, tail, cs, context=[1, 2, 3])
    assert doc != prefix_keys(ns, tail, cs) and len(doc) == 1
