"""Unit tests of the shard pass on tiny hand-built graphs (helpers: tests/pass_units.py)."""
from __future__ import annotations


import pytest
import torch
import torch.fx

from compiler import dialect
from compiler.convert import RecipeEvaluator
from compiler.facts import LAYER, PLACEMENT, REPLICATED, VAL, Placement
from models_ref import ops as ref
from models_ref.names import Role
from passes import shard
from passes.head_plan import PAD, padded_size, plan_heads
from runtime.emulator.shards import place
from graph_builder import TINY, _DictReader, count
from pass_units import (TINY_6x2, _heads, _unsharded_run, fused_model, linear_of, nodes_of, run_mesh, shard_cache, step, unit_ctx)
from pass_units import _one_thread  # noqa: F401 (autouse: one torch thread)


TINY_6x3 = TINY.replace(name="tiny-6x3", n_heads=6, n_kv_heads=3)  # 3 KV heads on 2 chips: a padded KV head
SHARD_CASES = [("N300", TINY), ("T3K", TINY), ("TG", TINY), ("T3K", TINY_6x2), ("TG", TINY_6x2),
               ("N300", TINY_6x3)]
SHARD_IDS = [f"{t}-{c.n_heads}x{c.n_kv_heads}" for t, c in SHARD_CASES]
SPLIT = {Role.WQKV: 1, Role.WO: 0, Role.W1: 1, Role.W3: 1, Role.W2: 0, Role.LM_HEAD: 1}


@pytest.mark.parametrize("target,cfg", SHARD_CASES, ids=SHARD_IDS)
def test_shard_weight_pieces_are_torch_chunks_laid_out_by_the_head_plan(target, cfg):
    """Every weight's recipe evaluates to its declared global shape; chip i holds
    torch.chunk(full, chips, dim)[i] (place/shard_index agree with the row-major tp order)
    at the shape the graph was propagated with; the pieces' contents are the head plan's:
    wqkv = [q_c | k_c | v_c] and wo rows = q_c (padded heads zero), w1/w3/w2 and the LM
    head split over a zero-padded hidden size / vocabulary; caches hold local KV heads."""
    ctx = unit_ctx("prefill", target, cfg)
    b, gm = fused_model(ctx)
    gm = step(shard, gm, ctx)

    t = ctx.target
    mesh, chips, axes = t.mesh_shape, t.tp_size, tuple(t.tp_axes)
    assert chips == {"N300": 2, "T3K": 8, "TG": 32}[target]
    plan = plan_heads(cfg.n_heads, cfg.n_kv_heads, chips)
    hd, lq, lkv = cfg.head_dim, plan.local_q, plan.local_kv
    evaluate = RecipeEvaluator(_DictReader(b.sources), cfg)
    attrs = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
    pieces = {}
    for name, spec in ctx.facts.weights.items():
        full = evaluate(spec.recipe)
        assert tuple(full.shape) == spec.shape, name
        if spec.role not in SPLIT:
            assert spec.placement == REPLICATED, name
            continue
        assert spec.placement == Placement(SPLIT[spec.role], axes), name
        dim = spec.placement.dim
        assert full.shape[dim] % chips == 0
        chunks = torch.chunk(full, chips, dim)
        pieces[spec.role] = place(full, spec.placement.to_json(), mesh)
        for c in range(chips):
            assert torch.equal(pieces[spec.role][c], chunks[c]), (name, c)
            assert tuple(chunks[c].shape) == spec.placement.local_shape(spec.shape, mesh)
            assert tuple(chunks[c].shape) == tuple(attrs[name].meta[VAL].shape), name

    src = {k.split(".")[-2]: v.t() for k, v in b.sources.items() if k.endswith("weight") and v.dim() == 2}
    for c in range(chips):  # [K, N] weights from the [N, K] checkpoint tensors
        expected = torch.cat([_heads(src["wq"], plan.q_heads[c], hd, 1), _heads(src["wk"], plan.kv_heads[c], hd, 1),
                              _heads(src["wv"], plan.kv_heads[c], hd, 1)], dim=1)
        assert pieces[Role.WQKV][c].shape == (cfg.dim, (lq + 2 * lkv) * hd)
        assert torch.equal(pieces[Role.WQKV][c], expected), c
        assert torch.equal(pieces[Role.WO][c], _heads(src["wo"], plan.q_heads[c], hd, 0)), c
    hidden, vocab = padded_size(cfg.ffn_dim, chips), padded_size(cfg.vocab_size, chips)
    for role, name, dim, size in ((Role.W1, "w1", 1, hidden), (Role.W3, "w3", 1, hidden),
                                  (Role.W2, "w2", 0, hidden), (Role.LM_HEAD, "output", 1, vocab)):
        whole = torch.cat(pieces[role], dim=dim)
        assert whole.shape[dim] == size and size % (32 * chips) == 0
        real = src[name].shape[dim]
        assert torch.equal(whole.narrow(dim, 0, real), src[name]), name
        assert not whole.narrow(dim, real, size - real).any(), f"{name}: padding is not zero"
    for spec in ctx.facts.state.values():
        assert spec.shape == (1, chips * lkv, ctx.max_seq_len, hd)
        assert spec.placement == Placement(1, axes)
        assert spec.placement.local_shape(spec.shape, mesh) == (1, lkv, ctx.max_seq_len, hd)
    heads = nodes_of(gm, dialect.qkv_heads)[0]
    assert heads.args[1:3] == (lq, lkv)
    assert ctx.counters["shard.padded_q_heads"] == plan.padded_q


