"""kvlayer's store events as vLLM KV events, so a router subscribed to vLLM's event stream
(``--kv-events-config``) sees what the engine's kvlayer tiers hold beside its own blocks.

Translation (``to_vllm``): a chunk is one "block" of ``chunk_size`` tokens whose hash is the
chunk's kvlayer key (32 bytes: ``sha256(namespace || d_i)``, ``kvlayer.keys``; a router computes
the same keys from a prompt's tokens and the engine's namespace). ``medium`` is vLLM's: ``CPU``
for the memory tier, ``STORAGE`` for disk, Redis and ``kvlayer serve``; ``locality`` says whether
the tier is this machine's (LOCAL) or shared (REMOTE), ``ownership`` names the tier
(``kvlayer:<tier>``). The blob store knows neither tokens nor chains, so ``token_ids`` is empty and
``parent_block_hash`` None. A tier emptied without a key list (Redis, a server) is vLLM's
``AllBlocksCleared``.

Path through vLLM: the worker-side connector subscribes to its store (bounded queue) and hands
what it took to vLLM each step (``get_kv_connector_kv_cache_events``, carried in
``KVConnectorOutput``); the scheduler-side connector collects them (``update_connector_output``,
bounded too) and gives them to vLLM's publisher (``take_events``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)

from kvlayer.events import EventHub, StoreEvent, Subscription

#: vLLM events the scheduler side keeps between two ``take_events`` (oldest dropped beyond)
MAX_PENDING = 10_000

_MEDIUM = {"memory": MEDIUM_CPU}
_LOCAL = {"memory", "disk"}


def to_vllm(ev: StoreEvent, *, block_size: int) -> KVCacheEvent:
    """One store event as vLLM's event (see the module doc for the mapping)."""
    if ev.kind == "cleared":
        return AllBlocksCleared()
    hashes: list[bytes | int] = [bytes.fromhex(k) for k in ev.keys]
    medium = _MEDIUM.get(ev.medium, MEDIUM_STORAGE)
    locality = "LOCAL" if ev.medium in _LOCAL else "REMOTE"
    owner = f"kvlayer:{ev.tier}"
    if ev.kind == "stored":
        return BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=block_size,
                           lora_id=None, medium=medium, lora_name=None, locality=locality, ownership=owner)
    return BlockRemoved(block_hashes=hashes, medium=medium, locality=locality, ownership=owner)


class KVLayerKVEvents(KVConnectorKVEvents):
    """The events of one step from one or more workers. ``aggregate`` keeps every event: with TP
    each rank stores its own shard under its own key, so no event is common to all ranks."""

    def __init__(self, events: Iterable[KVCacheEvent] = (), num_workers: int = 1) -> None:
        self._events: list[KVCacheEvent] = list(events)
        self._workers = num_workers

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.extend(events)

    def aggregate(self) -> KVLayerKVEvents:
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._events = []

    def __repr__(self) -> str:
        return f"<KVLayerKVEvents {len(self._events)} events>"


class WorkerEvents:
    """The worker side: a bounded subscription to its store, drained once per step."""

    def __init__(self, hub: EventHub, *, block_size: int, max_keys: int) -> None:
        self.block_size = block_size
        self.sub: Subscription = hub.subscribe(max_keys)

    def take(self) -> KVLayerKVEvents | None:
        got = self.sub.take()
        if not got:
            return None
        return KVLayerKVEvents(to_vllm(e, block_size=self.block_size) for e in got)

    @property
    def dropped(self) -> int:
        return self.sub.dropped

    def close(self) -> None:
        self.sub.close()


class SchedulerEvents:
    """The scheduler side: what the workers sent, until vLLM takes it (oldest dropped, counted)."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self._q: deque[KVCacheEvent] = deque()
        self.limit = limit
        self.dropped = 0

    def add(self, events: KVConnectorKVEvents | None) -> None:
        if events is None:
            return
        self.extend(events.get_all_events())

    def extend(self, events: Sequence[KVCacheEvent]) -> None:
        self._q.extend(events)
        while len(self._q) > self.limit:
            self._q.popleft()
            self.dropped += 1

    def take(self) -> list[KVCacheEvent]:
        out = list(self._q)
        self._q.clear()
        return out
