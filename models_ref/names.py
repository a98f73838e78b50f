"""What every weight *is*: one table from checkpoint names to typed roles.

Each row names one kind of tensor in the four spellings the project meets: the canonical
name (Meta's, which the reference modules use and every later stage sees), Hugging Face's,
GGUF's (llama.cpp) and, through `meta_shard_dim`, how Meta's model-parallel shards split
it. `{i}` stands for the decoder layer. `rope_rows` says which HF<->Meta row permutation
the tensor needs (RoPE's half-split vs interleaved layout): "q" and "k" permute output
rows per head, "head" permutes within one head (q/k norm weights, which scale head_dim).

Everything downstream reads the role, never a name pattern: `compiler.trace` stamps a
`Role` on every WeightSpec once, and `shard`, `precision`, the memory plan and the
lowering key their tables on it. A new family is new rows here (and its maths in
models_ref/modules.py), not new regexes in four passes.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import lru_cache


class Role(str, enum.Enum):
    EMBEDDING = "embedding"
    ATTENTION_NORM = "attention_norm"
    WQ = "wq"
    WK = "wk"
    WV = "wv"
    BQ = "bq"
    BK = "bk"
    BV = "bv"
    WQKV = "wqkv"  # made by passes/fuse_qkv.py
    BQKV = "bqkv"
    Q_NORM = "q_norm"
    K_NORM = "k_norm"
    WO = "wo"
    FFN_NORM = "ffn_norm"
    W1 = "w1"
    W2 = "w2"
    W3 = "w3"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"
    # Constants the compiler adds (no checkpoint tensor) and device state.
    ROPE_COS = "rope_cos"
    ROPE_SIN = "rope_sin"
    ROPE_TRANS_MAT = "rope_trans_mat"
    K_CACHE = "k_cache"
    V_CACHE = "v_cache"
    # Llama 3.2 Vision: the image-token embedding rows, the vision tower, the projector,
    # the gated cross-attention layers of the text decoder and their caches.
    IMAGE_TOKEN_EMBEDDING = "image_token_embedding"
    VISION_PATCH_EMBED = "vision_patch_embed"
    VISION_CLASS_EMBED = "vision_class_embed"
    VISION_POS_EMBED = "vision_pos_embed"
    VISION_TILE_POS_EMBED = "vision_tile_pos_embed"
    VISION_POS_GATE = "vision_pos_embed_gate"
    VISION_PRE_TILE_EMBED = "vision_pre_tile_embed"
    VISION_PRE_TILE_GATE = "vision_pre_tile_gate"
    VISION_POST_TILE_EMBED = "vision_post_tile_embed"
    VISION_POST_TILE_GATE = "vision_post_tile_gate"
    VISION_NORM = "vision_norm"  # layer norm weights (ln_pre, ln_post, ln_1, ln_2)
    VISION_NORM_BIAS = "vision_norm_bias"
    VISION_WQ = "vision_wq"
    VISION_WK = "vision_wk"
    VISION_WV = "vision_wv"
    VISION_WO = "vision_wo"
    VISION_WQKV = "vision_wqkv"  # made by passes/fuse_qkv.py
    VISION_FC1 = "vision_fc1"
    VISION_FC1_BIAS = "vision_fc1_bias"
    VISION_FC2 = "vision_fc2"
    VISION_FC2_BIAS = "vision_fc2_bias"
    VISION_GATE_ATTN = "vision_gate_attn"
    VISION_GATE_FFN = "vision_gate_ffn"
    PROJECTOR = "projector"
    PROJECTOR_BIAS = "projector_bias"
    CROSS_WQ = "cross_wq"
    CROSS_WK = "cross_wk"
    CROSS_WV = "cross_wv"
    CROSS_WO = "cross_wo"
    CROSS_Q_NORM = "cross_q_norm"
    CROSS_K_NORM = "cross_k_norm"
    CROSS_ATTENTION_NORM = "cross_attention_norm"
    CROSS_FFN_NORM = "cross_ffn_norm"
    CROSS_W1 = "cross_w1"
    CROSS_W2 = "cross_w2"
    CROSS_W3 = "cross_w3"
    CROSS_GATE_ATTN = "cross_attn_gate"
    CROSS_GATE_FFN = "cross_ffn_gate"
    CROSS_K_CACHE = "cross_k_cache"
    CROSS_V_CACHE = "cross_v_cache"


NORMS = frozenset({Role.ATTENTION_NORM, Role.FFN_NORM, Role.FINAL_NORM, Role.Q_NORM, Role.K_NORM,
                   Role.CROSS_Q_NORM, Role.CROSS_K_NORM, Role.CROSS_ATTENTION_NORM, Role.CROSS_FFN_NORM})
LOOKUP_TABLES = frozenset({Role.EMBEDDING, Role.ROPE_COS, Role.ROPE_SIN})  # read by row, not whole
CACHES = frozenset({Role.K_CACHE, Role.V_CACHE})  # paged self-attention KV caches
CROSS_CACHES = frozenset({Role.CROSS_K_CACHE, Role.CROSS_V_CACHE})  # one row per user, written per image


@dataclass(frozen=True)
class NameRow:
    role: Role
    canonical: str
    hf: str | None = None
    gguf: str | None = None
    meta_shard_dim: int | None = None  # None: every Meta shard holds all of it
    rope_rows: str | None = None  # "q" | "k" | "head": HF<->Meta row permutation
    # Llama 3.2 Vision rows (text rows leave these as they are):
    hf_legacy: str | None = None  # transformers 4 files' name of the same tensor
    meta: str | None = None  # Meta's name when it is not the canonical one
    transform: str = "identity"  # how a file's tensor becomes the canonical one (vision_names.py)
    repeat: str = "layers"  # which layer list {i} counts: layers | cross | vision | vision_global
    # {h} in hf names: the HF decoder index of cross-attention layer {i} (HF numbers cross-
    # and self-attention layers together: 3, 8, ..., 38 in 11B).


_L = "layers.{i}."
_HF = "model.layers.{i}."
_G = "blk.{i}."

WEIGHT_NAMES: tuple[NameRow, ...] = (
    NameRow(Role.EMBEDDING, "tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight", 1),
    NameRow(Role.FINAL_NORM, "norm.weight", "model.norm.weight", "output_norm.weight"),
    NameRow(Role.LM_HEAD, "output.weight", "lm_head.weight", "output.weight", 0),
    NameRow(Role.ATTENTION_NORM, _L + "attention_norm.weight", _HF + "input_layernorm.weight",
            _G + "attn_norm.weight"),
    NameRow(Role.FFN_NORM, _L + "ffn_norm.weight", _HF + "post_attention_layernorm.weight",
            _G + "ffn_norm.weight"),
    NameRow(Role.WQ, _L + "attention.wq.weight", _HF + "self_attn.q_proj.weight", _G + "attn_q.weight", 0, "q"),
    NameRow(Role.WK, _L + "attention.wk.weight", _HF + "self_attn.k_proj.weight", _G + "attn_k.weight", 0, "k"),
    NameRow(Role.WV, _L + "attention.wv.weight", _HF + "self_attn.v_proj.weight", _G + "attn_v.weight", 0),
    NameRow(Role.BQ, _L + "attention.wq.bias", _HF + "self_attn.q_proj.bias", _G + "attn_q.bias", 0, "q"),
    NameRow(Role.BK, _L + "attention.wk.bias", _HF + "self_attn.k_proj.bias", _G + "attn_k.bias", 0, "k"),
    NameRow(Role.BV, _L + "attention.wv.bias", _HF + "self_attn.v_proj.bias", _G + "attn_v.bias", 0),
    NameRow(Role.Q_NORM, _L + "attention.q_norm.weight", _HF + "self_attn.q_norm.weight",
            _G + "attn_q_norm.weight", None, "head"),
    NameRow(Role.K_NORM, _L + "attention.k_norm.weight", _HF + "self_attn.k_norm.weight",
            _G + "attn_k_norm.weight", None, "head"),
    NameRow(Role.WO, _L + "attention.wo.weight", _HF + "self_attn.o_proj.weight", _G + "attn_output.weight", 1),
    NameRow(Role.W1, _L + "feed_forward.w1.weight", _HF + "mlp.gate_proj.weight", _G + "ffn_gate.weight", 0),
    NameRow(Role.W3, _L + "feed_forward.w3.weight", _HF + "mlp.up_proj.weight", _G + "ffn_up.weight", 0),
    NameRow(Role.W2, _L + "feed_forward.w2.weight", _HF + "mlp.down_proj.weight", _G + "ffn_down.weight", 1),
    # Made by the compiler, not read from checkpoints.
    NameRow(Role.WQKV, _L + "attention.wqkv.weight"),
    NameRow(Role.BQKV, _L + "attention.wqkv.bias"),
    NameRow(Role.ROPE_COS, "rope_cos"),
    NameRow(Role.ROPE_SIN, "rope_sin"),
    NameRow(Role.ROPE_TRANS_MAT, "rope_trans_mat"),
    NameRow(Role.K_CACHE, _L + "attention.k_cache"),
    NameRow(Role.V_CACHE, _L + "attention.v_cache"),
)


# ---------------------------------------------------------------- Llama 3.2 Vision
_VE = "vision_model.vision_encoder."
_HV, _LV = "model.vision_model.", "vision_model."
_HX, _LX = "model.language_model.layers.{h}.", "language_model.model.layers.{h}."


def _vision(role, canon, hf, transform="identity", repeat="layers") -> NameRow:
    return NameRow(role, _VE + canon, _HV + hf, hf_legacy=_LV + hf, transform=transform, repeat=repeat)


def _cross(role, canon, hf) -> NameRow:
    return NameRow(role, "cross_attention_layers.{i}." + canon, _HX + hf, hf_legacy=_LX + hf,
                   meta="text_model.cross_attention_layers.{i}." + canon, repeat="cross")


def _block(kind: str, repeat: str) -> list[NameRow]:
    c, h = f"{kind}.resblocks.{{i}}.", f"{kind}.layers.{{i}}."
    rows = [_vision(role, c + f"attn.w{x}.weight", h + f"self_attn.{x}_proj.weight", repeat=repeat)
            for role, x in ((Role.VISION_WQ, "q"), (Role.VISION_WK, "k"), (Role.VISION_WV, "v"),
                            (Role.VISION_WO, "o"))]
    rows.append(NameRow(Role.VISION_WQKV, _VE + c + "attn.wqkv.weight", repeat=repeat))  # fused by the compiler
    for role, canon, hf in (
            (Role.VISION_NORM, "ln_1.weight", "input_layernorm.weight"),
            (Role.VISION_NORM_BIAS, "ln_1.bias", "input_layernorm.bias"),
            (Role.VISION_NORM, "ln_2.weight", "post_attention_layernorm.weight"),
            (Role.VISION_NORM_BIAS, "ln_2.bias", "post_attention_layernorm.bias"),
            (Role.VISION_FC1, "mlp.c_fc.weight", "mlp.fc1.weight"),
            (Role.VISION_FC1_BIAS, "mlp.c_fc.bias", "mlp.fc1.bias"),
            (Role.VISION_FC2, "mlp.c_proj.weight", "mlp.fc2.weight"),
            (Role.VISION_FC2_BIAS, "mlp.c_proj.bias", "mlp.fc2.bias")):
        rows.append(_vision(role, c + canon, h + hf, repeat=repeat))
    return rows


IMAGE_NAMES: tuple[NameRow, ...] = (
    _vision(Role.VISION_PATCH_EMBED, "conv1._linear.weight", "patch_embedding.weight", "conv_weight"),
    _vision(Role.VISION_CLASS_EMBED, "class_embedding", "class_embedding"),
    _vision(Role.VISION_POS_EMBED, "positional_embedding", "gated_positional_embedding.embedding"),
    _vision(Role.VISION_TILE_POS_EMBED, "gated_positional_embedding",
            "gated_positional_embedding.tile_embedding.weight", "ar_table"),
    _vision(Role.VISION_POS_GATE, "gated_positional_embedding_gate", "gated_positional_embedding.gate"),
    _vision(Role.VISION_PRE_TILE_EMBED, "pre_tile_pos_embed.embedding", "pre_tile_positional_embedding.embedding.weight",
            "ar_table"),
    _vision(Role.VISION_PRE_TILE_GATE, "pre_tile_pos_embed.gate", "pre_tile_positional_embedding.gate"),
    _vision(Role.VISION_POST_TILE_EMBED, "post_tile_pos_embed.embedding",
            "post_tile_positional_embedding.embedding.weight", "ar_table"),
    _vision(Role.VISION_POST_TILE_GATE, "post_tile_pos_embed.gate", "post_tile_positional_embedding.gate"),
    _vision(Role.VISION_NORM, "ln_pre.weight", "layernorm_pre.weight"),
    _vision(Role.VISION_NORM_BIAS, "ln_pre.bias", "layernorm_pre.bias"),
    _vision(Role.VISION_NORM, "ln_post.weight", "layernorm_post.weight"),
    _vision(Role.VISION_NORM_BIAS, "ln_post.bias", "layernorm_post.bias"),
    *_block("transformer", "vision"),
    *_block("global_transformer", "vision_global"),
    _vision(Role.VISION_GATE_ATTN, "global_transformer.resblocks.{i}.gate_attn",
            "global_transformer.layers.{i}.gate_attn", repeat="vision_global"),
    _vision(Role.VISION_GATE_FFN, "global_transformer.resblocks.{i}.gate_ffn",
            "global_transformer.layers.{i}.gate_ffn", repeat="vision_global"),
    NameRow(Role.PROJECTOR, "vision_model.vision_projection.weight", "model.multi_modal_projector.weight",
            hf_legacy="multi_modal_projector.weight"),
    NameRow(Role.PROJECTOR_BIAS, "vision_model.vision_projection.bias", "model.multi_modal_projector.bias",
            hf_legacy="multi_modal_projector.bias"),
    _cross(Role.CROSS_WQ, "attention.wq.weight", "cross_attn.q_proj.weight"),
    _cross(Role.CROSS_WK, "attention.wk.weight", "cross_attn.k_proj.weight"),
    _cross(Role.CROSS_WV, "attention.wv.weight", "cross_attn.v_proj.weight"),
    _cross(Role.CROSS_WO, "attention.wo.weight", "cross_attn.o_proj.weight"),
    _cross(Role.CROSS_Q_NORM, "attention.q_norm.weight", "cross_attn.q_norm.weight"),
    _cross(Role.CROSS_K_NORM, "attention.k_norm.weight", "cross_attn.k_norm.weight"),
    _cross(Role.CROSS_ATTENTION_NORM, "attention_norm.weight", "input_layernorm.weight"),
    _cross(Role.CROSS_FFN_NORM, "ffn_norm.weight", "post_attention_layernorm.weight"),
    _cross(Role.CROSS_W1, "feed_forward.w1.weight", "mlp.gate_proj.weight"),
    _cross(Role.CROSS_W2, "feed_forward.w2.weight", "mlp.down_proj.weight"),
    _cross(Role.CROSS_W3, "feed_forward.w3.weight", "mlp.up_proj.weight"),
    _cross(Role.CROSS_GATE_ATTN, "gate_attn", "cross_attn_attn_gate"),
    _cross(Role.CROSS_GATE_FFN, "gate_ffwd", "cross_attn_mlp_gate"),
    NameRow(Role.IMAGE_TOKEN_EMBEDDING, "learnable_embedding.weight", "model.language_model.embed_tokens.weight",
            hf_legacy="language_model.model.embed_tokens.weight", meta="text_model.learnable_embedding.weight",
            transform="vocab_rows"),
    # Device state (no checkpoint tensor).
    NameRow(Role.CROSS_K_CACHE, "cross_attention_layers.{i}.attention.k_cache", repeat="cross"),
    NameRow(Role.CROSS_V_CACHE, "cross_attention_layers.{i}.attention.v_cache", repeat="cross"),
)

WEIGHT_NAMES = WEIGHT_NAMES + IMAGE_NAMES
BY_ROLE: dict[Role, NameRow] = {}
for _row in WEIGHT_NAMES:
    BY_ROLE.setdefault(_row.role, _row)  # the first row of a role (norm roles have several)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)")
                      .replace(re.escape("{h}"), r"(?P<h>\d+)"))


@lru_cache(maxsize=None)
def _patterns(column: str) -> tuple[tuple[re.Pattern, NameRow], ...]:
    return tuple((_pattern(getattr(row, column)), row) for row in WEIGHT_NAMES if getattr(row, column))


def _lookup(name: str, column: str) -> tuple[NameRow, int | None] | None:
    for pattern, row in _patterns(column):
        m = pattern.fullmatch(name)
        if m:
            return row, (int(m.group("i")) if "i" in pattern.groupindex else None)
    return None


def role_of(name: str) -> tuple[Role, int | None] | None:
    """(role, decoder layer) of a canonical name; None if the table does not know it.
    Only self-attention decoder layers have a layer index here (what stamping and the
    memory plan count); vision-encoder and cross-attention rows give None."""
    found = _lookup(name, "canonical")
    if not found:
        return None
    row, index = found
    return row.role, (index if row.repeat == "layers" else None)


def row_of(name: str) -> tuple[NameRow, int | None] | None:
    """(table row, the index its {i} took) of a canonical name."""
    return _lookup(name, "canonical")


def canonical_name(role: Role, layer: int | None = None) -> str:
    return BY_ROLE[role].canonical.format(i=layer)


def _convert(name: str, source: str, target: str) -> str | None:
    found = _lookup(name, source)
    if not found or not getattr(found[0], target):
        return None
    return getattr(found[0], target).format(i=found[1])


def hf_to_canonical(name: str) -> str | None:
    return _convert(name, "hf", "canonical")


def canonical_to_hf(name: str) -> str | None:
    return _convert(name, "canonical", "hf")


def gguf_to_canonical(name: str) -> str | None:
    return _convert(name, "gguf", "canonical")


def meta_shard_dim(name: str) -> int | None:
    found = _lookup(name, "canonical")
    return found[0].meta_shard_dim if found else None


def rope_rows(name: str) -> str | None:
    found = _lookup(name, "canonical")
    return found[0].rope_rows if found else None
