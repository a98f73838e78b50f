"""Readable text for graphs between passes (MLIR's -print-ir-after, in spirit)."""
from __future__ import annotations

import torch
import torch.fx

from .dialect import op_name
from .facts import LAYER, PLACEMENT, PRECISION, REPLICATED, VAL


def _type(node) -> str:
    val = node.meta.get(VAL)
    if isinstance(val, torch.Tensor):
        text = "x".join(str(d) for d in val.shape) or "scalar"
    elif isinstance(val, (tuple, list)):
        text = ", ".join("x".join(str(d) for d in v.shape) for v in val if isinstance(v, torch.Tensor))
        text = f"({text})"
    else:
        text = type(val).__name__
    prec = node.meta.get(PRECISION)
    text = f"{text} {prec.dtype}" if prec else text
    placement = node.meta.get(PLACEMENT)
    return f"{text} {placement}" if placement is not None and placement != REPLICATED else text


def _arg(a) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    return repr(a)


def graph_text(gm: torch.fx.GraphModule, ctx, header: str) -> str:
    lines = [f"// ----- {header} -----"]
    for node in gm.graph.nodes:
        layer = node.meta.get(LAYER)
        where = f"  // layer {layer}" if layer is not None else ""
        if node.op == "placeholder":
            lines.append(f"%{node.name} = input : {_type(node)}")
        elif node.op == "get_attr":
            spec = ctx.facts.weights.get(node.target) or ctx.facts.state.get(node.target)
            kind = "state" if node.target in ctx.facts.state else "weight"
            placed = "" if spec.placement == REPLICATED else f" {spec.placement}"
            lines.append(f"%{node.name} = {kind} \"{node.target}\" : "
                         f"{'x'.join(map(str, spec.shape))} {spec.dtype}{placed}{where}")
        elif node.op == "call_function":
            args = ", ".join(_arg(a) for a in node.args)
            lines.append(f"%{node.name} = {op_name(node)}({args}) : {_type(node)}{where}")
        elif node.op == "output":
            lines.append(f"return {_arg(node.args[0])}")
    return "\n".join(lines) + "\n"
