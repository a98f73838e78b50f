"""Lower a compiled fx graph to a program Function of TTNN ops.

One rule per dialect op (RULES), each a small function that emits the ttnn ops the
reference uses for that step. Shapes come from the graph's propagated meta values; in
prefill, dims that scale with the row count become "S" (found by propagating the graph
a second time at another row count and comparing).
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from compiler import dialect
from compiler.facts import LAYER, PLACEMENT, PRECISION, REPLICATED, VAL, WeightSpec
from compiler.trace import ALT_SEQ_ROWS
from models_ref import ops as ref
from models_ref.names import LOOKUP_TABLES, NORMS, Role

from .optable import check_op
from .program import SEQ, Function, InputSpec, Op, TensorSpec

TILE = 32
TRANS_MAT = "rope_trans_mat"


def compute_config(fidelity: str, fp32_acc: bool = True) -> dict:
    return {"math_fidelity": fidelity, "fp32_dest_acc_en": fp32_acc, "packer_l1_acc": True}


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


# -------------------------------------------------------------------- rules
def _embed(lw: Lowering, node):
    tokens, table = node.args
    shape = lw.shape_of(node)
    rows3 = lw.tensor(lw.out_name(node, "_rows"), shape[1:], lw.dtype_of(node), node)
    lw.emit(node, "ttnn.embedding", [lw.ref(tokens), lw.ref(table)],
            {"layout": "TILE", "dtype": lw.dtype_of(node)}, [rows3])
    lw.result(node, "ttnn.unsqueeze_to_4D", ["%" + rows3])


def _rope_rows(lw: Lowering, node):
    table, positions, decode = node.args
    shape = lw.shape_of(node)  # prefill [1, 1, S, hd]; decode [1, B, 1, hd]
    rows = shape[2] if not decode else shape[1]
    rows3 = lw.tensor(lw.out_name(node, "_rows"), [1, rows, shape[3]], lw.dtype_of(node), node)
    lw.emit(node, "ttnn.embedding", [lw.ref(positions), lw.ref(table)],
            {"layout": "TILE", "dtype": lw.dtype_of(node)}, [rows3])
    if not decode:
        lw.result(node, "ttnn.unsqueeze_to_4D", ["%" + rows3])
        return
    flat = lw.tensor(lw.out_name(node, "_4d"), [1, 1, rows, shape[3]], lw.dtype_of(node), node)
    lw.emit(node, "ttnn.unsqueeze_to_4D", ["%" + rows3], None, [flat])
    lw.result(node, "ttnn.transpose", ["%" + flat, 1, 2])


def _rms_norm(lw: Lowering, node):
    x, weight, eps = node.args
    kwargs = {"epsilon": eps, "weight": lw.ref(weight),
              "compute_kernel_config": compute_config(node.meta[PRECISION].fidelity)}
    if not (lw.ctx.decode and lw.ctx.facts.weights[weight.target].role in (Role.Q_NORM, Role.K_NORM)):
        lw.result(node, "ttnn.rms_norm", [lw.ref(x)], kwargs)
        return
    # Decode heads are height-sharded, one user per core, which rms_norm does not take:
    # normalise them interleaved in L1, then shard them again for rotary.
    shape, dtype = lw.shape_of(node), lw.dtype_of(node)
    moved, normed = (lw.tensor(lw.out_name(node, s), shape, dtype, node) for s in ("_l1", "_normed"))
    lw.emit(node, "ttnn.to_memory_config", [lw.ref(x), "L1"], None, [moved])
    lw.emit(node, "ttnn.rms_norm", ["%" + moved], kwargs, [normed])
    lw.result(node, "ttnn.to_memory_config", ["%" + normed, "L1_HEIGHT_SHARDED"])


def _linear(lw: Lowering, node):
    x, weight = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else None
    lw.result(node, "ttnn.linear", [lw.ref(x), lw.ref(weight)], {
        "bias": lw.ref(bias) if bias is not None else None, "dtype": lw.dtype_of(node),
        "compute_kernel_config": compute_config(node.meta[PRECISION].fidelity)})


def _qkv_heads(lw: Lowering, node):
    x, n_heads, n_kv, _, decode = node.args
    outs = [lw.tensor(lw.out_name(node, f"_{p}"), lw.shape_of(node, i), lw.dtype_of(node), node)
            for i, p in enumerate("qkv")]
    if decode:
        lw.emit(node, "ttnn.experimental.nlp_create_qkv_heads_decode", [lw.ref(x)],
                {"num_heads": n_heads, "num_kv_heads": n_kv}, outs)
    else:
        lw.emit(node, "ttnn.experimental.nlp_create_qkv_heads", [lw.ref(x)],
                {"num_heads": n_heads, "num_kv_heads": n_kv, "transpose_k_heads": False}, outs)
    lw.names[node] = outs


def _getitem(lw: Lowering, node):
    source, index = node.args
    lw.names[node] = lw.names[source][index]


def _rotary(lw: Lowering, node):
    x, cos, sin = node.args
    lw.result(node, "ttnn.experimental.rotary_embedding_llama",
              [lw.ref(x), lw.ref(cos), lw.ref(sin), "%" + TRANS_MAT],
              {"is_decode_mode": lw.ctx.decode,
               "compute_kernel_config": compute_config("HiFi4")})


def _cache_input(lw: Lowering, node, cache, kv) -> str:
    """K/V in the cache's dtype where the write op needs it (fill_cache copies raw tiles)."""
    cache_dtype = lw.ctx.facts.state[cache.target].dtype
    if cache_dtype == lw.dtype_of(kv):
        return lw.ref(kv)
    name = lw.tensor(lw.out_name(node, "_cast"), lw.shape_of(kv), cache_dtype, node)
    lw.emit(node, "ttnn.typecast", [lw.ref(kv), cache_dtype], None, [name])
    return "%" + name


