"""What the scheduler side tells the worker side each step (plain data: it may be pickled to a
worker process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class LoadOp:
    """Load ``keys`` (consecutive chunks) into ``blocks[i]``, skipping the first ``skips[i]``
    blocks of chunk i (vLLM's own prefix cache already holds them)."""

    req_id: str
    keys: list[str]
    blocks: list[list[int]]
    skips: list[int]
    lease: str | None = None


@dataclass
class SaveOp:
    req_id: str
    key: str
    blocks: list[int]


@dataclass
class ConnectorMeta(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)


@dataclass
class KVLayerWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, when they live in different processes: which chunk keys the worker's
    store now holds, and which ones it failed to read (so the scheduler stops claiming them)."""

    stored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, KVLayerWorkerMeta):
            return self
        # with several TP ranks a chunk is loadable only when every rank stored its shard
        theirs = set(other.stored)
        return KVLayerWorkerMeta([k for k in self.stored if k in theirs], sorted(set(self.missing) | set(other.missing)))
