"""The codec layer: chunk tensors in, chunk tensors out, over a ``BlobStore``, one codec per tier.

- ``put`` encodes each chunk once, for the hottest tier; the background writer re-encodes for a
  lower tier only where its codec differs (decoding the queued blob once per write, however many
  tiers need it). A lossy hottest codec queues a copy of the tensor instead, so lower tiers are
  encoded from the original, not from the lossy blob.
- ``get`` decodes (verifying header, checksum and that the blob was encoded for its key: a
  corrupt or misplaced blob is deleted and read as a miss); a raw CPU hit is a view of the stored
  blob, no copy. Hits from lower tiers are promoted in the hottest tier's codec.
- An in-process hottest tier (memory) keeps its blobs unsealed: no checksum pass when they are
  stored, none when they are read back (their bytes never left the process; the key is still
  checked). A blob is sealed (hashed once) when it leaves: write-through, demotion, durable puts.
- ``put`` hands the hottest tier batches (up to ``PUT_BATCH_BYTES`` of blobs, so memory stays
  bounded): a remote tier pipelines them instead of paying a round trip per chunk, and the next
  batch is encoded while one is on the wire (two batches at most).
- Every blob is encoded for its key (``Codec.encode(..., key=)``), at every level.

Everything else (tiers, pins, the write queue, failure isolation, lookups) is the blob store's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from kvlayer.codec import Codec, decode, decode_verified
from kvlayer.codec.base import Buffer
from kvlayer.codec.header import open_local, seal
from kvlayer.errors import CorruptBlobError, UsageError
from kvlayer.storage.base import Tier
from kvlayer.storage.blobstore import BlobStore, Formats, Level, Payload, StoreOptions
from kvlayer.storage.pins import PinRegistry

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: blobs encoded ahead of one batched write to the hottest tier (a remote tier pipelines them)
PUT_BATCH_BYTES = 64 << 20


def _same(a: Codec, b: Codec) -> bool:
    return a.name == b.name and a.transform.params == b.transform.params


class TierCodecs(Formats):
    """Each level's blobs are its own codec's encoding of a chunk tensor, bound to its key: a blob
    encoded for another key (or for none) is never decoded as this key's chunk."""

    def __init__(self, codecs: Sequence[Codec], *, local_top: bool = False) -> None:
        super().__init__()
        self.codecs = list(codecs)
        #: level 0 is this process's memory: its blobs are stored unsealed and read unhashed
        self.local_top = local_top

    def _decode(self, blob: Buffer, level: int, key: str) -> torch.Tensor:
        if level == 0 and self.local_top:
            return decode_verified(blob, open_local(blob, key))
        return decode(blob, key=key)

    def open(self, blob: Buffer, level: int, key: str) -> torch.Tensor:
        return self._decode(blob, level, key)

    def sealed(self, level: int) -> bool:
        """Whether blobs encoded for ``level`` carry their checksum from the start."""
        return level > 0 or not self.local_top

    def blob_for(self, payload: Payload, level: int, key: str) -> Buffer | None:
        codec = self.codecs[level]
        if payload.blob is not None and _same(self.codecs[payload.src], codec):
            return seal(payload.blob) if self.sealed(level) else payload.blob
        if payload.data is None:  # decoded once, kept for the job's other tiers
            if payload.blob is None:
                return None
            try:
                payload.data = self._decode(payload.blob, payload.src, key)
            except CorruptBlobError:
                return None
        return codec.encode(payload.data, key=key, sealed=self.sealed(level))


