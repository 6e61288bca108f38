"""Saves off the engine's step: the step gathers chunks out of vLLM's blocks (a copy), one
background thread encodes them and writes the tiers.

Bounded: at most ``limit_bytes`` of gathered chunks wait; beyond that a save is dropped and
counted, never waited for. Keys stay visible while queued (``queued``/``wait``), so a load of a
chunk still in the queue waits for it instead of missing. ``durable`` (a ``kv_producer``): a save
counts as written only once every tier has it (the store's write-through flushed), since a
consumer on another machine reads it from the shared tier.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

import torch

from kvlayer.engine import KVCache

from ..core import FailureGuard
from .stats import WorkerCounters

log = logging.getLogger("kvlayer.vllm")

_Job = tuple[list[str], list[torch.Tensor], int]
#: the most a durable save waits for the store's lower tiers (a hung tier must not hold a
#: producer's blocks forever: its breaker and timeouts fail the write long before this)
DURABLE_FLUSH_S = 60.0


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority (Linux: threads are scheduled on their own), so the
    engine's forward threads win the cores over kvlayer's background work."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as e:  # not Linux, or not allowed
        log.debug("kvlayer: background thread priority unchanged (%s)", e)


class SaveQueue:
    def __init__(self, cache: KVCache, *, limit_bytes: int, guard: FailureGuard, counters: WorkerCounters,
                 nice: int = 0, durable: bool = False) -> None:
        self.cache = cache
        self.durable = durable
        self.nice = nice
        self.limit_bytes = limit_bytes
        self.guard = guard
        self.counters = counters
        self._cond = threading.Condition()
        self._pending_bytes = 0
        self._queued: dict[str, int] = {}
        self._landed: list[str] = []
        self._dropped: list[str] = []
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, keys: list[str], chunks: list[torch.Tensor]) -> bool:
        """Queue chunks for the background writer; False (dropped, counted) when over the bound."""
        nbytes = sum(c.numel() * c.element_size() for c in chunks)
        with self._cond:
            if self._pending_bytes + nbytes > self.limit_bytes and self._pending_bytes > 0:
                self.counters.add(dropped_saves=len(keys))
                self._dropped.extend(keys)
                return False
            self._pending_bytes += nbytes
            for k in keys:
                self._queued[k] = self._queued.get(k, 0) + 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvlayer-save", daemon=True)
                self._thread.start()
        self._jobs.put((keys, chunks, nbytes))
        return True

    def _run(self) -> None:
        lower_priority(self.nice)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            keys, _chunks, nbytes = job
            self.guard.call("background save", functools.partial(self._write, *job[:2]), None, then="a future miss",
                            on_error=lambda _e: self.counters.add(save_errors=1))
            del job, _chunks  # the gathered chunks are the queue's memory: free them before waiting again
            with self._cond:
                self._pending_bytes -= nbytes
                for k in keys:
                    left = self._queued.get(k, 0) - 1
                    if left > 0:
                        self._queued[k] = left
                    else:
                        self._queued.pop(k, None)
                self._landed.extend(keys)
                self._cond.notify_all()

    def _write(self, keys: list[str], chunks: list[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        where = self.cache.locate(keys)
        todo = [(k, c) for k, c, w in zip(keys, chunks, where, strict=True) if w is None]
        if todo:
            self.cache.store_chunks([k for k, _ in todo], [c for _, c in todo], block=self.durable)
            if self.durable and len(self.cache.tier_names) > 1:
                self.cache.flush(DURABLE_FLUSH_S)
            self.counters.samples.observe("save_seconds", time.perf_counter() - t0)
        self.counters.add(saved_chunks=len(todo), saved_bytes=sum(c.numel() * c.element_size() for _, c in todo),
                          skipped_saves=len(keys) - len(todo))

    def wait(self, keys: Sequence[str], timeout: float) -> bool:
        """Wait until none of ``keys`` is queued; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while any(k in self._queued for k in keys):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def take_reports(self) -> tuple[list[str], list[str]]:
        """(keys whose save finished since the last call, keys dropped since the last call)."""
        with self._cond:
            landed, dropped = self._landed, self._dropped
            self._landed, self._dropped = [], []
        return landed, dropped

    @property
    def pending_bytes(self) -> int:
        with self._cond:
            return self._pending_bytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued save has been written."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queued:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            thread.join()
