"""Llama 3.2 Vision's building blocks as fx leaf functions (see ops.py for the idea).

Layout: one image per call. Per-tile tensors are `[1, T, N, D]` (T = max_num_tiles,
N tokens of a tile); the transformers run on all tiles' tokens as one sequence
`[1, 1, T*Np, D]` (Np = N padded to a multiple of 8, or further, see
`encoder_attention_mask`). Heads use ops.split_heads / ops.merge_heads (`[1, H, S, hd]`).

Cross-attention (text rows attending to vision tokens) has no RoPE and is not causal:
its K/V are computed once per image into a cache `[max_batch, Hkv, L, hd]` and every
text row reads the whole cache through an additive mask `[1, 1, rows, L]`.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F


# ---------------------------------------------------------------- vision encoder
@torch.fx.wrap
def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """Tiles `[T, C, H, W]` -> patch rows `[1, T, (H/p)*(W/p), C*p*p]`.

    A stride-p p x p convolution without bias is exactly this unfold followed by a linear
    layer whose weight is the conv weight flattened in (C, kh, kw) order."""
    cols = F.unfold(pixels, kernel_size=patch, stride=patch)  # [T, C*p*p, patches]
    return cols.transpose(1, 2)[None]


@torch.fx.wrap
def aspect_ratio_rows(table: torch.Tensor, aspect_ratio_id: torch.Tensor, tiles: int, rows: int,
                      dim: int) -> torch.Tensor:
    """Row `aspect_ratio_id` (an int, or a tensor of one id) of a per-aspect-ratio table
    `[n_ar + 1, T*rows*dim]` as `[1, T, rows, dim]`: a row lookup, the id is data."""
    return table[aspect_ratio_id].reshape(1, tiles, rows, dim)


@torch.fx.wrap
def tanh_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * tanh(gate) for a learned scalar gate `[1]` (weight-only: foldable at conversion)."""
    return x * gate.tanh()


