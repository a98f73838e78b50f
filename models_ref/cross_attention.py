"""Llama 3.2 Vision's gated cross-attention layers, split the way a device program runs them.

Two program functions per cross-attention layer, both traceable with torch.fx:

1. cache fill, once per image (`CrossAttentionCacheFill`, or `CrossAttention.fill`):
   vision tokens `[1, 1, L, D]` (the projector's output, L = images * T * tokens_per_tile)
   -> K = k_norm(wk x), V = wv x per KV head, written to the user's row of the layer's
   cross-attention cache `[max_batch, Hkv, L_cache, hd]` (ops.fill_cache).
2. the per-token layer (`CrossAttentionBlock`, mode fixed at construction like
   modules.py): text rows `[1, 1, R, D]` (prefill: R tokens of `user_id`; decode: one row
   per user) read that cache. q = q_norm(wq x) per head; attention is grouped-query, not
   causal, no RoPE, with an additive mask `[1, 1, R, L_cache]`; then

       h   = x + tanh(gate_attn) * wo(attn)            (Meta: wo(attn) * row_mask)
       out = h + tanh(gate_ffwd) * (row_mask * w2(silu(w1 n) * w3 n)),  n = ffn_norm(h)

Masks (`cross_attention_masks` builds both from the processor's per-token tile mask, the
`cross_attention_mask` [S, images, T] of MllamaProcessor; see runtime/images.py), HF's
semantics exactly (transformers' _prepare_cross_attention_mask):
- a text row may attend to the tokens of the tiles marked 1 in its row (the image's real
  tiles, for every row from the image's <|image|> token to the end; padding tiles never);
  other vision tokens get finfo.min (float32 here);
- `row_mask` is 1 for a row with at least one visible tile, else 0 (rows before the
  first <|image|> token; a prompt without image has only such rows);
- a row with NO visible tile gets an all-zero additive row: HF then attends it to EVERY
  vision token of the cache (padding tiles included) with plain softmax weights, and adds
  tanh(gate_attn) * wo(that) to the residual: HF does not zero the attention output,
  only the MLP branch (`row_mask * mlp`). So under HF such a row still changes (by
  image-dependent amounts), and the MLP leaves it alone. Meta's reference (and tt-metal)
  also multiply the attention output by `row_mask`, making the whole layer an identity
  for such rows; `semantics="meta"` selects that (HF issue #39379 reports the
  difference; it only matters when <|image|> is not the first token, e.g. under the
  chat template, where the BOS and header tokens come first).
- decode rows: HF's generate appends a copy of the last prompt row for every new token,
  so a user's decode mask row is its last prompt row (`decode_rows`).
- a user without an image: HF skips the cross-attention layers entirely. Here the rows
  are fully masked, so the layer is an identity only under semantics="meta", or under
  "hf" if the user's cache row is all zeros (then attention returns mean(V) = 0): a
  runtime that reuses cache rows must zero them for text-only users.

Cross-attention q/k carry no RoPE, so the text decoder's HF<->Meta q/k row permutation
does not apply: wq, wk, q_norm and k_norm are copied as they are (vision_names.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from . import vision_ops as vops
from .blocks import FeedForward, RMSNorm
from .config import ModelConfig

MODES = ("prefill", "decode")
SEMANTICS = ("hf", "meta")


class CrossAttention(nn.Module):
    """Meta's `attention` of a cross-attention layer, with this layer's K/V cache."""

    def __init__(self, cfg: ModelConfig, decode: bool, max_batch: int, cache_len: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.decode = decode
        self.scale = cfg.head_dim ** -0.5
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        shape = (max_batch, cfg.n_kv_heads, cache_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def fill(self, vision_tokens, user_id):
        """Write K/V of `vision_tokens` `[1, 1, L, D]` at the start of row `user_id`."""
        k = self.k_norm(ops.split_heads(self.wk(vision_tokens), self.n_kv_heads, self.head_dim, False))
        v = ops.split_heads(self.wv(vision_tokens), self.n_kv_heads, self.head_dim, False)
        k_cache = ops.fill_cache(self.k_cache, k, user_id)
        v_cache = ops.fill_cache(self.v_cache, v, user_id)
        return k_cache, v_cache

    def forward(self, x, mask, user_id):
        q = self.q_norm(ops.split_heads(self.wq(x), self.n_heads, self.head_dim, self.decode))
        if self.decode:
            out = vops.cross_attention_decode(q, self.k_cache, self.v_cache, mask, self.scale)
        else:
            out = vops.cross_attention(q, self.k_cache, self.v_cache, user_id, mask, self.scale)
        return self.wo(ops.merge_heads(out, self.decode))


class CrossAttentionBlock(nn.Module):
    """Meta's `text_model.cross_attention_layers.{i}` (HF MllamaCrossAttentionDecoderLayer).

    forward(x [1, 1, R, D], xattn_mask [1, 1, R, L_cache], row_mask [1, 1, R, 1], user_id)
        -> [1, 1, R, D]; prefill rows are one user's tokens, decode rows are users.
    The K/V cache must have been filled (`attention.fill`) for the users read.
    """

    def __init__(self, cfg: ModelConfig, mode: str, max_batch: int = 1, cache_len: int = 6404,
                 semantics: str = "hf"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}")
        self.mode, self.semantics = mode, semantics
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = CrossAttention(cfg, mode == "decode", max_batch, cache_len)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, x, xattn_mask, row_mask, user_id):
        h = self.attention(self.attention_norm(x), xattn_mask, user_id)
        if self.semantics == "meta":
            h = h * row_mask
        x = x + vops.tanh_gate(h, self.gate_attn)
        f = row_mask * self.feed_forward(self.ffn_norm(x))
        return x + vops.tanh_gate(f, self.gate_ffwd)


class CrossAttentionCacheFill(nn.Module):
    """The "cross-attention cache fill" program function: one image's projected vision
    tokens `[1, 1, L, D]` -> K/V of every cross-attention layer in row `user_id` of its
    cache. Holds the layers it fills (only their wk, wv and k_norm are read)."""

    def __init__(self, layers: nn.ModuleList):
        super().__init__()
        self.layers = layers

    def forward(self, vision_tokens, user_id):
        return [layer.attention.fill(vision_tokens, user_id) for layer in self.layers]


def cross_attention_masks(token_tiles: torch.Tensor, tokens_per_tile: int,
                          cache_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's masks from the processor's per-token tile mask `[S, images, T]` (0/1).

    Returns (xattn_mask `[1, 1, S, cache_len]` float32 additive, row_mask `[1, 1, S, 1]`
    float32 0/1). Vision token j of the cache is token j % N of tile (j // N) % T of
    image j // (T*N), N = tokens_per_tile. Cache positions beyond images*T*N (a cache
    longer than this user's images) are always masked, so they are never read."""
    rows, images, tiles = token_tiles.shape
    length = images * tiles * tokens_per_tile
    cache_len = length if cache_len is None else cache_len
    if cache_len < length:
        raise ValueError(f"{images} image(s) of {tiles} tiles need {length} cache positions, cache has {cache_len}")
    allowed = token_tiles.to(torch.bool).repeat_interleave(tokens_per_tile, dim=2).reshape(rows, length)
    neg = torch.finfo(torch.float32).min
    additive = torch.zeros(rows, length).masked_fill(~allowed, neg)
    row_mask = allowed.any(-1, keepdim=True).float()
    additive = additive * row_mask  # rows seeing nothing: all zeros (HF's rule)
    additive = F.pad(additive, (0, cache_len - length), value=neg)
    return additive[None, None], row_mask[None, None]


def decode_rows(prompt_mask: torch.Tensor) -> torch.Tensor:
    """A user's mask for decode steps: the last prompt row `[..., S, X]` -> `[..., 1, X]`
    (HF's generate repeats it for every new token)."""
    return prompt_mask[..., -1:, :]
