"""fold_gates: weight-only factors of Llama 3.2 Vision folded into the weights they scale.

Expects: a canonical graph (Llama 3.2 Vision's vision function or text functions; other
graphs pass unchanged). Its learned scalar gates appear as `tanh_gate(x, g)` on a linear's
output (gated encoder blocks, the cross-attention layers' attention and MLP, the latter
behind the row-mask multiply) or on a table lookup (tile position embeddings), and as
the `gate` of `positional_embedding`; the encoder's taps are interleaved per channel by
`vision_features` before the projector.
Guarantees: no tanh_gate and no vision_features node is left. Each gate becomes a recipe
step of the weights it scales (evaluated once, at conversion): `["tanh_scale", g, W]`,
`["one_minus_tanh_scale", g, W]`; the taps become a plain `concat` and the projector's
input rows are reordered to match (`["taps_to_blocks", width, taps, W]`). Nothing is
computed per call that the weights already determine.

    %h = linear(%x, %wo)                            %h = linear(%x, %wo')   wo' = tanh(g) * wo
    %y = tanh_gate(%h, %g)                  ==>     (uses of %y read %h)
    %f = vision_features(%final, [%t0, %t1])        %f = concat([%final, %t0, %t1], 3)
    %p = linear(%f, %proj, %b)                      %p = linear(%f, %proj', %b)  rows regrouped
"""
from __future__ import annotations

import torch.fx

from compiler import dialect
from models_ref import vision_ops as vops

from .util import drop_unused_get_attrs

NAME = "fold_gates"


def _single_use(node) -> bool:
    return isinstance(node, torch.fx.Node) and len(node.users) == 1


def _scale(ctx, weight_node, gate_node, kind: str = "tanh_scale") -> None:
    spec = ctx.facts.weights[weight_node.target]
    gate = ctx.facts.weights[gate_node.target]
    spec.recipe = [kind, gate.recipe, spec.recipe]


def _scaled_linear(x):
    """The linear a gate multiplies: x itself, or the linear behind a (row-mask) multiply."""
    if x.target is dialect.linear and _single_use(x):
        return x
    if x.target is dialect.mul and _single_use(x):
        inner = [a for a in x.args if isinstance(a, torch.fx.Node) and a.target is dialect.linear and _single_use(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def _fold_tanh_gate(gm, ctx, node) -> None:
    x, gate = node.args
    linear = _scaled_linear(x)
    if linear is not None:
        for w in linear.args[1:3]:  # weight and bias
            if w is not None:
                _scale(ctx, w, gate)
    elif x.target is vops.aspect_ratio_rows and _single_use(x):
        _scale(ctx, x.args[0], gate)
    else:
        raise ValueError(f"tanh_gate of {x.name} ({dialect.op_name(x)}): no weight to fold the gate into")
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)


def _fold_positional(gm, ctx, node) -> None:
    """x + (1 - tanh g) * local + tanh g * per_tile  ->  x + local' + per_tile'."""
    x, local, per_tile, gate = node.args
    if gate is None:
        return
    if not (per_tile.target is vops.aspect_ratio_rows and _single_use(per_tile)):
        raise ValueError(f"positional_embedding {node.name}: per-tile table is not a lookup")
    _scale(ctx, local, gate, "one_minus_tanh_scale")
    _scale(ctx, per_tile.args[0], gate)
    node.args = (x, local, per_tile, None)


def _fold_taps(gm, ctx, node) -> None:
    final, taps = node.args
    projector = next(iter(node.users))
    if not (_single_use(node) and projector.target is dialect.linear):
        raise ValueError(f"vision_features {node.name} is not read by one projector linear")
    spec = ctx.facts.weights[projector.args[1].target]  # [K, N]: input features on dim 0
    width = spec.shape[0] // (1 + len(taps))
    spec.recipe = ["taps_to_blocks", width, len(taps), spec.recipe]
    with gm.graph.inserting_before(node):
        concat = gm.graph.call_function(dialect.concat, ([final, *taps], 3))
    concat.meta.update(node.meta)
    node.replace_all_uses_with(concat)
    gm.graph.erase_node(node)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is vops.tanh_gate:
            _fold_tanh_gate(gm, ctx, node)
        elif node.target is vops.positional_embedding:
            _fold_positional(gm, ctx, node)
        elif node.target is vops.vision_features:
            _fold_taps(gm, ctx, node)
        else:
            continue
        ctx.counters["fold_gates"] += 1
    drop_unused_get_attrs(gm, ctx)
    return gm
