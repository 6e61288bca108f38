"""SGLang host-pool pages <-> kvlayer canonical chunks.

kvlayer stores one page as one canonical chunk ``[layers, 2, tokens, kv_heads, head_dim]`` (MLA:
``[layers, 1, tokens, 1, latent]``), whatever order the engine keeps it in. That is what makes a
page written from a ``page_head`` pool readable into a ``layer_first`` pool, by another SGLang
instance or by vLLM, and what lets the quantized codecs see K and V per layer, token and head.

SGLang's host pool ``kv_buffer`` shapes (0.5.x), with ``size`` token slots and ``pages`` pages:

    MHA layer_first        (2, layers, size, heads, dim)       token-addressed
    MHA page_first         (2, size, layers, heads, dim)       token-addressed
    MHA page_first_direct  (2, pages, layers, page, heads, dim) page-addressed
    MHA page_head          (2, pages, heads, page, layers, dim) page-addressed
    MHA page_unified       (pages, groups, layers, 2, page, heads/group, dim) page-addressed
    MLA layer_first        (layers, size, 1, latent)           token-addressed
    MLA page_first         (size, layers, 1, latent)           token-addressed
    MLA page_first_direct  (pages, layers, page, 1, latent)    page-addressed
    MLA page_unified       (pages, layers, page, latent)       page-addressed

(``page_unified`` groups kv heads in ``head_group_num`` contiguous runs: head ``g * per_group + i``.)

``host_indices`` are token slots, ``page_size`` per page. When each page is a run of consecutive
slots (SGLang's page allocator guarantees it) a page is one strided view of the pool, and reads and
writes are one copy per page; token-addressed layouts also accept scattered slots (gather, then
permute). Page-addressed layouts require each page's first slot to be page aligned and refuse
otherwise. Every write touches only the pages it is given, so a failed page never touches the
pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvlayer.errors import KVLayerError

from ..core import LayoutError

MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head", "page_unified")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_unified")


class UnsupportedPoolError(LayoutError, ValueError):
    """The host pool's layout, dtype or geometry has no canonical mapping here."""


class PageIndexError(KVLayerError, ValueError):
    """``host_indices`` (or chunks) that are not whole, aligned pages of this pool."""


@dataclass(frozen=True)
class PoolGeometry:
    """What a KVSpec needs from a host pool."""

    num_layers: int
    num_kv_heads: int  # 1 for MLA
    head_dim: int  # latent width for MLA
    dtype: torch.dtype
    page_size: int
    is_mla: bool
    layout: str


