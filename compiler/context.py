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
    example_inputs: dict = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)

    @property
    def decode(self) -> bool:
        return self.mode == "decode"

    def propagate(self, gm, inputs: dict | None = None) -> None:
        """Refresh node.meta[VAL] (per-chip shapes) by running the graph on meta tensors."""
        from .shapes import propagate
        propagate(gm, self.facts, self.example_inputs if inputs is None else inputs,
                  self.target.mesh_shape)
