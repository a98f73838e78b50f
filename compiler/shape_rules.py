"""Shape rules: each graph op's result shape and dtype, computed without running the op.

Shape propagation (compiler/shapes.py) runs every graph about a dozen times per mode. On
meta tensors most of torch's kernels are Python (torch._prims, _refs, _decomp): about
half a millisecond a node, and their first call imports sympy and torch._dynamo, over a
second of a `ttcompile` process. A rule here returns `torch.empty(shape, dtype,
device="meta")` (C++ only) from the arguments' shapes.

A rule is a fast path, never a different answer: it returns None for any argument it does
not cover (a zero-dim tensor, mixed dtypes, a reshape that would fail), and the op then
runs on meta tensors as before. tests/test_shape_rules.py checks every rule against the
meta kernels on every node of the seed models' graphs.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from models_ref import ops as ref
from models_ref import vision_ops as vops

from . import dialect


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _tensors(*xs) -> bool:
    """All are tensors with at least one dim (zero-dim ones promote differently)."""
    for x in xs:
        if not (isinstance(x, torch.Tensor) and x.dim() > 0):
            return False
    return True


def _dtype(*xs):
    """The one dtype of tensors `xs`, or None if they differ (left to the meta kernels)."""
    dtypes = {x.dtype for x in xs}
    return dtypes.pop() if len(dtypes) == 1 else None


def _broadcast(*shapes) -> tuple | None:
    """numpy broadcasting of `shapes`, or None if they do not broadcast."""
    if shapes.count(shapes[0]) == len(shapes):  # the common case, and the fast one
        return tuple(shapes[0])
    ndim = max(len(s) for s in shapes)
    out = []
    for i in range(ndim):
        dims = {s[i - ndim + len(s)] for s in shapes if i - ndim + len(s) >= 0} - {1}
        if len(dims) > 1:
            return None
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _same_as(x):
    return _meta(x.shape, x.dtype) if _tensors(x) and x.dtype.is_floating_point else None


def _silu_function(x, inplace=False):
    return None if inplace else _same_as(x)


def _gelu_function(x, approximate="none"):
    return _same_as(x)


def _elementwise(*xs):
    """Tensors broadcast together, of one dtype."""
    if not _tensors(*xs):
        return None
    shape, dtype = _broadcast(*(x.shape for x in xs)), _dtype(*xs)
    return None if shape is None or dtype is None else _meta(shape, dtype)


def _binary(a, b):
    """a + b or a * b: two tensors, or a floating tensor and a Python number."""
    for t, s in ((a, b), (b, a)):
        if _tensors(t) and t.dtype.is_floating_point and type(s) in (int, float):
            return _meta(t.shape, t.dtype)
    return _elementwise(a, b)


def _reshaped(x, shape):
    """`shape` if x.reshape(shape) would succeed (no -1), else None."""
    return tuple(shape) if math.prod(shape) == x.numel() and min(shape, default=1) >= 0 else None


def _slice_len(n: int, start, stop) -> int:
    return len(range(n)[start:stop])


def _matmul_2d(x, w):
    """x `[..., K]` @ w `[K, N]` of one dtype -> `[..., N]`."""
    if _tensors(x, w) and x.dim() >= 2 and w.dim() == 2 and x.shape[-1] == w.shape[0] and _dtype(x, w):
        return tuple(x.shape[:-1]) + (w.shape[1],)
    return None


def _attention(q, v):
    """scaled_dot_product_attention-like: q's rows, v's head dim, q's dtype."""
    if _tensors(q, v) and q.dim() == 4 and v.dim() == 4:
        return _meta(tuple(q.shape[:-1]) + (v.shape[-1],), q.dtype)
    return None


# ---------------------------------------------------------------- models_ref.ops

def _embed(tokens, table):
    if _tensors(tokens, table) and table.dim() == 2 and tokens.dtype in (torch.int32, torch.int64):
        return _meta((1,) + tuple(tokens.shape) + (table.shape[1],), table.dtype)
    return None


def _rms_norm(x, weight, eps):
    if not (_tensors(x, weight) and x.dtype.is_floating_point):
        return None
    shape = _broadcast(x.shape, weight.shape)
    return None if shape is None else _meta(shape, x.dtype)


