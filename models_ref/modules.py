"""Reference Llama-3 / Qwen2.5 decoder, written to trace cleanly with torch.fx.

Parameter names are Meta's (`layers.0.attention.wq.weight`), q/k rows are in Meta's
interleaved RoPE layout (weights.py converts HF checkpoints), and the KV cache, rope
tables and positions are explicit. `mode` is fixed at construction: one module traces to
the prefill graph, another to the decode graph.
"""
from __future__ import annotations

import torch
from torch import nn

from . import multimodal, ops
from .blocks import FeedForward, RMSNorm
from .config import ModelConfig
from .rope import cos_sin_tables

MODES = ("prefill", "decode")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq_len: int, decode: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.decode = decode
        self.scale = cfg.head_dim ** -0.5
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.window = cfg.sliding_window
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim on every q and k head, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        shape = (max_batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, cos, sin, positions, user_id):
        q = ops.split_heads(self.wq(x), self.n_heads, self.head_dim, self.decode)
        k = ops.split_heads(self.wk(x), self.n_kv_heads, self.head_dim, self.decode)
        v = ops.split_heads(self.wv(x), self.n_kv_heads, self.head_dim, self.decode)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = ops.rotary(q, cos, sin)
        k = ops.rotary(k, cos, sin)
        if self.decode:
            k_cache = ops.update_cache(self.k_cache, k, positions)
            v_cache = ops.update_cache(self.v_cache, v, positions)
            out = ops.decode_attention(q, k_cache, v_cache, positions, self.scale, self.window)
        else:
            ops.fill_cache(self.k_cache, k, user_id)
            ops.fill_cache(self.v_cache, v, user_id)
            out = ops.causal_attention(q, k, v, self.scale, self.window)
        return self.wo(ops.merge_heads(out, self.decode))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, max_batch: int, max_seq_len: int, decode: bool):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, max_batch, max_seq_len, decode)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, positions, user_id):
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, user_id)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """forward(tokens [1, S|B], positions [S|B], user_id, last_index[, xattn_mask, row_mask])
    -> logits [1, 1, R, V].

    Prefill returns the logits of the 32-row tile holding `last_index`; decode returns one
    row per user. KV caches are buffers of each attention (`layers.i.attention.k_cache`).
    Llama 3.2 Vision (cfg.vision): gated cross-attention layers run before the
    self-attention layers cfg.cross_attention_layers names, reading the cross-attention
    caches the vision function writes (models_ref/multimodal.py) through the rows' masks
    (`xattn_mask` [1, 1, R, L] additive, `row_mask` [1, 1, R, 1]; cross_attention.py); the
    token table holds the image-token rows after the vocabulary (`assembled_weights`).
    """

    def __init__(self, cfg: ModelConfig, mode: str, max_batch: int = 1, max_seq_len: int = 4096):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.cfg, self.mode = cfg, mode
        decode = mode == "decode"
        self.decode = decode
        extra_rows = multimodal.IMAGE_TOKEN_ROWS if cfg.vision else 0
        # _weight skips the random init (on the meta device it would import torch._dynamo)
        rows = cfg.vocab_size + extra_rows
        self.tok_embeddings = nn.Embedding(rows, cfg.dim, _weight=torch.empty(rows, cfg.dim))
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, max_batch, max_seq_len, decode) for _ in range(cfg.n_layers)
        )
        # How weights the checkpoint stores in parts are assembled (trace reads this).
        self.assembled_weights = {}
        self.cross_before: dict[int, int] = {}  # self-attention layer -> cross-attention layer before it
        if cfg.vision:
            if cfg.tie_word_embeddings:
                raise ValueError("tied embeddings with image-token rows are not supported")
            self.cross_attention_layers = multimodal.cross_layers(cfg, mode, max_batch)
            self.cross_before = {layer: k for k, layer in enumerate(sorted(cfg.cross_attention_layers))}
            self.assembled_weights["tok_embeddings.weight"] = multimodal.image_embedding_recipe()
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if torch.empty(0).is_meta:  # traced for shapes: the tables' values are a weight recipe
            # two tensors: one object registered twice would be deduplicated as one buffer
            cos, sin = torch.empty(max_seq_len, cfg.head_dim), torch.empty(max_seq_len, cfg.head_dim)
        else:
            cos, sin = cos_sin_tables(cfg, max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, positions, user_id, last_index, xattn_mask=None, row_mask=None):
        x = ops.embed(tokens, self.tok_embeddings.weight)  # [1, 1, rows, dim]
        cos = ops.rope_rows(self.rope_cos, positions, self.decode)
        sin = ops.rope_rows(self.rope_sin, positions, self.decode)
        for i, layer in enumerate(self.layers):
            if i in self.cross_before:
                x = self.cross_attention_layers[self.cross_before[i]](x, xattn_mask, row_mask, user_id)
            x = layer(x, cos, sin, positions, user_id)
        if not self.decode:
            x = ops.last_tile(x, last_index)
        return self.output(self.norm(x))
