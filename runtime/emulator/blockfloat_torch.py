"""The block-float rounding of runtime/blockfloat.py, in torch, for the emulator's hot path.

The decode loop writes one bfloat8_b row per cache per layer per step; a numpy round
trip for each costs more than the rounding. This is the same algorithm step for step;
tests/test_emulator_ops.py holds it bit-equal to the numpy reference, which is itself
bit-equal to ttnn.
"""
from __future__ import annotations

import torch

from ..blockfloat import FORMATS, GROUP


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """float tensor -> float32 tensor of what ttnn reads back after converting to `fmt`."""
    f = FORMATS[fmt]
    shape = x.shape
    x = x.detach().to(torch.float32).reshape(-1, shape[-1] if len(shape) else 1)
    pad = -x.shape[-1] % GROUP
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    bits = x.contiguous().view(torch.int32).reshape(x.shape[0], -1, GROUP)
    e = (bits >> 23) & 0xFF
    m = ((bits & 0x7FFFFF) | (1 << 23)) * (e != 0)
    big_e = e.amax(dim=-1, keepdim=True)
    m = m >> (big_e - e).clamp(max=31)
    drop = 24 - f.mantissa_bits
    m = m + ((1 << (drop - 1)) - 1) + ((m >> drop) & 1)
    q = (m >> drop).clamp(max=(1 << f.mantissa_bits) - 1)
    out = torch.copysign(q.to(torch.float32), bits.view(torch.float32)).view(torch.int32)
    out = (out + ((big_e - f.exponent_bias_offset) << 23)) * (q != 0)
    out = out.view(torch.float32).reshape(x.shape)
    if pad:
        out = out[:, : x.shape[1] - pad]
    return out.reshape(shape)
