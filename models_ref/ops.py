"""The model's building blocks as fx leaf functions.

Tracing stops at these (torch.fx.wrap), so the traced graph speaks in the units the
device program is made of (a norm, a head split, a rotary embedding, a cache write, an
attention) instead of dozens of views and transposes. Each has a plain torch body, so
the reference module also runs eagerly and is checked against Hugging Face.

Layout convention (ttnn's): activations are 4D. Prefill rows are tokens of one user,
`[1, 1, S, D]`; decode rows are users, `[1, 1, B, D]`. Heads are `[1, H, S, hd]` in
prefill and `[1, B, H, hd]` in decode.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F


@torch.fx.wrap
def embed(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Token rows `[1, 1, R, D]` for token ids `[1, R]`."""
    return F.embedding(tokens, table)[None]


@torch.fx.wrap
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


@torch.fx.wrap
def split_heads(x: torch.Tensor, n_heads: int, head_dim: int, decode: bool) -> torch.Tensor:
    rows = x.shape[2]
    heads = x.reshape(1, rows, n_heads, head_dim)
    return heads if decode else heads.transpose(1, 2)


@torch.fx.wrap
def merge_heads(x: torch.Tensor, decode: bool) -> torch.Tensor:
    if not decode:
        x = x.transpose(1, 2)
    _, rows, n_heads, head_dim = x.shape
    return x.reshape(1, 1, rows, n_heads * head_dim)


@torch.fx.wrap
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angles in cos/sin (broadcast)."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


@torch.fx.wrap
def rope_rows(table: torch.Tensor, positions: torch.Tensor, decode: bool) -> torch.Tensor:
    """cos or sin rows for `positions`: [1, 1, S, hd] in prefill, [1, B, 1, hd] in decode."""
    rows = F.embedding(positions.reshape(-1), table)
    return rows[None, :, None, :] if decode else rows[None, None, :, :]


@torch.fx.wrap
def fill_cache(cache: torch.Tensor, kv: torch.Tensor, user_id: int) -> torch.Tensor:
    """Write a prefilled user's K or V `[1, Hkv, S, hd]` at the start of its cache row."""
    cache[user_id, :, : kv.shape[2]] = kv[0].to(cache.dtype)
    return cache


@torch.fx.wrap
def update_cache(cache: torch.Tensor, kv: torch.Tensor, cur_pos: torch.Tensor) -> torch.Tensor:
    """Write one decode step `[1, B, Hkv, hd]`: user b's row goes to position cur_pos[b]."""
    users = torch.arange(kv.shape[1], device=cache.device)
    cache[users, :, cur_pos.long()] = kv[0].to(cache.dtype)
    return cache


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Q, K] mask of what each query sees: causal, and with a sliding window W only the
    W latest positions, itself included (key > query - W, as Hugging Face defines it)."""
    mask = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        mask &= key_pos[None, :] > query_pos[:, None] - window
    return mask


@torch.fx.wrap
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     window: int | None = None) -> torch.Tensor:
    """Prefill attention, q `[1, H, S, hd]`, k/v `[1, Hkv, S, hd]` (grouped-query)."""
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups, 1), _repeat_kv(v, groups, 1)
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pos = torch.arange(q.shape[2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(pos, pos, window), scale=scale)


@torch.fx.wrap
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cur_pos: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """Decode attention: user b's query `[1, B, H, hd]` sees cache positions 0..cur_pos[b]
    (with a window W: cur_pos[b]-W+1..cur_pos[b])."""
    batch, n_heads = q.shape[1], q.shape[2]
    groups = n_heads // k_cache.shape[1]
    k = _repeat_kv(k_cache[:batch], groups, 1)  # [B, H, L, hd]
    v = _repeat_kv(v_cache[:batch], groups, 1)
    scores = torch.einsum("bhd,bhld->bhl", q[0].float(), k.float()) * scale
    mask = visible(cur_pos.long(), torch.arange(k.shape[2], device=q.device), window)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    out = torch.einsum("bhl,bhld->bhd", scores.softmax(-1), v.float())
    return out[None].to(q.dtype)


@torch.fx.wrap
def last_tile(x: torch.Tensor, last_index: int) -> torch.Tensor:
    """The 32-row tile of `[1, 1, S, D]` that holds row `last_index` (logits need only it)."""
    start = (last_index // 32) * 32
    return x[:, :, start : start + 32]
