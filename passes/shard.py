"""shard: tensor parallelism over the target's mesh, with head and MLP padding.

Expects: a fused graph (linear(wqkv) + qkv_heads, gated_mlp) with global shapes.
Guarantees: every weight and cache has a Placement and the graph is per chip:
- wqkv is column-parallel with each chip's columns laid out [q_c | k_c | v_c] for the
  heads passes/head_plan.py assigns it (padded heads are zero, KV heads replicated
  where chips share one); qkv_heads takes the local head counts; caches hold local KV
  heads; wo is row-parallel over the same heads, followed by an all_reduce;
- w1/w3 are column-parallel and w2 row-parallel (followed by an all_reduce), the hidden
  size zero-padded to split evenly in tiles (or to PAD_MLP_CORES cores per chip);
- the LM head is column-parallel over a padded vocabulary, followed by an all_gather;
- residuals, norms, embeddings and rope tables are replicated;
- Llama 3.2 Vision: cross-attention layers as the decoder's (q column-parallel by heads,
  k/v in the vision function by KV heads, caches by KV heads, wo and w2 row-parallel);
  the vision encoder's attention by its own head plan and its GELU MLP as above (the
  c_proj bias added once, after the all_reduce); patch embedding, tables and projector
  stay replicated.
Node placements follow from these weight and cache placements: compiler/placement.py,
which the pipeline re-runs after every pass.
On a TG mesh the tensor-parallel group is all 32 chips (both axes, row-major), so every
reduction is an all_reduce on axis 0 then on axis 1 (tp_axes order). On one chip it only annotates.

    %qkv = linear(%x, %wqkv)  : 1x1xSx960           %qkv = linear(%x, %wqkv) : 1x1xSx256   shard(3)
    %h = qkv_heads(%qkv, 9, 3, 64)          ==>     %h = qkv_heads(%qkv, 2, 1, 64)
    %o = linear(%a, %wo)      : 1x1xSx576           %o = linear(%a, %wo)     : 1x1xSx576   partial
                                                    %r = all_reduce(%o, 1)   : 1x1xSx576   replicated
"""
from __future__ import annotations

import torch.fx

from compiler import dialect
from compiler.facts import LAYER, VAL, Placement
from models_ref.names import CACHES, CROSS_CACHES, Role

from .head_plan import padded_size, plan_heads

NAME = "shard"
_QKV_PARTS = ((Role.WQ, Role.BQ), (Role.WK, Role.BK), (Role.WV, Role.BV))


def _select(recipe, dim: int, head_dim: int, heads) -> list:
    return ["select_heads", dim, head_dim, list(heads), recipe]


def _column(spec, axes, dim: int) -> None:
    spec.placement = Placement(dim, axes)


def _insert_after(gm, node, target, args) -> torch.fx.Node:
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(target, args)
    new.meta[LAYER] = node.meta.get(LAYER)
    return new


def _reduce_after(gm, node, axes) -> torch.fx.Node:
    """all_reduce `node` over each tensor-parallel axis; users read the reduced value,
    which is returned."""
    users = list(node.users)
    last = node
    for axis in axes:
        last = _insert_after(gm, last, dialect.all_reduce, (last, axis))
    for user in users:
        user.replace_input_with(node, last)
    return last


# Row-parallel output projections of each kind of attention, and unfused projections that
# are split into heads (Llama 3.2 Vision's cross-attention: q here, k/v in the vision function).
_OUT_PROJECTIONS = (Role.WO, Role.CROSS_WO, Role.VISION_WO)
_HEAD_PROJECTIONS = {Role.CROSS_WQ: "q", Role.CROSS_WK: "kv", Role.CROSS_WV: "kv"}
_FUSED_QKV = (Role.WQKV, Role.VISION_WQKV)


