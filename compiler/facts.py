"""Facts that passes attach to fx nodes and to the weight table: declared once, typed.

node.meta keys:
- VAL: a meta tensor (or tuple of them) with the node's per-program shape and torch dtype,
  refreshed by `compiler.shapes.propagate` after every pass.
- PRECISION: a `Precision`, the device dtype and math fidelity of the node's output.
- LAYER: the decoder layer the node came from (None for embedding and head).
"""
from __future__ import annotations

from dataclasses import dataclass, field

VAL = "val"
PRECISION = "tt_precision"
LAYER = "tt_layer"

DEVICE_DTYPES = ("float32", "bfloat16", "bfloat8_b", "bfloat4_b", "uint32", "int32")
FIDELITIES = ("LoFi", "HiFi2", "HiFi3", "HiFi4")


@dataclass(frozen=True)
class Precision:
    dtype: str = "bfloat16"
    fidelity: str = "HiFi4"

    def __post_init__(self):
        assert self.dtype in DEVICE_DTYPES, self.dtype
        assert self.fidelity in FIDELITIES, self.fidelity


@dataclass
class WeightSpec:
    """A device tensor that is not computed by the program: weights and constants.

    `recipe` says how to build it from the checkpoint's canonical tensors (or from a
    compile-time constant) as a small JSON-able expression; `convert` evaluates it.
    """

    name: str
    shape: tuple[int, ...]
    recipe: list
    dtype: str = "bfloat16"
    layout: str = "TILE"
    layer: int | None = None

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "layout": self.layout,
                "recipe": self.recipe, "layer": self.layer}


@dataclass
class StateSpec:
    """Device-resident state the program reads and writes across calls (KV caches)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "bfloat16"
    layer: int | None = None
    init: str = "zeros"


@dataclass
class GraphFacts:
    """Facts about the whole graph, owned by the pass context."""

    weights: dict[str, WeightSpec] = field(default_factory=dict)
    state: dict[str, StateSpec] = field(default_factory=dict)
