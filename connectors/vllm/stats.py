"""The vLLM connector's counters: one set per connector object, read through
``KVLayerConnector.stats()`` (``kvlayer.connectors.vllm.connector_of(llm).stats()``), and the
timings the connector hands to vLLM's metrics (``metrics.py``) as ``Samples``."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..core import Counters

#: observations kept per series between two reports to vLLM (the oldest go beyond)
MAX_SAMPLES = 4096


class Samples:
    """Timings (seconds) per (series, label) since the last ``take``; bounded per series."""

    def __init__(self, limit: int = MAX_SAMPLES) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._data: dict[tuple[str, str], list[float]] = {}
        self.dropped = 0

    def observe(self, name: str, value: float, label: str = "") -> None:
        with self._lock:
            xs = self._data.setdefault((name, label), [])
            if len(xs) >= self.limit:
                del xs[0]
                self.dropped += 1
            xs.append(float(value))

    def take(self) -> dict[tuple[str, str], list[float]]:
        with self._lock:
            out, self._data = self._data, {}
        return out


@dataclass
class SchedulerCounters(Counters):
    lookups: int = 0
    lookup_timeouts: int = 0  # lookups a tier did not answer within lookup_deadline_s: misses
    hit_requests: int = 0
    hit_tokens: int = 0  # tokens claimed from kvlayer (beyond vLLM's own prefix hit)
    async_hits: int = 0  # hit requests whose load runs in the background (vLLM's async path)
    partial_hits: int = 0  # hit requests whose claim ends with a partial chunk
    partial_saves: int = 0  # partial chunks planned for saving
    declined_hits: int = 0  # lookups whose hit was claimed only in part or not at all: recompute wins
    declined_tokens: int = 0
    probe_hits: int = 0  # hits claimed only to refresh a stale load estimate
    failed_async_retries: int = 0  # requests recomputed after their background load failed (no new lookup)
    preemptions: int = 0  # requests vLLM preempted (their state was dropped)


@dataclass
class WorkerCounters(Counters):
    loaded_chunks: int = 0
    loaded_tokens: int = 0  # token slots written by loads (whole blocks)
    load_errors: int = 0  # chunks that failed to load (their blocks were recomputed)
    error_blocks: int = 0
    async_loads: int = 0  # loads run in the background
    abandoned_loads: int = 0  # async loads past their deadline: recomputed, pin released
    cancelled_loads: int = 0  # async loads of requests that finished (aborted) meanwhile
    late_loads: int = 0  # abandoned or cancelled loads whose read came back afterwards (discarded)
    saved_chunks: int = 0  # chunks handed to the store
    saved_bytes: int = 0  # their KV bytes (as gathered from vLLM's blocks, before encoding)
    skipped_saves: int = 0  # already stored (e.g. by another request in the batch)
    save_errors: int = 0
    dropped_saves: int = 0  # saves refused because the background save queue was full
    finished_saves: int = 0  # saves of finished requests whose blocks vLLM kept until gathered

    def __post_init__(self) -> None:
        super().__post_init__()
        #: save timings (``save_seconds``) and read timings (``load_seconds``, per tier)
        self.samples = Samples()
