"""Small helpers shared by passes (no rewrites here)."""
from __future__ import annotations

import re
import warnings

import torch.fx

from compiler.facts import LAYER

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def layer_of_name(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def get_attr(gm: torch.fx.GraphModule, before: torch.fx.Node, name: str) -> torch.fx.Node:
    """A get_attr node for weight/state `name`, placed before `before`."""
    with gm.graph.inserting_before(before), warnings.catch_warnings():
        # Weights live in the pass context, not on the GraphModule: fx's warning is moot.
        warnings.simplefilter("ignore", UserWarning)
        node = gm.graph.get_attr(name)
    node.meta[LAYER] = layer_of_name(name)
    return node


def replace(gm: torch.fx.GraphModule, old: torch.fx.Node, target, args, kwargs=None) -> torch.fx.Node:
    """Replace `old` by call_function(target, args), keeping its layer and module stack."""
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(target, tuple(args), kwargs or {})
    new.meta[LAYER] = old.meta.get(LAYER)
    if "nn_module_stack" in old.meta:  # where the tracer saw it (canonicalize reads it)
        new.meta["nn_module_stack"] = old.meta["nn_module_stack"]
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def users_of_target(node: torch.fx.Node, target) -> list[torch.fx.Node]:
    return [u for u in node.users if u.op == "call_function" and u.target is target]


def drop_unused_get_attrs(gm: torch.fx.GraphModule, ctx) -> None:
    """Erase get_attr nodes nobody reads and forget weights no node names any more."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    live = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [w for w in ctx.facts.weights if w not in live]:
        del ctx.facts.weights[name]
    for name in [s for s in ctx.facts.state if s not in live]:
        del ctx.facts.state[name]
