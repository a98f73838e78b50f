"""Exact float64 matmuls over weights held in their narrowest exact form, and the
emulator's block-float rounding, as one small C library (exact_gemm.c, built by native.py).

The emulator's matmul operands have at most 11 significant bits (fidelity.py), so every
product is exact in float64 and so is each dot product's sum: the result does not depend
on the order of summation. torch's float64 GEMM needs both operands in float64, 8 bytes
per weight read per decode step; the kernel reads each weight as held and widens it in
registers, which is what a decode step is bound by: block-float weights (bfloat8_b,
bfloat4_b and the fidelity parts of them) as int8 mantissas with an exponent byte per
group of 16 (pack_blocks: ~1 byte a weight), others as bfloat16 or float32. Same
products, same exact sums, so the same bits as torch's path (tests/test_exact_gemm.py),
which the emulator takes without a compiler: slower, the same results.

One activation row (decode) streams the weights, widening them in registers; more rows
(batches, prefill) widen a panel of 8 weight rows once and run a 6 x 8 register-blocked
micro-kernel over it, about as fast as torch's float64 GEMM on operands it would first
have to widen.
"""
from __future__ import annotations

import ctypes

import torch

from .. import blockfloat
from . import native

# How the kernel reads a weight, by the dtype it is held in (exact_gemm.c's w_kind);
# int8 is block mantissas with their exponents (pack_blocks).
W_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
STORED = (torch.bfloat16, torch.float32)  # plain float dtypes, narrowest first
BLOCK_ROWS = 16  # block-float group along the output features (exact_gemm.c's BLOCK_ROWS)
BLOCK_BIAS = blockfloat.FORMATS["bfloat8_b"].exponent_bias_offset  # 133: exact_gemm.c's BLOCK_BIAS

_I64, _PTR, _INT, _U32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
SIGNATURES = {
    "exact_gemm": [_I64] * 4 + [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _INT, _PTR, _I64, _INT],
    "exact_linear": [_I64] * 4 + [_PTR, _I64, _INT, _U32, _U32, _INT, _PTR, _I64, _PTR, _PTR, _INT, _PTR, _INT, _PTR,
                                  _INT],
    "blockfloat_quantize": [_PTR, _I64, _I64, _INT, _INT, _PTR],
    "pack_blocks": ([_PTR, _I64, _I64, _I64, _PTR], _INT),
}
torch_only = native.torch_only  # run every matmul on torch's float64 GEMM (to compare the paths)


def _library():
    return native.library("exact_gemm", SIGNATURES)


def available() -> bool:
    return _library() is not None


def status() -> str:
    """One line on how the emulator's matmuls run here (for benchmarks and reports)."""
    if available():
        return f"exact-sum kernel {native.library_path('exact_gemm').name}"
    return f"torch float64 GEMM (kernel unavailable: {native.why('exact_gemm') or 'disabled'})"


def stored(values: torch.Tensor) -> torch.Tensor:
    """`values` [..., N, K] (exact operand values, any float dtype) in the narrowest form
    that holds them exactly: block mantissas (pack_blocks; only where the kernel runs, as
    torch's GEMM would widen them every call), else bfloat16, float32, float64."""
    packed = pack_blocks(values)
    if packed is not None:
        return packed
    for dtype in STORED:
        narrow = values.to(dtype)
        if torch.equal(narrow.to(values.dtype), values):
            return narrow
    return values.to(torch.float64)