def _fill_cache(lw: Lowering, node):
    cache, kv, user_id = node.args
    lw.emit(node, "ttnn.fill_cache", [lw.ref(cache), _cache_input(lw, node, cache, kv), "$user_id"])
    lw.names[node] = lw.names[cache]


def _update_cache(lw: Lowering, node):
    cache, kv, _ = node.args
    lw.emit(node, "ttnn.experimental.paged_update_cache", [lw.ref(cache), lw.ref(kv)],
            {"update_idxs_tensor": "%cur_pos"})
    lw.names[node] = lw.names[cache]


def _paged_fill_cache(lw: Lowering, node):
    cache, kv, chunk_table = node.args
    lw.emit(node, "ttnn.experimental.paged_fill_cache",
            [lw.ref(cache), _cache_input(lw, node, cache, kv), lw.ref(chunk_table)], {"batch_idx": 0})
    lw.names[node] = lw.names[cache]


def _paged_update_cache(lw: Lowering, node):
    cache, kv, _, page_table = node.args
    lw.emit(node, "ttnn.experimental.paged_update_cache", [lw.ref(cache), lw.ref(kv)],
            {"update_idxs_tensor": "%cur_pos", "page_table": lw.ref(page_table)})
    lw.names[node] = lw.names[cache]


def _attention_kwargs(node, scale, window=None) -> dict:
    """scale, compute config and (models with a sliding window) the window: ttnn's
    sliding_window_size counts the positions a query sees, itself included, as
    models_ref.ops.visible does."""
    return {"scale": scale, "sliding_window_size": window,
            "compute_kernel_config": compute_config(node.meta[PRECISION].fidelity)}


def _chunked_attention(lw: Lowering, node):
    q, k_cache, v_cache, page_table, _, scale, *window = node.args
    lw.result(node, "ttnn.transformer.chunked_scaled_dot_product_attention",
              [lw.ref(q), lw.ref(k_cache), lw.ref(v_cache), lw.ref(page_table), "$chunk_start"],
              _attention_kwargs(node, scale, *window))


def _paged_decode_attention(lw: Lowering, node):
    q, k_cache, v_cache, _, page_table, scale, *window = node.args
    lw.result(node, "ttnn.transformer.paged_scaled_dot_product_attention_decode",
              [lw.ref(q), lw.ref(k_cache), lw.ref(v_cache)],
              {"page_table_tensor": lw.ref(page_table), "cur_pos_tensor": "%cur_pos",
               **_attention_kwargs(node, scale, *window)})


