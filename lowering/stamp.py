"""Layer stamping: compile two decoder layers, write the other N-2 from the second.

Decoder layers differ only in their index, so the driver traces a model of TRACED_LAYERS
layers, runs the pass pipeline and the lowering on it once, and `stamp` writes layers
2..N-1 of the program by copying layer 1 with its index changed: the ops (op.layer, the
layer's activation tensors `l1.*`, its weights and caches `layers.1.*`), the tensor specs,
and the weight and state tables (names and recipes). Two layers, not one, because layer 1
shows what a layer reads from the one before it (refs to `l0.*` become `l{i-1}.*`), and
the ops after the last layer read `l1.*`, which become `l{N-1}.*`. Compile time no longer
grows with depth: an 80-layer model costs what a 2-layer one does.

`canonical_names` makes this exact. fx numbers nodes across the whole graph (`linear_57`),
so it renames every activation tensor by its op's layer and its position among that
layer's ops of the same kind (`l3.linear_2`, `l3.gated_mlp_w1`; ops outside the layers
keep no prefix: `embed`, `linear`), and `canonical_order` orders the weight and state
tables (outside the layers first, then by layer, by name). Both run on fully traced
programs too, so a stamped program is the same data as a fully traced one (a test checks
program.json byte for byte).

    ops:  embed .. | l0.* (layer 0) | l1.* (layer 1)          | last_tile .. reads %l1.add_1
     ==>  embed .. | l0.* | l1.* | l2.* .. l{N-1}.* (from l1) | last_tile .. reads %l{N-1}.add_1
"""
from __future__ import annotations

import copy
import re
from collections import Counter

from .program import Function, Op, TensorSpec

TRACED_LAYERS = 2
_NUMBER = re.compile(r"_\d+$")
_LAYER_PREFIX = re.compile(r"^l(\d+)\.")


def _prefix(layer: int | None) -> str:
    return "" if layer is None else f"l{layer}."


def _rename_refs(value, rename):
    """Apply `rename` to every "%tensor" reference inside an op argument."""
    if isinstance(value, str) and value.startswith("%"):
        return "%" + rename(value[1:])
    if isinstance(value, list):
        return [_rename_refs(v, rename) for v in value]
    if isinstance(value, dict):
        return {k: _rename_refs(v, rename) for k, v in value.items()}
    return value


