"""Shape propagation over a graph on meta tensors: node.meta[VAL] for every node."""
from __future__ import annotations

import torch
import torch.fx

from .facts import VAL, GraphFacts

# Tiny fixed values for scalar placeholders during propagation.
SCALAR_EXAMPLES = {"user_id": 0, "last_index": 0}


class _MetaInterpreter(torch.fx.Interpreter):
    def __init__(self, gm, facts: GraphFacts):
        super().__init__(gm)
        self.facts = facts

    def get_attr(self, target, args, kwargs):
        spec = self.facts.weights.get(target) or self.facts.state.get(target)
        if spec is None:
            raise KeyError(f"get_attr '{target}' names no weight or state")
        dtype = torch.float32
        return torch.empty(spec.shape, dtype=dtype, device="meta")

    def run_node(self, n):
        result = super().run_node(n)
        n.meta[VAL] = result
        return result


def propagate(gm: torch.fx.GraphModule, facts: GraphFacts, inputs: dict[str, object]) -> None:
    """Run the graph on meta tensors; `inputs` maps placeholder names to example values."""
    args = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.target in inputs:
                args.append(inputs[node.target])
            else:
                args.append(SCALAR_EXAMPLES[node.target])
    _MetaInterpreter(gm, facts).run(*args)
