"""Exact float64 matmuls over weights held at their stored width (bfloat16 or float32),
and the emulator's block-float rounding, as one small C library (exact_gemm.c).

The emulator's matmul operands have at most 11 significant bits (fidelity.py), so every
product is exact in float64 and so is each dot product's sum: the result does not depend
on the order of summation. torch's float64 GEMM needs both operands in float64, 8 bytes
per weight read per decode step; the small C kernel beside this file (exact_gemm.c) reads
each weight as stored (2 bytes for bfloat16) and widens it in registers, which is what a
decode step is bound by. Same products, same exact sums, so the same bits as torch's path
(tests/test_exact_gemm.py).

The kernel is compiled with the system's C compiler at first use, into
~/.cache/ttcompile/kernels/ keyed by its source, flags and the CPU (-march=native), and
loaded with ctypes. Without a compiler the emulator takes torch's float64 GEMM: slower,
the same results. One activation row (decode) streams the weights, widening them in
registers; more rows (batches, prefill) widen a panel of 8 weight rows once and run a
6 x 8 register-blocked micro-kernel over it, about as fast as torch's float64 GEMM on
operands it would first have to widen.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("exact_gemm.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]
STORED = (torch.bfloat16, torch.float32)  # weight dtypes the kernel reads

_state: dict = {"lib": None, "tried": False, "enabled": True, "why": ""}


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "|".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _library_path() -> Path:
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(FLAGS), platform.machine(), _cpu_key()])
                          .encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "ttcompile" / "kernels" / f"exact_gemm-{key}.so"


def _build(path: Path) -> None:
    """Compile into a temporary file and rename it into place (concurrent test workers may
    build at once; each rename is atomic and the results are the same file)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library():
    """The loaded kernel, or None (no compiler, or disabled): built once per process."""
    if not _state["enabled"]:
        return None
    if not _state["tried"]:
        _state["tried"] = True
        path = _library_path()
        try:
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            _state["why"] = str(exc)
            return None
        lib.exact_gemm.restype = None
        lib.exact_gemm.argtypes = [ctypes.c_int64] * 4 + [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        lib.exact_linear.restype = None
        lib.exact_linear.argtypes = [ctypes.c_int64] * 4 + [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        lib.blockfloat_quantize.restype = None
        lib.blockfloat_quantize.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                            ctypes.c_int, ctypes.c_void_p]
        _state["lib"] = lib
    return _state["lib"]


def available() -> bool:
    return _library() is not None


def status() -> str:
    """One line on how the emulator's matmuls run here (for benchmarks and reports)."""
    if available():
        return f"exact-sum kernel {_library_path().name}"
    return f"torch float64 GEMM (kernel unavailable: {_state['why'] or 'disabled'})"


@contextlib.contextmanager
def torch_only():
    """Run matmuls on torch's float64 GEMM (to compare the two paths)."""
    before = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = before


def stored(values: torch.Tensor) -> torch.Tensor:
    """`values` (exact operand values, any float dtype) in the narrowest dtype that holds
    them exactly: bfloat16, else float32, else float64."""
    for dtype in STORED:
        narrow = values.to(dtype)
        if torch.equal(narrow.to(values.dtype), values):
            return narrow
    return values.to(torch.float64)


def _batch_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else 0


def matmul(x: torch.Tensor, w: torch.Tensor, w_index: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, M, K] @ w[B, N, K]^T -> float64 [B, M, N], B broadcast where 1 on either side;
    with `w_index` [B] (int64), entry b multiplies by w[w_index[b]] (chips holding shared
    pieces). Exact products, exact sums."""
    batch = x.shape[0] if w_index is not None else max(x.shape[0], w.shape[0])
    m, k, n = x.shape[1], x.shape[2], w.shape[1]
    lib = _library() if w.dtype in STORED else None
    if lib is None:
        w = w if w_index is None else w[w_index]
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
                       None if w_index is None else w_index.data_ptr(),
                       int(w.dtype == torch.bfloat16), out.data_ptr(), out.stride(0), torch.get_num_threads())
    return out


# exact_linear's codes (exact_gemm.c): which of the activation's parts the weight's
# columns pair with, how the float32 Dst is written.
PARTS = {("src",): 1, ("high",): 2, ("high", "low"): 3}
OUT_MODES = {"float32": (0, torch.float32), "bf16_even": (1, torch.bfloat16), "bf16_away": (2, torch.bfloat16)}


def device_linear(x: torch.Tensor, w: torch.Tensor, w_index: torch.Tensor | None, src_mask: int,
                  high_mask: int, parts: tuple[str, ...], bias: torch.Tensor | None,
                  out_mode: str) -> torch.Tensor | None:
    """fidelity.py's whole linear in one kernel call: x [Bx, M, K] (Bx 1: every entry's),
    w [U, N, K * len(parts)], entry b against w[w_index[b]] (w[b] without an index); the
    activation keeps the float32 bits of `src_mask` (0: as it is) and splits into `parts`
    at `high_mask`; float64 sums plus `bias` [N], rounded to a float32 Dst and written as
    `out_mode`. -> [B, M, N]; None where the kernel does not run (no compiler, a float64
    weight)."""
    m = x.shape[1]
    lib = _library() if w.dtype in STORED else None
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
    out = torch.empty(batch, m, w.shape[1], dtype=dtype)
    if out.numel():
        lib.exact_linear(batch, m, w.shape[1], x.shape[2], x.data_ptr(), x.stride(0), x.shape[0], src_mask,
                         high_mask, PARTS[parts], w.data_ptr(), w.stride(0), None if w_index is None else w_index.data_ptr(),
                         int(w.dtype == torch.bfloat16), None if bias is None else bias.data_ptr(), code,
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
