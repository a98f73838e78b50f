"""chunked_prefill: prefill attends to earlier chunks through the paged cache.

Expects: a paged graph (passes/paged_kv.py): prefill writes its K/V with paged_fill_cache
and attends with causal_attention over its own rows only.
Guarantees: prefill attention reads K/V from the cache through the user's page table,
after this call's writes, for positions up to chunk_start + S; a new scalar input
`chunk_start` (the absolute position of the call's first row). A prompt longer than the
maximum chunk is then prefilled by repeated calls, each seeing everything before it, and
one-shot prefill is the special case chunk_start = 0. How large a chunk is, the memory
planner decides (passes/memory_plan.py); the runtime splits prompts accordingly.

    %fk = paged_fill_cache(%k_cache, %k, %chunk_page_table)
    %a = causal_attention(%q, %k, %v, s)          ==>   %a = chunked_attention(%q, %fk, %fv, %page_table, %chunk_start, s)
"""
from __future__ import annotations

import torch.fx

from compiler import dialect
from models_ref import ops as ref

from .paged_kv import add_placeholder
from .util import replace

NAME = "chunked_prefill"


def _fill_of(node: torch.fx.Node) -> torch.fx.Node:
    """The paged_fill_cache that wrote `node` (a rotated K or a V) into its cache."""
    fills = [u for u in node.users if u.target is dialect.paged_fill_cache]
    assert len(fills) == 1, f"{node.name} is written by {len(fills)} cache fills"
    return fills[0]


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    if ctx.mode != "prefill" or not ctx.options.paged_attention:
        return gm
    page_table = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "page_table")
    chunk_start = add_placeholder(gm, "chunk_start")
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is ref.causal_attention:
            q, k, v, scale, *window = node.args
            fill_k, fill_v = _fill_of(k), _fill_of(v)
            replace(gm, node, dialect.chunked_attention,
                    (q, fill_k, fill_v, page_table, chunk_start, scale, *window))
            ctx.counters["chunked_prefill.attentions"] += 1
    return gm