class TieredStore:
    """A ``BlobStore`` over ``(tier, codec)`` levels, hot to cold, that stores chunk tensors."""

    def __init__(self, levels: Sequence[tuple[Tier, Codec]], **options: Unpack[StoreOptions]) -> None:
        """``options``: the blob store's (write policy, queue bytes, promotion, retry policies)."""
        self.codecs = TierCodecs([c for _, c in levels], local_top=bool(levels) and levels[0][0].kind == "memory")
        self.blobs = BlobStore([t for t, _ in levels], formats=self.codecs, **options)
        self._send: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def levels(self) -> list[Level]:
        return self.blobs.levels

    @property
    def pins(self) -> PinRegistry:
        return self.blobs.pins

    # ------------------------------------------------------------------ tensors
    def get(self, keys: Sequence[str], *, promote: bool | None = None) -> list[torch.Tensor | None]:
        """Decoded chunks (None for misses). Corrupt blobs are deleted and read as misses."""
        return [None if hit is None else hit[0] for hit in self.blobs.get_many(keys, promote=promote)]

    def put(self, keys: Sequence[str], tensors: Sequence[torch.Tensor], *, block: bool = True) -> int:
        """Store chunks; returns how many the hottest tier accepted. Lower tiers are written in the
        background; with ``block=False`` a full write queue drops (and counts) instead of waiting."""
        if len(keys) != len(tensors):
            raise UsageError(f"{len(keys)} keys given for {len(tensors)} chunks")
        top, sealed = self.codecs.codecs[0], self.codecs.sealed(0)
        stored = 0
        batch: list[tuple[str, Buffer, Callable[[], Payload]]] = []
        size = 0
        sending: Future[list[bool]] | None = None  # a remote top tier's previous batch, in flight
        try:
            for i, (key, t) in enumerate(zip(keys, tensors, strict=True)):
                blob = top.encode(t, key=key, sealed=sealed)
                batch.append((key, blob, partial(self._payload, t, blob)))
                size += memoryview(blob).nbytes
                if size >= PUT_BATCH_BYTES or i == len(keys) - 1:
                    if sending is not None:
                        stored += sum(sending.result())
                        sending = None
                    if self.codecs.local_top or i == len(keys) - 1:
                        stored += sum(self.blobs.put_many(batch, block=block))
                    else:  # encode the next batch while this one is on the wire
                        sending = self._sender().submit(partial(self.blobs.put_many, batch, block=block))
                    batch, size = [], 0
        finally:
            if sending is not None:  # never return (or raise) while the caller's tensors are in use
                sending.result()
        return stored

    def _sender(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._send is None:
                self._send = ThreadPoolExecutor(1, thread_name_prefix="kvlayer-put")
            return self._send

    def _payload(self, tensor: torch.Tensor, blob: Buffer) -> Payload:
        """A background write that owns its data: the caller may reuse ``tensor`` as soon as
        ``put`` returns (engines recycle staging buffers), so queueing the tensor itself let the
        lower tiers store whatever the buffer held later. The hot tier's blob is an independent
        copy; it is exact when that codec is lossless, else the tensor is cloned."""
        if self.codecs.codecs[0].lossless:
            return Payload(blob, 0, memoryview(blob).nbytes)
        return Payload(None, 0, tensor.numel() * tensor.element_size(), tensor.detach().clone())

    # ------------------------------------------------------------------ the blob store's
    def locate(self, keys: Sequence[str]) -> list[str | None]:
        return self.blobs.locate(keys)

    def lookup(self, keys: Sequence[str]) -> list[str]:
        return self.blobs.lookup(keys)

    def delete(self, keys: Sequence[str], *, force: bool = False) -> int:
        return self.blobs.delete(keys, force=force)

    def flush(self, timeout: float | None = None) -> bool:
        return self.blobs.flush(timeout)

    def clear(self) -> None:
        self.blobs.clear()

    def stats(self) -> dict[str, Any]:
        s = self.blobs.stats()
        for d, codec in zip(s["tiers"], self.codecs.codecs, strict=True):
            d["codec"] = codec.name
            if codec.transform.params:  # e.g. the RoPE base an engine connector handed the int codecs
                d["codec_params"] = dict(codec.transform.params)
        return s

    def close(self) -> None:
        with self._lock:
            send, self._send = self._send, None
        if send is not None:
            send.shutdown(wait=True)
        self.blobs.close()
