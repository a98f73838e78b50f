"""Lowering rules of Llama 3.2 Vision's ops: the vision tower (one image per call) and the
cross-attention layers of the text functions. Same contract as lowering/lower.py's RULES:
one function per dialect op, emitting the ttnn ops the step needs.

Layout choices (ttnn 0.81.1, checked on the mock meshes):
- the patch "conv" is an unfold on the device (ROW_MAJOR reshapes and permutes of the
  pixels) and a matmul, as the reference does it;
- per-aspect-ratio tables are ROW_MAJOR weights; a lookup is a slice at the host's
  aspect-ratio id ($aspect_ratio_id), reshaped and tilized;
- a tile's tokens are padded to whole 32-row tiles (1601 -> 1632, models_ref.multimodal
  device_vision); the encoder mask (a host input) hides the padding both ways;
- cross-attention reads a user's row of the caches: prefill slices it at $user_id; decode
  attends every user to its own row with the masks the host gives.
"""
from __future__ import annotations

from compiler import dialect
from models_ref import ops as ref
from models_ref import vision_ops as vops

from .emitter import Lowering, compute_config
from .program import SEQ


def _target_shape(shape) -> list:
    """A reshape target: the prefill row count (S, known per call) as -1, which ttnn infers."""
    out = [-1 if d == SEQ else d for d in shape]
    assert out.count(-1) <= 1, f"reshape target {shape} has more than one row-count dim"
    return out


def _layer_norm(lw: Lowering, node):
    x, weight, bias, eps = node.args
    lw.result(node, "ttnn.layer_norm", [lw.ref(x)], {
        "epsilon": eps, "weight": lw.ref(weight), "bias": lw.ref(bias),
        "compute_kernel_config": compute_config("HiFi4")})


def _gelu(lw: Lowering, node):
    lw.result(node, "ttnn.gelu", [lw.ref(node.args[0])])  # ttnn 0.81.1's default: exact (erf)


def _concat(lw: Lowering, node):
    parts, dim = node.args
    lw.result(node, "ttnn.concat", [[lw.ref(p) for p in parts], dim])


def _steps(lw: Lowering, node, first: str, steps: list[tuple[str, list, dict, list, str]]) -> None:
    """A chain of ops, each reading the previous one's output: (op, args after the
    input, kwargs, output shape, layout); the last writes the node's value."""
    current = first
    for i, (op, args, kwargs, shape, layout) in enumerate(steps):
        if i == len(steps) - 1:
            lw.result(node, op, [current, *args], kwargs, layout)
            return
        name = lw.tensor(lw.out_name(node, f"_s{i}"), shape, lw.dtype_of(node), node, layout)  # not fx's _1, _2
        lw.emit(node, op, [current, *args], kwargs, [name])
        current = "%" + name


def _patchify(lw: Lowering, node):
    """[T, C, H, W] pixels -> [1, T, (H/p)(W/p), C p p] patch rows, in ROW_MAJOR, tilized."""
    pixels, p = node.args
    tiles, channels, height, width = lw.shape_of(pixels)
    h, w = height // p, width // p
    rm = "ROW_MAJOR"
    _steps(lw, node, lw.ref(pixels), [
        ("ttnn.reshape", [[tiles * channels * h, p, w, p]], {}, [tiles * channels * h, p, w, p], rm),
        ("ttnn.permute", [[0, 2, 1, 3]], {}, [tiles * channels * h, w, p, p], rm),
        ("ttnn.reshape", [[tiles, channels, h * w, p * p]], {}, [tiles, channels, h * w, p * p], rm),
        ("ttnn.permute", [[0, 2, 1, 3]], {}, [tiles, h * w, channels, p * p], rm),
        ("ttnn.reshape", [[1, tiles, h * w, channels * p * p]], {}, [1, tiles, h * w, channels * p * p], rm),
        ("ttnn.to_layout", ["TILE"], {}, None, "TILE"),
    ])


