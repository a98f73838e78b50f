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


NORMS = frozenset({Role.ATTENTION_NORM, Role.FFN_NORM, Role.FINAL_NORM, Role.Q_NORM, Role.K_NORM})
LOOKUP_TABLES = frozenset({Role.EMBEDDING, Role.ROPE_COS, Role.ROPE_SIN})  # read by row, not whole


@dataclass(frozen=True)
class NameRow:
    role: Role
    canonical: str
    hf: str | None = None
    gguf: str | None = None
    meta_shard_dim: int | None = None  # None: every Meta shard holds all of it
    rope_rows: str | None = None  # "q" | "k" | "head": HF<->Meta row permutation


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

BY_ROLE: dict[Role, NameRow] = {row.role: row for row in WEIGHT_NAMES}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


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
    """(role, layer) of a canonical name; None if the table does not know it."""
    found = _lookup(name, "canonical")
    return (found[0].role, found[1]) if found else None


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