@pytest.mark.parametrize("target", ["T3K", "TG"])
def test_shard_pads_heads_that_do_not_divide_the_chips(target):
    """6 heads / 2 KV heads compile on 8 and 32 chips; each padded head is a zero column
    block in its chip's wqkv and a zero row block in its chip's wo; real heads are not."""
    ctx = unit_ctx("prefill", target, TINY_6x2)
    b, gm = fused_model(ctx)
    gm = step(shard, gm, ctx)
    chips, hd, mesh = ctx.target.tp_size, TINY_6x2.head_dim, ctx.target.mesh_shape
    plan = plan_heads(6, 2, chips)
    assert plan.local_q == 1 and plan.local_kv == 1
    assert plan.padded_q == {8: 2, 32: 26}[chips] == ctx.counters["shard.padded_q_heads"]
    if chips == 8:
        assert [q[0] for q in plan.q_heads] == [0, 1, 2, PAD, 3, 4, 5, PAD]
    evaluate = RecipeEvaluator(_DictReader(b.sources), TINY_6x2)
    wqkv_spec, wo_spec = ctx.facts.weights["layers.0.attention.wqkv.weight"], ctx.facts.weights[
        "layers.0.attention.wo.weight"]
    wqkv = place(evaluate(wqkv_spec.recipe), wqkv_spec.placement.to_json(), mesh)
    wo = place(evaluate(wo_spec.recipe), wo_spec.placement.to_json(), mesh)
    for c in range(chips):
        padded = plan.q_heads[c][0] == PAD
        assert (not wqkv[c][:, :hd].any()) == padded, c  # q columns
        assert wqkv[c][:, hd:].abs().sum() > 0, c  # k and v of the chip's (real) KV head
        assert (not wo[c].any()) == padded, c


