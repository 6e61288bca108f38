"""What the scheduler side tells the worker side each step (plain data: it may be pickled to a
worker process)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class LoadOp:
    """Load ``keys`` (consecutive chunks, ``sizes[i]`` tokens each: the last may be a partial
    chunk) into ``blocks[i]``, skipping the first ``skips[i]`` blocks of chunk i (vLLM's own
    prefix cache already holds them). ``tiers[i]`` is where the lookup found chunk i.
    ``background``: vLLM waits for it asynchronously (``get_finished`` reports it done)."""

    req_id: str
    keys: list[str]
    blocks: list[list[int]]
    skips: list[int]
    lease: str | None = None
    sizes: list[int] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    background: bool = False


@dataclass
class SaveOp:
    req_id: str
    key: str
    blocks: list[int]
    #: the request has finished and vLLM keeps its blocks until ``get_finished`` reports this
    #: request in ``finished_sending`` (``request_finished`` returned True)
    finished: bool = False
    #: tokens of the chunk when it ends inside its last block (a producer's prompt tail); 0 =
    #: whole blocks
    tokens: int = 0


@dataclass
class ConnectorMeta(KVConnectorMetadata):
    loads: list[LoadOp] = field(default_factory=list)
    saves: list[SaveOp] = field(default_factory=list)
    #: finished requests of a producer: report each in ``finished_sending`` once its saves are
    #: written (vLLM keeps its blocks until then)
    sends: list[str] = field(default_factory=list)
    #: tokens and attention work this step computes (the worker times the step: prefill model)
    step_tokens: int = 0
    step_attention: float = 0.0


@dataclass
class KVLayerWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler, when they live in different processes: which chunk keys the worker's
    store now holds, and which ones it failed to read (so the scheduler stops claiming them)."""

    stored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    #: queued saves that reached the store (a shared store then answers for them itself)
    landed: list[str] = field(default_factory=list)
    #: timed reads: (tier, chunks, seconds), for the load-or-recompute estimates
    loads: list[tuple[str, int, float]] = field(default_factory=list)
    #: timed forward passes: (tokens, attention work, seconds)
    steps: list[tuple[int, float, float]] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, KVLayerWorkerMeta):
            return self
        # with several TP ranks a chunk is loadable only when every rank stored its shard
        theirs, landed = set(other.stored), set(other.landed)
        return KVLayerWorkerMeta([k for k in self.stored if k in theirs], sorted(set(self.missing) | set(other.missing)),
                                 [k for k in self.landed if k in landed], self.loads + other.loads,
                                 self.steps + other.steps)
