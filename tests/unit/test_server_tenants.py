"""The server's per-tenant quota of pins and documents (kvlayer.server.tenants), in-process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvlayer.server.tenants import ENTRY_COST, KEY_COST, QuotaExceeded, TenantLimits, TenantRegistry
from kvlayer.storage.pins import PinRegistry

KEYS = [f"{i:064x}" for i in range(100)]
LEASE = ENTRY_COST + KEY_COST * len(KEYS)


def registry(**limits: int) -> TenantRegistry:
    return TenantRegistry(PinRegistry(), TenantLimits(**limits))


def test_pins_are_charged_refused_when_full_and_refunded() -> None:
    reg = registry(metadata_bytes=3 * LEASE, tenant_bytes=2 * LEASE)
    a1 = reg.pin("a", KEYS, None)
    reg.pin("a", KEYS, None)
    with pytest.raises(QuotaExceeded, match="tenant 'a'"):
        reg.pin("a", KEYS, None)
    assert reg.pins.is_pinned(KEYS[0]) and len(reg.pins.leases()) == 2  # the refused pin changed nothing
    reg.pin("b", KEYS, None)
    with pytest.raises(QuotaExceeded, match="--metadata-bytes"):
        reg.pin("c", KEYS, None)
    assert reg.unpin("b", a1) == 0  # not b's lease
    assert reg.unpin("a", a1) == 1 and reg.unpin("a", a1) == 0
    reg.pin("c", KEYS, None)
    assert reg.usage()["metadata_bytes"] == 3 * LEASE


def test_expired_leases_are_refunded_when_the_quota_is_tight() -> None:
    reg = registry(metadata_bytes=LEASE, tenant_bytes=LEASE)
    reg.pin("a", KEYS, ttl_s=0.01)
    time.sleep(0.05)
    reg.pin("a", KEYS, None)  # the expired lease's charge came back on demand
    assert reg.usage() == {"metadata_bytes": LEASE, "metadata_limit": LEASE, "metadata_tenants": 1, "leases": 1,
                           "documents": 0}


def test_counts_tenants_and_documents_are_limited() -> None:
    reg = registry(metadata_bytes=1 << 30, tenant_bytes=1 << 30, max_tenants=2, max_leases=1, max_documents=1)
    reg.pin("a", KEYS[:1], None)
    with pytest.raises(QuotaExceeded, match="leases"):
        reg.pin("a", KEYS[:1], None)
    reg.register_document("b", "doc", KEYS)
    with pytest.raises(QuotaExceeded, match="documents"):
        reg.register_document("b", "other", KEYS)
    reg.register_document("b", "doc", KEYS[:5])  # replacing is not another document
    assert reg.document("b", "doc") == KEYS[:5]
    with pytest.raises(QuotaExceeded, match="tenants"):
        reg.pin("c", KEYS[:1], None)
    reg.clear_tenant("a")
    reg.pin("c", KEYS[:1], None)
    with pytest.raises(ValueError, match="doc_id"):
        reg.register_document("b", "x" * 300, KEYS)


def test_a_refused_replacement_keeps_the_old_document() -> None:
    reg = registry(metadata_bytes=2 * LEASE, tenant_bytes=2 * LEASE)
    reg.register_document("a", "doc", KEYS)
    with pytest.raises(QuotaExceeded):
        reg.register_document("a", "doc", KEYS * 3)
    assert reg.document("a", "doc") == KEYS
    assert reg.usage()["metadata_bytes"] == LEASE + len("doc")


def test_documents_persist_and_are_charged_on_load(tmp_path: Path) -> None:
    path = str(tmp_path / "documents.json")
    reg = TenantRegistry(PinRegistry(), TenantLimits(), path)
    reg.register_document("a", "doc", KEYS)
    again = TenantRegistry(PinRegistry(), TenantLimits(), path)
    assert again.document("a", "doc") == KEYS
    assert again.usage()["metadata_bytes"] == reg.usage()["metadata_bytes"] > 0
    again.clear_all()
    assert TenantRegistry(PinRegistry(), TenantLimits(), path).document("a", "doc") is None