COLLECTIVES = {"N150": (0, 0), "N300": (2, 1), "T3K": (2, 1), "TG": (4, 2)}  # per layer; LM head


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("target", list(COLLECTIVES))
def test_shard_collectives_per_layer(target, mode):
    """2 all_reduces per layer on a 1xN mesh (after wo and after w2), 4 on TG (one per mesh
    axis each), all_gathers after the LM head (1 / 2); on N150 the graph is untouched."""
    ctx = unit_ctx(mode, target, batch_size=2 if mode == "decode" else 1)
    b, gm = fused_model(ctx, layers=2)
    text, shapes = str(gm.graph), {n: s.shape for n, s in ctx.facts.weights.items()}
    gm = step(shard, gm, ctx)

    per_layer, gathers = COLLECTIVES[target]
    reduces = nodes_of(gm, dialect.all_reduce)
    assert [sum(n.meta[LAYER] == i for n in reduces) for i in (0, 1)] == [per_layer, per_layer]
    assert count(gm, dialect.all_gather) == gathers
    assert all(n.meta[LAYER] is None for n in nodes_of(gm, dialect.all_gather))
    if target == "N150":
        assert str(gm.graph) == text and "shard.collectives" not in ctx.counters
        assert {n: s.shape for n, s in ctx.facts.weights.items()} == shapes
        assert all(s.placement == REPLICATED for s in [*ctx.facts.weights.values(), *ctx.facts.state.values()])
        return
    assert ctx.counters["shard.collectives"] == 2 * per_layer + gathers
    axes, mesh = tuple(ctx.target.tp_axes), ctx.target.mesh_shape
    for role in (Role.WO, Role.W2):  # linear -> all_reduce(axis a) -> ... -> the residual add
        for lin in linear_of(gm, ctx, role):
            chain, node = [], lin
            while len(node.users) == 1 and next(iter(node.users)).target is dialect.all_reduce:
                node = next(iter(node.users))
                chain.append(node.args[1])
            assert chain == list(axes), (role, chain)
            assert [u.target for u in node.users] == [dialect.add]
    head = linear_of(gm, ctx, Role.LM_HEAD)[0]
    chain, node = [], head
    while node.users and next(iter(node.users)).target is dialect.all_gather:
        node = next(iter(node.users))
        chain.append(node.args[1:])
    assert chain == [(3, a, mesh[a]) for a in reversed(axes)]  # innermost axis first
    assert [u.op for u in node.users] == ["output"]


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("target", ["T3K", "TG"])
def test_shard_placements(target, mode):
    """Placements after the pipeline's analysis: wo's (and w2's) output partial before its
    all_reduce(s) and replicated after (on TG the first of two sums one axis: still
    partial over the other); q/k/v split on the heads dim; gated_mlp and the LM head on
    their last dim."""
    ctx = unit_ctx(mode, target, batch_size=2 if mode == "decode" else 1)
    b, gm = fused_model(ctx)
    gm = step(shard, gm, ctx)
    axes = tuple(ctx.target.tp_axes)
    heads_dim = 2 if ctx.decode else 1

    for role in (Role.WO, Role.W2):
        lin = linear_of(gm, ctx, role)[0]
        assert lin.meta[PLACEMENT] == Placement(None, axes, partial=True)
        first = next(iter(lin.users))
        if len(axes) == 2:
            assert first.meta[PLACEMENT] == Placement(None, (axes[1],), partial=True)
            first = next(iter(first.users))
        assert first.target is dialect.all_reduce and first.meta[PLACEMENT] == REPLICATED
        assert next(iter(first.users)).meta[PLACEMENT] == REPLICATED  # the residual add
    qkv = linear_of(gm, ctx, Role.WQKV)[0]
    assert qkv.meta[PLACEMENT] == Placement(3, axes) and qkv.args[0].meta[PLACEMENT] == REPLICATED
    heads = nodes_of(gm, dialect.qkv_heads)[0]
    for node in [heads, *heads.users, *nodes_of(gm, ref.rotary)]:
        assert node.meta[PLACEMENT] == Placement(heads_dim, axes), node.name
    attention = nodes_of(gm, ref.decode_attention if ctx.decode else ref.causal_attention)[0]
    assert attention.meta[PLACEMENT] == Placement(heads_dim, axes)
    assert nodes_of(gm, ref.merge_heads)[0].meta[PLACEMENT] == Placement(3, axes)
    assert nodes_of(gm, dialect.gated_mlp)[0].meta[PLACEMENT] == Placement(3, axes)
    assert linear_of(gm, ctx, Role.LM_HEAD)[0].meta[PLACEMENT] == Placement(3, axes)
    for op in (ref.embed, ref.rms_norm, ref.rope_rows):
        assert all(n.meta[PLACEMENT] == REPLICATED for n in nodes_of(gm, op)), op.__name__


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("target,cfg", SHARD_CASES, ids=SHARD_IDS)
def test_sharded_graph_run_chip_by_chip_equals_the_unsharded_graph(target, cfg, mode):
    """Numerics (mesh interpreter): every chip's output after the all_gathers is the
    unsharded graph's logits (float32), padded vocabulary columns zero; each chip's caches
    hold the unsharded caches' heads the head plan assigns it (decode starts from random
    caches, laid out per chip the same way); every node placed REPLICATED holds the same
    value on every chip."""
    ctx, b, gm, state, before, before_state = _unsharded_run(mode, target, cfg)

    gm = step(shard, gm, ctx)
    plan = plan_heads(cfg.n_heads, cfg.n_kv_heads, ctx.target.tp_size)
    values = {}
    outs, chip_state = run_mesh(gm, ctx, b.sources, b.real_inputs,
                                {n: shard_cache(t, plan) for n, t in state.items()}, trace=values)

    vocab = cfg.vocab_size
    for c, out in enumerate(outs):
        assert out.shape[-1] == padded_size(vocab, ctx.target.tp_size)
        torch.testing.assert_close(out[..., :vocab], before, atol=1e-5, rtol=1e-5)
        assert not out[..., vocab:].any()
    for name, per_chip in chip_state.items():
        for c, piece in enumerate(per_chip):
            torch.testing.assert_close(piece, _heads(before_state[name], plan.kv_heads[c], 1, 1), atol=1e-5,
                                       rtol=1e-5)
    for node, per_chip in values.items():
        if node.op == "call_function" and node.meta[PLACEMENT] == REPLICATED:
            assert all(torch.equal(v, per_chip[0]) for v in per_chip), node.name


def test_first_of_two_all_gathers_on_tg_is_not_replicated():
    """On TG the LM head's first all_gather (axis 1) leaves chips of different mesh rows
    with different vocab slices: Placement(3, (0,)), not replicated."""
    ctx = unit_ctx("decode", "TG", batch_size=2)
    b, gm = fused_model(ctx)
    gm = step(shard, gm, ctx)
    values = {}
    run_mesh(gm, ctx, b.sources, b.real_inputs, trace=values)
    first = nodes_of(gm, dialect.all_gather)[0]
    per_chip = values[first]
    assert not torch.equal(per_chip[0], per_chip[4])  # chips of mesh rows 0 and 1 differ ...
    assert first.meta[PLACEMENT] == Placement(3, (0,))  # ... so it is split over mesh rows