def _rebuild_tensors(fn: Function, tensors: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
    """Tensor specs in canonical order: those no op writes (inputs) first, then each op's
    outputs in program order."""
    written = [name for op in fn.ops for name in op.out]
    written_set = set(written)
    order = [name for name in tensors if name not in written_set] + written
    return {name: tensors[name] for name in order}


def canonical_names(fn: Function) -> Function:
    """Rename activation tensors (and op.node) so that names depend only on each op's
    layer and its rank among that layer's nodes of the same kind."""
    node_names: dict[tuple, str] = {}
    seen: Counter = Counter()
    for op in fn.ops:
        key = (op.layer, op.node)
        if key not in node_names:
            base = _NUMBER.sub("", _LAYER_PREFIX.sub("", op.node))
            rank = seen[(op.layer, base)]
            seen[(op.layer, base)] += 1
            node_names[key] = _prefix(op.layer) + base + (f"_{rank}" if rank else "")
    tensor_names: dict[str, str] = {}
    for op in fn.ops:
        new_node = node_names[(op.layer, op.node)]
        for name in op.out:
            assert name.startswith(op.node), f"tensor {name} of node {op.node}"
            tensor_names[name] = new_node + name[len(op.node):]
    assert len(set(tensor_names.values())) == len(tensor_names), "canonical names collide"
    rename = lambda name: tensor_names.get(name, name)  # noqa: E731
    ops = [Op(op.op, _rename_refs(op.args, rename), _rename_refs(op.kwargs, rename),
              [rename(n) for n in op.out], node_names[(op.layer, op.node)], op.layer) for op in fn.ops]
    renamed = Function(fn.name, fn.inputs, fn.scalars, [rename(n) for n in fn.outputs], ops,
                       {rename(k): v for k, v in fn.tensors.items()})
    renamed.tensors = _rebuild_tensors(renamed, renamed.tensors)
    return renamed


def _layer_name(name: str, src: int, dst: int) -> str:
    """`layers.{src}.x` -> `layers.{dst}.x` (weights, caches)."""
    return re.sub(rf"^layers\.{src}\.", f"layers.{dst}.", name)


def _recipe(value, src: int, dst: int):
    if isinstance(value, str):
        return _layer_name(value, src, dst)
    if isinstance(value, list):
        return [_recipe(v, src, dst) for v in value]
    return value


def _blocks(fn: Function) -> tuple[list[Op], list[Op], list[Op], list[Op]]:
    """(ops before layer 0, layer 0, layer 1, ops after layer 1); each layer contiguous."""
    layers = [op.layer for op in fn.ops]
    first0, first1 = layers.index(0), layers.index(1)
    end1 = len(layers) - layers[::-1].index(1)
    pre, l0, l1, post = fn.ops[:first0], fn.ops[first0:first1], fn.ops[first1:end1], fn.ops[end1:]
    if any(op.layer is not None for op in pre + post) or any(op.layer != 0 for op in l0) \
            or any(op.layer != 1 for op in l1):
        raise AssertionError(f"{fn.name}: decoder layers are not contiguous; cannot stamp")
    return pre, l0, l1, post


def _layer_renamer(src: int, dst: int, carried_from: int | None = None):
    """Names in a copy of layer `src` as layer `dst`: its own tensors l{src}.* ->
    l{dst}.*, what it reads from layer src-1 -> l{dst-1}.*, its weights and caches."""
    def rename(name: str) -> str:
        m = _LAYER_PREFIX.match(name)
        if m and int(m.group(1)) == src:
            return f"l{dst}." + name[m.end():]
        if m and carried_from is not None and int(m.group(1)) == carried_from:
            return f"l{dst - 1}." + name[m.end():]
        return _layer_name(name, src, dst)
    return rename


def stamp_function(fn: Function, n_layers: int) -> Function:
    """`fn` lowered from a TRACED_LAYERS-layer model, with layers 2..n_layers-1 added."""
    pre, l0, l1, post = _blocks(fn)
    ops, tensors = pre + l0 + l1, dict(fn.tensors)
    l1_tensors = [name for op in l1 for name in op.out]
    for i in range(TRACED_LAYERS, n_layers):
        rename = _layer_renamer(1, i, carried_from=0)
        for op in l1:
            ops.append(Op(op.op, _rename_refs(op.args, rename), _rename_refs(op.kwargs, rename),
                          [rename(n) for n in op.out], rename(op.node), i))
        for name in l1_tensors:
            spec = copy.copy(tensors[name])
            spec.layer = i
            tensors[rename(name)] = spec
    last = _layer_renamer(1, n_layers - 1)
    for op in post:
        ops.append(Op(op.op, _rename_refs(op.args, last), _rename_refs(op.kwargs, last),
                      list(op.out), op.node, op.layer))
    stamped = Function(fn.name, fn.inputs, fn.scalars, [last(n) for n in fn.outputs], ops, tensors)
    stamped.tensors = _rebuild_tensors(stamped, tensors)
    return stamped


def stamp_weights(weights: dict[str, dict], n_layers: int) -> dict[str, dict]:
    """The weight table (name -> WeightSpec JSON) with layer 1's entries copied to 2..n-1."""
    out = dict(weights)
    for name, spec in weights.items():
        if spec.get("layer") == 1:
            for i in range(TRACED_LAYERS, n_layers):
                copied = {**spec, "recipe": _recipe(spec["recipe"], 1, i), "layer": i}
                out[_layer_name(name, 1, i)] = copied
    return out


def stamp_state(state: dict[str, TensorSpec], n_layers: int) -> dict[str, TensorSpec]:
    out = dict(state)
    for name, spec in state.items():
        if spec.layer == 1:
            for i in range(TRACED_LAYERS, n_layers):
                copied = copy.copy(spec)
                copied.layer = i
                out[_layer_name(name, 1, i)] = copied
    return out


def _layer_of(spec) -> int | None:
    return spec.get("layer") if isinstance(spec, dict) else spec.layer


def canonical_order(table: dict) -> dict:
    """Weight or state table ordered: outside the layers first, then by layer, by name."""
    def key(item):
        layer = _layer_of(item[1])
        return (layer is not None, layer or 0, item[0])
    return dict(sorted(table.items(), key=key))