def _causal_attention(lw: Lowering, node):
    q, k, v, scale, *window = node.args
    lw.result(node, "ttnn.transformer.scaled_dot_product_attention",
              [lw.ref(q), lw.ref(k), lw.ref(v)], {"is_causal": True, **_attention_kwargs(node, scale, *window)})


def _decode_attention(lw: Lowering, node):
    q, k_cache, v_cache, _, scale, *window = node.args
    lw.result(node, "ttnn.transformer.scaled_dot_product_attention_decode",
              [lw.ref(q), lw.ref(k_cache), lw.ref(v_cache)],
              {"cur_pos_tensor": "%cur_pos", **_attention_kwargs(node, scale, *window)})


def _merge_heads(lw: Lowering, node):
    x, decode = node.args
    if decode:
        # SDPA-decode writes interleaved (GQA cannot write sharded); concat wants height-sharded.
        sharded = lw.tensor(lw.out_name(node, "_sharded"), lw.shape_of(x), lw.dtype_of(node), node)
        lw.emit(node, "ttnn.to_memory_config", [lw.ref(x), "L1_HEIGHT_SHARDED"], None, [sharded])
        lw.result(node, "ttnn.experimental.nlp_concat_heads_decode", ["%" + sharded],
                  {"num_heads": lw.shape_of(x)[2]})
    else:
        lw.result(node, "ttnn.experimental.nlp_concat_heads", [lw.ref(x)])


def _binary(op: str):
    def rule(lw: Lowering, node):
        a, b = node.args
        lw.result(node, op, [lw.ref(a), lw.ref(b)], {"dtype": lw.dtype_of(node)})
    return rule


def _silu(lw: Lowering, node):
    lw.result(node, "ttnn.silu", [lw.ref(node.args[0])])


def _gated_mlp(lw: Lowering, node):
    x, w1, w3 = node.args
    config = compute_config(node.meta[PRECISION].fidelity)
    gate, up = (lw.tensor(lw.out_name(node, s), lw.shape_of(node), lw.dtype_of(node), node)
                for s in ("_w1", "_w3"))
    for w, out in ((w1, gate), (w3, up)):
        lw.emit(node, "ttnn.linear", [lw.ref(x), lw.ref(w)],
                {"dtype": lw.dtype_of(node), "compute_kernel_config": config}, [out])
    lw.result(node, "ttnn.mul", ["%" + gate, "%" + up],
              {"input_tensor_a_activations": ["silu"], "dtype": lw.dtype_of(node)})


def _all_reduce(lw: Lowering, node):
    x, axis = node.args
    lw.result(node, "ttnn.all_reduce", [lw.ref(x)],
              {"cluster_axis": axis, "num_links": lw.ctx.target.links})


def _all_gather(lw: Lowering, node):
    x, dim, axis, _ = node.args
    lw.result(node, "ttnn.all_gather", [lw.ref(x), dim],
              {"cluster_axis": axis, "num_links": lw.ctx.target.links})


def _last_tile(lw: Lowering, node):
    x, _ = node.args
    dim = lw.shape_of(x)[-1]
    lw.result(node, "ttnn.slice", [lw.ref(x), [0, 0, "$last_tile_start", 0],
                                   [1, 1, "$last_tile_start+32", dim]])


RULES = {
    ref.embed: _embed, ref.rope_rows: _rope_rows, ref.rms_norm: _rms_norm,
    dialect.linear: _linear, dialect.qkv_heads: _qkv_heads, operator.getitem: _getitem,
    ref.rotary: _rotary, ref.fill_cache: _fill_cache, ref.update_cache: _update_cache,
    ref.causal_attention: _causal_attention, ref.decode_attention: _decode_attention,
    ref.merge_heads: _merge_heads, dialect.add: _binary("ttnn.add"),
    dialect.mul: _binary("ttnn.mul"), dialect.silu: _silu, dialect.gated_mlp: _gated_mlp,
    ref.last_tile: _last_tile, dialect.all_reduce: _all_reduce, dialect.all_gather: _all_gather,
    dialect.paged_fill_cache: _paged_fill_cache, dialect.paged_update_cache: _paged_update_cache,
    dialect.chunked_attention: _chunked_attention, dialect.paged_decode_attention: _paged_decode_attention,
}


