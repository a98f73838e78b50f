"""Placement analysis: how every node's value lies on the mesh, derived from the weights'
and caches' placements (set by passes/shard.py). The pipeline re-runs it after every pass
(compiler/pipeline.py), so a pass that adds nodes never has to remember to; the verifier
and the lowering read PLACEMENT from node.meta.

Rules: a column-parallel linear (weight split on its output dim) yields a tensor split on
its last dim; a row-parallel one (weight split on its input dim) yields partial sums; an
all_reduce makes them whole (or, the first of two on a 2-D mesh, sums over one axis);
ops over heads keep the heads dim split; everything else takes its first input's.
"""
from __future__ import annotations

import dataclasses

import torch.fx

from models_ref import ops as ref
from models_ref import vision_ops as vops

from . import dialect
from .facts import PLACEMENT, REPLICATED, Placement

# Ops whose output is split by heads when their inputs are (or by hidden units: gated_mlp).
_HEAD_OPS = (dialect.qkv_heads, dialect.gated_mlp, ref.merge_heads, ref.rotary,
             ref.causal_attention, ref.decode_attention, ref.update_cache, ref.fill_cache,
             dialect.paged_fill_cache, dialect.paged_update_cache, dialect.chunked_attention,
             dialect.paged_decode_attention, ref.split_heads, vops.encoder_attention, vops.cross_attention,
             vops.cross_attention_decode)


def placement_of(node: torch.fx.Node, facts, decode: bool) -> Placement:
    """The node's placement from its inputs' (already annotated) placements."""
    if node.op == "get_attr":
        spec = facts.weights.get(node.target) or facts.state.get(node.target)
        return spec.placement
    if node.op != "call_function":
        return REPLICATED
    ins = [a.meta.get(PLACEMENT, REPLICATED) for a in node.args if isinstance(a, torch.fx.Node)]
    if node.target in dialect.COLLECTIVES:
        # Reduced (all_reduce) or gathered (all_gather) over one mesh axis: what the input
        # was split or partial over, minus that axis (2-D meshes do one axis at a time).
        axis = node.args[1] if node.target is dialect.all_reduce else node.args[2]
        rest = tuple(a for a in ins[0].axes if a != axis)
        return dataclasses.replace(ins[0], axes=rest) if rest else REPLICATED
    if node.target is dialect.linear:
        w = node.args[1].meta[PLACEMENT]
        if w.dim == 0:
            return Placement(None, w.axes, partial=True)
        return Placement(3, w.axes) if w.dim == 1 else REPLICATED
    if node.target in dialect.SIDE_EFFECTS:  # cache writes return the cache, as placed
        return node.args[0].meta.get(PLACEMENT, REPLICATED)
    if node.target in _HEAD_OPS:
        sharded = [p for p in ins if p.dim is not None]
        if not sharded:
            return REPLICATED
        if node.target in (dialect.gated_mlp, ref.merge_heads):
            return Placement(3, sharded[0].axes)
        return Placement(2 if decode else 1, sharded[0].axes)  # heads: [1,B,H,hd] / [1,H,S,hd]
    return ins[0] if ins else REPLICATED


def annotate(gm: torch.fx.GraphModule, facts, decode: bool) -> None:
    """Set PLACEMENT on every node, in graph order."""
    for node in gm.graph.nodes:
        node.meta[PLACEMENT] = placement_of(node, facts, decode)
