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

Layers that differ (a precision file gives some of them other dtypes or fidelities) are
stamped per class: a `LayerPlan` traces layer 0 and one layer per class of the others, in
order of first appearance, and every layer i >= 1 is copied from its class's traced layer
j (l{j}.* -> l{i}.*, l{j-1}.* -> l{i-1}.*). Uniform layers give the plan above (traced
layers 0 and 1); when classes save nothing over tracing every layer, every layer is traced.

    classes  A A B A B C  ==>  trace 0:A 1:A 2:B 3:C;  layers 1, 3 from 1; 2, 4 from 2; 5 from 3
"""
from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .program import Function, Op, TensorSpec, tensor_refs

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
    old = f"layers.{src}."
    return f"layers.{dst}." + name[len(old):] if name.startswith(old) else name


def _recipe(value, src: int, dst: int):
    """A weight recipe (nested lists) with its layer `src` names made layer `dst`'s."""
    if isinstance(value, str):
        return _layer_name(value, src, dst)
    if isinstance(value, list):
        return [_recipe(v, src, dst) for v in value]
    return value


def _recipe_stamper(recipe, src: int):
    """`dst -> _recipe(recipe, src, dst)`, fast: the recipe's JSON text is split at its
    layer-`src` names once and joined and parsed for each layer (walking a 70B model's
    recipes element by element for every layer took 0.3 s: a TG recipe names each
    chip's heads). A recipe its JSON does not give back exactly (tuples), or with objects
    (_recipe leaves dicts alone) or escapes in it, is walked."""
    text = json.dumps(recipe)
    if "\\" in text or "{" in text or json.loads(text) != recipe:
        return lambda dst: _recipe(recipe, src, dst)
    pieces = text.split(f'"layers.{src}.')
    return lambda dst: json.loads(f'"layers.{dst}.'.join(pieces))


@dataclass(frozen=True)
class LayerPlan:
    """Which traced layer each decoder layer is compiled from: `source[i]` is the index, in
    the traced graph, of the layer decoder layer i copies (source[0] == 0)."""

    source: tuple[int, ...]

    @classmethod
    def of(cls, classes: Sequence[Hashable], stamp: bool = True) -> "LayerPlan":
        """The plan for layers whose classes (anything comparable: their precision) are
        `classes`: layer 0 traced as itself, one traced layer per class of the others;
        every layer traced when `stamp` is False or classes would save nothing."""
        n = len(classes)
        order = list(dict.fromkeys(classes[1:]))
        if stamp and n > TRACED_LAYERS and 1 + len(order) < n:
            return cls((0,) + tuple(1 + order.index(c) for c in classes[1:]))
        return cls(tuple(range(n)))

    @classmethod
    def uniform(cls, n_layers: int) -> "LayerPlan":
        return cls.of([0] * n_layers)

    @property
    def n_layers(self) -> int:
        return len(self.source)

    @property
    def traced(self) -> int:
        """How many layers the traced graph holds."""
        return max(self.source) + 1

    @property
    def stamped(self) -> bool:
        return self.traced < self.n_layers

    def count(self, traced_layer: int) -> int:
        """How many decoder layers are copies of a traced layer (the memory plan's weight)."""
        return self.source.count(traced_layer)

    def stands_for(self, traced_layer: int) -> int:
        """The first decoder layer copied from a traced layer (whose settings it has)."""
        return self.source.index(traced_layer)

    def to_json(self) -> list[int]:
        return list(self.source)


def _blocks(fn: Function) -> tuple[list[Op], dict[int, list[Op]], list[Op]]:
    """(ops before layer 0, each traced layer's ops, ops after the last); layers contiguous
    and in order."""
    layers = [op.layer for op in fn.ops]
    inner = [layer for layer in layers if layer is not None]
    first, end = layers.index(inner[0]), len(layers) - layers[::-1].index(inner[-1])
    body = layers[first:end]
    if None in body or body != sorted(body) or sorted(set(body)) != list(range(len(set(body)))):
        raise AssertionError(f"{fn.name}: decoder layers are not contiguous; cannot stamp")
    by_layer: dict[int, list[Op]] = {}
    for op in fn.ops[first:end]:
        by_layer.setdefault(op.layer, []).append(op)
    return fn.ops[:first], by_layer, fn.ops[end:]