def pack_blocks(values: torch.Tensor) -> torch.Tensor | None:
    """An [..., N, K] operand whose values are, in each group of 16 rows at one column, a
    small integer times a shared power of two (block-float weights and the fidelity parts
    of them: ttnn groups 16 output features per input index), as exact_gemm.c reads it:
    int8 [..., N + ceil(N / 16), K], the N rows of mantissas in [-127, 127] then a row of
    exponent bytes per group, w = mantissa * 2^(byte - 133) (bfloat8_b's own encoding:
    the byte is the group's largest float32 exponent field, 0 only for zeros). None when
    some value does not fit (it is checked, not assumed) or without the kernel (which
    alone reads this layout)."""
    lib = _library()
    if lib is None or values.dim() < 2 or not values.is_floating_point() or values.numel() == 0:
        return None
    single = values.to(torch.float32)
    if values.dtype == torch.float64 and not torch.equal(single.to(torch.float64), values):
        return None
    n, k = values.shape[-2:]
    single = single.contiguous()
    out = torch.empty(*values.shape[:-2], n + -(-n // BLOCK_ROWS), k, dtype=torch.int8)
    if not lib.pack_blocks(single.data_ptr(), single.numel() // (n * k), n, k, out.data_ptr()):
        return None
    return out


def zero_pieces(w: torch.Tensor) -> torch.Tensor | None:
    """uint8 [U] flags of the all-zero entries of operands w [U, N, K] as held (device_linear
    skips them), or None when none is."""
    values = w[:, : block_features(w)] if w.dtype == torch.int8 else w  # mantissas alone
    flags = (values == 0).flatten(1).all(1)
    return flags.to(torch.uint8) if bool(flags.any()) else None


def block_features(w: torch.Tensor) -> int:
    """N, the output features of an operand: its rows, or for pack_blocks' layout the N
    with N + ceil(N / 16) rows."""
    rows = w.shape[-2]
    if w.dtype != torch.int8:
        return rows
    whole, rest = divmod(rows, BLOCK_ROWS + 1)
    return whole * BLOCK_ROWS + max(rest - 1, 0)


def same_form(operands: list[torch.Tensor]) -> list[torch.Tensor]:
    """Operands (pieces of one weight, to be stacked) in one form: the widest any of them
    is held in (some chips' pieces may pack into blocks where others do not)."""
    order = [torch.int8, *STORED, torch.float64]
    widest = max((t.dtype for t in operands), key=order.index)
    return [t if t.dtype == widest else (unpack_blocks(t) if t.dtype == torch.int8 else t).to(widest)
            for t in operands]


def unpack_blocks(w: torch.Tensor) -> torch.Tensor:
    """pack_blocks' layout back to float32 values (for torch's path and for tests)."""
    n = block_features(w)
    exponents = w[..., n:, :].view(torch.uint8).to(torch.int32) - BLOCK_BIAS
    scale = torch.ldexp(torch.ones(exponents.shape, dtype=torch.float64), exponents).repeat_interleave(BLOCK_ROWS, dim=-2)
    return (w[..., :n, :].to(torch.float64) * scale[..., :n, :]).to(torch.float32)


def _batch_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else 0


def matmul(x: torch.Tensor, w: torch.Tensor, w_index: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, M, K] @ w[B, N, K]^T -> float64 [B, M, N], B broadcast where 1 on either side;
    with `w_index` [B] (int64), entry b multiplies by w[w_index[b]] (chips holding shared
    pieces). Exact products, exact sums."""
    batch = x.shape[0] if w_index is not None else max(x.shape[0], w.shape[0])
    m, k, n = x.shape[1], x.shape[2], block_features(w)
    lib = _library() if w.dtype in W_KINDS else None
    if lib is None:
        w = w if w_index is None else w[w_index]
        w = unpack_blocks(w) if w.dtype == torch.int8 else w
        return torch.matmul(x.to(torch.float64), w.to(torch.float64).transpose(-1, -2))
    x = x.to(torch.float64)
    if not (x[0].is_contiguous() and w[0].is_contiguous()):
        x, w = x.contiguous(), w.contiguous()
    out = torch.empty(batch, m, n, dtype=torch.float64)
    if w_index is not None:
        w_index = w_index.to(torch.int64).contiguous()
    if out.numel():
        lib.exact_gemm(batch, m, n, k, x.data_ptr(), _batch_stride(x), w.data_ptr(),
                       w.stride(0) if w_index is not None else _batch_stride(w),
                       None if w_index is None else w_index.data_ptr(), None,
                       W_KINDS[w.dtype], out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


# exact_linear's codes (exact_gemm.c): which of the activation's parts the weight's
# columns pair with, how the float32 Dst is written.
PARTS = {("src",): 1, ("high",): 2, ("high", "low"): 3}
OUT_MODES = {"float32": (0, torch.float32), "bf16_even": (1, torch.bfloat16), "bf16_away": (2, torch.bfloat16)}


def device_linear(x: torch.Tensor, w: torch.Tensor, w_index: torch.Tensor | None, src_mask: int,
                  high_mask: int, parts: tuple[str, ...], bias: torch.Tensor | None,
                  out_mode: str, zero: torch.Tensor | None = None) -> torch.Tensor | None:
    """fidelity.py's whole linear in one kernel call: x [Bx, M, K] (Bx 1: every entry's),
    w [U, N, K * len(parts)], entry b against w[w_index[b]] (w[b] without an index); the
    activation keeps the float32 bits of `src_mask` (0: as it is) and splits into `parts`
    at `high_mask`; float64 sums plus `bias` [N], rounded to a float32 Dst and written as
    `out_mode`. zero (uint8 [U], zero_pieces): the entries of all-zero weights are +0
    without a read. -> [B, M, N]; None where the kernel does not run (no compiler, a
    float64 weight)."""
    m = x.shape[1]
    lib = _library() if w.dtype in W_KINDS else None
    if lib is None or parts not in PARTS:
        return None
    batch = len(w_index) if w_index is not None else w.shape[0]
    x = x.to(torch.float32).contiguous()
    w = w.contiguous()
    if w_index is not None:
        w_index = w_index.to(torch.int64).contiguous()
    if bias is not None:
        bias = bias.reshape(-1).to(torch.float64).contiguous()
    code, dtype = OUT_MODES[out_mode]
    n = block_features(w)
    out = torch.empty(batch, m, n, dtype=dtype)
    if out.numel():
        lib.exact_linear(batch, m, n, x.shape[2], x.data_ptr(), x.stride(0), x.shape[0], src_mask,
                         high_mask, PARTS[parts], w.data_ptr(), w.stride(0), None if w_index is None else w_index.data_ptr(),
                         None if zero is None else zero.data_ptr(), W_KINDS[w.dtype], None if bias is None else bias.data_ptr(), code,
                         out.data_ptr(), torch.get_num_threads())
    return out


def blockfloat(values: torch.Tensor, mantissa_bits: int, exponent_bias_offset: int) -> torch.Tensor | None:
    """runtime/blockfloat.py's quantize in one kernel call, as bfloat16 (block-float values
    are exact in it); None without the kernel."""
    lib = _library()
    if lib is None:
        return None
    x = values.detach().to(torch.float32).contiguous()
    cols = x.shape[-1] if x.dim() else 1
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    if x.numel():
        lib.blockfloat_quantize(x.data_ptr(), x.numel() // cols, cols, mantissa_bits, exponent_bias_offset,
                                out.data_ptr())
    return out
