"""Facts that passes attach to fx nodes and to the weight table: declared once, typed.

node.meta keys:
- VAL: a meta tensor (or tuple of them) with the node's per-program shape and torch dtype,
  refreshed by `compiler.shapes.propagate` after every pass.
- PRECISION: a `Precision`, the device dtype and math fidelity of the node's output.
- LAYER: the decoder layer the node came from (None for embedding and head).
- PLACEMENT: a `Placement`, how the node's value is laid out over the mesh (set by shard).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from models_ref.names import Role

VAL = "val"
PRECISION = "tt_precision"
LAYER = "tt_layer"
PLACEMENT = "tt_placement"

DEVICE_DTYPES = ("float32", "bfloat16", "bfloat8_b", "bfloat4_b", "uint32", "int32")
FIDELITIES = ("LoFi", "HiFi2", "HiFi3", "HiFi4")


@dataclass(frozen=True)
class Precision:
    """A node's output dtype and its kernel settings: math fidelity, fp32 accumulation in
    the Dst register, packer L1 accumulation (ttnn's WormholeComputeKernelConfig)."""

    dtype: str = "bfloat16"
    fidelity: str = "HiFi4"
    fp32_acc: bool = True
    packer_l1_acc: bool = True

    def __post_init__(self):
        if self.dtype not in DEVICE_DTYPES or self.fidelity not in FIDELITIES:
            raise ValueError(f"no such device precision: {self.dtype}, {self.fidelity}")


@dataclass(frozen=True)
class Placement:
    """How a tensor lies on the mesh. `dim` is the tensor dim split evenly over the chips
    of mesh `axes` (flattened row-major), None when every chip holds all of it. `partial`
    marks per-chip partial sums that a reduction must still add up."""

    dim: int | None = None
    axes: tuple[int, ...] = ()
    partial: bool = False

    def local_shape(self, shape, mesh_shape) -> tuple[int, ...]:
        shape = tuple(shape)
        if self.dim is None:
            return shape
        parts = 1
        for axis in self.axes:
            parts *= mesh_shape[axis]
        if shape[self.dim] % parts:
            raise ValueError(f"{shape} does not split evenly as {self}")
        return shape[: self.dim] + (shape[self.dim] // parts,) + shape[self.dim + 1:]

    def to_json(self) -> dict:
        return {"dim": self.dim, "axes": list(self.axes), "partial": self.partial}

    def __str__(self) -> str:
        if self.partial:
            return "partial"
        return "replicated" if self.dim is None else f"shard(dim={self.dim}, axes={list(self.axes)})"


REPLICATED = Placement()


@dataclass(frozen=True)
class FusedPart:
    """One projection inside a fused weight (wq inside wqkv): its role, recipe and width
    along the fused (last) dim. Later passes regroup parts by role, never by position."""

    role: Role
    recipe: list
    width: int


@dataclass
class WeightSpec:
    """A device tensor that is not computed by the program: weights and constants.

    `role` says what it is (models_ref/names.py; set once, when the graph is traced);
    `recipe` says how to build it from the checkpoint's canonical tensors (or from a
    compile-time constant) as a small JSON-able expression; `convert` evaluates it.
    `fused` lists the projections a fused weight concatenates along its last dim.
    """

    name: str
    shape: tuple[int, ...]
    recipe: list
    dtype: str = "bfloat16"
    layout: str = "TILE"
    layer: int | None = None
    placement: Placement = REPLICATED  # `shape` is the whole (global) tensor
    role: Role | None = None
    fused: tuple[FusedPart, ...] = ()

    def part(self, *roles: Role) -> FusedPart:
        """The fused part with one of `roles` (e.g. WQ or BQ)."""
        return next(p for p in self.fused if p.role in roles)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "layout": self.layout,
                "recipe": self.recipe, "layer": self.layer, "placement": self.placement.to_json(),
                "role": self.role.value if self.role else None}


def weight_spec(name: str, shape, recipe: list, **fields) -> WeightSpec:
    """A WeightSpec whose role and layer come from the name table (models_ref/names.py)."""
    from models_ref.names import role_of

    found = role_of(name)
    if found is None:
        raise KeyError(f"'{name}' is not in the weight name table (models_ref/names.py)")
    role, layer = found
    return WeightSpec(name, tuple(shape), recipe, layer=layer, role=role, **fields)


@dataclass
class StateSpec:
    """Device-resident state the program reads and writes across calls (KV caches)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "bfloat16"
    layer: int | None = None
    init: str = "zeros"
    placement: Placement = REPLICATED
    role: Role | None = None


@dataclass
class GraphFacts:
    """Facts about the whole graph, owned by the pass context."""

    weights: dict[str, WeightSpec] = field(default_factory=dict)
    state: dict[str, StateSpec] = field(default_factory=dict)
    # compiler.memory.MemoryPlan: bytes per chip, fit decisions (set by the last pass)
    memory: object | None = None
    # the precision policy chosen and why (set by passes/precision.py)
    precision: dict | None = None