def _plans(ctx, chips: int) -> dict:
    """Head plans by kind of attention: the text decoder's (self- and cross-attention share
    its heads) and, for Llama 3.2 Vision, the vision encoder's (multi-head)."""
    plans = {"text": plan_heads(ctx.cfg.n_heads, ctx.cfg.n_kv_heads, chips)}
    if ctx.cfg.vision is not None:
        plans["vision"] = plan_heads(ctx.cfg.vision.n_heads, ctx.cfg.vision.n_heads, chips)
    return plans


def _kind(role: Role) -> str:
    return "vision" if role.value.startswith("vision") else "text"


def _n_heads(ctx, role: Role) -> int:
    return ctx.cfg.vision.n_heads if _kind(role) == "vision" else ctx.cfg.n_heads


def _shard_fused_qkv(ctx, node, plan, axes) -> None:
    """wqkv (and bias) column-parallel as [q_c | k_c | v_c] per chip; local head counts."""
    x_node, _, _, head_dim, decode = node.args
    node.args = (x_node, plan.local_q, plan.local_kv, head_dim, decode)
    for attr in x_node.args[1:]:
        if attr is None:
            continue
        spec = ctx.facts.weights[attr.target]
        rq, rk, rv = (part.recipe for part in spec.fused)  # q, k, v: fuse_qkv's order
        parts = []
        for q_heads, kv_heads in zip(plan.q_heads, plan.kv_heads):
            parts += [_select(rq, 1, head_dim, q_heads), _select(rk, 1, head_dim, kv_heads),
                      _select(rv, 1, head_dim, kv_heads)]
        spec.recipe, spec.fused = ["concat", 1, parts], ()  # now per chip, not [q|k|v]
        spec.shape = (spec.shape[0], plan.chips * (plan.local_q + 2 * plan.local_kv) * head_dim)
        _column(spec, axes, 1)


def _shard_head_projection(ctx, node, plan, axes) -> None:
    """An unfused q (or k / v) projection read by one split_heads: column-parallel."""
    spec = ctx.facts.weights[node.args[1].target]
    (split,) = node.users
    x, n_heads, head_dim, decode = split.args
    q = _HEAD_PROJECTIONS[spec.role] == "q"
    heads = plan.q_heads if q else plan.kv_heads
    spec.recipe = ["concat", 1, [_select(spec.recipe, 1, head_dim, h) for h in heads]]
    spec.shape = (spec.shape[0], plan.chips * len(heads[0]) * head_dim)
    _column(spec, axes, 1)
    split.args = (x, len(heads[0]), head_dim, decode)


def _shard_attention(gm, ctx, plans, axes) -> None:
    weights = ctx.facts.weights
    for node in list(gm.graph.nodes):
        role = weights[node.args[1].target].role if node.target is dialect.linear else None
        if node.target is dialect.qkv_heads and weights[node.args[0].args[1].target].role in _FUSED_QKV:
            _shard_fused_qkv(ctx, node, plans[_kind(weights[node.args[0].args[1].target].role)], axes)
        elif role in _HEAD_PROJECTIONS:
            _shard_head_projection(ctx, node, plans["text"], axes)
        elif role in _OUT_PROJECTIONS:
            plan, spec = plans[_kind(role)], weights[node.args[1].target]
            head_dim = spec.shape[0] // _n_heads(ctx, role)  # [H * hd, D] rows (hd padded for ttnn)
            spec.recipe = ["concat", 0, [_select(spec.recipe, 0, head_dim, q) for q in plan.q_heads]]
            spec.shape = (plan.chips * plan.local_q * head_dim, spec.shape[1])
            _column(spec, axes, 0)
            _reduce_after(gm, node, axes)
    plan = plans["text"]
    for spec in ctx.facts.state.values():  # [B, Hkv, L, hd] -> local KV heads per chip
        if spec.role in CACHES or spec.role in CROSS_CACHES:
            spec.shape = (spec.shape[0], plan.chips * plan.local_kv) + tuple(spec.shape[2:])
            spec.placement = Placement(1, axes)


