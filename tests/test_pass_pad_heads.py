"""Unit tests of the pad_heads pass on tiny hand-built graphs (helpers: tests/pass_units.py)."""
from __future__ import annotations


import operator

import pytest
import torch
import torch.fx

from compiler import dialect, pipeline
from compiler.convert import RecipeEvaluator
from compiler.errors import CompileError
from models_ref import ops as ref
from models_ref.names import Role
from passes import chunked_prefill, memory_plan, paged_kv, precision, shard
from passes.head_plan import plan_heads
from graph_builder import MAX_SEQ, TINY, _DictReader, run_real
from pass_units import (MEM_CFG, TINY_6x2, _heads, _unsharded_run, build_model, compile_through, fused_model, mem_ctx, nodes_of, run_mesh, shard_cache, step, unit_ctx)
from pass_units import _one_thread  # noqa: F401 (autouse: one torch thread)


PAD_CASES = {  # head_dim -> what the variant adds (heads 4 of 2 KV heads, dim 64)
    "hd16": TINY.replace(name="tiny-hd16", head_dim=16),
    "hd48-bias": TINY.replace(name="tiny-hd48", head_dim=48, qkv_bias=True),
    "hd80-qknorm": TINY.replace(name="tiny-hd80", head_dim=80, qk_norm=True),
    "hd100": TINY.replace(name="tiny-hd100", head_dim=100),
}


