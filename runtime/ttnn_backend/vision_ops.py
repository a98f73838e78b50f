"""ttnn implementations of the ops Llama 3.2 Vision programs add (lowering/vision_rules.py):
registered in the same table as runtime/ttnn_backend/ops.py's. Call forms checked on
ttnn 0.81.1's mock meshes (N150, N300)."""
from __future__ import annotations

from .ops import OpCall, _memory_kw, layout_of, ttnn_op


@ttnn_op("ttnn.layer_norm")
def layer_norm(c: OpCall, input_tensor, **kw):
    # gamma / beta arrive as ROW_MAJOR [1, 1, D/32, 32] rows, as rms_norm's do
    return c.ttnn.layer_norm(input_tensor, **_memory_kw(c, kw, input_tensor.shape))


@ttnn_op("ttnn.gelu")
def gelu(c: OpCall, input_tensor, **kw):
    return c.ttnn.gelu(input_tensor, **_memory_kw(c, kw, input_tensor.shape))  # exact (erf) by default


@ttnn_op("ttnn.concat")
def concat(c: OpCall, tensors, dim, **kw):
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return c.ttnn.concat(list(tensors), dim, **_memory_kw(c, kw, shape))


@ttnn_op("ttnn.permute")
def permute(c: OpCall, input_tensor, dims, **kw):
    shape = [input_tensor.shape[d] for d in dims]
    return c.ttnn.permute(input_tensor, list(dims), **_memory_kw(c, kw, shape))


@ttnn_op("ttnn.to_layout")
def to_layout(c: OpCall, tensor, layout, **kw):
    return c.ttnn.to_layout(tensor, layout_of(c.ttnn, layout), **_memory_kw(c, kw, tensor.shape))


@ttnn_op("ttnn.pad")
def pad(c: OpCall, input_tensor, padding, value, **kw):
    shape = [d + before + after for d, (before, after) in zip(input_tensor.shape, padding)]
    return c.ttnn.pad(input_tensor, [tuple(p) for p in padding], float(value), **_memory_kw(c, kw, shape))


@ttnn_op("ttnn.repeat")
def repeat(c: OpCall, input_tensor, repetition_vector, **kw):
    shape = [d * r for d, r in zip(input_tensor.shape, repetition_vector)]
    return c.ttnn.repeat(input_tensor, list(repetition_vector), **_memory_kw(c, kw, shape))