@torch.fx.wrap
def prepend_class_token(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """`[1, T, P, D]` -> `[1, T, P+1, D]` with the class embedding `[D]` as token 0 of every tile."""
    token = cls.to(x.dtype).expand(x.shape[0], x.shape[1], 1, x.shape[3])
    return torch.cat([token, x], dim=2)


@torch.fx.wrap
def positional_embedding(x: torch.Tensor, local: torch.Tensor, per_tile: torch.Tensor,
                         gate: torch.Tensor | None) -> torch.Tensor:
    """x + (1 - tanh g) * local `[N, D]` + tanh g * per_tile `[1, T, N, D]` (HF's order).
    With gate None, local and per_tile come with the gate folded in (passes/fold_gates.py)."""
    if gate is None:
        return x + local.reshape(1, 1, *local.shape[-2:]) + per_tile
    g = gate.tanh()
    x = x + ((1 - g) * local)[None, None]
    return x + g * per_tile


@torch.fx.wrap
def pad_tile_tokens(x: torch.Tensor, padded: int) -> torch.Tensor:
    """`[1, T, N, D]` -> `[1, 1, T*padded, D]`: zero rows after each tile's tokens."""
    _, tiles, n, dim = x.shape
    return F.pad(x, (0, 0, 0, padded - n)).reshape(1, 1, tiles * padded, dim)


@torch.fx.wrap
def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`[1, 1, R, D]` -> `[1, 1, rows, D]`: zero rows appended (rows >= R)."""
    return F.pad(x, (0, 0, 0, rows - x.shape[2]))


@torch.fx.wrap
def split_tiles(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """`[1, 1, T*N, D]` -> `[1, T, N, D]`."""
    return x.reshape(1, tiles, -1, x.shape[-1])


@torch.fx.wrap
def merge_tiles(x: torch.Tensor) -> torch.Tensor:
    """`[1, T, N, D]` -> `[1, 1, T*N, D]`."""
    return x.reshape(1, 1, -1, x.shape[-1])


@torch.fx.wrap
def unpad_tile_tokens(x: torch.Tensor, tiles: int, tokens: int) -> torch.Tensor:
    """`[1, 1, T*Np, D]` -> `[1, 1, T*tokens, D]`: drop each tile's padding rows."""
    dim = x.shape[-1]
    return x.reshape(tiles, -1, dim)[:, :tokens].reshape(1, 1, tiles * tokens, dim)


@torch.fx.wrap
def encoder_attention_mask(aspect_ratio_mask: torch.Tensor, tokens: int, semantic: int,
                           padded: int) -> torch.Tensor:
    """Additive float32 mask `[1, 1, T*padded, T*padded]` of the vision transformers.

    HF's and Meta's rule, reproduced exactly: a token is "padding" if its tile is masked
    (`aspect_ratio_mask[t] == 0`) or it is one of the zero rows after the tile's `tokens`
    real tokens (up to `semantic`, the multiple of 8). Entry (i, j) is finfo.min only if
    BOTH i and j are padding: real tokens attend to every token, padding ones included;
    padding tokens attend to real tokens only. Rows beyond `semantic` up to `padded` (a
    device's extra tile padding) are masked both ways (finfo.min as key for every query;
    their own query rows are all finfo.min, a uniform softmax whose output is discarded),
    so padding further does not change any real token."""
    tiles = aspect_ratio_mask.numel()
    position = torch.arange(padded, device=aspect_ratio_mask.device)
    tile_off = (aspect_ratio_mask.reshape(tiles, 1) == 0)
    pad = (tile_off | (position >= tokens)[None]).reshape(-1)
    extra = (position >= semantic)[None].expand(tiles, padded).reshape(-1)
    masked = (pad[:, None] & pad[None, :]) | extra[None, :] | extra[:, None]
    mask = torch.zeros(masked.shape, dtype=torch.float32, device=aspect_ratio_mask.device)
    return mask.masked_fill(masked, torch.finfo(torch.float32).min)[None, None]


@torch.fx.wrap
def encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Non-causal attention `[1, H, S, hd]` with an additive mask `[1, 1, S, S]`. The mask
    is clamped to the activations' finfo.min (float32's min would round to -inf in
    bfloat16, and an all -inf row, a device padding row, would give NaN)."""
    mask = mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@torch.fx.wrap
def vision_features(final: torch.Tensor, taps: list) -> torch.Tensor:
    """`[1, 1, L, D]` and k taps `[1, 1, L, D]` -> `[1, 1, L, D*(1+k)]`, HF's and Meta's
    order: the final state, then the taps INTERLEAVED per channel (feature D + d*k + j is
    channel d of tap j: torch.stack(taps, -1).flatten). A device can instead concatenate
    [final | tap_0 | ... | tap_k-1] and permute the projector's input columns
    (vision_names.projector_columns_for_concat)."""
    inter = torch.stack(taps, dim=-1).flatten(-2)
    return torch.cat([final, inter], dim=-1)


# ---------------------------------------------------------------- cross-attention
def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


@torch.fx.wrap
def cross_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, user_id: int,
                    mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Prefill rows of one user: q `[1, H, S, hd]` against the user's cache row
    `[Hkv, L, hd]` (grouped-query), additive mask `[1, 1, S, L]` -> `[1, H, S, hd]`.
    Softmax in float32."""
    groups = q.shape[1] // k_cache.shape[1]
    k = _repeat_kv(k_cache[user_id], groups, 0)[None].float()
    v = _repeat_kv(v_cache[user_id], groups, 0)[None].float()
    scores = torch.matmul(q.float(), k.transpose(-1, -2)) * scale + mask.float()
    return torch.matmul(scores.softmax(-1), v).to(q.dtype)


@torch.fx.wrap
def cross_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode rows: user b's query `[1, B, H, hd]` against cache row b, additive mask
    `[1, 1, B, L]` (row b is user b's) -> `[1, B, H, hd]`. Softmax in float32."""
    batch, n_heads = q.shape[1], q.shape[2]
    groups = n_heads // k_cache.shape[1]
    k = _repeat_kv(k_cache[:batch], groups, 1).float()  # [B, H, L, hd]
    v = _repeat_kv(v_cache[:batch], groups, 1).float()
    scores = torch.einsum("bhd,bhld->bhl", q[0].float(), k) * scale + mask[0, 0][:, None, :].float()
    out = torch.einsum("bhl,bhld->bhd", scores.softmax(-1), v)
    return out[None].to(q.dtype)