def pad_cache(t: torch.Tensor, head_dim: int, padded: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, padded - head_dim))


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("case", list(PAD_CASES))
def test_pad_heads_pads_rotary_heads_and_keeps_the_numbers(case, mode):
    """Heads that go through rotary (and q/k norms, biases, caches) are padded to whole
    tiles: wqkv columns and bias per head, wo rows, q/k norm gamma (scaled by sqrt(h/hp),
    eps by h/hp), cos/sin tables (1 and 0 on padded dims), caches; the attention scale
    stays 1/sqrt(h). Two layers in float32: the logits equal the unpadded graph's, the
    caches hold the unpadded heads in their first h dims and zeros after (decode starts from
    random caches, padded with zeros)."""
    from passes import pad_heads

    cfg = PAD_CASES[case]
    hd = cfg.head_dim
    hp = -(-hd // 32) * 32
    batch = 2 if mode == "decode" else 1
    ctx = unit_ctx(mode, "N150", cfg, batch_size=batch)
    b, gm = fused_model(ctx, layers=2)
    g = torch.Generator().manual_seed(1)
    state = {n: 0.5 * torch.randn(s.shape, generator=g) for n, s in ctx.facts.state.items()} if ctx.decode else {}
    before, before_state = run_real(gm, ctx.facts, b.sources, b.real_inputs, cfg, state)
    scales = {n.args[3] if n.target is ref.causal_attention else n.args[4]
              for n in nodes_of(gm, ref.causal_attention) + nodes_of(gm, ref.decode_attention)}

    gm = step(pad_heads, gm, ctx)
    assert ctx.counters["pad_heads"] == 2
    assert {n.args[3] for n in nodes_of(gm, dialect.qkv_heads)} == {hp}
    weights = ctx.facts.weights
    width = (cfg.n_heads + 2 * cfg.n_kv_heads) * hp
    assert weights["layers.0.attention.wqkv.weight"].shape == (cfg.dim, width)
    assert ("layers.0.attention.wqkv.bias" in weights) == cfg.qkv_bias
    if cfg.qkv_bias:
        assert weights["layers.0.attention.wqkv.bias"].shape == (1, width)
    assert weights["layers.0.attention.wo.weight"].shape == (cfg.n_heads * hp, cfg.dim)
    assert weights["rope_cos"].shape == weights["rope_sin"].shape == (MAX_SEQ, hp)
    assert {s.shape[-1] for s in ctx.facts.state.values()} == {hp}
    norms = [n for n in nodes_of(gm, ref.rms_norm) if weights[n.args[1].target].role in (Role.Q_NORM, Role.K_NORM)]
    assert len(norms) == (4 if cfg.qk_norm else 0)
    for n in norms:
        assert weights[n.args[1].target].shape == (hp,) and n.args[2] == pytest.approx(cfg.norm_eps * hd / hp)
    attention = nodes_of(gm, ref.causal_attention) + nodes_of(gm, ref.decode_attention)
    assert {n.args[3] if n.target is ref.causal_attention else n.args[4] for n in attention} == scales == {hd ** -0.5}

    padded_state = {n: pad_cache(t, hd, hp) for n, t in state.items()}
    after, after_state = run_real(gm, ctx.facts, b.sources, b.real_inputs, cfg, padded_state)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    for name, cache in before_state.items():
        torch.testing.assert_close(after_state[name][..., :hd], cache, atol=1e-5, rtol=1e-5)
        assert not after_state[name][..., hd:].any(), name
    evaluate = RecipeEvaluator(_DictReader(b.sources), cfg)
    cos, sin = evaluate(weights["rope_cos"].recipe), evaluate(weights["rope_sin"].recipe)
    assert torch.equal(cos[:, :hd], b.sources["rope_cos"]) and bool((cos[:, hd:] == 1).all())
    assert torch.equal(sin[:, :hd], b.sources["rope_sin"]) and not sin[:, hd:].any()


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("target", ["N300", "T3K"])
def test_padded_heads_shard_chip_by_chip_like_the_unpadded_graph(target, mode):
    """pad_heads then shard (heads of 80 padded to 96, 6 heads of 2 KV heads, q/k norms):
    every chip's logits equal the unpadded, unsharded graph's; each chip's caches hold its
    heads, padded."""
    from passes import pad_heads

    cfg = TINY_6x2.replace(head_dim=80, qk_norm=True)
    ctx, b, gm, state, before, before_state = _unsharded_run(mode, target, cfg)

    gm = step(shard, step(pad_heads, gm, ctx), ctx)
    plan = plan_heads(cfg.n_heads, cfg.n_kv_heads, ctx.target.tp_size)
    outs, chip_state = run_mesh(gm, ctx, b.sources, b.real_inputs,
                                {n: shard_cache(pad_cache(t, 80, 96), plan) for n, t in state.items()})
    for out in outs:
        torch.testing.assert_close(out[..., :cfg.vocab_size], before, atol=1e-5, rtol=1e-5)
    for name, per_chip in chip_state.items():
        for c, piece in enumerate(per_chip):
            expected = _heads(pad_cache(before_state[name], 80, 96), plan.kv_heads[c], 1, 1)
            torch.testing.assert_close(piece, expected, atol=1e-5, rtol=1e-5)


def test_pad_heads_refuses_heads_it_cannot_pad():
    """Heads of 80 that an op outside its list reads, or that stay unfused (fuse_qkv does
    not fire when a projection has another reader), are refused with the reason rather
    than emitted for ttnn to reject."""
    from passes import pad_heads

    cfg = TINY.replace(head_dim=80)
    ctx = unit_ctx("prefill", "N150", cfg)
    _, gm = fused_model(ctx)
    q = next(n for n in gm.graph.nodes if n.target is operator.getitem and n.args[1] == 0)
    with gm.graph.inserting_after(q):
        extra = gm.graph.call_function(dialect.silu, (q,))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((output.args[0], extra),)
    with pytest.raises(CompileError, match=r"layer 0: heads of 80 are read by silu .*whole tiles of 32"):
        pad_heads.run(gm, ctx)

    ctx = unit_ctx("prefill", "N150", cfg)
    b, gm = build_model(ctx)
    pipeline.refresh(gm, ctx)
    with pytest.raises(CompileError, match="heads of 80 from an unfused projection"):
        pad_heads.run(gm, ctx)


def test_memory_plan_counts_padded_heads():
    """The planner reads the padded specs: heads of 80 cost what heads of 96 cost (KV cache
    per token, rope table per position, attention weights)."""
    from passes import pad_heads

    plans = {}
    for hd in (80, 96):
        ctx = mem_ctx(cfg=MEM_CFG.replace(head_dim=hd))
        compile_through(ctx, [pad_heads, shard, paged_kv, chunked_prefill, precision, memory_plan])
        plans[hd] = ctx.facts.memory
    assert plans[80].kv_bytes_per_token == plans[96].kv_bytes_per_token > 0
    assert plans[80].rope_bytes_per_position == plans[96].rope_bytes_per_position
    assert plans[80].weights["attention"] == plans[96].weights["attention"]
