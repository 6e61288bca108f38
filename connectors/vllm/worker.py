"""Worker side: copy whole blocks between vLLM's paged cache and kvlayer chunks.

Synchronous loads (chunks in process memory) run in ``start_load_kv``, before the forward pass.
Background loads (vLLM's async path: the request waits, the batch keeps running) are fetched and
decoded on ``load_threads`` low-priority threads chunk by chunk, each chunk copied into the
request's blocks by the same thread (nothing else touches a waiting request's blocks) and
followed by a rest while the engine computes, and reported done by ``get_finished``. One that
makes no progress for ``load_deadline_s`` is abandoned there: its blocks are reported failed
(vLLM recomputes them), its pin released, and whatever its read returns later is discarded. A chunk that cannot be
read (missing, corrupt, tier down) marks its blocks and every later block of that request as
failed, which vLLM then recomputes.

Saves: the step only gathers the chunk out of vLLM's blocks (``wait_for_save``, after the forward
pass); encoding and tier writes run on one background thread (``saves.SaveQueue``). A finished
request's last partial chunk is gathered in the next step from blocks vLLM keeps for us until
``get_finished`` reports the request in ``finished_sending``. A producer (``kv_role``,
``roles.py``) writes each save through to every tier and reports a finished request in
``finished_sending`` once all its saves are written.

Every read is timed per tier and every forward pass per token count; the scheduler side turns
those into its load-or-recompute estimates (``estimate.py``).
"""

from __future__ import annotations

import enum
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kvlayer.engine import KVCache

from ..core import FailureGuard, LayoutError
from .config import ConnectorOptions
from .layout import Adapter, Layout, make_adapter, probe_layout, table_layout
from .metadata import ConnectorMeta, KVLayerWorkerMeta, LoadOp
from .roles import Role
from .saves import SaveQueue, lower_priority
from .stats import WorkerCounters

log = logging.getLogger("kvlayer.vllm")

#: How long an idle step (nothing scheduled, loads in flight) waits for a load to finish, so the
#: engine loop does not spin on the cores the loads need.
IDLE_WAIT_S = 0.005


class State(enum.Enum):
    PENDING = "pending"  # reading
    WRITING = "writing"  # copying into vLLM's blocks: no longer abandonable
    DONE = "done"
    ABANDONED = "abandoned"  # deadline or request gone: the read's result is discarded


@dataclass
class BackgroundLoad:
    op: LoadOp
    deadline: float
    state: State = State.PENDING
    errors: set[int] = field(default_factory=set)