# -------------------------------------------------------------------- inputs
def _inputs(lw: Lowering) -> None:
    """Per-call inputs. Decode positions feed two consumers in two forms (see ops)."""
    rows = SEQ if not lw.ctx.decode else lw.ctx.options.batch_size
    fn = lw.fn
    fn.inputs.append(InputSpec("tokens", "tokens", [1, rows], "uint32"))
    fn.inputs.append(InputSpec("positions", "positions", [1, rows], "uint32"))
    if lw.ctx.decode:
        fn.inputs.append(InputSpec("cur_pos", "positions", [rows], "int32"))
    if "page_table" in lw.ctx.input_shapes:
        fn.inputs.append(InputSpec("page_table", "page_table",
                                   list(lw.ctx.input_shapes["page_table"](0)), "int32"))
    if "chunk_page_table" in lw.ctx.input_shapes:
        fn.inputs.append(InputSpec("chunk_page_table", "chunk_page_table",
                                   [1, f"{SEQ}/{lw.ctx.options.block_size}"], "int32"))
    for spec in fn.inputs:
        fn.tensors[spec.name] = TensorSpec(list(spec.shape), spec.dtype, spec.layout, "DRAM", "input")
    for node in lw.gm.graph.nodes:
        if node.op == "placeholder" and node.target in lw.ctx.input_shapes:
            lw.names[node] = node.target
        elif node.op == "placeholder":
            lw.names[node] = "$" + node.target
        elif node.op == "get_attr":
            lw.names[node] = node.target


def _alt_shapes(gm, ctx) -> dict:
    """Shapes at a second row count, to find the S-dims of a prefill graph."""
    if ctx.decode:
        return {}
    primary = {n: n.meta.get(VAL) for n in gm.graph.nodes}
    ctx.propagate(gm, ctx.inputs_at(ALT_SEQ_ROWS))
    alt = {}
    for n in gm.graph.nodes:
        val = n.meta.get(VAL)
        if isinstance(val, torch.Tensor):
            alt[n.name] = tuple(val.shape)
        elif isinstance(val, tuple):
            alt[n.name] = [tuple(v.shape) for v in val]
        n.meta[VAL] = primary[n]
    return alt


def lower(gm: torch.fx.GraphModule, ctx) -> Function:
    fn = Function(name=ctx.mode, inputs=[], scalars=[], outputs=[], ops=[])
    lw = Lowering(gm, ctx, fn, alt_shapes=_alt_shapes(gm, ctx))
    _inputs(lw)
    fn.scalars = [n.target for n in gm.graph.nodes if n.op == "placeholder" and n.users
                  and n.target not in ctx.input_shapes and n.target != "last_index"]
    if not ctx.decode:
        fn.scalars.append("last_tile_start")  # from last_index: the logits tile (see _last_tile)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            RULES[node.target](lw, node)
        elif node.op == "output":
            fn.outputs = [lw.names[node.args[0]]]
    return fn


# -------------------------------------------------------------------- weights
def device_weights(facts) -> dict[str, dict]:
    """The program's weight table: device layouts for what the graph's weights are.

    Norm weights go to ttnn as ROW_MAJOR [1, 1, D/32, 32]; lookup tables (token embedding,
    rope rows) as ROW_MAJOR rows; the rotary transformation matrix is added as a constant.
    """
    out = {}
    for name, spec in facts.weights.items():
        spec = dataclasses.replace(spec)
        if spec.role in NORMS and spec.shape[0] % TILE == 0:
            spec.shape = (1, 1, spec.shape[0] // TILE, TILE)
            spec.recipe = ["reshape", list(spec.shape), spec.recipe]
            spec.layout = "ROW_MAJOR"
        elif spec.role in NORMS:
            spec.shape = (1, spec.shape[0])
            spec.recipe = ["reshape", [1, -1], spec.recipe]
        elif spec.role in LOOKUP_TABLES:
            spec.layout = "ROW_MAJOR"
        out[name] = spec.to_json()
    out[TRANS_MAT] = WeightSpec(TRANS_MAT, (1, 1, TILE, TILE), ["rope_trans_mat"],
                                _activation_dtype(facts), role=Role.ROPE_TRANS_MAT).to_json()
    return out


def _activation_dtype(facts) -> str:
    norm = next((w for w in facts.weights.values() if w.role in NORMS), None)
    return "float32" if norm is not None and norm.dtype == "float32" else "bfloat16"
