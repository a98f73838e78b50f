"""Lower a compiled fx graph to a program Function of TTNN ops.

One rule per dialect op (RULES), each a small function that emits the ttnn ops the
reference uses for that step. Shapes come from the graph's propagated meta values; in
prefill, dims that scale with the row count become "S" (found by propagating the graph
a second time at another row count and comparing).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from compiler import dialect
from compiler.facts import PRECISION, VAL, WeightSpec
from compiler.trace import ALT_SEQ_ROWS
from models_ref import ops as ref
from models_ref.names import LOOKUP_TABLES, NORMS, Role

from .emitter import TILE, TRANS_MAT, Lowering, compute_config, kernel_config
from .program import SEQ, Function, InputSpec, TensorSpec
from .vision_rules import VISION_RULES

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
              "compute_kernel_config": kernel_config(node.meta[PRECISION])}
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
        "compute_kernel_config": kernel_config(node.meta[PRECISION])})


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


ROTARY_FP32_DEST_MAX_HEAD_DIM = 128  # ttnn 0.81.1: "If head_dim is > 128, fp32_dest_acc_en must be False"


def _rotary(lw: Lowering, node):
    x, cos, sin = node.args
    fp32_acc = lw.shape_of(x)[-1] <= ROTARY_FP32_DEST_MAX_HEAD_DIM
    lw.result(node, "ttnn.experimental.rotary_embedding_llama",
              [lw.ref(x), lw.ref(cos), lw.ref(sin), "%" + TRANS_MAT],
              {"is_decode_mode": lw.ctx.decode,
               "compute_kernel_config": compute_config("HiFi4", fp32_acc)})


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
            "compute_kernel_config": kernel_config(node.meta[PRECISION])}


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
    config = kernel_config(node.meta[PRECISION])
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
    **VISION_RULES,
}


# -------------------------------------------------------------------- inputs
# Float inputs besides ids and page tables (Llama 3.2 Vision): their layout on the device.
_FLOAT_INPUT_LAYOUTS = {"pixels": "ROW_MAJOR", "encoder_mask": "TILE", "xattn_mask": "TILE", "row_mask": "TILE"}


def _inputs(lw: Lowering) -> None:
    """Per-call inputs. Decode positions feed two consumers in two forms (see ops)."""
    rows = SEQ if not lw.ctx.decode else lw.ctx.options.batch_size
    fn, shapes = lw.fn, lw.ctx.input_shapes
    if "tokens" in shapes:
        fn.inputs.append(InputSpec("tokens", "tokens", [1, rows], "uint32"))
        fn.inputs.append(InputSpec("positions", "positions", [1, rows], "uint32"))
    if lw.ctx.decode:
        fn.inputs.append(InputSpec("cur_pos", "positions", [rows], "int32"))
    dtype = _activation_dtype(lw.ctx.facts)
    for name, layout in _FLOAT_INPUT_LAYOUTS.items():
        if name in shapes:
            shape = [SEQ if a != b else a for a, b in zip(shapes[name](lw.ctx.seq_rows), shapes[name](ALT_SEQ_ROWS))]
            fn.inputs.append(InputSpec(name, name, shape, dtype, layout))
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
    if ctx.mode == "prefill":
        fn.scalars.append("last_tile_start")  # from last_index: the logits tile (see _last_tile)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            RULES[node.target](lw, node)
        elif node.op == "output":
            fn.outputs = [lw.names[node.args[0]]]
    return fn


# -------------------------------------------------------------------- weights
# Device layouts by role, beyond TILE at the graph's shape: (layout, shape from the graph's).
def _row_vector(shape):  # norm gammas/betas: ROW_MAJOR [1, 1, D/32, 32] (or [1, D] when D is not whole tiles)
    return ("ROW_MAJOR", (1, 1, shape[0] // TILE, TILE)) if shape[0] % TILE == 0 else ("TILE", (1, shape[0]))


def _vision_layouts(cfg) -> dict:
    """Llama 3.2 Vision: per-aspect-ratio tables as [ids, T, rows, D] (a lookup is a
    slice of one id), the class embedding and local positions as broadcastable rows."""
    if cfg is None or cfg.vision is None:
        return {}
    tiles, dim = cfg.vision.max_num_tiles, cfg.vision.dim
    table = lambda s: ("TILE", (s[0], tiles, s[1] // (tiles * dim), dim))  # noqa: E731
    return {Role.VISION_TILE_POS_EMBED: table, Role.VISION_PRE_TILE_EMBED: table,
            Role.VISION_POST_TILE_EMBED: table,
            Role.VISION_CLASS_EMBED: lambda s: ("TILE", (1, 1, 1, s[0])),
            Role.VISION_POS_EMBED: lambda s: ("TILE", (1, 1) + tuple(s)),
            Role.VISION_NORM: _row_vector, Role.VISION_NORM_BIAS: _row_vector}


def device_weights(facts, cfg=None) -> dict[str, dict]:
    """The program's weight table: device layouts for what the graph's weights are.

    Norm weights go to ttnn as ROW_MAJOR [1, 1, D/32, 32]; lookup tables (token embedding,
    rope rows) as ROW_MAJOR rows; the rotary transformation matrix is added as a constant;
    Llama 3.2 Vision's tables and rows as _vision_layouts says.
    """
    layouts = {**{role: _row_vector for role in NORMS}, **_vision_layouts(cfg)}
    out = {}
    for name, spec in facts.weights.items():
        spec = dataclasses.replace(spec)
        if spec.role in layouts:
            spec.layout, shape = layouts[spec.role](spec.shape)
            if tuple(shape) != tuple(spec.shape):
                spec.shape = tuple(shape)
                spec.recipe = ["reshape", list(shape), spec.recipe]
        elif spec.role in LOOKUP_TABLES:
            spec.layout = "ROW_MAJOR"
        out[name] = spec.to_json()
    out[TRANS_MAT] = WeightSpec(TRANS_MAT, (1, 1, TILE, TILE), ["rope_trans_mat"],
                                _activation_dtype(facts), role=Role.ROPE_TRANS_MAT).to_json()
    return out


def _activation_dtype(facts) -> str:
    return (facts.precision or {}).get("policy", {}).get("activations", "bfloat16")