def _aspect_ratio_rows(lw: Lowering, node):
    """Row $aspect_ratio_id of a table held as [n + 1, T, rows, D] (lowering.device_weights):
    one slice. (As [n + 1, T * rows * D] rows, the reshape after the slice would need 65 MB of
    L1 for the positional table: ttnn 0.81.1 refuses it.)"""
    table, _, tiles, rows, dim = node.args
    lw.result(node, "ttnn.slice", [lw.ref(table), ["$aspect_ratio_id", 0, 0, 0],
                                   ["$aspect_ratio_id+1", tiles, rows, dim]])


def _prepend_class_token(lw: Lowering, node):
    """The class embedding (a [1, 1, 1, D] weight) repeated per tile, then the patches."""
    x, cls = node.args
    tiles, dim = lw.shape_of(x)[1], lw.shape_of(x)[3]
    rows = lw.tensor(lw.out_name(node, "_cls"), [1, tiles, 1, dim], lw.dtype_of(node), node)
    lw.emit(node, "ttnn.repeat", [lw.ref(cls), [1, tiles, 1, 1]], None, [rows])
    lw.result(node, "ttnn.concat", [["%" + rows, lw.ref(x)], 2])


def _positional_embedding(lw: Lowering, node):
    """x + local (a [1, 1, N, D] weight, broadcast over tiles) + per-tile rows (gates folded)."""
    x, local, per_tile, gate = node.args
    assert gate is None, "passes/fold_gates.py folds the gate into the tables"
    partial = lw.tensor(lw.out_name(node, "_local"), lw.shape_of(node), lw.dtype_of(node), node)
    lw.emit(node, "ttnn.add", [lw.ref(x), lw.ref(local)], {"dtype": lw.dtype_of(node)}, [partial])
    lw.result(node, "ttnn.add", ["%" + partial, lw.ref(per_tile)], {"dtype": lw.dtype_of(node)})


def _pad_rows(lw: Lowering, node, x, rows_to: int, shape_after_pad: list):
    shape = lw.shape_of(x)
    padding = [[0, 0]] * (len(shape) - 2) + [[0, rows_to - shape[-2]], [0, 0]]
    return ("ttnn.pad", [padding, 0.0], {}, shape_after_pad, "TILE")


def _pad_tile_tokens(lw: Lowering, node):
    """[1, T, N, D] -> [1, 1, T * Np, D]: each tile's tokens padded to Np rows."""
    x, padded = node.args
    _, tiles, _, dim = lw.shape_of(x)
    _steps(lw, node, lw.ref(x), [
        _pad_rows(lw, node, x, padded, [1, tiles, padded, dim]),
        ("ttnn.reshape", [[1, 1, tiles * padded, dim]], {}, None, "TILE"),
    ])


def _pad_rows_rule(lw: Lowering, node):
    x, rows = node.args
    op, args, kwargs, _, _ = _pad_rows(lw, node, x, rows, None)
    lw.result(node, op, [lw.ref(x), *args], kwargs)


def _reshape(lw: Lowering, node):
    lw.result(node, "ttnn.reshape", [lw.ref(node.args[0]), _target_shape(lw.shape_of(node))])


def _unpad_tile_tokens(lw: Lowering, node):
    """[1, 1, T * Np, D] -> [1, 1, T * N, D]: the first N rows of each tile."""
    x, tiles, tokens = node.args
    dim = lw.shape_of(x)[3]
    padded = lw.shape_of(x)[2] // tiles
    _steps(lw, node, lw.ref(x), [
        ("ttnn.reshape", [[1, tiles, padded, dim]], {}, [1, tiles, padded, dim], "TILE"),
        ("ttnn.slice", [[0, 0, 0, 0], [1, tiles, tokens, dim]], {}, [1, tiles, tokens, dim], "TILE"),
        ("ttnn.reshape", [[1, 1, tiles * tokens, dim]], {}, None, "TILE"),
    ])


