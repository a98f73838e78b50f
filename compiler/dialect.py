"""The graph dialect: the ops a canonical graph may contain, each runnable on meta tensors.

After `passes.canonicalize`, every call_function node targets one of DIALECT's functions;
the lowering has one rule per entry and the verifier rejects anything else. Reference
leaves come from models_ref.ops; fused forms created by passes are defined here.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from models_ref import ops as ref
from models_ref import vision_ops as vops


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight (+ bias); weight is `[K, N]`, as ttnn.linear takes it."""
    y = torch.matmul(x, weight)
    return y if bias is None else y + bias.reshape(-1)


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a + b


def mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a * b


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as Llama 3.2 Vision's MLP uses it."""
    return F.gelu(x)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (float32 statistics), with weight and bias."""
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.reshape(-1).float(), bias.reshape(-1).float(), eps)
    return y.to(x.dtype)


def concat(parts: list, dim: int) -> torch.Tensor:
    return torch.cat(list(parts), dim=dim)


def qkv_heads(x: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, decode: bool):
    """Split a fused [q|k|v] projection into q, k, v heads (ttnn nlp_create_qkv_heads)."""
    q_end = n_heads * head_dim
    k_end = q_end + n_kv_heads * head_dim
    return (
        ref.split_heads(x[..., :q_end], n_heads, head_dim, decode),
        ref.split_heads(x[..., q_end:k_end], n_kv_heads, head_dim, decode),
        ref.split_heads(x[..., k_end:], n_kv_heads, head_dim, decode),
    )


def gated_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """silu(x @ w1) * (x @ w3): the MLP's gate and up projections as one unit."""
    return F.silu(torch.matmul(x, w1)) * torch.matmul(x, w3)


def all_reduce(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum per-chip partial values over the chips of one mesh axis (shape unchanged)."""
    return x.clone()


def all_gather(x: torch.Tensor, dim: int, axis: int, size: int) -> torch.Tensor:
    """Concatenate the chips' pieces along `dim` over one mesh axis of `size` chips."""
    return torch.cat([x] * size, dim=dim)


# ---------------------------------------------------------------- paged KV cache
# A cache is a pool of blocks [num_blocks, Hkv, block_size, hd]; a page table row maps a
# user's logical block j (positions j*bs .. j*bs+bs-1) to a physical block.

def _gather_user(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """A user's first `length` positions, [Hkv, length, hd], read through its page table row."""
    bs = cache.shape[2]
    blocks = cache[table_row[: -(-length // bs)].long()]  # [n, Hkv, bs, hd]
    return blocks.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]


def paged_fill_cache(cache: torch.Tensor, kv: torch.Tensor, chunk_page_table: torch.Tensor) -> torch.Tensor:
    """Write a prefill chunk's K or V `[1, Hkv, S, hd]` into the blocks its table names."""
    if cache.device.type != "meta":
        bs = cache.shape[2]
        for j, block in enumerate(chunk_page_table[0].tolist()):
            cache[block] = kv[0, :, j * bs:(j + 1) * bs].to(cache.dtype)
    return cache


def paged_update_cache(cache: torch.Tensor, kv: torch.Tensor, cur_pos: torch.Tensor,
                       page_table: torch.Tensor) -> torch.Tensor:
    """Write user b's decode K or V `[1, B, Hkv, hd]` at position cur_pos[b] (< 0: skip)."""
    if cache.device.type != "meta":
        bs = cache.shape[2]
        for b, pos in enumerate(cur_pos.tolist()):
            if pos >= 0:
                cache[int(page_table[b, pos // bs]), :, pos % bs] = kv[0, b].to(cache.dtype)
    return cache


def chunked_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      page_table: torch.Tensor, chunk_start: int, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """Prefill chunk attention: q `[1, H, S, hd]` at positions chunk_start.. sees every
    earlier position of its user through the page table (its own chunk included, causal;
    with a window, only the `window` latest: ref.visible)."""
    if q.device.type == "meta":
        return torch.empty_like(q)
    rows = q.shape[2]
    k = _gather_user(k_cache, page_table[0], chunk_start + rows)[None]
    v = _gather_user(v_cache, page_table[0], chunk_start + rows)[None]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
    visible = ref.visible(torch.arange(chunk_start, chunk_start + rows), torch.arange(chunk_start + rows), window)
    mask = torch.zeros(visible.shape).masked_fill(~visible, float("-inf"))
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, scale=scale).to(q.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cur_pos: torch.Tensor, page_table: torch.Tensor, scale: float,
                           window: int | None = None) -> torch.Tensor:
    """Decode attention `[1, B, H, hd]`: user b sees its positions 0..cur_pos[b] (the
    `window` latest of them with a window)."""
    if q.device.type == "meta":
        return torch.empty_like(q)
    out = torch.zeros_like(q)
    for b, pos in enumerate(cur_pos.tolist()):
        if pos < 0:
            continue
        k = _gather_user(k_cache, page_table[b], pos + 1)  # [Hkv, L, hd]
        v = _gather_user(v_cache, page_table[b], pos + 1)
        groups = q.shape[2] // k.shape[0]
        k, v = k.repeat_interleave(groups, 0).float(), v.repeat_interleave(groups, 0).float()
        scores = torch.einsum("hd,hld->hl", q[0, b].float(), k) * scale
        if window is not None:
            scores[:, : max(pos + 1 - window, 0)] = float("-inf")
        out[0, b] = torch.einsum("hl,hld->hd", scores.softmax(-1), v).to(q.dtype)
    return out


DIALECT = {
    f.__name__: f
    for f in (
        ref.embed, ref.rms_norm, ref.split_heads, ref.merge_heads, ref.rotary, ref.rope_rows,
        ref.fill_cache, ref.update_cache, ref.causal_attention, ref.decode_attention,
        ref.last_tile, linear, add, mul, silu, qkv_heads, gated_mlp, operator.getitem,
        all_reduce, all_gather, paged_fill_cache, paged_update_cache, chunked_attention,
        paged_decode_attention, gelu, layer_norm, concat,
        # Llama 3.2 Vision: the vision tower and the cross-attention layers
        vops.patchify, vops.aspect_ratio_rows, vops.tanh_gate, vops.prepend_class_token,
        vops.positional_embedding, vops.pad_tile_tokens, vops.pad_rows, vops.split_tiles,
        vops.merge_tiles, vops.unpad_tile_tokens, vops.encoder_attention, vops.vision_features,
        vops.cross_attention, vops.cross_attention_decode,
    )
}

# Ops that write device state: never dead, never reordered across each other.
SIDE_EFFECTS = frozenset({ref.fill_cache, ref.update_cache, paged_fill_cache, paged_update_cache})
COLLECTIVES = frozenset({all_reduce, all_gather})


def op_name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))
