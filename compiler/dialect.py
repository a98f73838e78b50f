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


DIALECT = {
    f.__name__: f
    for f in (
        ref.embed, ref.rms_norm, ref.split_heads, ref.merge_heads, ref.rotary, ref.rope_rows,
        ref.fill_cache, ref.update_cache, ref.causal_attention, ref.decode_attention,
        ref.last_tile, linear, add, mul, silu, qkv_heads, gated_mlp, operator.getitem,
        all_reduce, all_gather,
    )
}

# Ops that write device state: never dead, never reordered across each other.
SIDE_EFFECTS = frozenset({ref.fill_cache, ref.update_cache})
COLLECTIVES = frozenset({all_reduce, all_gather})


def op_name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))
