"""Llama 3.2 Vision's image-side weights: their rows of the one name table
(models_ref/names.py IMAGE_NAMES), expanded per layer, and the tensor transforms that
turn a file's tensor into the canonical one.

Rows carry: canonical (what the reference modules use; Meta's name, with the text
decoder's `text_model.` prefix dropped as for self-attention layers), hf (transformers 5:
`model.vision_model.*`, `model.multi_modal_projector.*`, `model.language_model.layers.{h}.*`),
hf_legacy (transformers 4: `vision_model.*`, `multi_modal_projector.*`,
`language_model.model.layers.{h}.*`), meta (when not the canonical name), role, and
transform:
    identity     same tensor in all layouts
    conv_weight  HF `[D, C, p, p]` -> canonical `[D, C*p*p]` (Meta already stores that)
    ar_table     Meta `[T, T, rows, D]` grid -> canonical `[n_ar+1, T*rows*D]`, one row per
                 aspect-ratio id (row 0 zeros; `meta_ar_table`); HF already stores that
    vocab_rows   HF keeps the 8 image-token rows after the vocabulary in embed_tokens
                 (`[vocab+8, D]`, rows vocab..); Meta has them as learnable_embedding `[8, D]`
Placeholders: `{i}` a layer index in its own list (local or global resblock, or Meta's
cross-attention layer 0..7); `{h}` the HF decoder index of cross-attention layer i.

Cross-attention q/k: no RoPE, so NO row permutation (transformers' converter permutes
self-attention q/k only; its rule `"cross_attn" not in new_key`), and q_norm/k_norm are
copied as they are (the rows have no `rope_rows`). tests/test_vision_ref.py checks that the
verbatim copy equals HF and that applying the text decoder's permutation breaks it.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import torch

from .names import IMAGE_NAMES, Role
from .vision_config import VisionConfig

CROSS_ATTENTION_QK_PERMUTED = False  # see the module docstring


class NameRow(NamedTuple):
    """One concrete tensor of the image side (a names.IMAGE_NAMES row, expanded)."""
    canonical: str
    hf: str
    hf_legacy: str
    meta: str
    role: Role
    transform: str


NAME_TABLE = tuple(row for row in IMAGE_NAMES if row.hf is not None)  # checkpoint tensors only


def _count(row, vcfg: VisionConfig, n_cross: int) -> int:
    return {"vision": vcfg.n_layers, "vision_global": vcfg.n_global_layers, "cross": n_cross}.get(row.repeat, 1)


def expand(vcfg: VisionConfig, hf_cross_layers: list[int] | tuple[int, ...]) -> list[NameRow]:
    """Every concrete row: placeholders filled for each layer (`hf_cross_layers`: HF decoder
    indices of the cross-attention layers in order, config.json's text_config
    `cross_attention_layers`)."""
    out = []
    for row in NAME_TABLE:
        for i in range(_count(row, vcfg, len(hf_cross_layers))):
            h = hf_cross_layers[i] if row.repeat == "cross" else 0
            canonical = row.canonical.format(i=i)
            out.append(NameRow(canonical, row.hf.format(i=i, h=h), row.hf_legacy.format(i=i, h=h),
                               (row.meta or row.canonical).format(i=i), row.role, row.transform))
    return out


def canonical_shapes(vcfg: VisionConfig, dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int,
                     n_cross: int) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape (text sizes: the decoder's dim, heads, KV heads, FFN)."""
    d, hd, t, n = vcfg.dim, dim // n_heads, vcfg.max_num_tiles, vcfg.tokens_per_tile
    ar = vcfg.n_aspect_ratios + 1
    by_role = {
        Role.VISION_PATCH_EMBED: (d, vcfg.num_channels * vcfg.patch_size ** 2), Role.VISION_CLASS_EMBED: (d,),
        Role.VISION_POS_EMBED: (n, d), Role.VISION_TILE_POS_EMBED: (ar, t * n * d),
        Role.VISION_PRE_TILE_EMBED: (ar, t * d), Role.VISION_POST_TILE_EMBED: (ar, t * d),
        Role.VISION_NORM: (d,), Role.VISION_NORM_BIAS: (d,),
        Role.VISION_WQ: (d, d), Role.VISION_WK: (d, d), Role.VISION_WV: (d, d), Role.VISION_WO: (d, d),
        Role.VISION_FC1: (vcfg.ffn_dim, d), Role.VISION_FC1_BIAS: (vcfg.ffn_dim,),
        Role.VISION_FC2: (d, vcfg.ffn_dim), Role.VISION_FC2_BIAS: (d,),
        Role.PROJECTOR: (dim, vcfg.output_dim), Role.PROJECTOR_BIAS: (dim,),
        Role.CROSS_WQ: (n_heads * hd, dim), Role.CROSS_WK: (n_kv_heads * hd, dim),
        Role.CROSS_WV: (n_kv_heads * hd, dim), Role.CROSS_WO: (dim, n_heads * hd),
        Role.CROSS_Q_NORM: (hd,), Role.CROSS_K_NORM: (hd,), Role.CROSS_ATTENTION_NORM: (dim,),
        Role.CROSS_FFN_NORM: (dim,), Role.CROSS_W1: (ffn_dim, dim), Role.CROSS_W3: (ffn_dim, dim),
        Role.CROSS_W2: (dim, ffn_dim), Role.IMAGE_TOKEN_EMBEDDING: (8, dim),
    }
    gates = (Role.VISION_POS_GATE, Role.VISION_PRE_TILE_GATE, Role.VISION_POST_TILE_GATE, Role.VISION_GATE_ATTN,
             Role.VISION_GATE_FFN, Role.CROSS_GATE_ATTN, Role.CROSS_GATE_FFN)
    by_role.update({g: (1,) for g in gates})
    return {row.canonical: by_role[row.role] for row in expand(vcfg, list(range(n_cross)))}


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