def _encoder_attention(lw: Lowering, node):
    q, k, v, mask, scale = node.args
    lw.result(node, "ttnn.transformer.scaled_dot_product_attention", [lw.ref(q), lw.ref(k), lw.ref(v)], {
        "attn_mask": lw.ref(mask), "is_causal": False, "scale": scale,
        "compute_kernel_config": compute_config("HiFi4")})


def _split_heads(lw: Lowering, node):
    """[1, 1, R, H*hd] -> prefill [1, H, R, hd] (reshape, transpose); decode [1, R, H, hd]."""
    x, n_heads, head_dim, decode = node.args
    rows = lw.shape_of(x)[2]
    if decode:
        lw.result(node, "ttnn.reshape", [lw.ref(x), [1, -1, n_heads, head_dim]])  # users: -1 (ttnn pads to 32)
        return
    _steps(lw, node, lw.ref(x), [
        ("ttnn.reshape", [_target_shape([1, rows, n_heads, head_dim])], {}, [1, rows, n_heads, head_dim], "TILE"),
        ("ttnn.transpose", [1, 2], {}, None, "TILE"),
    ])


def _cross_attention(lw: Lowering, node):
    """One user's prefill rows against its row of the cross-attention caches."""
    q, k_cache, v_cache, _, mask, scale = node.args
    rows = []
    for cache, tag in ((k_cache, "_k"), (v_cache, "_v")):
        _, heads, length, head_dim = lw.shape_of(cache)
        name = lw.tensor(lw.out_name(node, tag), [1, heads, length, head_dim], lw.dtype_of(node), node)
        lw.emit(node, "ttnn.slice", [lw.ref(cache), ["$user_id", 0, 0, 0], ["$user_id+1", heads, length, head_dim]],
                None, [name])
        rows.append("%" + name)
    lw.result(node, "ttnn.transformer.scaled_dot_product_attention", [lw.ref(q), *rows], {
        "attn_mask": lw.ref(mask), "is_causal": False, "scale": scale,
        "compute_kernel_config": compute_config("HiFi4")})


def _cross_attention_decode(lw: Lowering, node):
    """Every user's decode row against its own row of the caches. ttnn's decode attention
    takes the mask per user and head, [1, B, H, L]: the host's [1, 1, B, L] rows are
    reshaped to [1, B, 1, L] and repeated over the heads."""
    q, k_cache, v_cache, mask, scale = node.args
    _, users, heads, _ = lw.shape_of(q)
    length = lw.shape_of(mask)[3]
    per_user = lw.tensor(lw.out_name(node, "_mask_users"), [1, users, 1, length], lw.dtype_of(node), node)
    lw.emit(node, "ttnn.reshape", [lw.ref(mask), [1, -1, 1, length]], None, [per_user])  # users: -1 (ttnn pads)
    per_head = lw.tensor(lw.out_name(node, "_mask"), [1, users, heads, length], lw.dtype_of(node), node)
    lw.emit(node, "ttnn.repeat", ["%" + per_user, [1, 1, heads, 1]], None, [per_head])
    lw.result(node, "ttnn.transformer.scaled_dot_product_attention_decode",
              [lw.ref(q), lw.ref(k_cache), lw.ref(v_cache)],
              {"attn_mask": "%" + per_head, "is_causal": False, "scale": scale,
               "compute_kernel_config": compute_config("HiFi4")})


VISION_RULES = {
    dialect.layer_norm: _layer_norm, dialect.gelu: _gelu, dialect.concat: _concat,
    vops.patchify: _patchify, vops.aspect_ratio_rows: _aspect_ratio_rows,
    vops.prepend_class_token: _prepend_class_token, vops.positional_embedding: _positional_embedding,
    vops.pad_tile_tokens: _pad_tile_tokens, vops.pad_rows: _pad_rows_rule, vops.split_tiles: _reshape,
    vops.merge_tiles: _reshape, vops.unpad_tile_tokens: _unpad_tile_tokens,
    vops.encoder_attention: _encoder_attention, ref.split_heads: _split_heads,
    vops.cross_attention: _cross_attention, vops.cross_attention_decode: _cross_attention_decode,
}
