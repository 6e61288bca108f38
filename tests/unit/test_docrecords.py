"""Document records travel through the store: a second KVCache on the same disk finds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvlayer import docrecords
from kvlayer.engine import KVCache
from kvlayer.errors import CorruptBlobError
from kvlayer.spec import KVSpec

SPEC = KVSpec(model="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32")


def test_record_shared_through_tiers(tmp_path):
    # a disk tier indexes its directory when it opens: the reader opens after the writer flushed
    a = KVCache(SPEC, cpu_bytes="16MiB", disk_path=str(tmp_path), chunk_size=16)
    kv = torch.randn(2, 2, 40, 2, 8)
    a.put_document("faq", np.arange(40), kv, context=[1, 2, 3], source="test")
    a.publish_document("faq")
    a.flush()
    b = KVCache(SPEC, cpu_bytes="16MiB", disk_path=str(tmp_path), chunk_size=16)
    try:
        assert b.sync_documents() == ["faq"]
        assert b.document("faq").keys == a.document("faq").keys
        assert b.document("faq").context.tolist() == [1, 2, 3]
        n, got = b.get_document("faq")
        assert n == 40 and torch.equal(got, kv)
        assert b.sync_documents() == []  # already known
        lease = b.pin(doc_id="faq")
        assert b.unpin(lease) == 1
        a.remove_document("faq")  # deletes the record too
        a.flush()
        c = KVCache(SPEC, cpu_bytes="16MiB", disk_path=str(tmp_path), chunk_size=16)
        assert c.sync_documents() == []
        c.close()
    finally:
        a.close()
        b.close()


def test_other_namespace_does_not_see_records(tmp_path):
    other = KVSpec(model="other", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32")
    a = KVCache(SPEC, cpu_bytes="16MiB", disk_path=str(tmp_path), chunk_size=16)
    a.put_document("faq", np.arange(20), torch.randn(2, 2, 20, 2, 8))
    a.publish_document("faq")
    a.flush()
    b = KVCache(other, cpu_bytes="16MiB", disk_path=str(tmp_path), chunk_size=16)
    try:
        assert b.sync_documents() == []
    finally:
        a.close()
        b.close()


def test_bad_record_is_refused():
    with pytest.raises(CorruptBlobError):
        docrecords.decode(torch.frombuffer(bytearray(b"not json"), dtype=torch.uint8))
    with pytest.raises(CorruptBlobError):
        docrecords.decode(torch.frombuffer(bytearray(b'{"v":1,"id":3}'), dtype=torch.uint8))
