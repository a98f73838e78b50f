"""Llama 3.2 Vision's image path as program functions: the vision function (one image of
one user: vision tower, projector, and the K/V of every cross-attention layer written to
that user's row of the cross-attention caches) and the sizes the text functions share
with it.

The text decoder's cross-attention layers (modules.Transformer) read those caches. A
user without an image has its cache rows zeroed by the runtime: attention over zero K/V
returns zero and its row mask zeroes the MLP, so every cross-attention layer is then an
identity, as Hugging Face's text-only forward (which skips them) is.
"""
from __future__ import annotations

from torch import nn

from . import vision_ops as vops
from .config import ModelConfig
from .cross_attention import CrossAttentionBlock
from .vision import VisionModel
from .vision_config import VisionConfig

IMAGE_TOKEN_ROWS = 8  # embedding rows after the vocabulary (<|image|> and 7 reserved)
TILE = 32


def cross_cache_len(vision: VisionConfig) -> int:
    """Positions of a user's cross-attention cache row: one image's vision tokens
    (max tiles x tokens per tile), padded to whole tiles; the padding is always masked."""
    return -(-vision.vision_tokens // TILE) * TILE


def device_vision(vision: VisionConfig) -> VisionConfig:
    """The vision config a device program runs: tiles' tokens padded to whole 32-row
    tiles (1601 -> 1632) instead of 8 (1608); the extra rows are masked both ways
    (vision_ops.encoder_attention_mask), so no real token changes."""
    return vision.replace(token_multiple=TILE)


def cross_layers(cfg: ModelConfig, mode: str, max_batch: int) -> nn.ModuleList:
    """The decoder's cross-attention layers (canonical names cross_attention_layers.{i}.*)."""
    return nn.ModuleList(CrossAttentionBlock(cfg, mode, max_batch, cross_cache_len(cfg.vision))
                         for _ in cfg.cross_attention_layers)


class VisionFunction(nn.Module):
    """forward(pixels [T, C, tile, tile], aspect_ratio_id, encoder_mask [1, 1, T*Np, T*Np],
    user_id) -> the projected vision tokens [1, 1, L, D] (L = cross_cache_len, zero rows
    after T * tokens_per_tile); every cross-attention layer's K/V of them are written to
    row `user_id` of its cache. Parameters share the text program's canonical names."""

    def __init__(self, cfg: ModelConfig, max_batch: int):
        super().__init__()
        self.cache_len = cross_cache_len(cfg.vision)
        self.vision_model = VisionModel(device_vision(cfg.vision))
        self.cross_attention_layers = cross_layers(cfg, "prefill", max_batch)

    def forward(self, pixels, aspect_ratio_id, encoder_mask, user_id):
        tokens = self.vision_model(pixels, aspect_ratio_id, None, encoder_mask)
        tokens = vops.pad_rows(tokens, self.cache_len)
        for layer in self.cross_attention_layers:
            layer.attention.fill(tokens, user_id)
        return tokens


def image_embedding_recipe() -> list:
    """The text program's token table: the vocabulary, then the image-token rows."""
    return ["concat", 0, [["source", "tok_embeddings.weight"], ["source", "learnable_embedding.weight"]]]


