"""What clients make the server remember besides blobs: pin leases and named documents, per tenant.

Both grow with what clients send, so both live inside a byte quota (part of ``--cpu-bytes``, see
``kvlayer.server.memory``): every lease and document is charged an estimate of the memory it
holds before it is created and refunded when it goes (released, expired, cleared). A request that
would pass the server's quota, its tenant's share, or a count limit is refused with
``QuotaExceeded`` (RESOURCE_EXHAUSTED on the wire) and changes nothing.

Costs are estimates measured on CPython 3.11: a key held by a lease costs a 64-80 char str plus its
slots in the lease tuple and the pin counter (~180 B); a document key its str and list slot
(~140 B). ``KEY_COST`` rounds both up; ``ENTRY_COST`` covers a lease's or document's own objects,
ids and its line in the documents file. Tenants are bounded by count (``max_tenants``: those
holding a lease or document); tenants without state cost nothing.

Leases can expire inside the ``PinRegistry`` on their own (TTL); their charge comes back the next
time the quota is tight or the usage is read (``reap``), not on a timer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvlayer.errors import KVLayerError
from kvlayer.storage.pins import PinRegistry

log = logging.getLogger(__name__)

KEY_COST = 256
ENTRY_COST = 1024
_SEP = "\x00"  # lease labels: "<tenant>\x00" or "<tenant>\x00doc:<doc id>"


class QuotaExceeded(KVLayerError):
    """A client asked the server to remember more than its quota allows."""


@dataclass
class TenantLimits:
    metadata_bytes: int = 16 << 20  # all tenants together
    tenant_bytes: int = 16 << 20  # one tenant
    max_tenants: int = 1024  # tenants holding a lease or document
    max_leases: int = 100_000  # per tenant
    max_documents: int = 100_000  # per tenant
    max_doc_id_chars: int = 256


@dataclass
class _Usage:
    bytes: int = 0
    leases: int = 0
    documents: int = 0


@dataclass
class _Lease:
    tenant: str
    doc_id: str
    cost: int


class TenantRegistry:
    """Leases and documents of every tenant, charged against ``TenantLimits``. Thread-safe."""

    def __init__(self, pins: PinRegistry, limits: TenantLimits | None = None, docs_path: str | None = None) -> None:
        self.pins = pins
        self.limits = limits or TenantLimits()
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}
        self._total = 0
        self._leases: dict[str, _Lease] = {}
        self._docs: dict[tuple[str, str], list[str]] = {}
        # Documents survive a restart when the server has a disk tier (a small JSON file).
        self._docs_path = Path(docs_path) if docs_path else None
        self._load_docs()

    # ------------------------------------------------------------------ accounting
    def _charge(self, tenant: str, nbytes: int, *, leases: int = 0, documents: int = 0, force: bool = False) -> None:
        """Called with the lock held. Raises ``QuotaExceeded`` (after reaping expired leases once)."""
        if not force:
            problem = self._over(tenant, nbytes, leases, documents)
            if problem and self._reap_locked():
                problem = self._over(tenant, nbytes, leases, documents)
            if problem:
                raise QuotaExceeded(problem)
        u = self._usage.setdefault(tenant, _Usage())
        u.bytes += nbytes
        u.leases += leases
        u.documents += documents
        self._total += nbytes

    def _over(self, tenant: str, nbytes: int, leases: int, documents: int) -> str:
        lim = self.limits
        u = self._usage.get(tenant)
        if u is None and len(self._usage) >= lim.max_tenants:
            return f"the server holds pins or documents of {len(self._usage)} tenants, its limit; clear one first"
        u = u or _Usage()
        if u.leases + leases > lim.max_leases:
            return f"tenant {tenant!r} holds {u.leases} leases, the limit is {lim.max_leases}; unpin some first"
        if u.documents + documents > lim.max_documents:
            return f"tenant {tenant!r} has {u.documents} documents, the limit is {lim.max_documents}"
        if u.bytes + nbytes > lim.tenant_bytes:
            return (f"tenant {tenant!r} would hold {u.bytes + nbytes} bytes of pins and documents, its quota is "
                    f"{lim.tenant_bytes}; unpin or clear some first")
        if self._total + nbytes > lim.metadata_bytes:
            return (f"the server's pins and documents would take {self._total + nbytes} bytes, the quota is "
                    f"{lim.metadata_bytes} (--metadata-bytes); retry later")
        return ""

    def _refund(self, tenant: str, nbytes: int, *, leases: int = 0, documents: int = 0) -> None:
        u = self._usage.get(tenant)
        if u is None:
            return
        u.bytes -= nbytes
        u.leases -= leases
        u.documents -= documents
        self._total -= nbytes
        if u.leases <= 0 and u.documents <= 0:
            self._total -= u.bytes  # rounding left-overs, if any
            del self._usage[tenant]

    def _reap_locked(self) -> int:
        live = {le.lease_id for le in self.pins.leases()}
        gone = [i for i in self._leases if i not in live]
        for i in gone:
            le = self._leases.pop(i)
            self._refund(le.tenant, le.cost, leases=1)
        return len(gone)

    def reap(self) -> int:
        """Refund leases that expired (or were dropped by the store); returns how many."""
        with self._lock:
            return self._reap_locked()

    def usage(self) -> dict[str, int]:
        with self._lock:
            self._reap_locked()
            return {"metadata_bytes": self._total, "metadata_limit": self.limits.metadata_bytes,
                    "metadata_tenants": len(self._usage), "leases": len(self._leases),
                    "documents": len(self._docs)}

    # ------------------------------------------------------------------ leases
    def pin(self, tenant: str, keys: Sequence[str], ttl_s: float | None, doc_id: str = "") -> str:
        cost = ENTRY_COST + KEY_COST * len(keys)
        with self._lock:
            self._charge(tenant, cost, leases=1)
            try:
                lease = self.pins.pin(keys, ttl_s=ttl_s, label=tenant + _SEP + (f"doc:{doc_id}" if doc_id else ""))
            except BaseException:
                self._refund(tenant, cost, leases=1)
                raise
            self._leases[lease] = _Lease(tenant, doc_id, cost)
        return lease

    def _release(self, lease_id: str) -> bool:
        le = self._leases.pop(lease_id)
        self._refund(le.tenant, le.cost, leases=1)
        return self.pins.unpin(lease_id)  # False: it had expired already

    def unpin(self, tenant: str, lease_id: str) -> int:
        """Release one of ``tenant``'s leases; 0 for an unknown, expired or foreign lease."""
        with self._lock:
            le = self._leases.get(lease_id)
            if le is None or le.tenant != tenant:
                return 0
            return int(self._release(lease_id))

    def unpin_document(self, tenant: str, doc_id: str) -> int:
        with self._lock:
            ids = [i for i, le in self._leases.items() if le.tenant == tenant and le.doc_id == doc_id]
            return sum(self._release(i) for i in ids)

    # ------------------------------------------------------------------ documents
    def document(self, tenant: str, doc_id: str) -> list[str] | None:
        with self._lock:
            keys = self._docs.get((tenant, doc_id))
            return None if keys is None else list(keys)

    @staticmethod
    def _doc_cost(doc_id: str, keys: Sequence[str]) -> int:
        return ENTRY_COST + len(doc_id) + KEY_COST * len(keys)

    def register_document(self, tenant: str, doc_id: str, keys: Sequence[str]) -> None:
        if not doc_id or len(doc_id) > self.limits.max_doc_id_chars:
            raise ValueError(f"doc_id must be 1-{self.limits.max_doc_id_chars} characters")
        with self._lock:
            old = self._docs.get((tenant, doc_id))
            if old is not None:  # replacing: the old keys are given back first
                self._refund(tenant, self._doc_cost(doc_id, old), documents=1)
            try:
                self._charge(tenant, self._doc_cost(doc_id, keys), documents=1)
            except QuotaExceeded:
                if old is not None:
                    self._charge(tenant, self._doc_cost(doc_id, old), documents=1, force=True)
                raise
            self._docs[(tenant, doc_id)] = list(keys)
            self._save_docs()

    # ------------------------------------------------------------------ clearing
    def clear_tenant(self, tenant: str) -> None:
        with self._lock:
            for i in [i for i, le in self._leases.items() if le.tenant == tenant]:
                self._release(i)
            for dk in [d for d in self._docs if d[0] == tenant]:
                self._refund(tenant, self._doc_cost(dk[1], self._docs.pop(dk)), documents=1)
            self._save_docs()

    def clear_all(self) -> None:
        """After the store dropped every key and pin."""
        with self._lock:
            self._leases.clear()
            self._docs.clear()
            self._usage.clear()
            self._total = 0
            self._save_docs()

    # ------------------------------------------------------------------ persistence
    def _load_docs(self) -> None:
        if self._docs_path is None or not self._docs_path.exists():
            return
        try:
            data = json.loads(self._docs_path.read_text())
            docs = {(str(d["tenant"]), str(d["doc_id"])): [str(k) for k in d["keys"]] for d in data["documents"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("documents file %s unreadable (%s); starting without documents", self._docs_path, e)
            return
        for (tenant, doc_id), keys in docs.items():
            self._charge(tenant, self._doc_cost(doc_id, keys), documents=1, force=True)
        self._docs = docs
        if self._total > self.limits.metadata_bytes:
            log.warning("documents from %s take %d bytes, over --metadata-bytes %d: new pins and documents are "
                        "refused until some are removed", self._docs_path, self._total, self.limits.metadata_bytes)

    def _save_docs(self) -> None:
        """Called with the lock held; atomic replace, so a crash leaves the old or new file."""
        if self._docs_path is None:
            return
        docs: list[dict[str, Any]] = [{"tenant": t, "doc_id": d, "keys": ks} for (t, d), ks in self._docs.items()]
        tmp = self._docs_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"version": 1, "documents": docs}))
            os.replace(tmp, self._docs_path)
        except OSError as e:
            log.warning("cannot save documents to %s: %s", self._docs_path, e)
