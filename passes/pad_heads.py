"""pad_heads: attention heads padded to whole 32-wide tiles where ttnn needs it.

Expects: a fused graph (qkv_heads after a wqkv linear). ttnn 0.81.1's head split, concat
and prefill attention kernels take head_dim only in whole tiles ("Padding is not
supported on the head_dim dimension"); Llama 3.2 Vision's encoder has 16 heads of 80.
Guarantees: every qkv_heads whose q and k go straight to attention (no rotary) splits
heads of a multiple of 32: each head's q, k and v columns of wqkv (and bias) are
zero-padded (the fused spec's q/k/v parts too, so sharding regroups padded heads), and
the rows of the output projection after its merge_heads too. The
attention keeps its explicit scale (1/sqrt of the real head_dim) and zero columns add
nothing to a dot product or to the output, so the maths is unchanged. Heads that go
through rotary (the text decoder) are left as they are.

    %qkv = linear(%x, %wqkv) : 1x1xSx3840           %qkv = linear(%x, %wqkv') : 1x1xSx4608
    %h = qkv_heads(%qkv, 16, 16, 80)        ==>     %h = qkv_heads(%qkv, 16, 16, 96)
    %o = linear(merge_heads(..), %wo) : [1280, 1280] weight rows 1280 ==> 1536, zero per head
"""
from __future__ import annotations

import operator

import torch.fx

from compiler import dialect
from compiler.facts import FusedPart
from models_ref import ops as ref

NAME = "pad_heads"
TILE = 32


def _output_projection(heads: torch.fx.Node) -> torch.fx.Node | None:
    """The linear after merge_heads of the attention these heads feed (None: other use)."""
    users = {u for item in heads.users for u in item.users}
    if len(users) != 1:
        return None
    (attention,) = users
    merge = next(iter(attention.users), None)
    if merge is None or merge.target is not ref.merge_heads or len(merge.users) != 1:
        return None
    out = next(iter(merge.users))
    return out if out.target is dialect.linear else None


def _straight_to_attention(heads: torch.fx.Node) -> bool:
    return all(item.target is operator.getitem and all(u.target is not ref.rotary for u in item.users)
               for item in heads.users)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    weights = ctx.facts.weights
    for node in list(gm.graph.nodes):
        if node.target is not dialect.qkv_heads:
            continue
        x, n_heads, n_kv, head_dim, decode = node.args
        padded = -(-head_dim // TILE) * TILE
        if padded == head_dim or not _straight_to_attention(node):
            continue
        wo = _output_projection(node)
        if wo is None:
            continue
        for w in x.args[1:3]:  # wqkv and its bias: heads are blocks of head_dim columns
            if w is not None:
                spec = weights[w.target]
                spec.fused = tuple(FusedPart(p.role, ["pad_heads", 1, head_dim, padded, p.recipe],
                                             p.width // head_dim * padded) for p in spec.fused)
                spec.recipe = ["concat", 1, [p.recipe for p in spec.fused]]
                spec.shape = spec.shape[:-1] + ((n_heads + 2 * n_kv) * padded,)
        spec = weights[wo.args[1].target]
        spec.recipe = ["pad_heads", 0, head_dim, padded, spec.recipe]
        spec.shape = (n_heads * padded,) + tuple(spec.shape[1:])
        node.args = (x, n_heads, n_kv, padded, decode)
        ctx.counters["pad_heads"] += 1
    return gm
