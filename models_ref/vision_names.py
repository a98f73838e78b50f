"""Weight names of Llama 3.2 Vision's image side, as data: vision encoder, projector,
cross-attention layers and the image-token embedding rows.

`NAME_TABLE` is a list of rows (canonical, hf, hf_legacy, meta, role, transform):
- canonical: the name the reference modules use (vision.VisionTower's state dict, and
  `text_model.cross_attention_layers.{i}.` + cross_attention.CrossAttentionBlock's names).
  Canonical names ARE Meta's names (the meta column repeats them); what can differ is the
  tensor layout, said by `transform`.
- hf: transformers 5 layout (`model.vision_model.*`, `model.multi_modal_projector.*`,
  `model.language_model.layers.{h}.*`); hf_legacy: transformers 4 files
  (`vision_model.*`, `multi_modal_projector.*`, `language_model.model.layers.{h}.*`).
- placeholders: `{i}` a layer index in its own list (local or global resblock, or Meta's
  cross-attention layer 0..7); `{h}` the HF decoder index of cross-attention layer i
  (HF numbers cross- and self-attention layers together: 3, 8, ..., 38 in 11B).
- transform: how a file's tensor becomes the canonical one
    identity     same tensor in all three layouts
    conv_weight  HF `[D, C, p, p]` -> canonical `[D, C*p*p]` (Meta already stores that)
    ar_table     Meta `[T, T, rows, D]` grid -> canonical `[n_ar+1, T*rows*D]`, one row per
                 aspect-ratio id (row 0 zeros; `meta_ar_table`); HF already stores that
    vocab_rows   HF keeps the 8 image-token rows after the vocabulary in embed_tokens
                 (`[vocab+8, D]`, rows vocab..); Meta has them as learnable_embedding `[8, D]`

Cross-attention q/k: no RoPE, so NO row permutation (transformers' converter permutes
self-attention q/k only; its rule `"cross_attn" not in new_key`), and q_norm/k_norm are
copied as they are. tests/test_vision_ref.py checks that the verbatim copy equals HF and
that applying the text decoder's permutation to wq/wk breaks it.
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple

import torch

from .vision_config import VisionConfig

CROSS_ATTENTION_QK_PERMUTED = False  # see the module docstring


class NameRow(NamedTuple):
    canonical: str
    hf: str
    hf_legacy: str
    meta: str
    role: str
    transform: str


_VE = "vision_model.vision_encoder."
_HV, _LV = "model.vision_model.", "vision_model."
_XA = "text_model.cross_attention_layers.{i}."
_HX, _LX = "model.language_model.layers.{h}.", "language_model.model.layers.{h}."


def _vision(canon: str, hf: str, role: str, transform: str = "identity") -> NameRow:
    return NameRow(_VE + canon, _HV + hf, _LV + hf, _VE + canon, role, transform)


def _cross(canon: str, hf: str, role: str) -> NameRow:
    return NameRow(_XA + canon, _HX + hf, _LX + hf, _XA + canon, role, "identity")


def _block(kind: str, hf_kind: str, prefix: str) -> list[NameRow]:
    c, h = f"{kind}.resblocks.{{i}}.", f"{hf_kind}.layers.{{i}}."
    rows = [_vision(c + f"attn.w{x}.weight", h + f"self_attn.{x}_proj.weight", f"{prefix}_w{x}") for x in "qkvo"]
    rows += [
        _vision(c + "ln_1.weight", h + "input_layernorm.weight", f"{prefix}_ln_1"),
        _vision(c + "ln_1.bias", h + "input_layernorm.bias", f"{prefix}_ln_1_bias"),
        _vision(c + "ln_2.weight", h + "post_attention_layernorm.weight", f"{prefix}_ln_2"),
        _vision(c + "ln_2.bias", h + "post_attention_layernorm.bias", f"{prefix}_ln_2_bias"),
        _vision(c + "mlp.c_fc.weight", h + "mlp.fc1.weight", f"{prefix}_fc1"),
        _vision(c + "mlp.c_fc.bias", h + "mlp.fc1.bias", f"{prefix}_fc1_bias"),
        _vision(c + "mlp.c_proj.weight", h + "mlp.fc2.weight", f"{prefix}_fc2"),
        _vision(c + "mlp.c_proj.bias", h + "mlp.fc2.bias", f"{prefix}_fc2_bias"),
    ]
    return rows


NAME_TABLE: list[NameRow] = [
    _vision("conv1._linear.weight", "patch_embedding.weight", "vision_patch_embed", "conv_weight"),
    _vision("class_embedding", "class_embedding", "vision_class_embed"),
    _vision("positional_embedding", "gated_positional_embedding.embedding", "vision_pos_embed"),
    _vision("gated_positional_embedding", "gated_positional_embedding.tile_embedding.weight",
            "vision_tile_pos_embed", "ar_table"),
    _vision("gated_positional_embedding_gate", "gated_positional_embedding.gate", "vision_pos_embed_gate"),
    _vision("pre_tile_pos_embed.embedding", "pre_tile_positional_embedding.embedding.weight",
            "vision_pre_tile_embed", "ar_table"),
    _vision("pre_tile_pos_embed.gate", "pre_tile_positional_embedding.gate", "vision_pre_tile_gate"),
    _vision("post_tile_pos_embed.embedding", "post_tile_positional_embedding.embedding.weight",
            "vision_post_tile_embed", "ar_table"),
    _vision("post_tile_pos_embed.gate", "post_tile_positional_embedding.gate", "vision_post_tile_gate"),
    _vision("ln_pre.weight", "layernorm_pre.weight", "vision_ln_pre"),
    _vision("ln_pre.bias", "layernorm_pre.bias", "vision_ln_pre_bias"),
    _vision("ln_post.weight", "layernorm_post.weight", "vision_ln_post"),
    _vision("ln_post.bias", "layernorm_post.bias", "vision_ln_post_bias"),
    *_block("transformer", "transformer", "vision"),
    *_block("global_transformer", "global_transformer", "vision_global"),
    _vision("global_transformer.resblocks.{i}.gate_attn", "global_transformer.layers.{i}.gate_attn",
            "vision_global_gate_attn"),
    _vision("global_transformer.resblocks.{i}.gate_ffn", "global_transformer.layers.{i}.gate_ffn",
            "vision_global_gate_ffn"),
    NameRow("vision_model.vision_projection.weight", "model.multi_modal_projector.weight",
            "multi_modal_projector.weight", "vision_model.vision_projection.weight", "projector", "identity"),
    NameRow("vision_model.vision_projection.bias", "model.multi_modal_projector.bias",
            "multi_modal_projector.bias", "vision_model.vision_projection.bias", "projector_bias", "identity"),
    _cross("attention.wq.weight", "cross_attn.q_proj.weight", "cross_wq"),
    _cross("attention.wk.weight", "cross_attn.k_proj.weight", "cross_wk"),
    _cross("attention.wv.weight", "cross_attn.v_proj.weight", "cross_wv"),
    _cross("attention.wo.weight", "cross_attn.o_proj.weight", "cross_wo"),
    _cross("attention.q_norm.weight", "cross_attn.q_norm.weight", "cross_q_norm"),
    _cross("attention.k_norm.weight", "cross_attn.k_norm.weight", "cross_k_norm"),
    _cross("attention_norm.weight", "input_layernorm.weight", "cross_attention_norm"),
    _cross("ffn_norm.weight", "post_attention_layernorm.weight", "cross_ffn_norm"),
    _cross("feed_forward.w1.weight", "mlp.gate_proj.weight", "cross_w1"),
    _cross("feed_forward.w2.weight", "mlp.down_proj.weight", "cross_w2"),
    _cross("feed_forward.w3.weight", "mlp.up_proj.weight", "cross_w3"),
    _cross("gate_attn", "cross_attn_attn_gate", "cross_attn_gate"),
    _cross("gate_ffwd", "cross_attn_mlp_gate", "cross_ffn_gate"),
    NameRow("text_model.learnable_embedding.weight", "model.language_model.embed_tokens.weight",
            "language_model.model.embed_tokens.weight", "text_model.learnable_embedding.weight",
            "image_token_embedding", "vocab_rows"),
]


def _count(row: NameRow, vcfg: VisionConfig, n_cross: int) -> int:
    if row.canonical.startswith(_VE + "transformer."):
        return vcfg.n_layers
    if row.canonical.startswith(_VE + "global_transformer."):
        return vcfg.n_global_layers
    if row.canonical.startswith("text_model.cross_attention_layers."):
        return n_cross
    return 1


def expand(vcfg: VisionConfig, hf_cross_layers: list[int] | tuple[int, ...]) -> list[NameRow]:
    """Every concrete row: placeholders filled for each layer (`hf_cross_layers`: HF decoder
    indices of the cross-attention layers in order, config.json's text_config
    `cross_attention_layers`)."""
    out = []
    for row in NAME_TABLE:
        for i in range(_count(row, vcfg, len(hf_cross_layers))):
            h = hf_cross_layers[i] if "{h}" in row.hf else 0
            out.append(NameRow(*(f.format(i=i, h=h) for f in row[:4]), row.role, row.transform))
    return out


def canonical_shapes(vcfg: VisionConfig, dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
                     n_cross: int) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape (text sizes: the decoder's dim, heads, KV heads, FFN)."""
    d, hd, t, n = vcfg.dim, dim // n_heads, vcfg.max_num_tiles, vcfg.tokens_per_tile
    by_role = {
        "vision_patch_embed": (d, vcfg.num_channels * vcfg.patch_size ** 2), "vision_class_embed": (d,),
        "vision_pos_embed": (n, d), "vision_tile_pos_embed": (vcfg.n_aspect_ratios + 1, t * n * d),
        "vision_pre_tile_embed": (vcfg.n_aspect_ratios + 1, t * d),
        "vision_post_tile_embed": (vcfg.n_aspect_ratios + 1, t * d),
        "projector": (dim, vcfg.output_dim), "projector_bias": (dim,),
        "cross_wq": (n_heads * hd, dim), "cross_wk": (n_kv_heads * hd, dim), "cross_wv": (n_kv_heads * hd, dim),
        "cross_wo": (dim, n_heads * hd), "cross_q_norm": (hd,), "cross_k_norm": (hd,),
        "cross_attention_norm": (dim,), "cross_ffn_norm": (dim,), "cross_w1": (ffn_dim, dim),
        "cross_w3": (ffn_dim, dim), "cross_w2": (dim, ffn_dim), "image_token_embedding": (8, dim),
    }
    shapes = {}
    for row in expand(vcfg, list(range(n_cross))):
        r = row.role
        if r in by_role:
            shapes[row.canonical] = by_role[r]
        elif r.endswith(("gate", "gate_attn", "gate_ffn")):
            shapes[row.canonical] = (1,)
        elif r.endswith(("_wq", "_wk", "_wv", "_wo")):
            shapes[row.canonical] = (d, d)
        elif r.endswith("_fc1"):
            shapes[row.canonical] = (vcfg.ffn_dim, d)
        elif r.endswith("_fc1_bias"):
            shapes[row.canonical] = (vcfg.ffn_dim,)
        elif r.endswith("_fc2"):
            shapes[row.canonical] = (d, vcfg.ffn_dim)
        else:  # layer norms and the fc2 bias
            shapes[row.canonical] = (d,)
    return shapes