def _head_shape(x, n_heads, head_dim, decode):
    """ref.split_heads' result shape, or None."""
    if not (_tensors(x) and x.dim() >= 3):
        return None
    rows = x.shape[2]
    if _reshaped(x, (1, rows, n_heads, head_dim)) is None:
        return None
    return (1, rows, n_heads, head_dim) if decode else (1, n_heads, rows, head_dim)


def _split_heads(x, n_heads, head_dim, decode):
    shape = _head_shape(x, n_heads, head_dim, decode)
    return None if shape is None else _meta(shape, x.dtype)


def _merge_heads(x, decode):
    if not (_tensors(x) and x.dim() == 4):
        return None
    _, rows, n_heads, head_dim = x.shape if decode else (x.shape[0], x.shape[2], x.shape[1], x.shape[3])
    shape = _reshaped(x, (1, 1, rows, n_heads * head_dim))
    return None if shape is None else _meta(shape, x.dtype)


def _rotary(x, cos, sin):
    if _tensors(x) and x.shape[-1] % 2 == 0:
        return _elementwise(x, cos, sin)
    return None


def _rope_rows(table, positions, decode):
    if not (_tensors(table, positions) and table.dim() == 2 and positions.dtype in (torch.int32, torch.int64)):
        return None
    n, dim = positions.numel(), table.shape[1]
    return _meta((1, n, 1, dim) if decode else (1, 1, n, dim), table.dtype)


def _cache_write(cache, *args):
    """Cache writes return the cache itself (its shape and dtype are the state's)."""
    return cache if _tensors(cache) else None


def _causal_attention(q, k, v, scale, window=None):
    return _attention(q, v) if _tensors(k) and _dtype(q, k, v) else None


def _decode_attention(q, k_cache, v_cache, cur_pos, scale, window=None):
    """User b reads cache row b: the caches hold at least the batch's rows."""
    if (_tensors(q, k_cache, v_cache) and q.dim() == 4 and v_cache.dim() == 4
            and min(k_cache.shape[0], v_cache.shape[0]) >= q.shape[1]):
        return _meta((1, q.shape[1], q.shape[2], v_cache.shape[3]), q.dtype)
    return None


