"""pad_heads: attention heads padded to whole 32-wide tiles, as ttnn takes them.

Expects: a fused graph (qkv_heads after a wqkv linear), before shard.
ttnn 0.81.1 takes head_dim only in whole tiles: nlp_create_qkv_heads(_decode) rejects or
mis-splits other widths, prefill attention says "Padding is not supported on the head_dim
dimension", rotary_embedding_llama in decode wants "Head dim must be a multiple of
TILE_WIDTH" and in prefill cos/sin as wide as the heads; at 32, 64, 96 and 128 every
one of them accepts (checked on the mock meshes: tests/test_ttnn_sweep.py).
Llama 3.2 Vision's encoder has 16 heads of 80; text decoders such as OpenLLaMA 3B have
heads of 100.

Guarantees: every qkv_heads splits heads of a multiple of 32 (h real dims padded to hp),
and everything that makes, holds or reads those heads is padded with it so that the
maths is unchanged:
- wqkv (and its bias): each q, k and v head's columns are followed by hp - h zero
  columns (the fused spec's q/k/v parts too, so shard regroups padded heads); the padded
  dims of every head are zero;
- Qwen3's q/k RMSNorm over a padded head would average over hp dims. It is made exact by
  folding the ratio into the norm: gamma' = gamma * sqrt(h/hp) (zero on padded dims) and
  eps' = eps * h/hp, since mean_hp(x^2) + eps' = (h/hp) (mean_h(x^2) + eps);
- rotary: cos/sin tables are hp wide with cos = 1, sin = 0 on the padded dims. The real
  dims keep their interleaved pairs (h is even and pairs never straddle a 32-wide tile of
  rotary_embedding_llama's transformation matrix), and padded dims, zero in x, stay zero;
- KV caches hold padded heads (the memory plan counts them: it reads these specs);
- the output projection wo gets hp - h zero rows after each head's h rows;
- attention keeps its explicit scale, 1/sqrt(h): zero dims add nothing to q.k or to the
  output.
Refuses (CompileError, with the reason) heads whose readers it does not know how to pad:
an op other than those above, or unfused head projections (Llama 3.2 Vision's
cross-attention) with a head_dim that is not whole tiles.

    %qkv = linear(%x, %wqkv) : 1x1xSx640          %qkv = linear(%x, %wqkv') : 1x1xSx768
    %h = qkv_heads(%qkv, 4, 2, 80)        ==>     %h = qkv_heads(%qkv, 4, 2, 96)
    %c = rope_rows(%rope_cos) : 1x1xSx80          %c = rope_rows(%rope_cos') : 1x1xSx96  (cos 1, sin 0)
    state k_cache : 1x2xLx80                      state k_cache : 1x2xLx96
    %o = linear(merge_heads(..), %wo) : weight rows 320 ==> 384, zero per head
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch.fx

from compiler import dialect
from compiler.errors import CompileError
from compiler.facts import LAYER, FusedPart
from models_ref import ops as ref
from models_ref import vision_ops as vops
from models_ref.names import Role

NAME = "pad_heads"
TILE = 32

# What heads flow through: q/k norms, rotary (args[0]), cache writes (args[1]), attentions.
_HEAD_NORMS = (Role.Q_NORM, Role.K_NORM)
_CACHE_WRITES = (ref.fill_cache, ref.update_cache)
_ATTENTIONS = (ref.causal_attention, ref.decode_attention, vops.encoder_attention)
_ROPE_PAD_VALUES = {Role.ROPE_COS: 1.0, Role.ROPE_SIN: 0.0}  # padded dims: x * 1 + rotated * 0


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // TILE) * TILE


@dataclass
class _Heads:
    """What reads and holds one qkv_heads' heads, found by walking its users."""

    norms: list = field(default_factory=list)  # rms_norm nodes over heads (q/k norms)
    tables: set = field(default_factory=set)  # rope cos/sin table names
    caches: set = field(default_factory=set)  # KV cache state names
    out_projections: list = field(default_factory=list)  # linear(merge_heads(attention)) nodes


def _refuse(node: torch.fx.Node, head_dim: int, reader: torch.fx.Node, why: str) -> CompileError:
    layer = node.meta.get(LAYER)
    where = f"layer {layer}" if layer is not None else "the attention"
    name = getattr(reader.target, "__name__", str(reader.target))
    return CompileError(f"{where}: heads of {head_dim} are read by {name} ({why}); ttnn takes head_dim only in "
                        f"whole tiles of {TILE} and pad_heads cannot pad them exactly there")