def canonical_shape(row: NameRow, shape, source: str, vcfg: VisionConfig, vocab_size: int | None = None) -> tuple:
    """The canonical shape of a file's tensor of `shape` (what to_canonical would give)."""
    shape = tuple(shape)
    if row.transform == "conv_weight" and source == "hf":
        return (shape[0], int(torch.tensor(shape[1:]).prod()))
    if row.transform == "ar_table" and source == "meta":
        tiles, rows, dim = shape[0], (shape[2] if len(shape) == 4 else 1), shape[-1]
        return (vcfg.n_aspect_ratios + 1, tiles * rows * dim)
    if row.transform == "vocab_rows" and source == "hf":
        return (shape[0] - (vocab_size or 0),) + shape[1:]
    return shape


def canonical_from_hf(state: Mapping[str, torch.Tensor], vcfg: VisionConfig, hf_cross_layers,
                      vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """The image-side tensors of an HF state dict (either layout), canonical names and layouts."""
    names = hf_name_map(vcfg, hf_cross_layers)
    return {names[k].canonical: to_canonical(names[k], t, "hf", vcfg, vocab_size)
            for k, t in state.items() if k in names}


def canonical_from_meta(state: Mapping[str, torch.Tensor], vcfg: VisionConfig, n_cross: int
                        ) -> dict[str, torch.Tensor]:
    """The image-side tensors of a Meta state dict, canonical names and layouts."""
    rows = {row.meta: row for row in expand(vcfg, list(range(n_cross)))}
    return {rows[k].canonical: to_canonical(rows[k], t, "meta", vcfg) for k, t in state.items() if k in rows}


def projector_columns_for_concat(weight: torch.Tensor, dim: int, n_taps: int) -> torch.Tensor:
    """The projector weight `[out, D*(1+k)]` with its input columns reordered for features
    laid out [final | tap_0 | ... | tap_{k-1}] (plain concatenation) instead of HF/Meta's
    [final | channel-interleaved taps] (vision_ops.vision_features)."""
    final, inter = weight[:, :dim], weight[:, dim:]
    inter = inter.reshape(weight.shape[0], dim, n_taps).transpose(1, 2).reshape(weight.shape[0], dim * n_taps)
    return torch.cat([final, inter], dim=1)