def _last_tile(x, last_index):
    if not (_tensors(x) and x.dim() >= 3 and type(last_index) is int):
        return None
    start = (last_index // 32) * 32
    shape = list(x.shape)
    shape[2] = _slice_len(shape[2], start, start + 32)
    return _meta(shape, x.dtype)


# ---------------------------------------------------------------- compiler.dialect

def _linear(x, weight, bias=None):
    shape = _matmul_2d(x, weight)
    if shape is None:
        return None
    if bias is not None and not (_tensors(bias) and bias.numel() in (1, shape[-1]) and _dtype(x, bias)):
        return None
    return _meta(shape, x.dtype)


def _gated_mlp(x, w1, w3):
    shape = _matmul_2d(x, w1)
    if shape is None or _matmul_2d(x, w3) != shape:
        return None
    return _meta(shape, x.dtype)


def _layer_norm(x, weight, bias, eps):
    if _tensors(x, weight, bias) and x.dtype.is_floating_point and weight.numel() == bias.numel() == x.shape[-1]:
        return _meta(x.shape, x.dtype)
    return None


def _concat(parts, dim):
    parts = list(parts)
    if not (parts and _tensors(*parts) and _dtype(*parts) and len({p.dim() for p in parts}) == 1):
        return None
    ndim = parts[0].dim()
    if not -ndim <= dim < ndim:
        return None
    dim %= ndim
    rest = {tuple(p.shape[:dim]) + tuple(p.shape[dim + 1:]) for p in parts}
    if len(rest) != 1:
        return None
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return _meta(shape, parts[0].dtype)


def _qkv_heads(x, n_heads, n_kv_heads, head_dim, decode):
    if not (_tensors(x) and x.dim() >= 3):
        return None
    q_end = n_heads * head_dim
    k_end = q_end + n_kv_heads * head_dim
    out = []
    for heads, (start, stop) in ((n_heads, (None, q_end)), (n_kv_heads, (q_end, k_end)),
                                 (n_kv_heads, (k_end, None))):
        part = _meta(tuple(x.shape[:-1]) + (_slice_len(x.shape[-1], start, stop),), x.dtype)
        shape = _head_shape(part, heads, head_dim, decode)
        if shape is None:
            return None
        out.append(_meta(shape, x.dtype))
    return tuple(out)


def _all_reduce(x, axis):
    return _meta(x.shape, x.dtype) if _tensors(x) else None


def _all_gather(x, dim, axis, size):
    if not (_tensors(x) and -x.dim() <= dim < x.dim() and size >= 1):
        return None
    shape = list(x.shape)
    shape[dim] *= size
    return _meta(shape, x.dtype)


def _paged_attention(q, *args, **kwargs):
    """chunked_attention / paged_decode_attention on meta tensors: empty_like(q)."""
    return _meta(q.shape, q.dtype) if _tensors(q) else None


def _getitem(obj, index):
    """Picking one result of a multi-output op; tensor indexing runs on meta."""
    return obj[index] if isinstance(obj, (tuple, list)) and type(index) is int else None


# ---------------------------------------------------------------- models_ref.vision_ops

def _patchify(pixels, patch):
    if not (_tensors(pixels) and pixels.dim() == 4 and patch >= 1):
        return None
    t, c, h, w = pixels.shape
    if h < patch or w < patch:
        return None
    patches = ((h - patch) // patch + 1) * ((w - patch) // patch + 1)
    return _meta((1, t, patches, c * patch * patch), pixels.dtype)


def _aspect_ratio_rows(table, aspect_ratio_id, tiles, rows, dim):
    if not (_tensors(table) and table.dim() >= 2 and type(aspect_ratio_id) is int
            and -table.shape[0] <= aspect_ratio_id < table.shape[0]):
        return None
    if math.prod(table.shape[1:]) != tiles * rows * dim:
        return None
    return _meta((1, tiles, rows, dim), table.dtype)


def _prepend_class_token(x, cls):
    if not (_tensors(x, cls) and x.dim() == 4):
        return None
    target = (x.shape[0], x.shape[1], 1, x.shape[3])
    if cls.dim() > 4 or _broadcast(cls.shape, target) != target:
        return None
    return _meta((x.shape[0], x.shape[1], x.shape[2] + 1, x.shape[3]), x.dtype)


def _positional_embedding(x, local, per_tile, gate):
    if not (_tensors(x, local, per_tile) and local.dim() >= 2):
        return None
    if gate is None:
        local_shape = (1, 1) + tuple(local.shape[-2:])
        if _reshaped(local, local_shape) is None or not _dtype(x, local, per_tile):
            return None
        shape = _broadcast(x.shape, local_shape, per_tile.shape)
    else:
        if not (_tensors(gate) and _dtype(x, local, per_tile, gate)):
            return None
        gated_local = _broadcast(gate.shape, local.shape)
        gated_tile = _broadcast(gate.shape, per_tile.shape)
        if gated_local is None or gated_tile is None:
            return None
        shape = _broadcast(x.shape, (1, 1) + gated_local, gated_tile)
    return None if shape is None else _meta(shape, x.dtype)


def _pad_tile_tokens(x, padded):
    if not (_tensors(x) and x.dim() == 4 and x.shape[0] == 1 and padded >= 0):
        return None
    _, tiles, _, dim = x.shape
    return _meta((1, 1, tiles * padded, dim), x.dtype)


def _pad_rows(x, rows):
    if not (_tensors(x) and x.dim() == 4 and rows >= 0):
        return None
    return _meta((x.shape[0], x.shape[1], rows, x.shape[3]), x.dtype)


def _split_tiles(x, tiles):
    if not (_tensors(x) and tiles >= 1 and x.numel() > 0 and x.numel() % (tiles * x.shape[-1]) == 0):
        return None
    return _meta((1, tiles, x.numel() // (tiles * x.shape[-1]), x.shape[-1]), x.dtype)


def _merge_tiles(x):
    if not (_tensors(x) and x.numel() > 0):
        return None
    return _meta((1, 1, x.numel() // x.shape[-1], x.shape[-1]), x.dtype)


def _unpad_tile_tokens(x, tiles, tokens):
    if not (_tensors(x) and tiles >= 1 and tokens >= 0 and x.numel() > 0):
        return None
    dim = x.shape[-1]
    if x.numel() % (tiles * dim) or tokens > x.numel() // (tiles * dim):
        return None
    return _meta((1, 1, tiles * tokens, dim), x.dtype)


def _encoder_attention(q, k, v, mask, scale):
    return _attention(q, v) if _tensors(k, mask) and _dtype(q, k, v) else None


def _vision_features(final, taps):
    taps = list(taps)
    if not (taps and _tensors(final, *taps) and _dtype(final, *taps) and len({t.shape for t in taps}) == 1):
        return None
    if tuple(final.shape[:-1]) != tuple(taps[0].shape[:-1]):
        return None
    return _meta(tuple(final.shape[:-1]) + (final.shape[-1] + taps[0].shape[-1] * len(taps),), final.dtype)


def _cross_attention(q, k_cache, v_cache, user_id, mask, scale):
    if not (_tensors(q, k_cache, v_cache, mask) and q.dim() == 4 and q.shape[0] == 1 and k_cache.dim() == 4):
        return None
    scores = (1, q.shape[1], q.shape[2], k_cache.shape[2])
    if _broadcast(scores, mask.shape) != scores:
        return None
    return _meta((1, q.shape[1], q.shape[2], v_cache.shape[-1]), q.dtype)


def _cross_attention_decode(q, k_cache, v_cache, mask, scale):
    return _decode_attention(q, k_cache, v_cache, None, scale)


# ---------------------------------------------------------------- the tables

FUNCTION_RULES = {
    ref.embed: _embed, ref.rms_norm: _rms_norm, ref.split_heads: _split_heads, ref.merge_heads: _merge_heads,
    ref.rotary: _rotary, ref.rope_rows: _rope_rows, ref.fill_cache: _cache_write,
    ref.update_cache: _cache_write, ref.causal_attention: _causal_attention,
    ref.decode_attention: _decode_attention, ref.last_tile: _last_tile,
    dialect.linear: _linear, dialect.add: _binary, dialect.mul: _binary, dialect.silu: _same_as,
    dialect.gelu: _same_as, dialect.layer_norm: _layer_norm, dialect.concat: _concat,
    dialect.qkv_heads: _qkv_heads, dialect.gated_mlp: _gated_mlp, dialect.all_reduce: _all_reduce,
    dialect.all_gather: _all_gather, dialect.paged_fill_cache: _cache_write,
    dialect.paged_update_cache: _cache_write, dialect.chunked_attention: _paged_attention,
    dialect.paged_decode_attention: _paged_attention, operator.getitem: _getitem,
    # the traced graph before canonicalize
    operator.add: _binary, operator.mul: _binary, F.silu: _silu_function, F.gelu: _gelu_function,
    vops.patchify: _patchify, vops.aspect_ratio_rows: _aspect_ratio_rows, vops.tanh_gate: _elementwise,
    vops.prepend_class_token: _prepend_class_token, vops.positional_embedding: _positional_embedding,
    vops.pad_tile_tokens: _pad_tile_tokens, vops.pad_rows: _pad_rows, vops.split_tiles: _split_tiles,
    vops.merge_tiles: _merge_tiles, vops.unpad_tile_tokens: _unpad_tile_tokens,
    vops.encoder_attention: _encoder_attention, vops.vision_features: _vision_features,
    vops.cross_attention: _cross_attention, vops.cross_attention_decode: _cross_attention_decode,
}


def _linear_module(module: nn.Linear, x):
    return _linear(x, module.weight.t(), module.bias)


def _layer_norm_module(module: nn.LayerNorm, x):
    if not (module.elementwise_affine and module.bias is not None and len(module.normalized_shape) == 1):
        return None
    return _layer_norm(x, module.weight, module.bias, module.eps)


MODULE_RULES = {nn.Linear: _linear_module, nn.LayerNorm: _layer_norm_module}


def function_result(target, args, kwargs):
    """The meta result of call_function `target`, or None: run it on meta tensors."""
    rule = FUNCTION_RULES.get(target) if callable(target) else None
    return None if rule is None else rule(*args, **kwargs)


def module_result(module, args, kwargs):
    """The meta result of call_module `module`, or None: run it on meta tensors."""
    rule = MODULE_RULES.get(type(module))
    return None if rule is None else rule(module, *args, **kwargs)