class WorkerSide:
    """The worker-side connector's state and copies; vLLM's calls arrive through
    ``KVLayerConnector``, which guards them."""

    def __init__(self, cache: KVCache, *, block_size: int, num_blocks: int, layer_names: list[str],
                 guard: FailureGuard | None = None, options: ConnectorOptions | None = None,
                 role: Role = "kv_both") -> None:
        self.cache = cache
        self.options = options or ConnectorOptions()
        self.role = role
        self.counters = WorkerCounters()
        self.guard = guard or FailureGuard(log, "vLLM worker")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layer_names = layer_names
        self.adapter: Adapter | None = None
        #: test only: seconds added per chunk read from a tier (``test_tier_delay_s``; mutable)
        self.delays: dict[str, float] = dict(self.options.test_tier_delay_s)
        self._lock = threading.Condition()
        self._errors: set[int] = set()
        self._stored: list[str] = []
        self._missing: list[str] = []
        self._samples: list[tuple[str, int, float]] = []
        self._steps: list[tuple[int, float, float]] = []
        self._background: dict[str, BackgroundLoad] = {}
        self._sent: set[str] = set()
        self._sending: dict[str, list[str]] = {}  # producer: request -> keys it queued for saving
        self._awaiting: set[str] = set()  # finished producer requests whose saves may not be written yet
        self._loader: ThreadPoolExecutor | None = None
        self._step: tuple[float, ConnectorMeta] | None = None
        self._idle = False  # the current step runs no forward pass
        self._sync_load_s = 0.0
        self.load_seconds = 0.0
        self.save_seconds = 0.0
        self.saves = SaveQueue(cache, limit_bytes=int(cache.config.write_queue_bytes), guard=self.guard,
                               # a producer's saves are the hand-off a decode engine waits for:
                               # they do not yield to the engine's next prefill
                               counters=self.counters, nice=0 if role == "kv_producer" else self.options.background_nice,
                               durable=role == "kv_producer")

    # ------------------------------------------------------------------ setup
    def register(self, kv_caches: dict[str, torch.Tensor], forward_context: dict[str, Any], backend: str) -> Layout:
        names = [n for n in self.layer_names if n in kv_caches] or list(kv_caches)
        if len(names) != self.cache.spec.num_layers:
            raise LayoutError(f"vLLM registered {len(names)} KV layers, the spec has {self.cache.spec.num_layers}")
        caches = [kv_caches[n] for n in names]
        spec = self.cache.spec
        geom = dict(num_blocks=self.num_blocks, block_size=self.block_size, num_heads=spec.num_kv_heads,
                    head_dim=spec.head_dim)
        layer = forward_context.get(names[0])
        try:
            layout = probe_layout(layer, caches[0], **geom)
        except Exception as e:
            log.warning("kvlayer: probing the %s KV layout failed (%s: %s); trying the known-layout table",
                        backend, type(e).__name__, e)
            layout = table_layout(backend, caches[0], **geom)
        for kv in caches[1:]:
            if kv.shape != caches[0].shape or kv.stride() != caches[0].stride() or kv.dtype != caches[0].dtype:
                raise LayoutError("KV layers differ in shape/stride/dtype; one layout per model is supported")
        if caches[0].dtype != spec.torch_dtype:
            raise LayoutError(f"KV cache dtype {caches[0].dtype} != spec dtype {spec.torch_dtype}")
        self.adapter = make_adapter(caches, layout)
        log.info("kvlayer: %d KV layers, layout %s", len(caches), layout.describe())
        return layout

    # ------------------------------------------------------------------ step timing
    def begin_step(self, meta: ConnectorMeta) -> None:
        self._step = (time.perf_counter(), meta)
        self._idle = meta.step_tokens == 0
        self._sync_load_s = 0.0

    def _end_step(self) -> None:
        """Time the forward pass (minus synchronous loads) for the prefill model."""
        if self._step is None:
            return
        t0, meta = self._step
        self._step = None
        if meta.step_tokens > 0:
            seconds = time.perf_counter() - t0 - self._sync_load_s
            with self._lock:
                self._steps.append((meta.step_tokens, meta.step_attention, seconds))

    # ------------------------------------------------------------------ load
    def start_load(self, meta: ConnectorMeta) -> None:
        if not meta.loads:
            return
        t0 = time.perf_counter()
        for op in meta.loads:
            if op.background:
                self._submit(op)
            else:
                self._load_guarded(op)
        dt = time.perf_counter() - t0
        self._sync_load_s += dt
        self.load_seconds += dt

    def _load_guarded(self, op: LoadOp) -> None:
        """Load one request's chunks now; whatever fails is recomputed, and the pin always goes."""
        self.guard.call("load", lambda: self._fail(op, self._scatter(op, self._read(op))), None,
                        then="its blocks are recomputed", on_error=lambda _e: self._fail(op, 0))
        self._unpin(op)

    def _unpin(self, op: LoadOp) -> None:
        lease = op.lease
        if lease:
            self.guard.call("unpin", lambda: self.cache.unpin(lease), 0, then="the pin expires by its TTL")

    def _read(self, op: LoadOp) -> list[torch.Tensor | None]:
        """The op's chunks (None from the first one that cannot be read), each run of chunks from
        one tier read and timed on its own."""
        out: list[torch.Tensor | None] = []
        tiers = op.tiers or ["?"] * len(op.keys)
        i = 0
        while i < len(op.keys):
            j = i
            while j < len(op.keys) and tiers[j] == tiers[i]:
                j += 1
            keys = op.keys[i:j]
            self.saves.wait(keys, self.options.load_deadline_s)  # a chunk still queued for saving
            t0 = time.perf_counter()
            delay = self.delays.get(tiers[i], 0.0)
            if delay:
                time.sleep(delay * len(keys))
            got = self.cache.retrieve_chunks(keys)
            if all(c is not None for c in got):
                with self._lock:
                    self._samples.append((tiers[i], len(keys), time.perf_counter() - t0))
            out.extend(got)
            if any(c is None for c in got):
                break
            i = j
        return out + [None] * (len(op.keys) - len(out))

    def _scatter(self, op: LoadOp, chunks: list[torch.Tensor | None]) -> int:
        """Copy the chunks into the op's blocks; returns the index of the first chunk that failed
        (``len(op.keys)`` if none did)."""
        for i, chunk in enumerate(chunks):
            if not self._scatter_one(op, i, chunk):
                return i
        return len(op.keys)

    def _failed_blocks(self, op: LoadOp, first: int) -> list[int]:
        return [b for i in range(first, len(op.blocks)) for b in op.blocks[i][op.skips[i]:]]

    def _fail(self, op: LoadOp, first: int) -> None:
        """Report the blocks of chunks ``first`` onwards as failed (vLLM recomputes them)."""
        bad = self._failed_blocks(op, first)
        if not bad:
            return
        with self._lock:
            self._errors.update(bad)
        self.counters.add(load_errors=len(op.blocks) - first, error_blocks=len(bad))

    # ------------------------------------------------------------------ background loads
    def _submit(self, op: LoadOp) -> None:
        job = BackgroundLoad(op, time.monotonic() + self.options.load_deadline_s)
        self.counters.add(async_loads=1)
        with self._lock:
            self._background[op.req_id] = job
        if self.adapter is None or not op.keys:  # inactive connector, or a plan that cannot run
            self._finish(job, 0)
            return
        if self._loader is None:
            self._loader = ThreadPoolExecutor(self.options.load_threads, thread_name_prefix="kvlayer-load",
                                              initializer=lower_priority, initargs=(self.options.background_nice,))
        self._loader.submit(self._run, job)

    def _run(self, job: BackgroundLoad) -> None:
        """Chunk by chunk: read, then copy unless the load was abandoned meanwhile, then rest a
        while (``background_duty``), so the engine's steps share the cores with a load instead of
        losing them to it for one long step."""
        op = job.op
        tiers = op.tiers or ["?"] * len(op.keys)
        spent: dict[str, tuple[int, float]] = {}
        first = len(op.keys)
        for i, key in enumerate(op.keys):
            t0 = time.perf_counter()
            self.saves.wait([key], self.options.load_deadline_s)  # a chunk still queued for saving
            delay = self.delays.get(tiers[i], 0.0)
            if delay:
                time.sleep(delay)
            chunk: torch.Tensor | None = self.guard.call(
                "background load", functools.partial(self._read_one, key), None, then="its blocks are recomputed")
            read_s = time.perf_counter() - t0
            with self._lock:
                if job.state is not State.PENDING:
                    self.counters.add(late_loads=1)
                    return  # abandoned: its blocks may belong to another request by now
                job.state = State.WRITING
            ok = self.guard.call("background load", functools.partial(self._scatter_one, op, i, chunk), False,
                                 then="its blocks are recomputed")
            with self._lock:
                job.state = State.PENDING
                job.deadline = time.monotonic() + self.options.load_deadline_s  # progress: a new deadline
            if not ok:
                first = i
                break
            n, sec = spent.get(tiers[i], (0, 0.0))
            spent[tiers[i]] = (n + 1, sec + read_s)
            busy = time.perf_counter() - t0 - delay
            if i + 1 < len(op.keys) and self.options.background_duty < 1 and not self._idle:
                time.sleep(busy * (1 / self.options.background_duty - 1))  # only while the engine computes
        with self._lock:
            self._samples.extend((tier, n, sec) for tier, (n, sec) in spent.items())
        self._finish(job, first)

    def _read_one(self, key: str) -> torch.Tensor | None:
        return self.cache.retrieve_chunks([key])[0]

    def _scatter_one(self, op: LoadOp, i: int, chunk: torch.Tensor | None) -> bool:
        """Copy chunk ``i`` of ``op`` into its blocks; False (and its keys reported missing) when
        it cannot be read."""
        size = op.sizes[i] if op.sizes else self.cache.chunk_size
        if self.adapter is None or chunk is None or chunk.shape[2] != size:
            with self._lock:
                self._missing.extend(op.keys[i:])
            return False
        skip = op.skips[i]
        blocks = op.blocks[i][skip:]
        if blocks:
            bs = self.block_size
            part = chunk[:, :, skip * bs:(skip + len(blocks)) * bs]
            whole = part.shape[2] // bs
            if whole:
                self.adapter.scatter(blocks[:whole], part[:, :, :whole * bs])
            if whole < len(blocks):  # a chunk that ends inside its last block (a producer's prompt tail)
                last = part.new_zeros((*part.shape[:2], bs, *part.shape[3:]))
                last[:, :, :part.shape[2] - whole * bs] = part[:, :, whole * bs:]
                self.adapter.scatter(blocks[whole:], last)
        self.counters.add(loaded_chunks=1, loaded_tokens=len(blocks) * self.block_size)
        return True

    def _finish(self, job: BackgroundLoad, first: int) -> None:
        bad = self._failed_blocks(job.op, first)
        with self._lock:
            if job.state is not State.PENDING:
                return  # abandoned after its last chunk: already reported
            job.errors = set(bad)
            job.state = State.DONE
            self._lock.notify_all()
        if bad:
            self.counters.add(load_errors=len(job.op.blocks) - first, error_blocks=len(bad))
        self._unpin(job.op)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(finished requests whose delayed save is gathered, requests whose background load is
        over: done, failed, past its deadline, or of a request that finished meanwhile)."""
        idle = self._idle
        recving: set[str] = set()
        gone: list[BackgroundLoad] = []
        if idle and self._awaiting:  # a producer with nothing to run waits for its saves, not spins
            with self._lock:
                pending = [k for r in self._awaiting for k in self._sending.get(r, ())]
            self.saves.wait(pending, IDLE_WAIT_S)
        with self._lock:
            if idle and self._background and not any(j.state is State.DONE for j in self._background.values()):
                nearest = min(j.deadline for j in self._background.values()) - time.monotonic()
                self._lock.wait(max(0.0, min(IDLE_WAIT_S, nearest)))
            now = time.monotonic()
            for req_id, job in list(self._background.items()):
                if job.state is State.DONE:
                    self._errors.update(job.errors)
                elif job.state is State.PENDING and (req_id in finished_req_ids or now >= job.deadline):
                    job.state = State.ABANDONED
                    gone.append(job)
                    if req_id in finished_req_ids:
                        self.counters.add(cancelled_loads=1)
                    else:  # recomputed by vLLM
                        bad = self._failed_blocks(job.op, 0)
                        self._errors.update(bad)
                        self.counters.add(abandoned_loads=1, load_errors=len(job.op.blocks), error_blocks=len(bad))
                else:
                    continue
                del self._background[req_id]
                recving.add(req_id)
            sending, self._sent = self._sent, set()
            for req_id in list(self._awaiting):
                if self.saves.wait(self._sending.get(req_id, ()), 0):  # all written (or dropped)
                    self._awaiting.discard(req_id)
                    self._sending.pop(req_id, None)
                    sending.add(req_id)
        for job in gone:
            self._unpin(job.op)
        if gone:
            log.info("kvlayer: %d background load(s) abandoned (deadline %.1f s or request finished); recomputed",
                     len(gone), self.options.load_deadline_s)
        return sending or None, recving or None

    def inflight(self) -> int:
        with self._lock:
            return len(self._background)

    def take_worker_meta(self) -> KVLayerWorkerMeta | None:
        landed, dropped = self.saves.take_reports()
        with self._lock:
            meta = KVLayerWorkerMeta(self._stored, self._missing + dropped, landed, self._samples, self._steps)
            self._stored, self._missing, self._samples, self._steps = [], [], [], []
        if not (meta.stored or meta.missing or meta.landed or meta.loads or meta.steps):
            return None
        return meta

    def take_load_errors(self) -> set[int]:
        with self._lock:
            out, self._errors = self._errors, set()
        return out

    # ------------------------------------------------------------------ save
    def save(self, meta: ConnectorMeta) -> None:
        self._end_step()
        if meta.sends:  # reported by get_finished once their saves are written
            with self._lock:
                self._awaiting.update(meta.sends)
            self.counters.add(finished_saves=len(meta.sends))
        if not meta.saves:
            return
        t0 = time.perf_counter()
        # a failed save is a future miss, nothing more
        self.guard.call("save", lambda: self._save(meta), None, then="a future miss",
                        on_error=lambda _e: self.counters.add(save_errors=1))
        finished = {op.req_id for op in meta.saves if op.finished}
        if finished:  # gathered (or failed): vLLM may free their blocks now
            with self._lock:
                self._sent |= finished
            self.counters.add(finished_saves=len(finished))
        self.save_seconds += time.perf_counter() - t0

    def _save(self, meta: ConnectorMeta) -> None:
        """Gather each chunk out of vLLM's blocks (the only part the step pays) and queue it."""
        if self.adapter is None:
            return
        keys, chunks, seen = [], [], set()
        for op in meta.saves:
            if self.role == "kv_producer":
                with self._lock:
                    self._sending.setdefault(op.req_id, []).append(op.key)
            if op.key in seen:
                self.counters.add(skipped_saves=1)
                continue
            seen.add(op.key)
            keys.append(op.key)
            chunk = self.adapter.gather(op.blocks)
            chunks.append(chunk[:, :, :op.tokens].contiguous() if op.tokens else chunk)
        if keys and self.saves.submit(keys, chunks):
            with self._lock:
                self._stored.extend(keys)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued saves, then for the store's own background writes."""
        return self.saves.flush(timeout) and self.cache.flush(timeout)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)  # a hung tier must not hang shutdown
        self.saves.close()
