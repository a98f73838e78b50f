"""Row-wise float32 ops in one C call each (row_kernels.c, built by native.py), where
torch would take several small ops and their dispatch per row of a decode step. Without
a compiler, torch computes the same maths; the two agree to float32 rounding."""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import native

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
SIGNATURES = {"rms_norm_rows": [_I64, _I64, _PTR, _INT, _PTR, ctypes.c_float, _PTR, _INT],
              "rotary_rows": [_INT, _PTR, _PTR, _I64, _PTR, _INT, _PTR, _PTR, _INT, _PTR, _PTR, _PTR]}
TILE = 32
INPUT_DTYPES = (torch.bfloat16, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2, last dim) + eps) * weight, float32, x's shape."""
    lib = native.library("row_kernels", SIGNATURES) if x.dtype in INPUT_DTYPES else None
    n = x.shape[-1]
    if weight is not None:
        weight = weight.reshape(-1).to(torch.float32)
    if lib is None:
        xf = x.float()
        return F.rms_norm(xf, (n,), weight, eps)
    x = x.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    if out.numel():
        lib.rms_norm_rows(x.numel() // n, n, x.data_ptr(), int(x.dtype == torch.bfloat16),
                          None if weight is None else weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads())
    return out


_permutations: dict[tuple, tuple] = {}  # (address, shape, strides, dtype) -> (the matrix, its permutation)


def signed_permutation(trans_mat: torch.Tensor):
    """(source [32] int64, sign [32] float32) when the 32 x 32 matrix moves each input to
    one output with a sign of 1 or -1 (x @ T: out[j] = sign[j] * x[source[j]]), else None."""
    key = (trans_mat.data_ptr(), tuple(trans_mat.shape), trans_mat.stride(), trans_mat.dtype)
    held = _permutations.get(key)
    if held is not None:  # the held view pins the storage: no other tensor can take its address
        return held[1]
    t = trans_mat.reshape(TILE, TILE).float()
    nonzero = t != 0
    found = None
    if bool((nonzero.sum(0) == 1).all()):
        source = nonzero.int().argmax(0)
        sign = t[source, torch.arange(TILE)]
        if bool((sign.abs() == 1).all()):
            found = (source.to(torch.int64).contiguous(), sign.contiguous())
    _permutations[key] = (trans_mat, found)
    return found


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, trans_mat: torch.Tensor) -> torch.Tensor:
    """x * cos + (x @ trans_mat per tile of 32) * sin in float32 (x [.., n], n a multiple
    of 32; cos, sin broadcast to x)."""
    lib = native.library("row_kernels", SIGNATURES)
    moves = signed_permutation(trans_mat) if lib is not None else None
    cos, sin = cos.expand(x.shape), sin.expand(x.shape)
    if (moves is None or x.dim() < 2 or x.dtype not in INPUT_DTYPES or cos.dtype not in INPUT_DTYPES
            or cos.dtype != sin.dtype or cos.stride() != sin.stride() or cos.stride(-1) != 1):
        xf = x.float()
        rotated = (xf.unflatten(-1, (-1, TILE)) @ trans_mat.reshape(TILE, TILE).float()).flatten(-2)
        return torch.addcmul(xf * cos.float(), rotated, sin.float())
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    source, sign = moves
    dims = x.dim() - 1
    shape, strides = (ctypes.c_int64 * dims)(*x.shape[:-1]), (ctypes.c_int64 * dims)(*cos.stride()[:-1])
    lib.rotary_rows(dims, shape, strides, x.shape[-1], x.data_ptr(),
                    int(x.dtype == torch.bfloat16), cos.data_ptr(), sin.data_ptr(), int(cos.dtype == torch.bfloat16),
                    source.data_ptr(), sign.data_ptr(), out.data_ptr())
    return out
