"""fuse_qkv: one projection for q, k and v, split into heads by one op.

Expects: canonical graph; per layer three `linear`s of the same input whose weights have
roles WQ, WK, WV, each read only by a `split_heads`.
Guarantees: one `linear` with weight `layers.i.attention.wqkv.weight` (role WQKV)
`[K, Nq+Nk+Nv]` (bias BQKV when the model has one), then `qkv_heads` and three getitems.
The spec lists its q, k and v parts by role (WeightSpec.fused), so sharding can regroup
them per chip as [q_i | k_i | v_i] (the layout the reference uses).

    %q = linear(%x, %wq); %qh = split_heads(%q, 9, 64, False)       %qkv = linear(%x, %wqkv, %bqkv)
    %k = linear(%x, %wk); %kh = split_heads(%k, 3, 64, False)  ==>  %h = qkv_heads(%qkv, 9, 3, 64, False)
    %v = linear(%x, %wv); %vh = split_heads(%v, 3, 64, False)       %qh = getitem(%h, 0) ...
"""
from __future__ import annotations

import operator

import torch.fx

from compiler import dialect
from compiler.facts import LAYER, FusedPart, WeightSpec
from models_ref import ops as ref
from models_ref.names import Role

from .util import drop_unused_get_attrs, get_attr, replace

NAME = "fuse_qkv"
# Self-attention projections that fuse: (q, k, v weight roles) -> (fused weight role,
# bias roles, fused bias role). The text decoder's (with Qwen2's biases) and the vision
# encoder's; cross-attention's q has no k/v beside it (they are computed per image).
FUSIONS = {
    (Role.WQ, Role.WK, Role.WV): (Role.WQKV, (Role.BQ, Role.BK, Role.BV), Role.BQKV),
    (Role.VISION_WQ, Role.VISION_WK, Role.VISION_WV): (Role.VISION_WQKV, None, None),
}
_PART_ROLES = {role for roles in FUSIONS for role in roles}


def _projection(node: torch.fx.Node, weights):
    """(role, linear, split_heads) if `node` is split_heads(linear(x, w)) with w a q, k or v
    projection weight."""
    lin = node.args[0]
    if not (isinstance(lin, torch.fx.Node) and lin.target is dialect.linear and len(lin.users) == 1):
        return None
    role = weights[lin.args[1].target].role
    return (role, lin, node) if role in _PART_ROLES else None


def _fused_spec(ctx, linears: list, roles: tuple[Role, ...] | None, fused_role: Role, widths: list[int],
                slot: int) -> WeightSpec | None:
    """The fused [q|k|v] weight (slot 1 of the linears) or bias (slot 2). A projection
    without a bias contributes zeros, so a model biased on only some of them keeps its
    numerics; None when none of the three has one."""
    nodes = [lin.args[slot] if len(lin.args) > slot else None for lin in linears]
    specs = [ctx.facts.weights[n.target] if n is not None else None for n in nodes]
    if all(s is None for s in specs):
        return None
    if roles is None:
        raise ValueError(f"{fused_role.value}: the projections carry biases this fusion has no role for")
    first = next(s for s in specs if s is not None)
    rows = first.shape[0]
    parts = tuple(FusedPart(role, s.recipe if s is not None else ["zeros", [rows, w]], w)
                  for role, s, w in zip(roles, specs, widths))
    name = ctx.facts.weights[linears[0].args[1].target].name.replace(".wq.", ".wqkv.")  # the canonical rule
    if slot == 2:
        name = name.rsplit(".", 1)[0] + ".bias"
    return WeightSpec(name, (rows, sum(widths)), ["concat", 1, [p.recipe for p in parts]], layer=first.layer,
                      role=fused_role, fused=parts)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    groups: dict[torch.fx.Node, dict] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is ref.split_heads:
            found = _projection(node, ctx.facts.weights)
            if found:
                role, lin, split = found
                groups.setdefault(lin.args[0], {})[role] = (lin, split)
    for x, parts in groups.items():
        triple = next((roles for roles in FUSIONS if set(parts) == set(roles)), None)
        if triple is None:
            continue
        fused_role, bias_roles, fused_bias_role = FUSIONS[triple]
        linears = [parts[r][0] for r in triple]
        q_split, k_split, v_split = (parts[r][1] for r in triple)
        widths = [ctx.facts.weights[lin.args[1].target].shape[1] for lin in linears]
        weight = _fused_spec(ctx, linears, triple, fused_role, widths, 1)
        bias = _fused_spec(ctx, linears, bias_roles, fused_bias_role, widths, 2)
        for spec in (weight, bias):
            if spec is not None:
                ctx.facts.weights[spec.name] = spec
        first = min(linears, key=lambda n: list(gm.graph.nodes).index(n))
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
