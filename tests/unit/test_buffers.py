"""Recycled blob buffers: reused only once nothing can read them, bounded, and invisible to readers."""

from __future__ import annotations

import gc

import torch

from kvlayer import KVCache, KVSpec
from kvlayer.codec.buffers import MIN_POOLED, BufferPool

N = MIN_POOLED * 4


def _addr(a) -> int:
    return a.__array_interface__["data"][0]


def test_buffer_is_reused_only_after_every_reader_let_go():
    pool = BufferPool(16 * N)
    a = pool.take(N)
    first = _addr(a)
    t = torch.from_numpy(a)[10:]  # a torch view keeps the blob alive
    mv = a.data
    del a
    gc.collect()
    b = pool.take(N)
    assert _addr(b) != first and pool.reused == 0  # t and mv still read the first buffer
    del t
    gc.collect()
    c = pool.take(N)
    assert _addr(c) != first and pool.reused == 0  # mv still reads it
    seen = {first, _addr(b), _addr(c)}
    del mv, b, c
    gc.collect()
    assert pool.idle_bytes == 3 * N
    d = pool.take(N)
    assert pool.reused == 1 and _addr(d) in seen  # memory already faulted in, handed out again
    assert pool.idle_bytes == 2 * N


def test_idle_bytes_never_exceed_the_cap_and_small_buffers_bypass_the_pool():
    pool = BufferPool(3 * N)
    held = [pool.take(N) for _ in range(6)]
    del held
    gc.collect()
    assert pool.idle_bytes == 3 * N
    small = pool.take(MIN_POOLED - 1)
    assert small.nbytes == MIN_POOLED - 1 and pool.allocated == 6  # not counted: not pooled
    assert BufferPool(0).take(N).nbytes == N  # cap 0 disables pooling


def test_retrieved_chunk_survives_eviction_and_reuse_of_its_memory():
    """The CPU tier hands out zero-copy views; recycling must never write into one still held."""
    spec = KVSpec(model="pool", num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16")
    chunk = 64
    one = spec.chunk_shape(chunk)
    nbytes = torch.empty(one, dtype=torch.float16).nbytes
    cache = KVCache(spec, chunk_size=chunk, cpu_bytes=int(nbytes * 3.5))  # room for 3 chunks
    try:
        g = torch.Generator().manual_seed(0)
        first = torch.randn(one, generator=g).half()
        toks = list(range(chunk))
        cache.store(toks, first)
        n, held = cache.retrieve(toks)
        assert n == chunk and held is not None and torch.equal(held, first)
        for i in range(1, 20):  # evicts `first` early, then churns its size class
            cache.store([i * 1000 + t for t in range(chunk)], torch.randn(one, generator=g).half())
        gc.collect()
        assert cache.lookup(toks).hit_tokens == 0  # evicted
        assert torch.equal(held, first)  # the view we hold was never recycled under us
    finally:
        cache.close()
