"""What a pass sees: the model config, the target row, the options, and the graph's facts."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from models_ref.config import ModelConfig

from .facts import GraphFacts
from .options import CompileOptions
from .targets import Target


@dataclass
class PassContext:
    cfg: ModelConfig
    target: Target
    options: CompileOptions
    mode: str  # "prefill" | "decode"
    max_seq_len: int
    seq_rows: int  # the row count the graph is propagated with (see trace.SEQ_ROWS)
    facts: GraphFacts = field(default_factory=GraphFacts)
    # Placeholder name -> shape as a function of the row count (prefill: S; decode: ignored).
    input_shapes: dict = field(default_factory=dict)
    input_dtypes: dict = field(default_factory=dict)  # placeholder name -> torch dtype (default int64)
    example_inputs: dict = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    # Weights of the program's functions compiled before this one (name -> WeightSpec) and
    # their peak activations: the memory plan counts them (Llama 3.2 Vision's tower).
    resident: dict = field(default_factory=dict)
    other_activation_bytes: int = 0
    # Set by the driver: every decoder layer's precision (passes/precision.PrecisionPlan)
    # and which traced layer each decoder layer is stamped from (lowering/stamp.LayerPlan).
    # None: the mode's policy alone, and a graph of all layers or of alike ones.
    precision_plan: object | None = None
    layer_plan: object | None = None

    @property
    def decode(self) -> bool:
        return self.mode == "decode"

    def inputs_at(self, rows: int) -> dict:
        """Meta example inputs for every tensor placeholder at a given row count."""
        import torch
        return {name: torch.empty(shape(rows), dtype=self.input_dtypes.get(name, torch.int64), device="meta")
                for name, shape in self.input_shapes.items()}

    def add_input(self, name: str, shape, dtype=None) -> None:
        """Declare a tensor placeholder (`shape(rows) -> tuple`; ids and positions are
        integers unless `dtype` says otherwise, e.g. pixels and masks)."""
        self.input_shapes[name] = shape
        if dtype is not None:
            self.input_dtypes[name] = dtype
        self.example_inputs = self.inputs_at(self.seq_rows)

    def propagate(self, gm, inputs: dict | None = None) -> None:
        """Refresh node.meta[VAL] (per-chip shapes) by running the graph on meta tensors."""
        from .shapes import propagate
        propagate(gm, self.facts, self.example_inputs if inputs is None else inputs,
                  self.target.mesh_shape)
