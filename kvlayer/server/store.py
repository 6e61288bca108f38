"""The server's store: the tiered store over opaque blobs that clients encoded themselves.

The in-process ``TieredStore`` encodes tensors with a codec per tier; the server never sees
tensors, so every tier holds the client's blob byte for byte (the level codecs are a
placeholder "raw" so the background writer passes blobs through unchanged). Pins, lookup,
deletion, the bounded write-through queue and failure isolation are inherited.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvlayer.codec import get_codec
from kvlayer.codec.base import Buffer
from kvlayer.codec.header import verify
from kvlayer.errors import CorruptBlobError
from kvlayer.storage.base import Tier
from kvlayer.storage.hierarchy import TieredStore, _Job

log = logging.getLogger(__name__)
_PASSTHROUGH = "raw"


class BlobStore(TieredStore):
    """Tiers hot -> cold holding verified client blobs; optional synchronous disk writes."""

    def __init__(self, tiers: Sequence[Tier], *, write_queue_bytes: int = 64 << 20, promote_on_hit: bool = True,
                 retry_after_s: float = 2.0) -> None:
        raw = get_codec(_PASSTHROUGH)
        super().__init__([(t, raw) for t in tiers], write_policy="write_through", write_queue_bytes=write_queue_bytes,
                         promote_on_hit=promote_on_hit, retry_after_s=retry_after_s)
        # Durable puts are written synchronously down to (and including) the first disk tier.
        self.disk_level = next((i for i, lv in enumerate(self.levels) if lv.tier.kind == "disk"), None)

    def put_blob(self, key: str, blob: Buffer, *, durable: bool = False) -> bool:
        """Store a verified blob. With ``durable`` the call returns True only once the blob is in
        the disk tier (a file renamed into place, fsynced if the tier was built with fsync)."""
        nbytes = memoryview(blob).nbytes
        last_sync = self.disk_level if durable and self.disk_level is not None else 0
        ok_levels: list[bool] = []
        for i in range(last_sync + 1):
            lv = self.levels[i]
            ok_levels.append(self._safe(lv, "put", lambda lv=lv: lv.tier.put(key, blob), False))
        rest = tuple(range(last_sync + 1, len(self.levels)))
        if rest:
            self._enqueue(_Job(rest, key, None, blob, _PASSTHROUGH, nbytes), block=True)
        if durable and self.disk_level is not None:
            return ok_levels[-1]
        return any(ok_levels) or bool(rest)

    def get_blob(self, key: str, *, promote: bool | None = None) -> tuple[Buffer, str] | None:
        """(blob, tier name) from the hottest tier holding ``key``; lower-tier blobs are verified
        (a corrupt one is deleted and read as a miss) and promoted to the hottest tier."""
        promote = self.promote_on_hit if promote is None else promote
        for depth, lv in enumerate(self.levels):
            blob = self._safe(lv, "get", lambda lv=lv: lv.tier.get(key), None)
            if blob is None:
                continue
            if depth > 0:
                try:
                    verify(blob)
                except CorruptBlobError as e:
                    log.warning("tier %s: corrupt blob %s (%s); deleted", lv.name, key[:24], e)
                    lv.tier.count(corrupt=1)
                    self._count(corrupt=1)
                    self._safe(lv, "delete", lambda lv=lv: lv.tier.delete(key), False)
                    continue
                if promote:
                    top = self.levels[0]
                    if self._safe(top, "put", lambda top=top, b=blob: top.tier.put(key, b), False):
                        self._count(promotions=1)
            with self._clock:
                self.counters.hits += 1
                self.counters.hits_by_tier[lv.name] = self.counters.hits_by_tier.get(lv.name, 0) + 1
            return blob, lv.name
        self._count(misses=1)
        return None

    def keys_with_prefix(self, prefix: str) -> set[str]:
        out: set[str] = set()
        for lv in self.levels:
            ks: list[str] = self._safe(lv, "keys", lv.tier.keys, [])
            out.update(k for k in ks if k.startswith(prefix))
        return out

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix`` from every tier, pinned or not."""
        self.flush(timeout=30)
        keys = self.keys_with_prefix(prefix)
        return self.delete(sorted(keys), force=True) if keys else 0