def _walk(node: torch.fx.Node, head_dim: int, weights) -> _Heads:
    found = _Heads()
    seen, todo = set(), [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            target = user.target
            if target is operator.getitem and current is node:
                todo.append(user)
            elif target is ref.rms_norm and user.args[0] is current:
                if weights[user.args[1].target].role not in _HEAD_NORMS:
                    raise _refuse(node, head_dim, user, "a norm that is not a q/k head norm")
                found.norms.append(user)
                todo.append(user)
            elif target is ref.rotary and user.args[0] is current:
                for rows in user.args[1:3]:
                    if not (isinstance(rows, torch.fx.Node) and rows.target is ref.rope_rows):
                        raise _refuse(node, head_dim, user, "cos/sin that are not rope table rows")
                    found.tables.add(rows.args[0].target)
                todo.append(user)
            elif target in _CACHE_WRITES and user.args[1] is current:
                found.caches.add(user.args[0].target)
                todo.append(user)  # decode attention reads the written cache
            elif target in _ATTENTIONS:
                merge = next(iter(user.users), None)
                out = next(iter(merge.users), None) if merge is not None and len(merge.users) == 1 else None
                if (len(user.users) != 1 or merge.target is not ref.merge_heads or out is None
                        or out.target is not dialect.linear or out.args[0] is not merge):
                    raise _refuse(node, head_dim, user, "an attention whose output is not merged into a linear")
                found.out_projections.append(out)
            else:
                raise _refuse(node, head_dim, user, "an op pad_heads does not know")
    found.out_projections = list(dict.fromkeys(found.out_projections))
    return found


def _pad_wqkv(spec, n_heads: int, n_kv: int, head_dim: int, padded: int) -> None:
    """Heads are blocks of head_dim columns in each fused part (q, k, v)."""
    spec.fused = tuple(FusedPart(p.role, ["pad_heads", 1, head_dim, padded, p.recipe],
                                 p.width // head_dim * padded) for p in spec.fused)
    spec.recipe = ["concat", 1, [p.recipe for p in spec.fused]]
    spec.shape = spec.shape[:-1] + ((n_heads + 2 * n_kv) * padded,)


def _pad_head_norm(node: torch.fx.Node, spec, head_dim: int, padded: int) -> None:
    """RMSNorm over hp dims equal to the one over h: gamma * sqrt(h/hp), eps * h/hp."""
    x, weight, eps = node.args
    node.args = (x, weight, eps * head_dim / padded)
    if spec.shape == (head_dim,):
        spec.recipe = ["pad", 0, padded, ["scale", math.sqrt(head_dim / padded), spec.recipe]]
        spec.shape = (padded,)


def _pad_rope_table(spec, head_dim: int, padded: int) -> None:
    """cos = 1, sin = 0 on the padded dims (the tables are [positions, head_dim])."""
    if spec.shape[-1] == padded:  # read by the heads of an earlier layer
        return
    if spec.shape[-1] != head_dim or spec.role not in _ROPE_PAD_VALUES:
        raise CompileError(f"rope table '{spec.name}' is {spec.shape[-1]} wide, not the heads' {head_dim}")
    spec.recipe = ["pad", len(spec.shape) - 1, padded, spec.recipe, _ROPE_PAD_VALUES[spec.role]]
    spec.shape = spec.shape[:-1] + (padded,)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    weights, state = ctx.facts.weights, ctx.facts.state
    for node in list(gm.graph.nodes):
        if node.target is ref.split_heads and node.args[2] % TILE:
            raise CompileError(f"heads of {node.args[2]} from an unfused projection ({node.name}): ttnn takes "
                               f"head_dim only in whole tiles of {TILE}, and pad_heads pads fused q/k/v heads only")
        if node.target is not dialect.qkv_heads:
            continue
        x, n_heads, n_kv, head_dim, decode = node.args
        padded = padded_head_dim(head_dim)
        if padded == head_dim:
            continue
        heads = _walk(node, head_dim, weights)
        for w in x.args[1:3]:  # wqkv and its bias
            if w is not None:
                _pad_wqkv(weights[w.target], n_heads, n_kv, head_dim, padded)
        for norm in heads.norms:
            _pad_head_norm(norm, weights[norm.args[1].target], head_dim, padded)
        for table in heads.tables:
            _pad_rope_table(weights[table], head_dim, padded)
        for cache in heads.caches:
            spec = state[cache]
            if spec.shape[-1] == head_dim:
                spec.shape = spec.shape[:-1] + (padded,)
        for out in heads.out_projections:
            spec = weights[out.args[1].target]
            if spec.shape[0] == n_heads * head_dim:
                spec.recipe = ["pad_heads", 0, head_dim, padded, spec.recipe]
                spec.shape = (n_heads * padded,) + tuple(spec.shape[1:])
        node.args = (x, n_heads, n_kv, padded, decode)
        ctx.counters["pad_heads"] += 1
    return gm
