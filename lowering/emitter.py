"""The lowering's emitter: names, shapes and ops of the Function being written. Rules
(lowering/lower.py, lowering/vision_rules.py) call it; it checks every op against the
table (lowering/optable.py) as it is emitted."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from compiler.facts import LAYER, PLACEMENT, PRECISION, REPLICATED, VAL

from .optable import check_op
from .program import SEQ, Function, Op, TensorSpec

TILE = 32
TRANS_MAT = "rope_trans_mat"


def compute_config(fidelity: str, fp32_acc: bool = True, packer_l1_acc: bool = True) -> dict:
    return {"math_fidelity": fidelity, "fp32_dest_acc_en": fp32_acc, "packer_l1_acc": packer_l1_acc}


def kernel_config(precision) -> dict:
    """The compute_kernel_config of a node's PRECISION fact (passes/precision.py)."""
    return compute_config(precision.fidelity, precision.fp32_acc, precision.packer_l1_acc)


@dataclass
class Lowering:
    gm: torch.fx.GraphModule
    ctx: object
    fn: Function
    names: dict = field(default_factory=dict)  # fx node -> tensor name (or list of names)
    alt_shapes: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- shapes
    def shape_of(self, node: torch.fx.Node, index: int | None = None) -> list:
        val, alt = node.meta[VAL], self.alt_shapes.get(node.name)
        if index is not None:
            val, alt = val[index], (alt[index] if alt is not None else None)
        dims = list(val.shape)
        if alt is not None:
            dims = [SEQ if a != b else a for a, b in zip(dims, alt)]
        return dims

    def dtype_of(self, node) -> str:
        return node.meta[PRECISION].dtype

    # ---------------------------------------------------------------- emission
    def tensor(self, name: str, shape, dtype: str, node, layout="TILE") -> str:
        placement = node.meta.get(PLACEMENT, REPLICATED) if node is not None else REPLICATED
        self.fn.tensors[name] = TensorSpec(
            list(shape), dtype, layout, "DRAM", "activation",
            node.meta.get(LAYER) if node is not None else None,
            None if placement == REPLICATED else placement.to_json())
        return name

    def emit(self, node, op: str, args: list, kwargs: dict | None = None, out=()) -> list[str]:
        kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}
        check_op(op, args, kwargs)
        self.fn.ops.append(Op(op, args, kwargs, list(out), node.name, node.meta.get(LAYER)))
        return list(out)

    def ref(self, node) -> str:
        name = self.names[node]
        assert isinstance(name, str), f"{node.name} is not a single tensor"
        return "%" + name

    def out_name(self, node, suffix: str = "") -> str:
        return f"{node.name}{suffix}"

    def result(self, node, op, args, kwargs=None, layout="TILE") -> str:
        """Emit `op` producing the node's value (its own shape and dtype)."""
        name = self.tensor(self.out_name(node), self.shape_of(node), self.dtype_of(node), node, layout)
        self.emit(node, op, args, kwargs, [name])
        self.names[node] = name
        return name