def _layer_renamer(src: int, dst: int, carried_from: int | None = None):
    """Names in a copy of layer `src` as layer `dst`: its own tensors l{src}.* ->
    l{dst}.*, what it reads from layer src-1 -> l{dst-1}.*, its weights and caches."""
    def rename(name: str) -> str:
        m = _LAYER_PREFIX.match(name)
        if m and int(m.group(1)) == src:
            return f"l{dst}." + name[m.end():]
        if m and carried_from is not None and int(m.group(1)) == carried_from:
            return f"l{dst - 1}." + name[m.end():]
        if m:
            raise AssertionError(f"layer {src} reads l{m.group(1)}.*; cannot stamp")
        return _layer_name(name, src, dst)
    return rename


def _check_refs(ops: list[Op], tensors: dict, fn: Function) -> None:
    """Every layer tensor a stamped op reads exists: classes of layers must differ in
    settings only, never in the tensors they hand on."""
    for op in ops:
        for ref in tensor_refs(op):
            if _LAYER_PREFIX.match(ref) and ref not in tensors:
                raise AssertionError(f"{fn.name}: stamped op {op.node} reads {ref}, which no layer "
                                     "writes (layer classes differ in structure); cannot stamp")


def stamp_function(fn: Function, plan: LayerPlan | int) -> Function:
    """`fn` lowered from the traced layers of `plan` (or, given a layer count, from
    TRACED_LAYERS alike layers), with every decoder layer written from its traced one."""
    plan = LayerPlan.uniform(plan) if isinstance(plan, int) else plan
    pre, layers, post = _blocks(fn)
    if len(layers) != plan.traced:
        raise AssertionError(f"{fn.name}: {len(layers)} traced layers, the plan has {plan.traced}")
    ops = pre + layers[0]
    tensors = {name: spec for name, spec in fn.tensors.items() if spec.layer in (None, 0)}
    for i in range(1, plan.n_layers):
        j = plan.source[i]
        rename = _layer_renamer(j, i, carried_from=j - 1)
        for op in layers[j]:
            ops.append(Op(op.op, _rename_refs(op.args, rename), _rename_refs(op.kwargs, rename),
                          [rename(n) for n in op.out], rename(op.node), i))
            for name in op.out:
                spec = copy.copy(fn.tensors[name])
                spec.layer = i
                tensors[rename(name)] = spec
    last = _layer_renamer(plan.traced - 1, plan.n_layers - 1)
    for op in post:
        ops.append(Op(op.op, _rename_refs(op.args, last), _rename_refs(op.kwargs, last),
                      list(op.out), op.node, op.layer))
    _check_refs(ops, tensors, fn)
    stamped = Function(fn.name, fn.inputs, fn.scalars, [last(n) for n in fn.outputs], ops, tensors)
    stamped.tensors = _rebuild_tensors(stamped, tensors)
    return stamped


def stamp_weights(weights: dict[str, dict], plan: LayerPlan | int) -> dict[str, dict]:
    """The weight table (name -> WeightSpec JSON) with every layer's entries copied from its
    traced layer (names and recipes renamed)."""
    plan = LayerPlan.uniform(plan) if isinstance(plan, int) else plan
    out = {name: spec for name, spec in weights.items() if spec.get("layer") in (None, 0)}
    stampers = {}
    for i in range(1, plan.n_layers):
        j = plan.source[i]
        for name, spec in weights.items():
            if spec.get("layer") == j:
                if name not in stampers:
                    stampers[name] = _recipe_stamper(spec["recipe"], j)
                out[_layer_name(name, j, i)] = {**spec, "recipe": stampers[name](i), "layer": i}
    return out


def stamp_state(state: dict[str, TensorSpec], plan: LayerPlan | int) -> dict[str, TensorSpec]:
    plan = LayerPlan.uniform(plan) if isinstance(plan, int) else plan
    out = {name: spec for name, spec in state.items() if spec.layer in (None, 0)}
    for i in range(1, plan.n_layers):
        j = plan.source[i]
        for name, spec in state.items():
            if spec.layer == j:
                copied = copy.copy(spec)
                copied.layer = i
                out[_layer_name(name, j, i)] = copied
    return out


def _layer_of(spec) -> int | None:
    return spec.get("layer") if isinstance(spec, dict) else spec.layer


def canonical_order(table: dict) -> dict:
    """Weight or state table ordered: outside the layers first, then by layer, by name."""
    def key(item):
        layer = _layer_of(item[1])
        return (layer is not None, layer or 0, item[0])
    return dict(sorted(table.items(), key=key))
