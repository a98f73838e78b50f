"""Unit tests of the paged_kv pass on tiny hand-built graphs (helpers: tests/pass_units.py)."""
from __future__ import annotations


import pytest
import torch
import torch.fx

from compiler import dialect, pipeline
from compiler.errors import CompileError
from compiler.facts import VAL, Placement
from models_ref import ops as ref
from passes import paged_kv, shard
from graph_builder import MAX_SEQ, TINY, assert_same_outputs, count, run_real
from pass_units import (BS, _gather, _paged, _same_sources, _scrambled_table, compile_through, fused_model, nodes_of, placeholders, step, unit_ctx)
from pass_units import _one_thread  # noqa: F401 (autouse: one torch thread)


@pytest.mark.parametrize("max_num_blocks", [None, 20])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_paged_kv_makes_pools_and_page_tables(mode, max_num_blocks):
    """Caches become pools [blocks, Hkv, block_size, hd] (1024 blocks by default); decode
    takes page_table [batch, max_seq_len / block]; prefill takes page_table [1, ...] and
    chunk_page_table [1, S / block] and no user_id; the cache ops are the paged ones."""
    batch = 2 if mode == "decode" else 1
    ctx = _paged(mode, batch=batch, max_num_blocks=max_num_blocks)
    b, gm = compile_through(ctx, [shard], layers=2)
    assert count(gm, ref.fill_cache if mode == "prefill" else ref.update_cache) == 4
    gm = step(paged_kv, gm, ctx)

    blocks = 1024 if max_num_blocks is None else max_num_blocks
    per_user = MAX_SEQ // BS
    assert ctx.counters["paged_kv.pool_blocks"] == blocks
    assert ctx.counters["paged_kv.rewrites"] == (6 if mode == "decode" else 4)
    for spec in ctx.facts.state.values():
        assert spec.shape == (blocks, TINY.n_kv_heads, BS, TINY.head_dim)
    shapes = {n.target: tuple(n.meta[VAL].shape) for n in gm.graph.nodes if n.op == "placeholder"}
    if mode == "decode":
        assert placeholders(gm) == ["tokens", "positions", "page_table"]
        assert shapes["page_table"] == (batch, per_user)
        assert count(gm, ref.update_cache) == 0 and count(gm, dialect.paged_update_cache) == 4
        assert count(gm, ref.decode_attention) == 0 and count(gm, dialect.paged_decode_attention) == 2
        for node in nodes_of(gm, dialect.paged_decode_attention):
            assert node.args[1].target is dialect.paged_update_cache and node.args[4].target == "page_table"
    else:
        assert placeholders(gm) == ["tokens", "positions", "page_table", "chunk_page_table"]
        assert shapes["page_table"] == (1, per_user) and shapes["chunk_page_table"] == (1, 64 // BS)
        assert tuple(ctx.inputs_at(128)["chunk_page_table"].shape) == (1, 128 // BS)
        assert count(gm, ref.fill_cache) == 0 and count(gm, dialect.paged_fill_cache) == 4
        assert count(gm, ref.causal_attention) == 2  # chunked_prefill's job
        for node in nodes_of(gm, dialect.paged_fill_cache):
            assert node.args[0].op == "get_attr" and node.args[2].target == "chunk_page_table"


def test_paged_kv_pools_are_per_chip_after_shard():
    """On T3K the pool holds the chips' local KV heads: [blocks, 8 x 1, bs, hd] split on dim 1."""
    ctx = unit_ctx("decode", "T3K", batch_size=2, paged_attention=True, block_size=BS, max_num_blocks=20)
    b, gm = compile_through(ctx, [shard, paged_kv])
    for spec in ctx.facts.state.values():
        assert spec.shape == (20, 8, BS, TINY.head_dim) and spec.placement == Placement(1, (1,))
    assert {tuple(n.meta[VAL].shape) for n in gm.graph.nodes if n.op == "get_attr" and "cache" in n.target} == {
        (20, 1, BS, TINY.head_dim)}


def test_paged_kv_refuses_what_it_cannot_page():
    """A pool that cannot hold one user's page-table row (plus one block, as ttnn needs)
    is the user's error, naming the fix; so is a context that is not whole blocks."""
    ctx = _paged("decode", max_num_blocks=MAX_SEQ // BS)
    b, gm = compile_through(ctx, [shard])
    with pytest.raises(CompileError, match=r"--max-num-blocks 8 cannot hold one user.*"
                                           r"use --max-num-blocks 9 or more, or a smaller --max-seq-len"):
        pipeline.run_pass(paged_kv, gm, ctx)
    ctx = _paged("decode", max_num_blocks=MAX_SEQ // BS + 1)
    b, gm = compile_through(ctx, [shard, paged_kv])
    assert ctx.counters["paged_kv.pool_blocks"] == 9
    ctx = unit_ctx("prefill", rows=64, seq_len=224, paged_attention=True, block_size=64)
    b, gm = compile_through(ctx, [shard])
    with pytest.raises(CompileError, match="max-seq-len 224 is not a multiple of --block-size 64"):
        pipeline.run_pass(paged_kv, gm, ctx)


def test_paged_decode_with_scrambled_pages_equals_contiguous():
    """Numerics: a decode step of 2 users whose caches live in scrambled blocks of a pool
    (junk elsewhere) gives the contiguous graph's logits, and writes the new K/V to the
    block and slot the page table names; reading through an unscrambled table does not."""
    ctx_c = unit_ctx("decode", batch_size=2)
    bc, gm_c = fused_model(ctx_c, layers=2)
    ctx_p = _paged("decode", batch=2, max_num_blocks=20)
    bp, gm_p = compile_through(ctx_p, [shard, paged_kv], layers=2)
    _same_sources(bc, bp)
    g = torch.Generator().manual_seed(2)
    contiguous = {n: torch.randn(s.shape, generator=g) for n, s in ctx_c.facts.state.items()}
    table = _scrambled_table(2, 20)
    pools = {}
    for name, cache in contiguous.items():
        pool = torch.randn(ctx_p.facts.state[name].shape, generator=g)  # junk in every other block
        for user in range(2):
            for j, block in enumerate(table[user].tolist()):
                pool[block] = cache[user, :, j * BS:(j + 1) * BS]
        pools[name] = pool

    before, after_c = run_real(gm_c, ctx_c.facts, bc.sources, bc.real_inputs, TINY, contiguous)
    inputs = {**bp.real_inputs, "page_table": table}
    paged, after_p = run_real(gm_p, ctx_p.facts, bp.sources, inputs, TINY, pools)

    assert_same_outputs(before, paged, atol=1e-5, rtol=1e-5)
    positions = bp.real_inputs["positions"].tolist()
    for name in contiguous:
        for user in range(2):
            torch.testing.assert_close(_gather(after_p[name], table[user]), after_c[name][user])
            pos = positions[user]
            assert not torch.equal(after_p[name][table[user, pos // BS], :, pos % BS],
                                   pools[name][table[user, pos // BS], :, pos % BS])  # written there
    wrong = torch.arange(16).reshape(2, 8)
    other, _ = run_real(gm_p, ctx_p.facts, bp.sources, {**inputs, "page_table": wrong}, TINY, pools)
    assert not torch.allclose(other, before, atol=1e-3)


def test_paged_prefill_writes_the_blocks_of_the_chunk_page_table():
    """Prefill through paged_kv alone: the same logits; the pool blocks the chunk table
    names hold the contiguous cache's rows, every other block stays zero."""
    ctx_c = unit_ctx("prefill", rows=64)
    bc, gm_c = fused_model(ctx_c)
    ctx_p = _paged("prefill", rows=64, max_num_blocks=20)
    bp, gm_p = compile_through(ctx_p, [shard, paged_kv])
    _same_sources(bc, bp)
    table = _scrambled_table(1, 20)
    before, cache_c = run_real(gm_c, ctx_c.facts, bc.sources, bc.real_inputs, TINY)
    inputs = {**bp.real_inputs, "page_table": table, "chunk_page_table": table[:, :2]}
    after, pools = run_real(gm_p, ctx_p.facts, bp.sources, inputs, TINY)
    assert_same_outputs(before, after)
    for name, pool in pools.items():
        torch.testing.assert_close(_gather(pool, table[0, :2]), cache_c[name][0, :, :64])
        untouched = [blk for blk in range(20) if blk not in table[0, :2].tolist()]
        assert not pool[untouched].any()
