"""RoPE frequencies (none, linear, llama3, yarn) and the tables the device program uses.

Frequencies follow Hugging Face's definitions so that float32 programs match it. The
device consumes cos/sin in Meta's interleaved layout (pairs (2i, 2i+1) rotate together),
which is what ttnn's rotary_embedding_llama and its 32x32 transformation matrix expect.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig, RopeScaling

TILE = 32


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    old_ctx = s.original_max_position_embeddings
    low_wavelen = old_ctx / s.low_freq_factor
    high_wavelen = old_ctx / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(theta: float, dim: int, s: RopeScaling, max_pos: int) -> tuple[torch.Tensor, float]:
    original = s.original_max_position_embeddings or max_pos

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        attention = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        attention = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    else:
        attention = mscale(s.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the factor cos/sin are multiplied by."""
    s = cfg.rope_scaling
    base = _default_inv_freq(cfg.rope_theta, cfg.head_dim)
    if s is None:
        return base, 1.0
    if s.kind == "linear":
        return base / s.factor, 1.0
    if s.kind == "llama3":
        return _llama3(base, s), 1.0
    if s.kind == "yarn":
        return _yarn(cfg.rope_theta, cfg.head_dim, s, cfg.max_position_embeddings)
    raise ValueError(f"unsupported rope type {s.kind}")


def cos_sin_tables(cfg: ModelConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq_len, head_dim] in interleaved layout: column 2i and 2i+1 share freq i."""
    inv_freq, scale = inv_freq_and_scale(cfg)
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]  # HF: float32 outer product
    cos = (freqs.cos() * scale).repeat_interleave(2, dim=-1)
    sin = (freqs.sin() * scale).repeat_interleave(2, dim=-1)
    return cos, sin


def transformation_matrix() -> torch.Tensor:
    """The 32x32 matrix T with (x @ T) rotating each interleaved pair: (a, b) -> (-b, a)."""
    t = torch.zeros(TILE, TILE)
    t[torch.arange(0, TILE, 2), torch.arange(1, TILE, 2)] = 1.0
    t[torch.arange(1, TILE, 2), torch.arange(0, TILE, 2)] = -1.0
    return t
