"""The graph verifier: invariants every pass must keep. Run after each pass in tests and
with `ttcompile --verify`. It raises VerifyError naming the pass and the node."""
from __future__ import annotations

import operator

import torch
import torch.fx

from models_ref import ops as ref
from models_ref import vision_ops as vops

from . import dialect
from .errors import InternalCompilerError
from .facts import DEVICE_DTYPES, LAYER, PLACEMENT, PRECISION, REPLICATED, VAL

BLOCK_FLOATS = ("bfloat8_b", "bfloat4_b")


class VerifyError(InternalCompilerError):
    """A graph breaks an invariant: the pass that made it has a bug."""

    def __init__(self, after: str, mode: str, node: str | None, detail: str):
        super().__init__(f"the verifier after pass '{after}'", mode, node, detail)


class _Violation(Exception):
    """Raised by _require inside the per-node checks; verify() turns it into a VerifyError
    naming the pass and node. Plain raises, not asserts: it works under `python -O`."""


def _require(condition, message) -> None:
    if not condition:
        raise _Violation(message)


def _shape(node) -> tuple:
    val = node.meta.get(VAL)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def _check_linear(node):
    x, w = _shape(node.args[0]), _shape(node.args[1])
    _require(len(w) == 2 and x[-1] == w[0], f"linear: input {x} does not match weight {w}")
    _require(_shape(node) == x[:-1] + (w[1],), f"linear: output {_shape(node)}")
    bias = node.args[2] if len(node.args) > 2 else None
    if bias is not None:
        _require(_shape(bias) == (1, w[1]), f"linear: bias {_shape(bias)} for weight {w}")


def _check_rms_norm(node):
    x, w = _shape(node.args[0]), _shape(node.args[1])
    _require(w == (x[-1],) or w[-1] * (w[-2] if len(w) > 1 else 1) == x[-1], f"rms_norm: {x} vs weight {w}")


def _check_same_shape(node):
    """Elementwise operands have one shape, or one broadcasts over the other along dims
    of size 1 (a per-tile row, a per-row mask); the result has the larger shape."""
    a, b = _shape(node.args[0]), _shape(node.args[1])
    try:
        out = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        out = None
    _require(out is not None and out in (a, b) and len(a) == len(b),
             f"{dialect.op_name(node)}: operand shapes differ {a} vs {b}")


def _check_qkv_heads(node):
    x = _shape(node.args[0])
    _, n_heads, n_kv, head_dim, _ = node.args
    _require(x[-1] == (n_heads + 2 * n_kv) * head_dim, f"qkv_heads: width {x[-1]} vs heads")


def _check_gated_mlp(node):
    x, w1, w3 = (_shape(a) for a in node.args)
    _require(w1 == w3 and x[-1] == w1[0], f"gated_mlp: {x}, w1 {w1}, w3 {w3}")


def _check_cache_write(node):
    cache, kv = _shape(node.args[0]), _shape(node.args[1])
    _require(len(cache) == 4 and len(kv) == 4 and cache[-1] == kv[-1], f"cache write: {cache} <- {kv}")


SHAPE_RULES = {
    dialect.linear: _check_linear,
    ref.rms_norm: _check_rms_norm,
    dialect.add: _check_same_shape,
    dialect.mul: _check_same_shape,
    dialect.qkv_heads: _check_qkv_heads,
    dialect.gated_mlp: _check_gated_mlp,
    ref.fill_cache: _check_cache_write,
    ref.update_cache: _check_cache_write,
    dialect.paged_fill_cache: _check_cache_write,
    dialect.paged_update_cache: _check_cache_write,
}

# Operand positions that may read a block-float weight (ttnn only takes those in matmuls).
_BLOCK_FLOAT_READERS = {dialect.linear: (1,), dialect.gated_mlp: (1, 2),
                        ref.fill_cache: (0,), ref.update_cache: (0,),
                        ref.decode_attention: (1, 2), dialect.paged_fill_cache: (0,),
                        dialect.paged_update_cache: (0,), dialect.chunked_attention: (1, 2),
                        dialect.paged_decode_attention: (1, 2), vops.cross_attention: (1, 2),
                        vops.cross_attention_decode: (1, 2)}


def _placement(node):
    return node.meta.get(PLACEMENT, REPLICATED)


def _check_placements(node):
    """Where placements meet, they must agree (the shard pass's collectives make them)."""
    target, args = node.target, node.args
    if target in (dialect.add, dialect.mul):
        a, b = _placement(args[0]), _placement(args[1])
        _require(a == b and not a.partial, f"operands placed {a} and {b}")
    elif target is ref.rms_norm:
        x = _placement(args[0])  # normalised over its last dim, which must be whole on every chip
        _require(not x.partial and x.dim in (None, *range(len(_shape(args[0])) - 1)), f"norm of a {x} tensor")
    elif target is dialect.linear:
        x, w = _placement(args[0]), _placement(args[1])
        if w.dim == 0:
            _require(x.dim == 3 and x.axes == w.axes, f"row-parallel linear reads a {x} input")
        else:
            _require(x == REPLICATED, f"column-parallel linear reads a {x} input")
    elif target is dialect.all_reduce:
        source = args[0]
        _require(_placement(source).partial, f"all_reduce of a {_placement(source)} tensor")


def _check_node(node, facts, precise: bool, mesh_shape=(1, 1)):
    if node.op == "get_attr":
        spec = facts.weights.get(node.target) or facts.state.get(node.target)
        _require(spec is not None, f"get_attr '{node.target}' names no weight or state")
        _require(node.users, "dead get_attr: nothing reads it, yet its weight would be converted")
        local = spec.placement.local_shape(spec.shape, mesh_shape)
        _require(tuple(local) == _shape(node), f"'{node.target}': spec {local} vs {_shape(node)}")
        if precise:
            _require(spec.dtype in DEVICE_DTYPES, f"'{node.target}': dtype {spec.dtype}")
            if spec.dtype in BLOCK_FLOATS:
                for user in node.users:
                    slots = _BLOCK_FLOAT_READERS.get(user.target, ())
                    _require(any(user.args[i] is node for i in slots if i < len(user.args)), (
                        f"block-float '{node.target}' read by {user.name}, which needs bfloat16"))
        return
    if node.op != "call_function":
        return
    _require(node.target in dialect.DIALECT.values(), f"op {node.target} is not in the dialect")
    _require(VAL in node.meta, "no shape (propagation did not reach it)")
    _require(LAYER in node.meta, "no layer annotation")
    if not node.users and node.target not in dialect.SIDE_EFFECTS:
        raise _Violation("dead node")
    if node.target is operator.getitem:
        return
    if precise:
        _require(isinstance(node.meta.get(PRECISION), object) and PRECISION in node.meta, "no precision")
    rule = SHAPE_RULES.get(node.target)
    if rule:
        rule(node)
    if PLACEMENT in node.meta:
        _check_placements(node)


def verify(gm: torch.fx.GraphModule, ctx, after: str, precise: bool) -> None:
    """Check every node; `precise` once the precision pass has run."""
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise VerifyError(after, ctx.mode, None, f"graph has {len(outputs)} outputs")
    for node in gm.graph.nodes:
        try:
            _check_node(node, ctx.facts, precise, ctx.target.mesh_shape)
        except _Violation as e:
            raise VerifyError(after, ctx.mode, node.name, str(e)) from None
    for name, spec in ctx.facts.weights.items():
        if not any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
            raise VerifyError(after, ctx.mode, None, f"weight '{name}' is read by no node")