def hf_name_map(vcfg: VisionConfig, hf_cross_layers) -> dict[str, NameRow]:
    """HF key (either layout) -> its concrete row."""
    out = {}
    for row in expand(vcfg, hf_cross_layers):
        out[row.hf] = out[row.hf_legacy] = row
    return out


# ---------------------------------------------------------------- tensor transforms
def meta_ar_table(grid: torch.Tensor, aspect_ratios) -> torch.Tensor:
    """Meta's `[T, T, rows, D]` grid -> `[n_ar + 1, T*rows*D]`: row k (aspect ratio
    (h, w) = aspect_ratios[k-1]) holds tiles t < h*w as grid[t // w, t % w] and zeros after;
    row 0 (no image) is zeros. (transformers' converter, pre_compute_positional_embedding.)"""
    tiles, _, rows, dim = grid.shape
    table = grid.new_zeros(len(aspect_ratios) + 1, tiles, rows, dim)
    for k, (h, w) in enumerate(aspect_ratios, start=1):
        table[k, : h * w] = grid[:h, :w].reshape(h * w, rows, dim)
    return table.flatten(1)


def to_canonical(row: NameRow, tensor: torch.Tensor, source: str, vcfg: VisionConfig,
                 vocab_size: int | None = None) -> torch.Tensor:
    """A file's tensor (`source` "hf" or "meta") in the canonical layout of `row`."""
    if row.transform == "conv_weight" and source == "hf":
        return tensor.reshape(tensor.shape[0], -1)
    if row.transform == "ar_table" and source == "meta":
        if tensor.dim() == 3:  # pre/post tile grids may come without the rows axis
            tensor = tensor[:, :, None]
        return meta_ar_table(tensor, vcfg.supported_aspect_ratios)
    if row.transform == "vocab_rows" and source == "hf":
        if vocab_size is None:
            raise ValueError(f"{row.hf}: the vocabulary size is needed to take the image-token rows")
        return tensor[vocab_size:]
    return tensor


