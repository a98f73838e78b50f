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
- residuals, norms, embeddings and rope tables are replicated.
On a TG mesh the tensor-parallel group is all 32 chips (both axes, row-major), so every
reduction is an all_reduce on axis 1 then on axis 0. On one chip it only annotates.

    %qkv = linear(%x, %wqkv)  : 1x1xSx960           %qkv = linear(%x, %wqkv) : 1x1xSx256   shard(3)
    %h = qkv_heads(%qkv, 9, 3, 64)          ==>     %h = qkv_heads(%qkv, 2, 1, 64)
    %o = linear(%a, %wo)      : 1x1xSx576           %o = linear(%a, %wo)     : 1x1xSx576   partial
                                                    %r = all_reduce(%o, 1)   : 1x1xSx576   replicated
"""
from __future__ import annotations

import torch.fx

from compiler import dialect
from compiler.facts import LAYER, PLACEMENT, REPLICATED, Placement
from models_ref import ops as ref

from .head_plan import padded_size, plan_heads

NAME = "shard"


def _select(recipe, dim: int, head_dim: int, heads) -> list:
    return ["select_heads", dim, head_dim, list(heads), recipe]


def _column(spec, axes, dim: int) -> None:
    spec.placement = Placement(dim, axes)


def _insert_after(gm, node, target, args) -> torch.fx.Node:
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(target, args)
    new.meta[LAYER] = node.meta.get(LAYER)
    return new


def _reduce_after(gm, node, axes) -> None:
    """all_reduce `node` over each tensor-parallel axis; users read the reduced value."""
    users = list(node.users)
    last = node
    for axis in axes:
        last = _insert_after(gm, last, dialect.all_reduce, (last, axis))
    for user in users:
        user.replace_input_with(node, last)


def _shard_attention(gm, ctx, plan, axes) -> None:
    weights, hd = ctx.facts.weights, ctx.cfg.head_dim
    for node in list(gm.graph.nodes):
        if node.target is dialect.qkv_heads:
            x_node, _, _, head_dim, decode = node.args
            node.args = (x_node, plan.local_q, plan.local_kv, head_dim, decode)
            for attr in x_node.args[1:]:
                if attr is None:
                    continue
                spec = weights[attr.target]
                rq, rk, rv = spec.recipe[2]
                parts = []
                for q_heads, kv_heads in zip(plan.q_heads, plan.kv_heads):
                    parts += [_select(rq, 1, hd, q_heads), _select(rk, 1, hd, kv_heads),
                              _select(rv, 1, hd, kv_heads)]
                spec.recipe = ["concat", 1, parts]
                spec.shape = (spec.shape[0], plan.chips * (plan.local_q + 2 * plan.local_kv) * hd)
                _column(spec, axes, 1)
        elif node.target is dialect.linear and node.args[1].target.endswith("attention.wo.weight"):
            spec = weights[node.args[1].target]
            spec.recipe = ["concat", 0, [_select(spec.recipe, 0, hd, q) for q in plan.q_heads]]
            spec.shape = (plan.chips * plan.local_q * hd, spec.shape[1])
            _column(spec, axes, 0)
            _reduce_after(gm, node, axes)
    for spec in ctx.facts.state.values():  # [B, Hkv, L, hd] -> local KV heads per chip
        spec.shape = (spec.shape[0], plan.chips * plan.local_kv) + tuple(spec.shape[2:])
        spec.placement = Placement(1, axes)


def _pad(spec, dim: int, size: int, axes) -> None:
    if spec.shape[dim] != size:
        spec.recipe = ["pad", dim, size, spec.recipe]
        spec.shape = spec.shape[:dim] + (size,) + spec.shape[dim + 1:]
    spec.placement = Placement(dim, axes)


def _shard_mlp(gm, ctx, chips, axes) -> None:
    weights = ctx.facts.weights
    cores = ctx.options.pad_mlp_cores or 1
    hidden = padded_size(ctx.cfg.ffn_dim, chips, 32 * cores)
    for node in list(gm.graph.nodes):
        if node.target is dialect.gated_mlp:
            for w in node.args[1:]:
                _pad(weights[w.target], 1, hidden, axes)
        elif node.target is dialect.linear and node.args[1].target.endswith("feed_forward.w2.weight"):
            _pad(weights[node.args[1].target], 0, hidden, axes)
            _reduce_after(gm, node, axes)


def _shard_lm_head(gm, ctx, chips, axes) -> None:
    for node in list(gm.graph.nodes):
        if node.target is dialect.linear and node.args[1].target == "output.weight":
            spec = ctx.facts.weights["output.weight"]
            _pad(spec, 1, padded_size(ctx.cfg.vocab_size, chips), axes)
            users, last = list(node.users), node
            for axis in reversed(axes):  # innermost axis first: chip order is row-major
                size = ctx.target.mesh_shape[axis]
                last = _insert_after(gm, last, dialect.all_gather, (last, 3, axis, size))
            for user in users:
                user.replace_input_with(node, last)


# Ops whose output is split by heads when their inputs are (or by hidden units: gated_mlp).
_HEAD_OPS = (dialect.qkv_heads, dialect.gated_mlp, ref.merge_heads, ref.rotary,
             ref.causal_attention, ref.decode_attention, ref.update_cache, ref.fill_cache,
             dialect.paged_fill_cache, dialect.paged_update_cache, dialect.chunked_attention,
             dialect.paged_decode_attention)


# How each op's output placement follows from its inputs'.
def _placement_of(node, facts, decode: bool) -> Placement:
    if node.op == "get_attr":
        spec = facts.weights.get(node.target) or facts.state.get(node.target)
        return spec.placement
    if node.op != "call_function":
        return REPLICATED
    if node.target is dialect.all_reduce and any(u.target is dialect.all_reduce for u in node.users):
        return Placement(None, (node.args[1],), partial=True)  # summed over one axis of two
    if node.target in dialect.COLLECTIVES:
        return REPLICATED
    ins = [a.meta.get(PLACEMENT, REPLICATED) for a in node.args if isinstance(a, torch.fx.Node)]
    if node.target is dialect.linear:
        w = node.args[1].meta[PLACEMENT]
        if w.dim == 0:
            return Placement(None, w.axes, partial=True)
        return Placement(3, w.axes) if w.dim == 1 else REPLICATED
    if node.target in dialect.SIDE_EFFECTS:  # cache writes return the cache, as placed
        return _placement_of(node.args[0], facts, decode)
    if node.target in _HEAD_OPS:
        sharded = [p for p in ins if p.dim is not None]
        if not sharded:
            return REPLICATED
        if node.target in (dialect.gated_mlp, ref.merge_heads):
            return Placement(3, sharded[0].axes)
        return Placement(2 if decode else 1, sharded[0].axes)  # heads: [1,B,H,hd] / [1,H,S,hd]
    return ins[0] if ins else REPLICATED


def annotate(gm, facts, decode: bool) -> None:
    """Set PLACEMENT on every node from the weights' and caches' placements. Later passes
    that add nodes call it again."""
    for node in gm.graph.nodes:
        node.meta[PLACEMENT] = _placement_of(node, facts, decode)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    chips, axes = ctx.target.tp_size, tuple(ctx.target.tp_axes)
    if chips > 1:
        plan = plan_heads(ctx.cfg.n_heads, ctx.cfg.n_kv_heads, chips)
        _shard_attention(gm, ctx, plan, axes)
        _shard_mlp(gm, ctx, chips, axes)
        _shard_lm_head(gm, ctx, chips, axes)
        ctx.counters["shard.padded_q_heads"] = plan.padded_q
        ctx.counters["shard.collectives"] = sum(
            1 for n in gm.graph.nodes if n.target in dialect.COLLECTIVES)
    annotate(gm, ctx.facts, ctx.decode)
    return gm
