"""Decode attention (one query row per user) over a KV cache held in blocks: a paged
cache's pool, or a dense cache as one block per user. ttnn's flash-decode reads each
user's cache only up to its position; so does this.

The C kernel beside this file (decode_attention.c, built by native.py) runs it in one
call; without a compiler, torch runs the same float32 maths (gather the blocks, scores,
softmax, weighted sum). The two agree to float32 rounding (their dot products are
summed in different orders), not bit for bit; each is deterministic, batch-invariant
and independent of the thread count, so every path of the emulator that attends the
same way gives the same bits (mesh or single chip, ranks, one user or a batch).
"""
from __future__ import annotations

import ctypes

import torch

from . import native

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SIGNATURES = {"decode_attention": [_I64] * 4 + [_PTR, _PTR, _PTR, _INT, _PTR, _I64, _I64, _PTR, _I64,
                                                ctypes.c_float, _PTR, _INT]}
KV_DTYPES = (torch.bfloat16, torch.float32)


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Additive mask: 0 where a query sees a key (causal; the `window` latest positions,
    itself included, with a sliding window), -inf elsewhere."""
    hidden = key_pos[None, :] > query_pos[:, None]
    if window is not None:
        hidden |= key_pos[None, :] <= query_pos[:, None] - window
    return torch.zeros(hidden.shape).masked_fill(hidden, float("-inf"))


def attend(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, slots: torch.Tensor,
           positions: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """q [1, B, H, hd] against k/v blocks [S, Hkv, bs, hd]: user b's logical block j is
    block slots[b, j] (slots [B, n]); user b sees positions 0..positions[b] (the `window`
    latest of them with a sliding window; a negative position sees position 0).
    -> [1, B, H, hd] float32."""
    _, batch, n_heads, head_dim = q.shape
    kv_heads, block_size = k_blocks.shape[1], k_blocks.shape[2]
    lib = native.library("decode_attention", SIGNATURES) if k_blocks.dtype in KV_DTYPES else None
    if lib is None or k_blocks.dtype != v_blocks.dtype:
        length = max(int(positions.max()) + 1, 1)
        return attend_gathered(q, gather(k_blocks, slots, length), gather(v_blocks, slots, length), positions,
                               scale, window)
    qf = q[0].to(torch.float32).contiguous()
    k_blocks, v_blocks = k_blocks.contiguous(), v_blocks.contiguous()
    slots = slots.to(torch.int64).contiguous()
    positions = positions.to(torch.int64).contiguous()
    out = torch.empty(1, batch, n_heads, head_dim, dtype=torch.float32)
    lib.decode_attention(batch, kv_heads, n_heads // kv_heads, head_dim, qf.data_ptr(), k_blocks.data_ptr(),
                         v_blocks.data_ptr(), int(k_blocks.dtype == torch.bfloat16), slots.data_ptr(),
                         slots.shape[1], block_size, positions.data_ptr(), window or 0, scale, out.data_ptr(),
                         torch.get_num_threads())
    return out


def gather(blocks: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor:
    """Every user's first `length` positions [B, Hkv, length, hd] through its slots."""
    got = blocks[slots]  # [B, n, Hkv, bs, hd]
    batch, n, heads, block_size, head_dim = got.shape
    return got.permute(0, 2, 1, 3, 4).reshape(batch, heads, n * block_size, head_dim)[:, :, :length]


def attend_gathered(q, k, v, positions, scale, window=None):
    """q [1, B, H, hd] against k/v [B, Hkv, L, hd] in torch's float32; user b sees
    0..positions[b] (the `window` latest of them with a sliding window)."""
    _, batch, n_heads, head_dim = q.shape
    n_kv, length = k.shape[1], k.shape[2]
    qg = q[0].float().reshape(batch, n_kv, n_heads // n_kv, head_dim)  # GQA groups
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    if int(positions.min()) + 1 < length or window is not None:  # hide each user's future (and past window)
        scores = scores + window_mask(positions.clamp(min=0), torch.arange(length), window)[:, None, None, :]
    out = torch.matmul(scores.softmax(-1), v.float())  # [B, Hkv, G, hd]
    return out.reshape(1, batch, n_heads, head_dim)