def canonical_from_hf(state: Mapping[str, torch.Tensor], vcfg: VisionConfig, hf_cross_layers,
                      vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The image-side tensors of an HF state dict (either layout), canonical names and layouts."""
    names = hf_name_map(vcfg, hf_cross_layers)
    return {names[k].canonical: to_canonical(names[k], t, "hf", vcfg, vocab_size)
            for k, t in state.items() if k in names}


def canonical_from_meta(state: Mapping[str, torch.Tensor], vcfg: VisionConfig, n_cross: int
                        ) -> dict[str, torch.Tensor]:
    """The image-side tensors of a Meta state dict, canonical layouts (names are Meta's)."""
    rows = {row.meta: row for row in expand(vcfg, list(range(n_cross)))}
    return {k: to_canonical(rows[k], t, "meta", vcfg) for k, t in state.items() if k in rows}


def projector_columns_for_concat(weight: torch.Tensor, dim: int, n_taps: int) -> torch.Tensor:
    """The projector weight `[out, D*(1+k)]` with its input columns reordered for features
    laid out [final | tap_0 | ... | tap_{k-1}] (plain concatenation) instead of HF/Meta's
    [final | channel-interleaved taps] (vision_ops.vision_features)."""
    final, inter = weight[:, :dim], weight[:, dim:]
    inter = inter.reshape(weight.shape[0], dim, n_taps).transpose(1, 2).reshape(weight.shape[0], dim * n_taps)
    return torch.cat([final, inter], dim=1)


_CROSS_INDEX = re.compile(r"text_model\.cross_attention_layers\.(\d+)\.")


def cross_layer_prefix(name: str) -> tuple[int, str] | None:
    """`text_model.cross_attention_layers.3.attention.wq.weight` -> (3, 'attention.wq.weight')."""
    m = _CROSS_INDEX.match(name)
    return (int(m.group(1)), name[m.end():]) if m else None
