"""Unit tests of the chunked_prefill pass on tiny hand-built graphs (helpers: tests/pass_units.py)."""
from __future__ import annotations


import operator

import pytest
import torch
import torch.fx

from compiler import dialect
from compiler.facts import LAYER
from models_ref import ops as ref
from passes import chunked_prefill, memory_plan, paged_kv, precision, shard
from graph_builder import TINY, count, run_real
from pass_units import (BS, _gather, _paged, _same_sources, _scrambled_table, compile_through, fused_model, nodes_of, placeholders, run_mesh, step, unit_ctx)
from pass_units import _one_thread  # noqa: F401 (autouse: one torch thread)


def test_chunked_prefill_attends_through_the_cache():
    """Prefill causal_attention becomes chunked_attention(q, fill_k, fill_v, page_table,
    chunk_start, scale): it reads the caches the paged_fill_caches wrote; chunk_start is
    a new (scalar) input."""
    ctx = _paged("prefill", max_num_blocks=20)
    b, gm = compile_through(ctx, [shard, paged_kv], layers=2)
    gm = step(chunked_prefill, gm, ctx)
    assert count(gm, ref.causal_attention) == 0 and count(gm, dialect.chunked_attention) == 2
    assert ctx.counters["chunked_prefill.attentions"] == 2
    assert placeholders(gm) == ["tokens", "positions", "page_table", "chunk_page_table", "chunk_start"]
    for node in nodes_of(gm, dialect.chunked_attention):
        q, fk, fv, table, start, scale = node.args
        assert q.target is ref.rotary
        assert fk.target is fv.target is dialect.paged_fill_cache
        assert fk.args[0].target.endswith("k_cache") and fv.args[0].target.endswith("v_cache")
        assert fk.meta[LAYER] == fv.meta[LAYER] == node.meta[LAYER]
        assert fk.args[1].target is ref.rotary and fv.args[1].target is operator.getitem
        assert table.target == "page_table" and start.target == "chunk_start"
        assert scale == TINY.head_dim ** -0.5
        order = list(gm.graph.nodes)
        assert order.index(fk) < order.index(node) and order.index(fv) < order.index(node)


@pytest.mark.parametrize("mode,paged", [("decode", True), ("prefill", False), ("decode", False)])
def test_chunked_prefill_leaves_decode_and_contiguous_graphs_alone(mode, paged):
    """Decode graphs and --no-paged-attention graphs: the same graph text, no chunk_start."""
    ctx = unit_ctx(mode, rows=64, batch_size=2 if mode == "decode" else 1, paged_attention=paged,
                   max_num_blocks=20 if paged else None)
    b, gm = compile_through(ctx, [shard, paged_kv])
    text = str(gm.graph)
    gm = step(chunked_prefill, gm, ctx)
    assert str(gm.graph) == text and "chunk_start" not in placeholders(gm)
    assert ctx.counters["chunked_prefill.attentions"] == 0


def test_two_chunks_equal_one_shot_prefill():
    """Numerics: prefilling 2S rows as two chunked calls (chunk_start 0 then S, scrambled
    blocks, the pool carried between calls) gives the contiguous one-shot prefill's logits
    for both halves and the same K/V; the second chunk alone (empty pool) does not."""
    s = 64
    ctx_c = unit_ctx("prefill", rows=s)
    bc, gm_c = fused_model(ctx_c, layers=2)
    ctx_p = _paged("prefill", rows=s, max_num_blocks=20)
    bp, gm_p = compile_through(ctx_p, [shard, paged_kv, chunked_prefill], layers=2)
    _same_sources(bc, bp)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, TINY.vocab_size, (1, 2 * s), generator=g)
    one_shot, caches = run_real(gm_c, ctx_c.facts, bc.sources,
                                {"tokens": tokens, "positions": torch.arange(2 * s), "user_id": 0}, TINY)
    table = _scrambled_table(1, 20)

    def chunk(start, pools):
        inputs = {"tokens": tokens[:, start:start + s], "positions": torch.arange(start, start + s),
                  "page_table": table, "chunk_page_table": table[:, start // BS:(start + s) // BS],
                  "chunk_start": start}
        return run_real(gm_p, ctx_p.facts, bp.sources, inputs, TINY, pools)

    first, pools = chunk(0, None)
    second, pools = chunk(s, pools)
    torch.testing.assert_close(first, one_shot[:, :, :s], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, one_shot[:, :, s:], atol=1e-5, rtol=1e-5)
    for name, pool in pools.items():
        torch.testing.assert_close(_gather(pool, table[0, :2 * s // BS]), caches[name][0, :, :2 * s])
    alone, _ = chunk(s, None)
    assert not torch.allclose(alone, one_shot[:, :, s:], atol=1e-3)


def test_sharded_paged_chunked_pipeline_on_t3k_equals_one_shot():
    """shard + paged_kv + chunked_prefill + precision(float32) + memory_plan on T3K: two
    chunks run chip by chip equal the unsharded contiguous one-shot prefill; the plan counts
    2 collectives per layer."""
    s = 32
    ctx_c = unit_ctx("prefill", rows=s)
    bc, gm_c = fused_model(ctx_c)
    ctx = unit_ctx("prefill", "T3K", rows=s, paged_attention=True, block_size=BS, max_num_blocks=20)
    b, gm = compile_through(ctx, [shard, paged_kv, chunked_prefill, precision, memory_plan])
    _same_sources(bc, b)
    assert ctx.facts.memory.collectives_per_layer == {"prefill": 2}
    tokens = torch.randint(0, TINY.vocab_size, (1, 2 * s), generator=torch.Generator().manual_seed(5))
    one_shot, _ = run_real(gm_c, ctx_c.facts, bc.sources,
                           {"tokens": tokens, "positions": torch.arange(2 * s), "user_id": 0}, TINY)
    table = _scrambled_table(1, 20)
    pools = None
    for start in (0, s):
        inputs = {"tokens": tokens[:, start:start + s], "positions": torch.arange(start, start + s),
                  "page_table": table, "chunk_page_table": table[:, start // BS:(start + s) // BS],
                  "chunk_start": start}
        global_pools = None if pools is None else {n: torch.cat(p, dim=1) for n, p in pools.items()}
        outs, pools = run_mesh(gm, ctx, b.sources, inputs, global_pools)
        for out in outs:
            torch.testing.assert_close(out[..., :TINY.vocab_size], one_shot[:, :, start:start + s],
                                       atol=1e-5, rtol=1e-5)