class PageLayout:
    """Reads and writes whole pages of one host pool as canonical chunks."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.layout: str = str(getattr(pool, "layout", ""))
        self.page_size = int(pool.page_size)
        self.kv: torch.Tensor = pool.kv_buffer
        if self.kv is None:
            raise UnsupportedPoolError("host pool has no kv_buffer (allocator-only / dummy pool)")
        if getattr(pool, "dcp_size", 1) != 1:
            raise UnsupportedPoolError("decode context parallel (dcp_size > 1) host pools are not supported")
        self.is_mla = hasattr(pool, "kv_lora_rank")  # MLATokenToKVPoolHost; MHA pools have head_num
        self.geometry = self._geometry()

    # ------------------------------------------------------------------ geometry
    def _geometry(self) -> PoolGeometry:
        p, kv = self.pool, self.kv
        layers = int(p.layer_num)
        if self.is_mla:
            if self.layout not in MLA_LAYOUTS:
                raise UnsupportedPoolError(f"MLA host layout {self.layout!r} not supported; use one of {MLA_LAYOUTS}")
            latent = int(p.kv_cache_dim)
            want = {
                "layer_first": (layers, -1, 1, latent),
                "page_first": (-1, layers, 1, latent),
                "page_first_direct": (-1, layers, self.page_size, 1, latent),
                "page_unified": (-1, layers, self.page_size, latent),
            }[self.layout]
            heads, dim = 1, latent
        else:
            if self.layout not in MHA_LAYOUTS:
                raise UnsupportedPoolError(f"MHA host layout {self.layout!r} not supported; use one of {MHA_LAYOUTS}")
            heads, dim = int(p.head_num), int(p.head_dim)
            if int(getattr(p, "v_head_dim", dim)) != dim:
                raise UnsupportedPoolError("K and V head dims differ; the canonical chunk needs one head_dim")
            groups = int(getattr(p, "head_group_num", 1) or 1)
            self.groups = groups
            want = {
                "page_unified": (-1, groups, layers, 2, self.page_size, heads // groups, dim),
                "layer_first": (2, layers, -1, heads, dim),
                "page_first": (2, -1, layers, heads, dim),
                "page_first_direct": (2, -1, layers, self.page_size, heads, dim),
                "page_head": (2, -1, heads, self.page_size, layers, dim),
            }[self.layout]
        got = tuple(kv.shape)
        if len(got) != len(want) or any(w not in (-1, g) for w, g in zip(want, got, strict=True)):
            raise UnsupportedPoolError(f"{self.layout} kv_buffer has shape {got}, expected {want} (-1 = any)")
        return PoolGeometry(layers, heads, dim, kv.dtype, self.page_size, self.is_mla, self.layout)

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        g = self.geometry
        return (g.num_layers, 1 if g.is_mla else 2, g.page_size, g.num_kv_heads, g.head_dim)

    def page_count(self, host_indices: torch.Tensor) -> int:
        n = int(host_indices.numel())
        if n % self.page_size:
            raise PageIndexError(f"{n} host indices is not a whole number of pages of {self.page_size}")
        return n // self.page_size

    def _slots(self, host_indices: torch.Tensor) -> torch.Tensor:
        return host_indices.reshape(-1).to(device=self.kv.device, dtype=torch.long)

    def _page_ids(self, host_indices: torch.Tensor) -> torch.Tensor:
        first = self._slots(host_indices)[:: self.page_size]
        if bool((first % self.page_size).any()):
            raise PageIndexError(f"{self.layout} pages must start on a multiple of page_size={self.page_size}")
        return first // self.page_size

    # ------------------------------------------------------------------ read
    def read(self, host_indices: torch.Tensor) -> list[torch.Tensor]:
        """Canonical chunks of the pages at ``host_indices`` (copies, contiguous)."""
        n = self.page_count(host_indices)
        if n == 0:
            return []
        starts = self._page_starts(host_indices)
        if starts is None:  # scattered token slots: gather, then permute (two copies)
            batched = self._read_batched(host_indices, n).contiguous()  # [n, layers, planes, page, heads, dim]
            return list(batched.unbind(0))
        out = torch.empty((n, *self.chunk_shape), dtype=self.kv.dtype, device=self.kv.device)
        for i, s in enumerate(starts):  # one strided copy per page, straight from the pool
            v = self._page_view(s)
            out[i].view(v.shape).copy_(v)
        return list(out.unbind(0))

    def _page_starts(self, host_indices: torch.Tensor) -> list[int] | None:
        """First slot of each page when every page is a run of consecutive, in-range slots (what
        SGLang's page allocator hands out); None otherwise."""
        slots = self._slots(host_indices).reshape(-1, self.page_size)
        first = slots[:, :1]
        if not bool((slots - first == torch.arange(self.page_size, device=slots.device)).all()):
            return None
        starts = first.reshape(-1)
        limit = self.kv.shape[self._slot_dim()] * (self.page_size if self._page_addressed() else 1)
        if bool((starts < 0).any()) or bool((starts + self.page_size > limit).any()):
            return None
        if self._page_addressed() and bool((starts % self.page_size).any()):
            raise PageIndexError(f"{self.layout} pages must start on a multiple of page_size={self.page_size}")
        return [int(x) for x in starts.tolist()]

    def _page_addressed(self) -> bool:
        return self.layout in ("page_first_direct", "page_head", "page_unified")

    def _slot_dim(self) -> int:
        """The kv_buffer axis that token slots (or pages) index."""
        if self.is_mla:
            return 1 if self.layout == "layer_first" else 0
        if self.layout == "page_unified":
            return 0
        return 2 if self.layout == "layer_first" else 1

    def _page_view(self, start: int) -> torch.Tensor:
        """A view of one page in canonical axis order: (layers, planes, page, heads, dim), or for
        page_unified (layers, 2, page, groups, heads/group, dim), which a contiguous canonical chunk
        can be viewed as."""
        kv, P, lay = self.kv, self.page_size, self.layout
        p = start // P
        if self.is_mla:
            if lay == "layer_first":
                return kv[:, start : start + P].unsqueeze(1)  # (L, 1, P, 1, Dl)
            if lay == "page_first":
                return kv[start : start + P].permute(1, 0, 2, 3).unsqueeze(1)
            if lay == "page_unified":
                return kv[p].unsqueeze(1).unsqueeze(3)  # (L, P, Dl) -> (L, 1, P, 1, Dl)
            return kv[p].unsqueeze(1)  # page_first_direct (L, P, 1, Dl)
        if lay == "layer_first":
            return kv[:, :, start : start + P].permute(1, 0, 2, 3, 4)
        if lay == "page_first":
            return kv[:, start : start + P].permute(2, 0, 1, 3, 4)
        if lay == "page_first_direct":
            return kv[:, p].permute(1, 0, 2, 3, 4)
        if lay == "page_head":
            return kv[:, p].permute(3, 0, 2, 1, 4)
        return kv[p].permute(1, 2, 3, 0, 4, 5)  # page_unified (G, L, 2, P, Hg, D)

    def _read_batched(self, host_indices: torch.Tensor, n: int) -> torch.Tensor:
        kv, P, lay = self.kv, self.page_size, self.layout
        if self.is_mla:
            if lay == "layer_first":  # (L, size, 1, Dl) -> (n, L, P, 1, Dl)
                g = kv.index_select(1, self._slots(host_indices))
                g = g.reshape(kv.shape[0], n, P, 1, kv.shape[-1]).permute(1, 0, 2, 3, 4)
            elif lay == "page_first":  # (size, L, 1, Dl) -> (n, P, L, 1, Dl) -> (n, L, P, 1, Dl)
                g = kv.index_select(0, self._slots(host_indices))
                g = g.reshape(n, P, kv.shape[1], 1, kv.shape[-1]).permute(0, 2, 1, 3, 4)
            elif lay == "page_unified":  # (pages, L, P, Dl) -> (n, L, P, 1, Dl)
                g = kv.index_select(0, self._page_ids(host_indices)).unsqueeze(3)
            else:  # page_first_direct (pages, L, P, 1, Dl)
                g = kv.index_select(0, self._page_ids(host_indices))
            return g.unsqueeze(2)  # planes axis: (n, L, 1, P, 1, Dl)
        if lay == "layer_first":  # (2, L, size, H, D) -> (2, L, n, P, H, D) -> (n, L, 2, P, H, D)
            g = kv.index_select(2, self._slots(host_indices))
            return g.reshape(2, kv.shape[1], n, P, *kv.shape[3:]).permute(2, 1, 0, 3, 4, 5)
        if lay == "page_first":  # (2, size, L, H, D) -> (2, n, P, L, H, D) -> (n, L, 2, P, H, D)
            g = kv.index_select(1, self._slots(host_indices))
            return g.reshape(2, n, P, *kv.shape[2:]).permute(1, 3, 0, 2, 4, 5)
        pages = self._page_ids(host_indices)
        if lay == "page_unified":  # (n, G, L, 2, P, Hg, D) -> (n, L, 2, P, G*Hg, D)
            g = kv.index_select(0, pages).permute(0, 2, 3, 4, 1, 5, 6)
            return g.reshape(n, *g.shape[1:4], -1, kv.shape[-1])
        g = kv.index_select(1, pages)
        if lay == "page_first_direct":  # (2, n, L, P, H, D) -> (n, L, 2, P, H, D)
            return g.permute(1, 2, 0, 3, 4, 5)
        # page_head: (2, n, H, P, L, D) -> (n, L, 2, P, H, D)
        return g.permute(1, 4, 0, 3, 2, 5)

    # ------------------------------------------------------------------ write
    def write(self, host_indices: torch.Tensor, chunks: Sequence[torch.Tensor | None]) -> list[bool]:
        """Write canonical chunks into the pages at ``host_indices``; None entries are skipped.

        Returns, per page, whether it was written. A chunk of the wrong shape is not written.
        """
        n = self.page_count(host_indices)
        if len(chunks) != n:
            raise PageIndexError(f"{len(chunks)} chunks for {n} pages")
        want = self.chunk_shape
        ok = [c is not None and tuple(c.shape) == want for c in chunks]
        sel = [i for i, good in enumerate(ok) if good]
        if not sel:
            return ok
        starts = self._page_starts(host_indices)
        if starts is not None:  # one strided copy per page, straight into the pool
            for i in sel:
                v = self._page_view(starts[i])
                v.copy_(chunks[i].reshape(v.shape))  # type: ignore[union-attr]
            return ok
        data = torch.stack([chunks[i].to(dtype=self.kv.dtype) for i in sel])  # type: ignore[union-attr]
        slots = self._slots(host_indices).reshape(n, self.page_size)[sel]
        self._write_batched(slots, data)
        return ok

    def _write_batched(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """``slots``: [m, P] token slots; ``data``: [m, L, planes, P, H, D] canonical."""
        kv, lay = self.kv, self.layout
        m, P = slots.shape
        flat = slots.reshape(-1)
        if self.is_mla:
            d = data.squeeze(2)  # (m, L, P, 1, Dl)
            if lay == "layer_first":  # kv (L, size, 1, Dl)
                kv[:, flat] = d.permute(1, 0, 2, 3, 4).reshape(kv.shape[0], m * P, 1, kv.shape[-1])
            elif lay == "page_first":  # kv (size, L, 1, Dl)
                kv[flat] = d.permute(0, 2, 1, 3, 4).reshape(m * P, kv.shape[1], 1, kv.shape[-1])
            elif lay == "page_unified":  # kv (pages, L, P, Dl)
                kv[self._aligned_pages(slots)] = d.squeeze(3)
            else:
                kv[self._aligned_pages(slots)] = d
            return
        if lay == "layer_first":  # kv (2, L, size, H, D) <- (2, L, m*P, H, D)
            kv[:, :, flat] = data.permute(2, 1, 0, 3, 4, 5).reshape(2, kv.shape[1], m * P, *kv.shape[3:])
        elif lay == "page_first":  # kv (2, size, L, H, D) <- (2, m*P, L, H, D)
            kv[:, flat] = data.permute(2, 0, 3, 1, 4, 5).reshape(2, m * P, *kv.shape[2:])
        elif lay == "page_unified":  # kv (pages, G, L, 2, P, Hg, D)
            d = data.reshape(*data.shape[:4], self.groups, -1, data.shape[-1])  # (m, L, 2, P, G, Hg, D)
            kv[self._aligned_pages(slots)] = d.permute(0, 4, 1, 2, 3, 5, 6)
        elif lay == "page_first_direct":  # kv (2, pages, L, P, H, D)
            kv[:, self._aligned_pages(slots)] = data.permute(2, 0, 1, 3, 4, 5)
        else:  # page_head: kv (2, pages, H, P, L, D)
            kv[:, self._aligned_pages(slots)] = data.permute(2, 0, 4, 3, 1, 5)

    def _aligned_pages(self, slots: torch.Tensor) -> torch.Tensor:
        first = slots[:, 0]
        if bool((first % self.page_size).any()):
            raise PageIndexError(f"{self.layout} pages must start on a multiple of page_size={self.page_size}")
        return first // self.page_size

    # ------------------------------------------------------------------ legacy flat pages
    def native_page_shape(self) -> tuple[int, ...]:
        """Shape of one page as SGLang's ``get_data_page``/``set_from_flat_data_page`` order it."""
        g, P = self.geometry, self.page_size
        L, H, D = g.num_layers, g.num_kv_heads, g.head_dim
        if self.is_mla:
            return {"layer_first": (L, P, 1, D), "page_first": (P, L, 1, D),
                    "page_first_direct": (1, L, P, 1, D), "page_unified": (L, P, D)}[self.layout]
        if self.layout == "page_unified":
            return (self.groups, L, 2, P, H // self.groups, D)
        return {"layer_first": (2, L, P, H, D), "page_first": (2, P, L, H, D),
                "page_first_direct": (2, 1, L, P, H, D), "page_head": (2, 1, H, P, L, D)}[self.layout]

    def flat_to_chunk(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat page in the pool's native order (legacy ``set``) -> canonical chunk."""
        x = flat.reshape(self.native_page_shape())
        if self.is_mla:
            if self.layout == "page_first":
                x = x.permute(1, 0, 2, 3)
            elif self.layout == "page_first_direct":
                x = x[0]
            elif self.layout == "page_unified":
                x = x.unsqueeze(2)
            return x.unsqueeze(1).contiguous()
        if self.layout == "page_unified":  # (G, L, 2, P, Hg, D) -> (L, 2, P, G*Hg, D)
            x = x.permute(1, 2, 3, 0, 4, 5)
            return x.reshape(*x.shape[:3], -1, x.shape[-1]).contiguous()
        if self.layout == "layer_first":
            x = x.permute(1, 0, 2, 3, 4)
        elif self.layout == "page_first":
            x = x.permute(2, 0, 1, 3, 4)
        elif self.layout == "page_first_direct":
            x = x[:, 0].permute(1, 0, 2, 3, 4)
        else:
            x = x[:, 0].permute(3, 0, 2, 1, 4)
        return x.contiguous()

    def chunk_to_flat(self, chunk: torch.Tensor) -> torch.Tensor:
        """Canonical chunk -> flat page in the pool's native order (legacy ``get``)."""
        if self.is_mla:
            x = chunk.squeeze(1)  # (L, P, 1, Dl); page_unified (L, P, Dl) has the same order
            if self.layout == "page_first":
                x = x.permute(1, 0, 2, 3)
            return x.contiguous().reshape(-1)
        if self.layout == "page_unified":  # (L, 2, P, H, D) -> (G, L, 2, P, Hg, D)
            x = chunk.reshape(*chunk.shape[:3], self.groups, -1, chunk.shape[-1]).permute(3, 0, 1, 2, 4, 5)
        elif self.layout in ("layer_first", "page_first_direct"):
            x = chunk.permute(1, 0, 2, 3, 4)
        elif self.layout == "page_first":
            x = chunk.permute(1, 2, 0, 3, 4)
        else:  # page_head (2, H, P, L, D)
            x = chunk.permute(1, 3, 2, 0, 4)
        return x.contiguous().reshape(-1)
