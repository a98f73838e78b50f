"""canonicalize: bring the traced graph into the compiler's dialect (compiler/dialect.py).

Expects: a graph fresh from compiler.trace (nn.Linear and nn.LayerNorm modules as
call_module, operator add/mul, F.silu/F.gelu, reference leaves, get_attr for every
weight, rope table and cache).
Guarantees: every call_function targets a DIALECT op; linears read `[K, N]` weights (the
transpose of the checkpoint's `[out, in]`, recorded in the weight recipe, as ttnn.linear
takes them) with biases as `[1, N]`; unused placeholders are gone; every node carries
LAYER (its decoder layer, None for embedding and head).

    %q = call_module[layers.0.attention.wq](%x)          %w = get_attr[layers.0.attention.wq.weight]
                                               ==>       %q = linear(%x, %w, None)
    %a = operator.add(%x, %y)                            %a = add(%x, %y)
"""
from __future__ import annotations

import operator
import re

import torch.fx
import torch.nn.functional as F
from torch import nn

from compiler import dialect
from compiler.facts import LAYER

from .util import drop_unused_get_attrs, get_attr, layer_of_name, replace

NAME = "canonicalize"

_FUNCTIONS = {operator.add: dialect.add, operator.mul: dialect.mul, F.silu: dialect.silu, F.gelu: dialect.gelu}


def _layer_norm(gm, ctx, node: torch.fx.Node, module: nn.LayerNorm) -> None:
    weight = get_attr(gm, node, f"{node.target}.weight")
    bias = get_attr(gm, node, f"{node.target}.bias")
    replace(gm, node, dialect.layer_norm, (node.args[0], weight, bias, module.eps))


def _module(gm, ctx, node: torch.fx.Node) -> None:
    module = gm.get_submodule(node.target)
    if isinstance(module, nn.LayerNorm):
        _layer_norm(gm, ctx, node, module)
    elif isinstance(module, nn.Linear):
        _linear(gm, ctx, node, module)
    else:
        raise TypeError(f"no dialect form for module {type(module).__name__} ({node.target})")


def _linear(gm, ctx, node: torch.fx.Node, module: nn.Linear) -> None:
    weights = ctx.facts.weights
    w = weights[f"{node.target}.weight"]
    w.shape, w.recipe = w.shape[::-1], ["transpose", w.recipe]
    bias = None
    if module.bias is not None:
        b = weights[f"{node.target}.bias"]
        b.shape, b.recipe = (1, b.shape[0]), ["reshape", [1, -1], b.recipe]
        bias = get_attr(gm, node, b.name)
    weight = get_attr(gm, node, w.name)
    replace(gm, node, dialect.linear, (node.args[0], weight, bias))


_MODULE_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def _module_layer(node: torch.fx.Node) -> int | None:
    """The decoder layer whose module called this node at trace time (None: the top level)."""
    for key, value in reversed(list(node.meta.get("nn_module_stack", {}).items())):
        path = value[0] if isinstance(value, tuple) else key
        m = _MODULE_LAYER.search(str(path))
        if m:
            return int(m.group(1))
    return None


def _annotate_layers(gm: torch.fx.GraphModule) -> None:
    """A node belongs to the decoder layer whose module ran it (the tracer's module
    stack), so the residual add closing layer i is in layer i and the final norm's input
    slice is in none. Graphs without module stacks (built by hand): a node with a weight
    input belongs to that weight's layer, others to their inputs'."""
    traced = any("nn_module_stack" in n.meta for n in gm.graph.nodes)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            node.meta[LAYER] = layer_of_name(node.target)
            continue
        if traced:
            node.meta[LAYER] = _module_layer(node)
            continue
        inputs = node.all_input_nodes
        weight_layers = [n.meta[LAYER] for n in inputs if n.op == "get_attr"]
        if weight_layers:
            node.meta[LAYER] = weight_layers[0]
        else:
            layers = [n.meta.get(LAYER) for n in inputs if n.meta.get(LAYER) is not None]
            node.meta[LAYER] = max(layers) if layers else None


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            _module(gm, ctx, node)
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            replace(gm, node, _FUNCTIONS[node.target], node.args)
        elif node.op == "placeholder" and not node.users:
            gm.graph.erase_node(node)
    drop_unused_get_attrs(gm, ctx)
    # Weights now live in ctx.facts only; get_attr targets name entries there.
    for name, _ in list(gm.named_children()):
        delattr(gm, name)
    _annotate_layers(gm)
    ctx.counters["canonicalize.linears"] = sum(
        1 for n in gm.graph.nodes if n.target is dialect.linear)
    return gm
