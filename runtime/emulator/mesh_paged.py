"""The mesh emulator's adapters for paged KV caches (mesh.py's BATCHED): cache writes,
paged decode attention and chunked prefill attention with the chips as leading
dimensions. A MeshPagePool (pools.py) holds every chip's blocks; the attention ops see
it as one chip's cache whose users are the chips' users side by side (_Folded), so
ops.py's implementations run once for the whole mesh.
"""
from __future__ import annotations

import torch

from . import ops
from .mesh import LEAD, _is_replicated, _lead_of, batched, held_entry, per_chip
from .pools import MeshPagePool


def _host(value):
    """A host input (page table, positions): the same on every chip."""
    if not _is_replicated(value):
        raise ValueError("a page table or position tensor differs between chips")
    return value[0, 0]


def _expand(t: torch.Tensor, lead) -> torch.Tensor:
    return t.expand(*lead, *t.shape[LEAD:])


@batched("ttnn.experimental.paged_update_cache")
def _paged_update(impl, cache, x, update_idxs_tensor=None, page_table=None, cache_dtype="bfloat16"):
    if not isinstance(cache, MeshPagePool) or page_table is None:
        return per_chip(impl, (cache, x), dict(update_idxs_tensor=update_idxs_tensor, page_table=page_table,
                                               cache_dtype=cache_dtype))
    positions, table = _host(update_idxs_tensor).long(), _host(page_table)
    rows = _expand(ops.quantize_like(x[:, :, 0], cache_dtype), cache.lead)  # [*lead, B, Hkv, hd]
    users, blocks, offsets = ops._paged_users(table, positions, cache.block_size)
    if users.numel():
        cache.write_rows(blocks, offsets, rows[:, :, users])


@batched("ttnn.experimental.paged_fill_cache")
def _paged_fill(impl, cache, x, page_table, batch_idx=0, cache_dtype="bfloat16"):
    if not isinstance(cache, MeshPagePool):
        return per_chip(impl, (cache, x, page_table), dict(batch_idx=batch_idx, cache_dtype=cache_dtype))
    bs = cache.block_size
    blocks = _host(page_table)[batch_idx].long()
    heads, head_dim = x.shape[-3], x.shape[-1]
    rows = x[:, :, 0].reshape(*x.shape[:LEAD], heads, -1, bs, head_dim).transpose(2, 3)  # [*lead, n, Hkv, bs, hd]
    cache.write_blocks(blocks, _expand(rows[:, :, : len(blocks)], cache.lead).to(cache.dtype))


class _Folded:
    """A MeshPagePool seen by ops.py's attention as one chip's cache whose users are the
    chips' users in row-major chip order (storage_blocks)."""

    def __init__(self, pool: MeshPagePool, lead):
        self.pool, self.lead = pool, lead
        self.shape, self.dtype = pool.shape, pool.dtype

    def storage_blocks(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(every held chip's storage as one [chips x S, Hkv, bs, hd], the slots [chips x
        users, n] of the folded users' blocks in it): PagePool.storage_blocks for the mesh."""
        storage = self.pool.storage
        held, per_chip = tuple(storage.shape[:LEAD]), storage.shape[LEAD]
        slots = self.pool.slots.lookup(table)  # [users, n]
        first = (held_entry(held, tuple(self.lead)) * per_chip)[:, None, None]  # each chip's first slot
        return storage.reshape(-1, *storage.shape[LEAD + 1:]), (first + slots).flatten(0, 1)


def _fold(q: torch.Tensor, lead, batch_dim: int) -> torch.Tensor:
    """q [*lead, *shape] -> one chip's shape whose dimension `batch_dim` holds the chips'
    entries in row-major chip order (as _Folded lays out their users)."""
    q = _expand(q, lead).reshape(-1, *q.shape[LEAD:])
    return q.movedim(0, batch_dim).flatten(batch_dim, batch_dim + 1)


def _unfold(out: torch.Tensor, lead, batch_dim: int) -> torch.Tensor:
    """_fold's inverse for an op's result."""
    out = out.unflatten(batch_dim, (lead[0] * lead[1], -1)).movedim(batch_dim, 0)
    return out.reshape(*lead, *out.shape[1:])


@batched("ttnn.transformer.paged_scaled_dot_product_attention_decode")
def _paged_decode(impl, q, k_cache, v_cache, page_table_tensor=None, cur_pos_tensor=None, **kwargs):
    if not isinstance(k_cache, MeshPagePool):
        return per_chip(impl, (q, k_cache, v_cache), dict(kwargs, page_table_tensor=page_table_tensor,
                                                          cur_pos_tensor=cur_pos_tensor))
    lead = _lead_of([q, k_cache, v_cache])
    chips = lead[0] * lead[1]
    positions = _host(cur_pos_tensor)
    out = impl(_fold(q, lead, 1), _Folded(k_cache, lead), _Folded(v_cache, lead),
               page_table_tensor=_host(page_table_tensor), cur_pos_tensor=positions.repeat(chips), **kwargs)
    return _unfold(out, lead, 1)


@batched("ttnn.transformer.chunked_scaled_dot_product_attention")
def _chunked(impl, q, k_cache, v_cache, page_table_tensor, chunk_start_idx, **kwargs):
    if not isinstance(k_cache, MeshPagePool):
        return per_chip(impl, (q, k_cache, v_cache, page_table_tensor, chunk_start_idx), kwargs)
    lead = _lead_of([q, k_cache, v_cache])
    out = impl(_fold(q, lead, 0), _Folded(k_cache, lead), _Folded(v_cache, lead), _host(page_table_tensor)[:1],
               chunk_start_idx, **kwargs)
    return _unfold(out, lead, 0)
