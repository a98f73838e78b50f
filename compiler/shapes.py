"""Shape propagation over a graph on meta tensors: node.meta[VAL] for every node.

Ops with a shape rule (compiler/shape_rules.py) get their result from it; the others run
on meta tensors."""
from __future__ import annotations

import torch
import torch.fx

from . import shape_rules
from .facts import VAL, GraphFacts

# Tiny fixed values for scalar placeholders during propagation.
SCALAR_EXAMPLES = {"user_id": 0, "last_index": 0, "chunk_start": 0, "aspect_ratio_id": 1}


class _MetaInterpreter(torch.fx.Interpreter):
    def __init__(self, gm, facts: GraphFacts, mesh_shape):
        super().__init__(gm)
        self.facts, self.mesh_shape = facts, mesh_shape

    def get_attr(self, target, args, kwargs):
        spec = self.facts.weights.get(target) or self.facts.state.get(target)
        if spec is None:
            raise KeyError(f"get_attr '{target}' names no weight or state")
        # Graphs are per chip: a sharded weight is seen at its local shape.
        local = spec.placement.local_shape(spec.shape, self.mesh_shape)
        return torch.empty(local, dtype=torch.float32, device="meta")

    def call_function(self, target, args, kwargs):
        out = shape_rules.function_result(target, args, kwargs)
        return super().call_function(target, args, kwargs) if out is None else out

    def call_module(self, target, args, kwargs):
        out = shape_rules.module_result(self.fetch_attr(target), args, kwargs)
        return super().call_module(target, args, kwargs) if out is None else out

    def run_node(self, n):
        result = super().run_node(n)
        n.meta[VAL] = result
        return result


def propagate(gm: torch.fx.GraphModule, facts: GraphFacts, inputs: dict[str, object],
              mesh_shape=(1, 1)) -> None:
    """Run the graph on meta tensors; `inputs` maps placeholder names to example values."""
    args = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.target in inputs:
                args.append(inputs[node.target])
            elif node.target in SCALAR_EXAMPLES:
                args.append(SCALAR_EXAMPLES[node.target])
            else:  # an optional input this model does not use (e.g. xattn_mask): its default
                args.append(node.args[0] if node.args else None)
    with torch.no_grad():  # shapes only: no autograd graph
        _MetaInterpreter(gm, facts, mesh_shape).run(*args)
