"""Numpy model of ttnn's host conversion to the block-float formats bfloat8_b / bfloat4_b.

The emulator must produce the numbers a real device would see, so this reproduces
ttnn 0.81.1's float32 -> block-float -> float32 round trip bit for bit, including its
quirks (truncating alignment, saturation instead of exponent bump, flushed subnormals).
It is deliberately numpy-only so the runtime's ttnn side never needs torch.

Every 16 consecutive values along the last dimension (one row of a 16x16 tile face)
share one 8-bit exponent E, the largest raw float32 exponent field in the group. Each
value keeps a sign and an n-bit magnitude q with an explicit leading one, so it reads
back as +-q * 2**(E - 127 - (n - 1)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

GROUP = 16  # values sharing one exponent
TILE = 32


@dataclass(frozen=True)
class BlockFormat:
    name: str
    mantissa_bits: int  # sign-magnitude bits kept per value, leading one included
    exponent_bias_offset: int  # value = +-q * 2**(E - exponent_bias_offset)
    tile_bytes: int  # bytes per 32x32 tile: 64 exponents + packed magnitudes


FORMATS = {
    "bfloat8_b": BlockFormat("bfloat8_b", 7, 133, 64 + 1024),
    "bfloat4_b": BlockFormat("bfloat4_b", 3, 129, 64 + 512),
}

SCALAR_BYTES = {"bfloat16": 2, "float32": 4, "uint32": 4, "int32": 4}


def round_bfloat16(x) -> np.ndarray:
    """Round to nearest-even bfloat16 and widen back: what a bfloat16 tensor holds.

    ttnn turns every NaN into the positive quiet NaN, so this does too.
    """
    import ml_dtypes  # here, not at the top: the compiler imports this module for bytes_for alone

    with np.errstate(invalid="ignore"):
        out = np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    out[np.isnan(out)] = np.nan
    return out


def bytes_for(shape, dtype: str) -> int:
    """Device bytes of a TILE-layout tensor: last two dims padded to 32, rest multiplied."""
    dims = [1, 1] + [int(d) for d in shape]
    rows, cols = -(-dims[-2] // TILE) * TILE, -(-dims[-1] // TILE) * TILE
    n = math.prod(dims[:-2]) * rows * cols
    if dtype in FORMATS:
        return n // (TILE * TILE) * FORMATS[dtype].tile_bytes
    return n * SCALAR_BYTES[dtype]


def quantize(x, fmt: str) -> np.ndarray:
    """Return what ttnn reads back after converting float array `x` to block format `fmt`.

    bfloat16 input is widened exactly first, so a bf16 tensor is rounded twice, as in
    ttnn. float64 is rounded to float32 first, since ttnn's host path works on float32.
    """
    f = FORMATS[fmt]
    x = np.asarray(x)
    shape = x.shape
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, shape[-1] if shape else 1)
    pad = -x.shape[-1] % GROUP
    if pad:  # zero padding never raises a group's exponent
        x = np.pad(x, ((0, 0), (0, pad)))
    bits = x.view(np.int32).reshape(x.shape[0], -1, GROUP)

    e = (bits >> 23) & 0xFF
    # Exponent field 0 (zero, subnormal) is flushed; inf/nan are not special-cased.
    m = (bits & 0x7FFFFF) | (1 << 23)
    m *= e != 0
    big_e = e.max(axis=-1, keepdims=True)
    # Align to the shared exponent, dropping shifted-out bits (no sticky bit);
    # shifts of 24..31 already give 0, so capping at 31 keeps the shift defined.
    shift = np.subtract(big_e, e, out=e)
    np.minimum(shift, 31, out=shift)
    m >>= shift

    # Round to nearest, ties to even: add just under half, plus the kept lsb.
    drop = 24 - f.mantissa_bits
    m += (1 << (drop - 1)) - 1 + ((m >> drop) & 1)
    q = m >> drop
    np.minimum(q, (1 << f.mantissa_bits) - 1, out=q)  # saturate, E unchanged

    # q as a float is exact; moving its exponent field by E - offset scales it by
    # 2**(E - offset) and, at E = 255, yields inf/nan bit patterns as ttnn does.
    # No result is subnormal: a nonzero one is >= 2**-126, as its input was normal.
    out = np.copysign(q.astype(np.float32), bits.view(np.float32)).view(np.int32)
    out += (big_e - f.exponent_bias_offset) << 23
    out *= q != 0  # -0 and values that round to 0 read back as +0
    out = out.view(np.float32)

    out = out.reshape(x.shape)
    if pad:
        out = out[:, : x.shape[1] - pad]
    return out.reshape(shape)
