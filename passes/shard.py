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
- residuals, norms, embeddings and rope tables are replicated; so are (in this version)
  Llama 3.2 Vision's vision tower and cross-attention layers: every chip computes them.
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
from compiler.facts import LAYER, Placement
from models_ref.names import CACHES, Role

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
        if node.target is dialect.qkv_heads and weights[node.args[0].args[1].target].role is Role.WQKV:
            x_node, _, _, head_dim, decode = node.args
            node.args = (x_node, plan.local_q, plan.local_kv, head_dim, decode)
            for attr in x_node.args[1:]:
                if attr is None:
                    continue
                spec = weights[attr.target]
                rq, rk, rv = (spec.part(*roles).recipe for roles in _QKV_PARTS)
                parts = []
                for q_heads, kv_heads in zip(plan.q_heads, plan.kv_heads):
                    parts += [_select(rq, 1, hd, q_heads), _select(rk, 1, hd, kv_heads),
                              _select(rv, 1, hd, kv_heads)]
                spec.recipe, spec.fused = ["concat", 1, parts], ()  # now per chip, not [q|k|v]
                spec.shape = (spec.shape[0], plan.chips * (plan.local_q + 2 * plan.local_kv) * hd)
                _column(spec, axes, 1)
        elif node.target is dialect.linear and weights[node.args[1].target].role is Role.WO:
            spec = weights[node.args[1].target]
            spec.recipe = ["concat", 0, [_select(spec.recipe, 0, hd, q) for q in plan.q_heads]]
            spec.shape = (plan.chips * plan.local_q * hd, spec.shape[1])
            _column(spec, axes, 0)
            _reduce_after(gm, node, axes)
    for spec in ctx.facts.state.values():  # [B, Hkv, L, hd] -> local KV heads per chip
        if spec.role in CACHES:
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
        if node.target is dialect.gated_mlp and weights[node.args[1].target].role is Role.W1:
            for w in node.args[1:]:
                _pad(weights[w.target], 1, hidden, axes)
        elif node.target is dialect.linear and weights[node.args[1].target].role is Role.W2:
            _pad(weights[node.args[1].target], 0, hidden, axes)
            _reduce_after(gm, node, axes)


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
        plan = plan_heads(ctx.cfg.n_heads, ctx.cfg.n_kv_heads, chips)
        _shard_attention(gm, ctx, plan, axes)
        _shard_mlp(gm, ctx, chips, axes)
        _shard_lm_head(gm, ctx, chips, axes)
        ctx.counters["shard.padded_q_heads"] = plan.padded_q
        ctx.counters["shard.collectives"] = sum(
            1 for n in gm.graph.nodes if n.target in dialect.COLLECTIVES)
    return gm
