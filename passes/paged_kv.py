"""paged_kv: KV caches become block pools addressed through a page table.

Expects: caches as state `[batch, Hkv, max_seq_len, hd]` (per chip after shard), written
by fill_cache (prefill) and update_cache (decode), read by decode_attention.
Guarantees (when options.paged_attention, the default): every self-attention cache (role
K_CACHE / V_CACHE; Llama 3.2 Vision's cross-attention caches stay one row per user) is a pool
`[max_num_blocks, Hkv, block_size, hd]`; the graph takes `page_table` (decode:
`[batch, max_seq_len / block_size]`, one row per user; prefill: the prefilled user's row
`[1, max_seq_len / block_size]`) and, in prefill, `chunk_page_table` `[1, S / block_size]`
(the blocks this call's rows go to). Writes and decode attention go through the table,
so users of any length share one pool and blocks need not be contiguous.

    %c = update_cache(%k_cache, %k, %pos)             %c = paged_update_cache(%k_cache, %k, %pos, %page_table)
    %a = decode_attention(%q, %c, %cv, %pos, s)  ==>  %a = paged_decode_attention(%q, %c, %cv, %pos, %page_table, s)
    fill_cache(%k_cache, %k, %user_id)                paged_fill_cache(%k_cache, %k, %chunk_page_table)
"""
from __future__ import annotations

import torch.fx

from compiler import dialect
from compiler.errors import CompileError
from models_ref.names import CACHES
from runtime import schedule
from models_ref import ops as ref

from .util import replace

NAME = "paged_kv"


def add_placeholder(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """A new graph input after the existing ones (or the existing one of that name)."""
    existing = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in existing:
        if n.target == name:
            return n
    with gm.graph.inserting_after(existing[-1]):
        return gm.graph.placeholder(name)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    caches = [spec for spec in ctx.facts.state.values() if spec.role in CACHES]
    if not ctx.options.paged_attention or not caches:  # (a vision function has none)
        return gm
    bs = ctx.options.block_size
    if ctx.max_seq_len % bs:
        raise CompileError(f"max-seq-len {ctx.max_seq_len} is not a multiple of --block-size {bs}")
    per_user = ctx.max_seq_len // bs
    try:  # the runtime's rule (runtime/schedule.py), so the pool is what it allocates from
        blocks = schedule.pool_blocks(ctx.options.max_num_blocks, ctx.max_seq_len, bs)
    except schedule.PoolTooSmall as e:
        raise CompileError(str(e)) from None
    ctx.counters["paged_kv.pool_blocks"] = blocks
    for spec in caches:
        _, kv_heads, _, head_dim = spec.shape
        spec.shape = (blocks, kv_heads, bs, head_dim)

    page_table = add_placeholder(gm, "page_table")
    batch = ctx.options.batch_size
    ctx.add_input("page_table", (lambda rows: (batch, per_user)) if ctx.decode else (lambda rows: (1, per_user)))
    if not ctx.decode:
        chunk_table = add_placeholder(gm, "chunk_page_table")
        ctx.add_input("chunk_page_table", lambda rows: (1, rows // bs))

    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is ref.fill_cache:
            cache, kv, _ = node.args
            replace(gm, node, dialect.paged_fill_cache, (cache, kv, chunk_table))
        elif node.target is ref.update_cache:
            cache, kv, pos = node.args
            replace(gm, node, dialect.paged_update_cache, (cache, kv, pos, page_table))
        elif node.target is ref.decode_attention:
            q, k_cache, v_cache, pos, scale, *window = node.args
            replace(gm, node, dialect.paged_decode_attention,
                    (q, k_cache, v_cache, pos, page_table, scale, *window))
        else:
            continue
        ctx.counters["paged_kv.rewrites"] += 1
    for node in list(gm.graph.nodes):  # the prefilled user is now named by its page table
        if node.op == "placeholder" and node.target == "user_id" and not node.users:
            gm.graph.erase_node(node)
    return gm
