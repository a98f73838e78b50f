"""The program IR: what `ttcompile` writes and both backends execute.

A Program is data. Tensors are named; an op reads tensor names and literals and writes
output names. In op arguments a string "%name" is a tensor, "$name" (or "$name+32") a
host integer passed per call, anything else a literal. Shapes may contain "S", the
prefill row count, which is fixed per call.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

FORMAT_VERSION = 1
SEQ = "S"
_SCALAR = re.compile(r"^\$([a-z_]+)(?:\+(\d+))?$")


@dataclass
class TensorSpec:
    shape: list  # ints and SEQ
    dtype: str
    layout: str = "TILE"  # TILE | ROW_MAJOR
    memory: str = "DRAM"  # DRAM | L1
    kind: str = "activation"  # input | weight | state | activation
    layer: int | None = None
    placement: dict | None = None  # {"dim", "axes", "partial"}; None: replicated

    def concrete(self, seq: int | None) -> tuple[int, ...]:
        return tuple(concrete_dim(d, seq) for d in self.shape)


@dataclass
class InputSpec:
    """A per-call input: built on the host from a named host array (`source`)."""

    name: str
    source: str  # "tokens" | "positions"
    shape: list
    dtype: str
    layout: str = "ROW_MAJOR"


@dataclass
class Op:
    op: str
    args: list
    kwargs: dict
    out: list[str]
    node: str = ""
    layer: int | None = None


@dataclass
class Function:
    name: str
    inputs: list[InputSpec]
    scalars: list[str]
    outputs: list[str]
    ops: list[Op]
    tensors: dict[str, TensorSpec] = field(default_factory=dict)  # activations + inputs


@dataclass
class Program:
    target: str
    mesh_shape: list[int]
    model: dict
    options: dict
    weights: dict[str, dict]  # name -> WeightSpec.to_json()
    state: dict[str, TensorSpec]
    functions: dict[str, Function]
    format_version: int = FORMAT_VERSION
    # compiler.memory.MemoryPlan.to_json(): bytes per chip by category, max context and
    # prefill chunk, collectives per layer (informational; the runtime needs none of it)
    memory_plan: dict = field(default_factory=dict)
    # passes/precision.py's choice: {"mode", "policy": {field: dtype or fidelity}, "rules": [why]}
    precision: dict = field(default_factory=dict)
    # Data parallel (compiler/data_parallel.py): {"count", "system", "system_mesh_shape",
    # "submesh_shape" (carved from the system's mesh), "mesh_shape" (the replica's, as
    # `mesh_shape`), "batch_size" (each replica's users)}; empty for a single program.
    replicas: dict = field(default_factory=dict)

    # -------------------------------------------------------------- (de)serialisation
    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def dumps(self) -> str:
        """program.json's text: compact (json's C encoder; indenting a 70B program's ~6 MB
        takes a second in the pure-Python one): `python -m json.tool` pretty-prints it,
        `ttcompile --emit python` prints it as ttnn calls. Same content as to_json()."""
        return json.dumps(self, default=vars)

    @classmethod
    def from_json(cls, data: dict) -> "Program":
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"program format {data.get('format_version')} is not {FORMAT_VERSION}")
        functions = {}
        for name, f in data["functions"].items():
            functions[name] = Function(
                name=f["name"],
                inputs=[InputSpec(**i) for i in f["inputs"]],
                scalars=list(f["scalars"]),
                outputs=list(f["outputs"]),
                ops=[Op(**o) for o in f["ops"]],
                tensors={k: TensorSpec(**v) for k, v in f["tensors"].items()},
            )
        return cls(
            target=data["target"], mesh_shape=list(data["mesh_shape"]), model=data["model"],
            options=data["options"], weights=data["weights"],
            state={k: TensorSpec(**v) for k, v in data["state"].items()},
            functions=functions, format_version=data["format_version"],
            memory_plan=data.get("memory_plan") or {},
            precision=data.get("precision") or {},
            replicas=data.get("replicas") or {},
        )

    def replica_program(self) -> "Program":
        """The program one data-parallel replica runs: these functions with the options of
        a single program on the replica's sub-mesh (its target, its batch). Itself when
        the program is not replicated."""
        if not self.replicas:
            return self
        options = {**self.options, "target": self.target, "batch_size": self.replicas["batch_size"],
                   "data_parallel": 1}
        return dataclasses.replace(self, options=options, replicas={})

    @classmethod
    def loads(cls, text: str) -> "Program":
        return cls.from_json(json.loads(text))


def concrete_dim(dim, seq: int | None):
    """An int, "S" (the prefill row count) or "S/k" (rows per k, e.g. blocks of a chunk)."""
    if dim == SEQ:
        return seq
    if isinstance(dim, str) and dim.startswith(SEQ + "/"):
        return seq // int(dim[2:])
    return dim


# ------------------------------------------------------------------ argument helpers
def is_tensor_ref(a) -> bool:
    return isinstance(a, str) and a.startswith("%")


def tensor_name(a: str) -> str:
    return a[1:]


def resolve_scalar(a, scalars: dict[str, int]):
    """Literal or "$name[+k]" -> value; lists are resolved element-wise."""
    if isinstance(a, list):
        return [resolve_scalar(x, scalars) for x in a]
    if isinstance(a, str):
        m = _SCALAR.match(a)
        if m:
            return scalars[m.group(1)] + int(m.group(2) or 0)
    return a


def tensor_refs(op: Op) -> list[str]:
    """Names of the tensors an op reads, in argument order."""
    refs = [tensor_name(a) for a in op.args if is_tensor_ref(a)]
    refs += [tensor_name(v) for v in op.kwargs.values() if is_tensor_ref(v)]
    return refs


def is_ref_list(value) -> bool:
    """A list of tensor references (ttnn.concat's tensors)."""
    return isinstance(value, list) and bool(value) and all(is_tensor_ref(v) for v in value)


def op_tensor_refs(op: Op) -> list[tuple[str, str]]:
    """(parameter name, tensor name) of every tensor an op reads, each one of a list too;
    positional arguments are named by the op table (lowering/optable.py)."""
    from .optable import OPS

    params = OPS[op.op].params if op.op in OPS else ()
    named = [(params[i] if i < len(params) else str(i), a) for i, a in enumerate(op.args)] + list(op.kwargs.items())
    return [(param, tensor_name(r)) for param, a in named
            for r in (a if is_ref_list(a) else [a] if is_tensor_ref(a) else [])]
