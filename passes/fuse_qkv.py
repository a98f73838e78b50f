"""fuse_qkv: one projection for q, k and v, split into heads by one op.

Expects: canonical graph; per layer three `linear`s of the same input whose weights are
`layers.i.attention.w{q,k,v}.weight`, each read only by a `split_heads`.
Guarantees: one `linear` with weight `layers.i.attention.wqkv.weight` `[K, Nq+Nk+Nv]`
(bias `bqkv` when the model has one), then `qkv_heads` and three getitems. The weight
recipe keeps q, k and v as separate concat parts, so sharding can regroup them per chip
as [q_i | k_i | v_i] (the layout the reference uses).

    %q = linear(%x, %wq); %qh = split_heads(%q, 9, 64, False)       %qkv = linear(%x, %wqkv, %bqkv)
    %k = linear(%x, %wk); %kh = split_heads(%k, 3, 64, False)  ==>  %h = qkv_heads(%qkv, 9, 3, 64, False)
    %v = linear(%x, %wv); %vh = split_heads(%v, 3, 64, False)       %qh = getitem(%h, 0) ...
"""
from __future__ import annotations

import operator

import torch.fx

from compiler import dialect
from compiler.facts import LAYER, WeightSpec
from models_ref import ops as ref

from .util import drop_unused_get_attrs, get_attr, replace

NAME = "fuse_qkv"
_PARTS = ("wq", "wk", "wv")


def _projection(node: torch.fx.Node):
    """(part, linear, split_heads) if `node` is split_heads(linear(x, w_part))."""
    lin = node.args[0]
    if not (isinstance(lin, torch.fx.Node) and lin.target is dialect.linear and len(lin.users) == 1):
        return None
    weight = lin.args[1].target
    part = weight.rsplit(".", 2)[-2]
    return (part, lin, node) if part in _PARTS else None


def _fused_spec(ctx, prefix: str, kind: str, widths: list[int]) -> WeightSpec | None:
    """The fused [q|k|v] weight (kind "weight") or bias (kind "bias"). A projection
    without a bias contributes zeros, so a model biased on only some of them keeps its
    numerics; None when none of the three has one."""
    specs = [ctx.facts.weights.get(f"{prefix}.{p}.{kind}") for p in _PARTS]
    if all(s is None for s in specs):
        return None
    rows = next(s.shape[0] for s in specs if s is not None)
    recipes = [s.recipe if s is not None else ["zeros", [rows, w]] for s, w in zip(specs, widths)]
    layer = next(s.layer for s in specs if s is not None)
    return WeightSpec(f"{prefix}.wqkv.{kind}", (rows, sum(widths)), ["concat", 1, recipes], layer=layer)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    groups: dict[torch.fx.Node, dict] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ref.split_heads:
            found = _projection(node)
            if found:
                part, lin, split = found
                groups.setdefault(lin.args[0], {})[part] = (lin, split)
    for x, parts in groups.items():
        if set(parts) != set(_PARTS):
            continue
        (q_lin, q_split), (_, k_split), (_, v_split) = (parts[p] for p in _PARTS)
        prefix = q_lin.args[1].target.rsplit(".", 2)[0]  # layers.i.attention
        widths = [ctx.facts.weights[p[0].args[1].target].shape[1] for p in (parts[n] for n in _PARTS)]
        weight = _fused_spec(ctx, prefix, "weight", widths)
        bias = _fused_spec(ctx, prefix, "bias", widths)
        for spec in (weight, bias):
            if spec is not None:
                ctx.facts.weights[spec.name] = spec
        first = min((p[0] for p in parts.values()), key=lambda n: list(gm.graph.nodes).index(n))
        w_node = get_attr(gm, first, weight.name)
        b_node = get_attr(gm, first, bias.name) if bias else None
        with gm.graph.inserting_before(first):
            fused = gm.graph.call_function(dialect.linear, (x, w_node, b_node))
            fused.meta[LAYER] = first.meta[LAYER]
        _, n_heads, head_dim, decode = q_split.args
        n_kv = k_split.args[1]
        with gm.graph.inserting_after(fused):
            heads = gm.graph.call_function(dialect.qkv_heads, (fused, n_heads, n_kv, head_dim, decode))
            heads.meta[LAYER] = first.meta[LAYER]
        for index, split in enumerate((q_split, k_split, v_split)):
            lin = split.args[0]
            replace(gm, split, operator.getitem, (heads, index))
            gm.graph.erase_node(lin)
        ctx.counters["fuse_qkv"] += 1
    drop_unused_get_attrs(gm, ctx)
    return gm
