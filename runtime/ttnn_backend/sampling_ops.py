"""ttnn implementations of the ops of sampling on the device (lowering/sampling.py), in
the same table as runtime/ttnn_backend/ops.py's; call forms checked on ttnn 0.81.1's mock
meshes. topk gives TILE values and indices (uint16 while the vocabulary tile-pads to at
most 65536, else uint32); ttnn.sampling wants ROW_MAJOR int32 indices (the program
typecasts them) and bfloat16 values, one user per core."""
from __future__ import annotations

from .ops import OpCall, ttnn_op


@ttnn_op("ttnn.topk")
def topk(c: OpCall, input_tensor, k, dim=-1, largest=True, sorted=True, **kw):
    values, indices = c.ttnn.topk(input_tensor, k, dim=dim, largest=largest, sorted=sorted)
    return [values, indices]


@ttnn_op("ttnn.sampling")
def sampling(c: OpCall, input_values_tensor, input_indices_tensor, k=None, p=None, temp=None, seed=None):
    kw = {} if seed is None else {"seed": seed}
    return c.ttnn.sampling(input_values_tensor, input_indices_tensor, k=k, p=p, temp=temp, **kw)
