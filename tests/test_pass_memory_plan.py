"""Unit tests of the memory_plan pass on tiny hand-built graphs (helpers: tests/pass_units.py)."""
from __future__ import annotations


import dataclasses
import math

import pytest
import torch
import torch.fx

from compiler import dialect, pipeline
from compiler.errors import CompileError
from compiler.facts import VAL
from compiler.targets import TARGETS, get_target
from models_ref import ops as ref
from passes import chunked_prefill, memory_plan, paged_kv, precision, shard
from graph_builder import GraphBuilder
from pass_units import (BS, MEM_CFG, compile_through, mem_ctx, nodes_of, step, unit_ctx)
from pass_units import _one_thread  # noqa: F401 (autouse: one torch thread)


BF8, BF4, BF16_TILE = 1088, 576, 32 * 32 * 2
# dim 64, 3 layers (the graph holds one: the planner scales), ffn 80 and vocab 100 (tile padding)


def tiles(rows: int, cols: int) -> int:
    return math.ceil(rows / 32) * math.ceil(cols / 32)


def hand_plan(chips: int) -> dict:
    """MEM_CFG in performance mode (attention, w2, LM head, KV bfloat8_b; w1/w3 bfloat4_b;
    the rest bfloat16), bytes per chip, written out by hand."""
    cfg, hd, dim, layers = MEM_CFG, MEM_CFG.head_dim, MEM_CFG.dim, MEM_CFG.n_layers
    if chips == 1:
        lq, lkv, hidden, vocab = cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size
    else:  # 4 heads / 2 KV heads on 8 or 32 chips: one q head (or a zero one) and one KV head a chip
        lq, lkv, hidden, vocab = 1, 1, 32, 32  # ffn 80 and vocab 100 padded to 32 a chip
    return {
        "attention": layers * (tiles(dim, (lq + 2 * lkv) * hd) + tiles(lq * hd, dim)) * BF8,
        "mlp": layers * (2 * tiles(dim, hidden) * BF4 + tiles(hidden, dim) * BF8),
        # [64] norms as ROW_MAJOR [2, 32] rows, padded like every tensor to a 32x32 bfloat16 tile
        "norms": (2 * layers + 1) * BF16_TILE,
        "embedding": 128 * dim * 2,  # [100, 64] bfloat16, rows padded to 128
        "lm_head": tiles(dim, vocab) * BF8,
        # a [.., Hkv, positions, hd] bfloat8_b cache: hd / 32 tiles per 32 positions per head
        "kv_per_token": layers * 2 * lkv * (hd // 32) * BF8 // 32,
        "rope_per_position": 2 * hd * 2,  # cos and sin rows, bfloat16
    }


def plan_for(ctx, layers: int = 1):
    """The whole pipeline after the fusions, on the hand-built model: the memory plan."""
    compile_through(ctx, [shard, paged_kv, chunked_prefill, precision, memory_plan], layers=layers)
    return ctx.facts.memory


@pytest.mark.parametrize("target", ["N150", "T3K", "TG"])
def test_memory_plan_weights_and_kv_equal_the_hand_sums(target):
    """Weight bytes per category (per chip, tile padding, block-float tiles, one graph layer
    scaled to the model's three) and KV bytes per token equal hand_plan."""
    ctx = mem_ctx(target=target)
    plan = plan_for(ctx)
    hand = hand_plan(ctx.target.tp_size)
    assert ctx.facts.weights["layers.0.feed_forward.w1.weight"].dtype == "bfloat4_b"  # what hand_plan assumes
    assert {s.dtype for s in ctx.facts.state.values()} == {"bfloat8_b"}
    assert plan.weights == {k: hand[k] for k in ("attention", "mlp", "norms", "embedding", "lm_head")}
    assert plan.kv_bytes_per_token == hand["kv_per_token"]
    assert plan.rope_bytes_per_position == hand["rope_per_position"]
    assert sum(plan.weights_by_dtype.values()) == sum(plan.weights.values())
    assert plan.weights_by_dtype["bfloat4_b"] == hand["mlp"] - MEM_CFG.n_layers * tiles(
        32 if target != "N150" else 80, 64) * BF8
    assert plan.collectives_per_layer == {"prefill": {"N150": 0, "T3K": 2, "TG": 4}[target]}


def test_memory_plan_two_graph_layers_give_the_same_plan():
    """Scaling is exact: a graph of two layers and one of one layer give the same bytes."""
    one, two = plan_for(mem_ctx()), plan_for(mem_ctx(), layers=2)
    assert one.weights == two.weights and one.kv_bytes_per_token == two.kv_bytes_per_token


CHAIN_CFG = MEM_CFG.replace(name="tiny-chain", n_layers=1, vocab_size=4096)


def build_chain(ctx):
    """tokens -> embed -> rms_norm -> gated_mlp -> linear(w2) -> add -> last_tile -> LM head:
    a chain whose live set is easy to write down by hand (hand_live below)."""
    cfg = ctx.cfg
    b = GraphBuilder(ctx)
    ctx.add_input("tokens", lambda r: (1, r))
    tokens = b.input("tokens", (1, ctx.seq_rows), real=torch.zeros(1, ctx.seq_rows, dtype=torch.long))
    last = b.input("last_index", (), real=0)
    x = b.call(ref.embed, tokens, b.table("tok_embeddings.weight", cfg.vocab_size, cfg.dim), layer=None)
    n = b.call(ref.rms_norm, x, b.vector("layers.0.ffn_norm.weight", cfg.dim), cfg.norm_eps)
    g = b.call(dialect.gated_mlp, n, b.weight("layers.0.feed_forward.w1.weight", cfg.dim, cfg.ffn_dim),
               b.weight("layers.0.feed_forward.w3.weight", cfg.dim, cfg.ffn_dim))
    o = b.call(dialect.linear, g, b.weight("layers.0.feed_forward.w2.weight", cfg.ffn_dim, cfg.dim), None)
    y = b.call(dialect.add, x, o)
    t = b.call(ref.last_tile, y, last, layer=None)
    logits = b.call(dialect.linear, t, b.weight("output.weight", cfg.dim, cfg.vocab_size), None, layer=None)
    return b, b.finish(logits)


def hand_live(rows: int) -> int:
    """Peak bytes alive in build_chain at `rows` (a multiple of 32), bfloat16 activations:
    tokens [1, S] (one tile row high: 64 B a row); x, n, o, y [S, 64] (128 B a row);
    g [S, 80 -> 96] (192 B a row) plus gated_mlp's two matmul outputs while it runs; then
    the last tile t [32, 64] (4096 B) and the logits [32, 4096] (262144 B)."""
    s, tile, logits = rows, 32 * 64 * 2, 32 * 4096 * 2
    points = [64 * s,                        # tokens
              64 * s + 128 * s,              # embed: tokens, x
              128 * s + 128 * s,             # rms_norm: x, n
              (128 + 128 + 3 * 192) * s,     # gated_mlp: x, n, g and its w1 / w3 outputs
              (128 + 192 + 128) * s,         # linear(w2): x, g, o
              (128 + 128 + 128) * s,         # add: x, o, y
              128 * s + tile,                # last_tile: y, t
              tile + logits,                 # LM head: t, logits
              logits]                        # output
    return max(points)


def test_activation_envelope_is_the_live_set_by_hand():
    """The prefill activation plan, base + per_row x S over program points, equals the live
    set computed by hand at small S (the logits' constant term wins) and large S (the MLP
    wins), and its upper envelope is exactly those three program points."""
    ctx = mem_ctx(cfg=CHAIN_CFG)
    b, gm = build_chain(ctx)
    pipeline.refresh(gm, ctx)
    for p in (precision, memory_plan):
        gm = step(p, gm, ctx)
    plan = ctx.facts.memory
    assert plan.activation_points == [(0, 832), (4096, 128), (32 * 64 * 2 + 32 * 4096 * 2, 0)]
    for rows in (32, 128, 2048, 8192):
        assert plan.activation_bytes(rows) == hand_live(rows), rows
    assert hand_live(128) == 32 * 64 * 2 + 32 * 4096 * 2 and hand_live(2048) == 832 * 2048
    embed = nodes_of(gm, ref.embed)[0]
    assert tuple(embed.meta[VAL].shape) == (1, 1, 128, 64)  # the planner restored the shapes at seq_rows


def _budget(hand: dict, plan, context: int, chunk: int, batch: int = 1) -> int:
    """DRAM per chip by hand: weights + rope and KV (contiguous caches, `batch` users) for
    `context` tokens + the activations of a `chunk`-row prefill (from the plan: the
    envelope arithmetic is tested above on a graph small enough to walk by hand)."""
    fixed = sum(hand[k] for k in ("attention", "mlp", "norms", "embedding", "lm_head"))
    kv = hand["kv_per_token"] * batch
    return fixed + (hand["rope_per_position"] + kv) * context + plan.activation_bytes(chunk)


def test_memory_plan_decides_context_and_chunk_at_the_byte():
    """A budget that fits 3000 tokens beside a 4096-row chunk (not 4096) gets a 2048-token
    context and chunk; one byte less than 4096's needs gets 2048, exactly 4096's gets 4096;
    with --max-seq-len 2048, a budget for a 512-row chunk beside it gets chunk 512, and
    asking for 1024 is refused naming 512."""
    hand, probe = hand_plan(1), plan_for(mem_ctx())
    assert probe.fixed_bytes() == _budget(hand, probe, 0, 0) - probe.activation_bytes(0)
    assert probe.activation_bytes(4096) > probe.activation_bytes(2048) > 0

    plan = plan_for(mem_ctx(_budget(hand, probe, 3000, 4096)))
    assert plan.refusal is None
    assert (plan.max_context, plan.context, plan.max_prefill_chunk, plan.prefill_chunk) == (2048, 2048, 2048, 2048)
    plan = plan_for(mem_ctx(_budget(hand, probe, 4096, 4096) - 1))
    assert plan.max_context == 2048
    plan = plan_for(mem_ctx(_budget(hand, probe, 4096, 4096)))
    assert (plan.max_context, plan.prefill_chunk) == (4096, 4096)
    assert plan.total_bytes(4096, 4096) == plan.dram_bytes

    dram = _budget(hand, probe, 2048, 512)
    plan = plan_for(mem_ctx(dram, explicit_context=True))
    assert plan.refusal is None and (plan.context, plan.max_prefill_chunk, plan.prefill_chunk) == (2048, 512, 512)
    plan = plan_for(mem_ctx(dram, explicit_context=True, max_prefill_chunk=1024))
    assert plan.refusal is not None and plan.prefill_chunk == 0
    assert plan.refusal.startswith("tiny-mem: a 1024-token prefill chunk beside a 2048-token context")
    assert plan.refusal.endswith("the largest chunk that fits is 512")


def test_memory_plan_refuses_an_explicit_context_that_does_not_fit():
    """Batch 8, a budget for 1000 tokens a user beside a 4096-row chunk: --max-seq-len 4096
    is refused naming the largest context (1000 rounded down to 512), which then compiles."""
    hand, probe = hand_plan(1), plan_for(mem_ctx())
    dram = _budget(hand, probe, 1000, 4096, batch=8)
    plan = plan_for(mem_ctx(dram, max_seq_len=4096, explicit_context=True, batch_size=8))
    assert plan.context == 0 and plan.max_context == 512
    assert plan.refusal.startswith("tiny-mem with --max-seq-len 4096 (batch 8) needs about")
    assert plan.refusal.endswith("the largest context that fits is 512")
    plan = plan_for(mem_ctx(dram, max_seq_len=512, explicit_context=True, batch_size=8))
    assert plan.refusal is None and plan.context == 512 and plan.prefill_chunk == 512


def test_memory_plan_refuses_weights_that_do_not_fit_and_names_targets_that_hold_them():
    """A budget one byte below the weights (by hand): refused in one line naming the
    Wormhole targets that would hold the model (every one but N150, at 12 GB a chip)."""
    weights = _budget(hand_plan(1), plan_for(mem_ctx()), 0, 0) - plan_for(mem_ctx()).activation_bytes(0)
    plan = plan_for(mem_ctx(weights - 1))
    assert plan.fixed_bytes() == weights
    assert plan.context == 0 and plan.max_context == 0
    assert plan.refusal.startswith("tiny-mem needs about ")
    assert "on N150, which has 0.0 GB per chip" in plan.refusal
    wormholes = [n for n, t in TARGETS.items() if t.arch == "wormhole_b0" and n != "N150"]
    assert plan.refusal.endswith("; use " + " or ".join(wormholes)) and wormholes == ["N300", "T3K", "TG"]


def _pool_budget(probe, hand, blocks: int) -> int:
    """DRAM that holds the weights, a 128-token context's rope, a 128-row chunk and a pool
    of exactly `blocks` blocks (the KV the planner counts when the pool is larger)."""
    fixed = sum(hand[k] for k in ("attention", "mlp", "norms", "embedding", "lm_head"))
    return fixed + hand["rope_per_position"] * 128 + probe.activation_bytes(128) + hand["kv_per_token"] * BS * blocks


def test_memory_plan_refuses_a_page_pool_and_says_how_many_blocks_fit():
    """--max-num-blocks 400 beside a budget for 50 blocks: refused with 'use
    --max-num-blocks 50 or fewer'; 50 then fits and 51 does not."""
    paged = dict(paged_attention=True, block_size=BS, max_seq_len=256)
    hand, probe = hand_plan(1), plan_for(mem_ctx(max_num_blocks=400, **paged))  # the paged graph's activations
    dram = _pool_budget(probe, hand, 50) + 7
    plan = plan_for(mem_ctx(dram, max_num_blocks=400, **paged))
    assert plan.kv_pool_tokens == 400 * BS
    assert plan.refusal.startswith("tiny-mem: the KV page pool (400 blocks, ")
    assert plan.refusal.endswith("use --max-num-blocks 50 or fewer")
    assert plan_for(mem_ctx(dram, max_num_blocks=50, **paged)).refusal is None
    assert plan_for(mem_ctx(dram, max_num_blocks=51, **paged)).refusal is not None


def test_memory_plan_suggested_page_pool_is_one_paged_kv_accepts():
    """When the blocks that fit cannot hold one user at the compiled max-seq-len (ttnn
    needs more blocks than a page-table row), the advice is a smaller --max-seq-len with
    that pool, and following it compiles."""
    paged = dict(paged_attention=True, block_size=BS, max_seq_len=256)
    hand, probe = hand_plan(1), plan_for(mem_ctx(max_num_blocks=400, **paged))
    dram = _pool_budget(probe, hand, 6) + 7  # 6 blocks fit; a 256-token user needs 8 + 1
    plan = plan_for(mem_ctx(dram, max_num_blocks=400, **paged))
    assert "--max-num-blocks 6 or fewer" not in plan.refusal
    assert plan.refusal.endswith("use a --max-seq-len of at most 160 with --max-num-blocks 6"), plan.refusal
    with pytest.raises(CompileError, match="cannot hold one user"):
        plan_for(mem_ctx(dram, max_num_blocks=6, **paged))
    following = plan_for(mem_ctx(dram, max_num_blocks=6, **{**paged, "max_seq_len": 160}))
    assert following.refusal is None


def test_memory_plan_default_context_is_always_rounded():
    """Fewer than 128 tokens beside a 4096-row chunk: the context is decided beside a
    128-row chunk and still rounded to a whole prefill shape (3000 -> 2048)."""
    hand, probe = hand_plan(1), plan_for(mem_ctx())
    dram = _budget(hand, probe, 3000, 128)  # beside a 4096-row chunk: < 128 tokens fit
    assert _budget(hand, probe, 128, 4096) > dram
    plan = plan_for(mem_ctx(dram))
    assert plan.refusal is None
    assert plan.context % BS == 0 and plan.context == 2048, plan.context


def test_memory_plan_decode_checks_l1():
    """Decode: the step's live set is checked against L1 (cores x L1 per core), not DRAM."""
    plan = plan_for(mem_ctx(mode="decode", batch_size=2))
    assert plan.refusal is None and plan.context == 2048 and plan.decode_activation_bytes > 0
    small = dataclasses.replace(get_target("N150"), l1_bytes_per_core=plan.decode_activation_bytes // 64 - 1)
    ctx = unit_ctx("decode", small, MEM_CFG, rows=128, seq_len=2048, optimizations="performance", batch_size=2)
    plan = plan_for(ctx)
    assert plan.refusal is not None and plan.refusal.endswith("use a smaller --batch-size")
