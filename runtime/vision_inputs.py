"""Host-side inputs of Llama 3.2 Vision programs, torch-free: the vision function's
encoder mask and each user's cross-attention masks (the rules models_ref.vision_ops and
models_ref.cross_attention state, here in numpy; tests/test_vision_program.py checks they
agree).

A masked position holds the most negative bfloat16 rather than -inf: a row that masks
everything (a padding token's) then gets a finite, uniform softmax instead of NaN, and
its output is discarded anyway.
"""
from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .images import ProcessedImage, cross_attention_token_mask

NEG = float(ml_dtypes.finfo(ml_dtypes.bfloat16).min)  # -3.39e38


def encoder_mask(aspect_ratio_mask: np.ndarray, tokens: int, semantic: int, padded: int) -> np.ndarray:
    """The vision transformers' additive mask [1, 1, T*padded, T*padded]: (i, j) is masked
    when both are padding (a padding tile's token, or a row after a tile's `tokens` real
    ones up to `semantic`, the model's multiple of 8), and every row or column past
    `semantic` (the device's extra padding to whole tiles) is masked both ways."""
    tiles = len(aspect_ratio_mask)
    position = np.arange(padded)
    pad = ((np.asarray(aspect_ratio_mask).reshape(tiles, 1) == 0) | (position >= tokens)[None]).reshape(-1)
    extra = np.broadcast_to((position >= semantic)[None], (tiles, padded)).reshape(-1)
    masked = (pad[:, None] & pad[None, :]) | extra[None, :] | extra[:, None]
    return np.where(masked, NEG, 0.0).astype(np.float32)[None, None]


@dataclass
class UserImage:
    """One user's image as its text rows see it: per prompt token, which tiles it sees."""

    token_tiles: np.ndarray  # [S, max_tiles] 0/1: the processor's cross_attention_mask (one image)
    tokens_per_tile: int
    cache_len: int

    @classmethod
    def of(cls, token_ids: list[int], image: ProcessedImage, image_token_id: int, tokens_per_tile: int,
           cache_len: int) -> "UserImage":
        mask = cross_attention_token_mask(token_ids, image_token_id, [image.num_tiles], len(image.aspect_ratio_mask))
        return cls(mask[:, 0, :], tokens_per_tile, cache_len)

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(xattn rows [R, cache_len], row mask [R]) for prompt token indices `rows`
        (indices past the prompt repeat its last row, as decode steps do)."""
        tiles = self.token_tiles[np.minimum(rows, len(self.token_tiles) - 1)]  # [R, T]
        sees = np.repeat(tiles, self.tokens_per_tile, axis=1).astype(bool)  # [R, T*N]
        row_mask = sees.any(axis=1)
        additive = np.where(sees | ~row_mask[:, None], 0.0, NEG)  # a row seeing nothing: zeros (HF)
        out = np.full((len(rows), self.cache_len), NEG, dtype=np.float32)
        out[:, : sees.shape[1]] = additive
        return out, row_mask.astype(np.float32)


def text_only_rows(count: int, vision_tokens: int, cache_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a user without an image: its cache rows are zero, so attention gives zero
    whatever it reads, and the row mask zeroes the MLP: the layer is an identity."""
    out = np.full((count, cache_len), NEG, dtype=np.float32)
    out[:, :vision_tokens] = 0.0
    return out, np.zeros(count, dtype=np.float32)


def batch_masks(per_user: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Program inputs from per-user (xattn rows, row mask) pairs stacked along the rows."""
    xattn = np.concatenate([x for x, _ in per_user])
    rows = np.concatenate([r for _, r in per_user])
    return {"xattn_mask": xattn[None, None], "row_mask": rows[None, None, :, None]}
