"""Reference Llama 3.2 Vision encoder + multi-modal projector, traceable with torch.fx.

Parameter names are Meta's (`vision_model.vision_encoder.transformer.resblocks.0.attn.wq.weight`,
`vision_model.vision_projection.weight`; see vision_names.py for the HF names), with two
layout choices that follow the device rather than Meta's file:
- the patch "conv" is `conv1._linear` `[D, C*p*p]` (Meta's layout; HF's conv weight
  `[D, C, p, p]` flattened), applied to unfolded patches (vision_ops.patchify);
- the three aspect-ratio-dependent embeddings (`pre_tile_pos_embed.embedding`,
  `post_tile_pos_embed.embedding`, `gated_positional_embedding`) are tables with one row
  per aspect-ratio id `[n_ar + 1, T*rows*D]` (HF's layout; row 0 = no image), looked up
  with the id. Meta's files hold `[T, T, rows, D]` grids; vision_names.meta_ar_table
  builds the table (exactly as transformers' converter does).

One image per call, shapes fixed by the config (T = max_num_tiles tiles always, padding
tiles masked through `aspect_ratio_mask`):

    forward(pixels [T, C, tile, tile] float, aspect_ratio_id [1] long, aspect_ratio_mask [T])
        -> vision tokens [1, 1, T * tokens_per_tile, text_dim]

No data-dependent Python control flow: ids and masks are tensors consumed by leaf ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from . import vision_ops as vops
from .vision_config import VisionConfig


class ImageAttention(nn.Module):
    """Multi-head (no GQA), no bias, no RoPE, non-causal with the encoder mask."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, mask):
        q = ops.split_heads(self.wq(x), self.n_heads, self.head_dim, False)
        k = ops.split_heads(self.wk(x), self.n_heads, self.head_dim, False)
        v = ops.split_heads(self.wv(x), self.n_heads, self.head_dim, False)
        out = vops.encoder_attention(q, k, v, mask, self.scale)
        return self.wo(ops.merge_heads(out, False))


class ImageFeedForward(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.dim, cfg.ffn_dim, bias=True)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=True)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU, as HF's "gelu" and Meta's nn.GELU


class ImageTransformerBlock(nn.Module):
    """Pre-LayerNorm block; the global transformer's blocks gate both branches by tanh."""

    def __init__(self, cfg: VisionConfig, gated: bool):
        super().__init__()
        self.gated = gated
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = ImageAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = ImageFeedForward(cfg)
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x, mask):
        h = self.attn(self.ln_1(x), mask)
        if self.gated:
            h = vops.tanh_gate(h, self.gate_attn)
        x = x + h
        h = self.mlp(self.ln_2(x))
        if self.gated:
            h = vops.tanh_gate(h, self.gate_ffn)
        return x + h


class ImageTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, n_layers: int, gated: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ImageTransformerBlock(cfg, gated) for _ in range(n_layers))

    def forward(self, x, mask, taps: tuple[int, ...] = (), tap_output: bool = False):
        """Returns (x, [hidden state entering (or, tap_output, leaving) layer i for i in taps])."""
        out = []
        for i, block in enumerate(self.resblocks):
            if i in taps and not tap_output:
                out.append(x)
            x = block(x, mask)
            if i in taps and tap_output:
                out.append(x)
        return x, out


