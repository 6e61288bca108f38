"""Connector counters, process-wide so tests, the demo and benchmarks can read them."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass


@dataclass
class ConnectorCounters:
    lookups: int = 0
    hit_requests: int = 0
    hit_tokens: int = 0  # tokens claimed from kvlayer (beyond vLLM's own prefix hit)
    loaded_chunks: int = 0
    loaded_tokens: int = 0  # token slots written by loads (whole blocks)
    load_errors: int = 0  # chunks that failed to load (their blocks were recomputed)
    error_blocks: int = 0
    saved_chunks: int = 0  # chunks handed to the store
    skipped_saves: int = 0  # already stored (e.g. by another request in the batch)
    save_errors: int = 0
    dropped_saves: int = 0  # saves refused because the background save queue was full
    preemptions: int = 0  # requests vLLM preempted (their state was dropped)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    def reset(self) -> None:
        with self._lock:
            for k in asdict(self):
                setattr(self, k, 0)


#: One set of counters per process (scheduler and worker sides add to the same one).
COUNTERS = ConnectorCounters()
