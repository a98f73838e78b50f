"""Evaluate weight recipes on real checkpoint tensors (the only place weights are read)."""
from __future__ import annotations

import torch

from models_ref.config import ModelConfig
from models_ref.rope import cos_sin_tables, transformation_matrix


class RecipeEvaluator:
    """recipe (nested JSON list) -> tensor. Rope tables are computed once and shared."""

    def __init__(self, reader, cfg: ModelConfig):
        self.reader, self.cfg = reader, cfg
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, recipe: list) -> torch.Tensor:
        kind, *args = recipe
        if kind == "source":
            return self.reader.get(args[0])
        if kind == "transpose":
            return self(args[0]).t().contiguous()
        if kind == "concat":
            dim, parts = args
            return torch.cat([self(p) for p in parts], dim=dim)
        if kind == "reshape":
            shape, inner = args
            return self(inner).reshape(shape)
        if kind == "select_heads":  # pick head blocks along dim; -1 is a zero (padded) head
            dim, head_dim, heads, inner = args
            t = self(inner)
            blocks = t.split(head_dim, dim=dim)
            zero = torch.zeros_like(blocks[0])
            return torch.cat([blocks[h] if h >= 0 else zero for h in heads], dim=dim)
        if kind == "pad":  # pad dim up to size with zeros (or `value`: rotary cos tables get ones)
            dim, size, inner, *value = args
            t = self(inner)
            pad = [0, 0] * (t.dim() - 1 - dim) + [0, size - t.shape[dim]]
            return torch.nn.functional.pad(t, pad, value=value[0] if value else 0.0)
        if kind == "tanh_scale":  # a learned gate folded into what it scales (passes/fold_gates.py)
            gate, inner = args
            return self(inner) * torch.tanh(self(gate).float()).to(torch.float32)
        if kind == "one_minus_tanh_scale":
            gate, inner = args
            return self(inner) * (1 - torch.tanh(self(gate).float()))
        if kind == "taps_to_blocks":  # projector rows for [final | tap_0 | ... ] instead of interleaved taps
            width, taps, inner = args
            t = self(inner)
            final, inter = t[:width], t[width:]
            return torch.cat([final, inter.reshape(width, taps, -1).transpose(0, 1).reshape(width * taps, -1)])
        if kind == "pad_heads":  # zero columns (or rows) after each head's head_dim (passes/pad_heads.py)
            dim, head_dim, padded, inner = args
            blocks = self(inner).split(head_dim, dim=dim)
            pad = [0, 0] * (blocks[0].dim() - 1 - dim) + [0, padded - head_dim]
            return torch.cat([torch.nn.functional.pad(b, pad) for b in blocks], dim=dim)
        if kind == "zeros":
            return torch.zeros(args[0])
        if kind == "scale":  # a constant factor (passes/pad_heads.py: q/k norms over padded heads)
            factor, inner = args
            return self(inner).float() * factor
        if kind == "rope_table":
            which, rows = args
            if rows not in self._rope:
                self._rope[rows] = cos_sin_tables(self.cfg, rows)
            return self._rope[rows][0 if which == "cos" else 1]
        if kind == "rope_trans_mat":
            return transformation_matrix().reshape(1, 1, 32, 32)
        raise ValueError(f"unknown weight recipe step '{kind}'")


def storage_dtype(device_dtype: str) -> torch.dtype:
    """What the cache stores for a device dtype: block floats are quantised at load time
    from bfloat16, as the reference hands ttnn bfloat16 torch tensors."""
    return torch.float32 if device_dtype == "float32" else torch.bfloat16
