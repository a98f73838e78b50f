"""fuse_mlp: the gated MLP's gate and up projections, with SiLU, as one op.

Expects: canonical graph with `mul(silu(linear(x, w1)), linear(x, w3))` per layer.
Guarantees: `gated_mlp(x, w1, w3)` in its place. w1 and w3 stay two weights (sharded the
same way, quantised the same way); the lowering emits them as two matmuls that share the
input and a multiply with SiLU fused on its first operand, as ttnn does best.

    %g = linear(%x, %w1); %s = silu(%g)
    %u = linear(%x, %w3); %m = mul(%s, %u)     ==>    %m = gated_mlp(%x, %w1, %w3)
"""
from __future__ import annotations

import torch.fx

from compiler import dialect

from .util import replace

NAME = "fuse_mlp"


def _bias_free_linear(node) -> bool:
    return (isinstance(node, torch.fx.Node) and node.target is dialect.linear
            and len(node.users) == 1 and (len(node.args) < 3 or node.args[2] is None))


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not dialect.mul:
            continue
        act, up = node.args
        if not (isinstance(act, torch.fx.Node) and act.target is dialect.silu and len(act.users) == 1):
            continue
        gate = act.args[0]
        if not (_bias_free_linear(gate) and _bias_free_linear(up) and gate.args[0] is up.args[0]):
            continue
        replace(gm, node, dialect.gated_mlp, (gate.args[0], gate.args[1], up.args[1]))
        for dead in (act, gate, up):
            gm.graph.erase_node(dead)
        ctx.counters["fuse_mlp"] += 1
    return gm
