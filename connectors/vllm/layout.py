"""Layout adapters: expose each layer's paged KV as logical ``[blocks, block_size, heads, dim]``.

vLLM's attention backends lay a block page out differently (the CPU backend stores K transposed
as ``[head_dim, block_size]`` inside each (block, head) page; flash-attention stores per-token
rows), and the tiling may change with the CPU instruction set or the vLLM version. So the layout
is *measured*, not assumed: ``probe_layout`` asks the backend's own cache-write op
(``impl.do_kv_cache_update``) to write known values into a two-block scratch cache and reads back
where each (plane, token, head, dim) landed. An affine result becomes zero-copy strided views
(``StridedAdapter``); anything else becomes flat index maps (``IndexAdapter``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvlayer import ops

from ..core import LayoutError

log = logging.getLogger("kvlayer.vllm")


@dataclass(frozen=True)
class PlaneMap:
    """Where plane ``p`` (K or V) of token ``t``, head ``h``, dim ``d`` lives, relative to the
    start of the layer tensor's storage region, in elements. ``offsets`` is ``[bs, H, D]`` for
    block 0; block ``b`` adds ``b * block_stride``."""

    offsets: torch.Tensor
    block_stride: int

    def affine(self) -> tuple[int, int, int, int] | None:
        """(base, token, head, dim) strides when the map is affine, else None."""
        o = self.offsets
        base = int(o[0, 0, 0])
        st = int(o[1, 0, 0]) - base if o.shape[0] > 1 else 0
        sh = int(o[0, 1, 0]) - base if o.shape[1] > 1 else 0
        sd = int(o[0, 0, 1]) - base if o.shape[2] > 1 else 0
        t = torch.arange(o.shape[0]).view(-1, 1, 1)
        h = torch.arange(o.shape[1]).view(1, -1, 1)
        d = torch.arange(o.shape[2]).view(1, 1, -1)
        if torch.equal(o, base + st * t + sh * h + sd * d):
            return base, st, sh, sd
        return None


@dataclass(frozen=True)
class Layout:
    block_dim: int
    block_size: int
    num_heads: int
    head_dim: int
    k: PlaneMap
    v: PlaneMap
    source: str  # "probe:<backend>" or "table:<backend>"

    def describe(self) -> str:
        def one(p: PlaneMap) -> str:
            a = p.affine()
            return f"strided(base={a[0]}, t={a[1]}, h={a[2]}, d={a[3]})" if a else "indexed"
        return f"{self.source}: K {one(self.k)}, V {one(self.v)}, block stride {self.k.block_stride}"


class Adapter(Protocol):
    layout: Layout
    num_layers: int

    def gather(self, block_ids: list[int]) -> torch.Tensor: ...

    def scatter(self, block_ids: list[int], chunk: torch.Tensor) -> None: ...


class StridedAdapter:
    """Zero-copy logical views per layer; copies go through ``kvlayer.ops``."""

    def __init__(self, caches: list[torch.Tensor], layout: Layout) -> None:
        self.layout = layout
        self.num_layers = len(caches)
        ka, va = layout.k.affine(), layout.v.affine()
        assert ka is not None and va is not None
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []
        for kv in caches:
            nblocks = kv.shape[layout.block_dim]
            size = (nblocks, layout.block_size, layout.num_heads, layout.head_dim)
            views = []
            for (base, st, sh, sd), pm in ((ka, layout.k), (va, layout.v)):
                views.append(torch.as_strided(kv, size, (pm.block_stride, st, sh, sd), kv.storage_offset() + base))
            self.views.append((views[0], views[1]))

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        return ops.gather_layers(self.views, block_ids)

    def scatter(self, block_ids: list[int], chunk: torch.Tensor) -> None:
        ops.scatter_layers(self.views, block_ids, chunk)


class IndexAdapter:
    """Any layout the probe can map, at the price of an index gather per copy."""

    def __init__(self, caches: list[torch.Tensor], layout: Layout) -> None:
        self.layout = layout
        self.num_layers = len(caches)
        self.caches = caches
        self.flat = [torch.as_strided(kv, (kv.untyped_storage().nbytes() // kv.element_size() - kv.storage_offset(),),
                                      (1,), kv.storage_offset()) for kv in caches]

    def _index(self, block_ids: list[int], pm: PlaneMap) -> torch.Tensor:
        ids = torch.as_tensor(block_ids, dtype=torch.long).view(-1, 1, 1, 1) * pm.block_stride
        return (ids + pm.offsets.unsqueeze(0)).reshape(-1)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        lay = self.layout
        n = len(block_ids) * lay.block_size
        ik, iv = self._index(block_ids, lay.k), self._index(block_ids, lay.v)
        out = torch.empty((self.num_layers, 2, n, lay.num_heads, lay.head_dim), dtype=self.caches[0].dtype)
        for i, flat in enumerate(self.flat):
            out[i, 0] = flat[ik].view(n, lay.num_heads, lay.head_dim)
            out[i, 1] = flat[iv].view(n, lay.num_heads, lay.head_dim)
        return out

    def scatter(self, block_ids: list[int], chunk: torch.Tensor) -> None:
        lay = self.layout
        ik, iv = self._index(block_ids, lay.k), self._index(block_ids, lay.v)
        for i, flat in enumerate(self.flat):
            flat[ik] = chunk[i, 0].reshape(-1).to(flat.dtype)
            flat[iv] = chunk[i, 1].reshape(-1).to(flat.dtype)


def _find_block_dim(kv: torch.Tensor, num_blocks: int) -> int:
    dims = [i for i, s in enumerate(kv.shape) if s == num_blocks]
    if not dims:
        raise LayoutError(f"no dimension of the KV tensor {tuple(kv.shape)} has num_blocks={num_blocks}")
    return dims[0]


def probe_layout(layer: Any, kv: torch.Tensor, *, num_blocks: int, block_size: int, num_heads: int,
                 head_dim: int) -> Layout:
    """Measure the layout by letting the backend write known values into a scratch cache."""
    impl = getattr(layer, "impl", None)
    update = getattr(impl, "do_kv_cache_update", None)
    if update is None:
        raise LayoutError(f"attention impl {type(impl).__name__} has no do_kv_cache_update to probe with")
    bdim = _find_block_dim(kv, num_blocks)
    shape = list(kv.shape)
    shape[bdim] = 2
    probe = torch.zeros(shape, dtype=kv.dtype, device=kv.device)
    t = torch.arange(block_size, device=kv.device).view(-1, 1, 1).expand(block_size, num_heads, head_dim)
    h = torch.arange(num_heads, device=kv.device).view(1, -1, 1).expand(block_size, num_heads, head_dim)
    d = torch.arange(head_dim, device=kv.device).view(1, 1, -1).expand(block_size, num_heads, head_dim)
    slots = torch.arange(block_size, 2 * block_size, dtype=torch.long, device=kv.device)  # all of block 1
    readings = []
    for idx in (t, h, d):
        if int(idx.max()) + 1 > 256:
            raise LayoutError("probe values would not be exact in a 16-bit float")
        probe.zero_()
        val = (idx + 1).to(kv.dtype).contiguous()
        update(layer, val, (-val).contiguous(), probe, slots)
        readings.append(probe.reshape(-1).to(device="cpu", dtype=torch.float32, copy=True))
    pstrides = torch.tensor(probe.stride())
    pshape = torch.tensor(probe.shape)
    kstrides = torch.tensor(kv.stride())
    maps = []
    for sign in (1.0, -1.0):
        hit = (readings[0] * sign) > 0
        pos = hit.nonzero().view(-1)
        if len(pos) != block_size * num_heads * head_dim:
            raise LayoutError(f"probe found {len(pos)} elements for plane {'KV'[sign < 0]}, "
                              f"expected {block_size * num_heads * head_dim}")
        tt, hh, dd = ((readings[i][pos] * sign).round().long() - 1 for i in range(3))
        # unravel probe flat positions into indices, then re-express them with kv's own strides
        rem = pos.clone()
        idx = torch.zeros((len(pos), len(shape)), dtype=torch.long)
        for i in range(len(shape)):
            idx[:, i] = rem // pstrides[i]
            rem = rem % pstrides[i]
        if not bool((idx[:, bdim] == 1).all()) or bool((idx >= pshape).any()):
            raise LayoutError("probe values landed outside the probed block")
        idx[:, bdim] = 0
        real = (idx * kstrides).sum(dim=1)
        offsets = torch.full((block_size, num_heads, head_dim), -1, dtype=torch.long)
        offsets[tt, hh, dd] = real
        if bool((offsets < 0).any()):
            raise LayoutError("probe did not see every (token, head, dim) exactly once")
        maps.append(PlaneMap(offsets, int(kv.stride(bdim))))
    return Layout(bdim, block_size, num_heads, head_dim, maps[0], maps[1], f"probe:{type(impl).__name__}")


def table_layout(backend: str, kv: torch.Tensor, *, num_blocks: int, block_size: int, num_heads: int,
                 head_dim: int) -> Layout:
    """Known layouts, used only when probing is impossible. Flash-attention (vLLM 0.32):
    ``kv [blocks, heads?...]`` with K, V = ``kv.transpose(1, 2).split(head_dim, -1)``."""
    if backend.upper().startswith("FLASH") and kv.dim() == 4 and kv.shape[-1] == 2 * head_dim:
        bdim = _find_block_dim(kv, num_blocks)
        # logical K[b, t, h, d] = kv[b, h, t, d]; V adds head_dim on the last axis
        sb, sh, st, sd = kv.stride()
        t = torch.arange(block_size).view(-1, 1, 1)
        h = torch.arange(num_heads).view(1, -1, 1)
        d = torch.arange(head_dim).view(1, 1, -1)
        k = t * st + h * sh + d * sd
        return Layout(bdim, block_size, num_heads, head_dim, PlaneMap(k, sb), PlaneMap(k + head_dim * sd, sb),
                      f"table:{backend}")
    raise LayoutError(f"no known layout for backend {backend!r} with KV tensor {tuple(kv.shape)}")


def make_adapter(caches: list[torch.Tensor], layout: Layout) -> Adapter:
    if layout.k.affine() is not None and layout.v.affine() is not None:
        return StridedAdapter(caches, layout)
    return IndexAdapter(caches, layout)