class TilePositionEmbedding(nn.Module):
    """x + tanh(gate) * table[aspect_ratio_id] (one `[D]` row per tile)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.tiles, self.dim = cfg.max_num_tiles, cfg.dim
        self.embedding = nn.Parameter(torch.zeros(cfg.n_aspect_ratios + 1, cfg.max_num_tiles * cfg.dim))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, aspect_ratio_id):
        rows = vops.aspect_ratio_rows(self.embedding, aspect_ratio_id, self.tiles, 1, self.dim)
        return x + vops.tanh_gate(rows, self.gate)


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self._linear = nn.Linear(cfg.num_channels * cfg.patch_size ** 2, cfg.dim, bias=False)

    def forward(self, pixels):
        return self._linear(vops.patchify(pixels, self.patch))


class VisionEncoder(nn.Module):
    """Meta's `vision_model.vision_encoder`: pixels of one image -> features `[1, 1, T*N, output_dim]`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.dim, cfg.tokens_per_tile
        self.conv1 = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.positional_embedding = nn.Parameter(torch.zeros(n, d))
        self.gated_positional_embedding = nn.Parameter(torch.zeros(cfg.n_aspect_ratios + 1, cfg.max_num_tiles * n * d))
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.pre_tile_pos_embed = TilePositionEmbedding(cfg)
        self.post_tile_pos_embed = TilePositionEmbedding(cfg)
        self.ln_pre = nn.LayerNorm(d, eps=1e-5)
        self.ln_post = nn.LayerNorm(d, eps=1e-5)
        self.transformer = ImageTransformer(cfg, cfg.n_layers, gated=False)
        self.global_transformer = ImageTransformer(cfg, cfg.n_global_layers, gated=True)

    def forward(self, pixels, aspect_ratio_id, aspect_ratio_mask, encoder_mask=None):
        """`encoder_mask` (optional): the additive mask encoder_attention_mask would make
        from aspect_ratio_mask, given instead (the compiled program takes it from the host)."""
        cfg = self.cfg
        tiles, n = cfg.max_num_tiles, cfg.tokens_per_tile
        x = self.conv1(pixels)                                        # [1, T, P, D]
        x = self.pre_tile_pos_embed(x, aspect_ratio_id)
        x = vops.prepend_class_token(x, self.class_embedding)         # [1, T, N, D]
        per_tile = vops.aspect_ratio_rows(self.gated_positional_embedding, aspect_ratio_id, tiles, n, cfg.dim)
        x = vops.positional_embedding(x, self.positional_embedding, per_tile, self.gated_positional_embedding_gate)
        x = self.ln_pre(x)
        x = vops.pad_tile_tokens(x, cfg.padded_tokens_per_tile)       # [1, 1, T*Np, D]
        mask = encoder_mask if encoder_mask is not None else vops.encoder_attention_mask(
            aspect_ratio_mask, n, _semantic_padding(cfg), cfg.padded_tokens_per_tile)
        x, taps = self.transformer(x, mask, cfg.intermediate_layers, cfg.intermediate_taps == "layer_output")
        x = self.ln_post(x)
        x = vops.split_tiles(x, tiles)
        x = self.post_tile_pos_embed(x, aspect_ratio_id)
        x = vops.merge_tiles(x)
        x, _ = self.global_transformer(x, mask)
        x = vops.unpad_tile_tokens(x, tiles, n)
        taps = [vops.unpad_tile_tokens(t, tiles, n) for t in taps]
        return vops.vision_features(x, taps)                          # [1, 1, T*N, D*(1+k)]


def _semantic_padding(cfg: VisionConfig) -> int:
    """The tile length HF and Meta pad to (a multiple of 8); more is device padding."""
    return -(-cfg.tokens_per_tile // 8) * 8


class VisionModel(nn.Module):
    """Meta's `vision_model`: encoder + `vision_projection` (the multi-modal projector)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.padded_tokens_per_tile < _semantic_padding(cfg):
            raise ValueError(f"token_multiple {cfg.token_multiple} pads tiles to {cfg.padded_tokens_per_tile} "
                             f"tokens, fewer than the model's {_semantic_padding(cfg)}")
        self.vision_encoder = VisionEncoder(cfg)
        self.vision_projection = nn.Linear(cfg.output_dim, cfg.text_dim, bias=True)

    def forward(self, pixels, aspect_ratio_id, aspect_ratio_mask, encoder_mask=None):
        return self.vision_projection(self.vision_encoder(pixels, aspect_ratio_id, aspect_ratio_mask, encoder_mask))


class VisionTower(nn.Module):
    """The module to trace: its state-dict names are the canonical names
    (`vision_model.vision_encoder.*`, `vision_model.vision_projection.*`).

    forward(pixels [T, C, tile, tile], aspect_ratio_id [1], aspect_ratio_mask [T])
        -> projected vision tokens [1, 1, T * tokens_per_tile, text_dim]
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg)

    def forward(self, pixels, aspect_ratio_id, aspect_ratio_mask):
        return self.vision_model(pixels, aspect_ratio_id, aspect_ratio_mask)