def _pad(spec, dim: int, size: int, axes) -> None:
    if spec.shape[dim] != size:
        spec.recipe = ["pad", dim, size, spec.recipe]
        spec.shape = spec.shape[:dim] + (size,) + spec.shape[dim + 1:]
    spec.placement = Placement(dim, axes)


def _shard_mlp(gm, ctx, chips, axes) -> None:
    """Gated MLPs (the decoder's and the cross-attention layers'): w1/w3 column-parallel
    over a hidden size padded to whole tiles per chip, w2 row-parallel + all_reduce. The
    vision encoder's GELU MLP likewise: c_fc (and its bias) column-parallel, c_proj
    row-parallel with its bias added once, after the all_reduce."""
    weights = ctx.facts.weights
    cores = ctx.options.pad_mlp_cores or 1
    hidden = padded_size(ctx.cfg.ffn_dim, chips, 32 * cores)
    vision_hidden = padded_size(ctx.cfg.vision.ffn_dim, chips) if ctx.cfg.vision else None
    for node in list(gm.graph.nodes):
        role = weights[node.args[1].target].role if node.target in (dialect.linear, dialect.gated_mlp) else None
        if node.target is dialect.gated_mlp and role in (Role.W1, Role.CROSS_W1):
            for w in node.args[1:]:
                _pad(weights[w.target], 1, hidden, axes)
        elif node.target is dialect.linear and role in (Role.W2, Role.CROSS_W2):
            _pad(weights[node.args[1].target], 0, hidden, axes)
            _reduce_after(gm, node, axes)
        elif node.target is dialect.linear and role is Role.VISION_FC1:
            for w in node.args[1:3]:  # weight [K, N] and bias [1, N]: split N
                _pad(weights[w.target], 1, vision_hidden, axes)
        elif node.target is dialect.linear and role is Role.VISION_FC2:
            _pad(weights[node.args[1].target], 0, vision_hidden, axes)
            bias = node.args[2]
            node.args = (node.args[0], node.args[1], None)
            reduced = _reduce_after(gm, node, axes)
            _add_after(gm, reduced, bias, weights[bias.target])


def _add_after(gm, node, bias, spec) -> None:
    """`node + bias` for every user of `node` (a [1, N] bias as a broadcast [1, 1, 1, N] row)."""
    spec.shape, spec.recipe = (1, 1, 1, spec.shape[-1]), ["reshape", [1, 1, 1, -1], spec.recipe]
    users = list(node.users)
    added = _insert_after(gm, node, dialect.add, (node, bias))
    for user in users:
        user.replace_input_with(node, added)
    bias.meta.pop(VAL, None)


def _shard_lm_head(gm, ctx, chips, axes) -> None:
    for node in list(gm.graph.nodes):
        if node.target is dialect.linear and ctx.facts.weights[node.args[1].target].role is Role.LM_HEAD:
            spec = ctx.facts.weights[node.args[1].target]
            _pad(spec, 1, padded_size(ctx.cfg.vocab_size, chips), axes)
            users, last = list(node.users), node
            for axis in reversed(axes):  # innermost axis first: chip order is row-major
                size = ctx.target.mesh_shape[axis]
                last = _insert_after(gm, last, dialect.all_gather, (last, 3, axis, size))
            for user in users:
                user.replace_input_with(node, last)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    chips, axes = ctx.target.tp_size, tuple(ctx.target.tp_axes)
    if chips > 1:
        plans = _plans(ctx, chips)
        _shard_attention(gm, ctx, plans, axes)
        _shard_mlp(gm, ctx, chips, axes)
        _shard_lm_head(gm, ctx, chips, axes)
        ctx.counters["shard.padded_q_heads"] = plans["text"].padded_q
        ctx.counters["shard.collectives"] = sum(
            1 for n in gm.graph.nodes if n.target in dialect.COLLECTIVES)
    return gm
