"""memory_plan: what each chip holds, whether it fits, and the largest context and prefill
chunk that do. The last pass; it reads the graph and changes nothing in it.

Expects: the final graph (sharded, paged, precision assigned): every WeightSpec and
StateSpec has its device dtype and placement, node VALs are per-chip shapes.
Guarantees: ctx.facts.memory is a MemoryPlan computed from arithmetic on the graph alone
(no model-name tables). Bytes are per chip (per-chip shapes, `runtime.blockfloat.bytes_for`:
bfloat16 2 B a value, bfloat8_b 1088 B and bfloat4_b 576 B a 32x32 tile, the last two dims
padded to 32):

- weights by category and dtype. 1-D norm weights count as the ROW_MAJOR [D/32, 32] rows
  the lowering makes of them. A graph holding fewer layers than the model (the driver
  stamps the rest, lowering/stamp.py) is scaled exactly: the per-layer sum x n_layers /
  layers in the graph. Llama 3.2 Vision's cross-attention layers are not in the text
  program but their weights occupy the device: each counts as one decoder layer's
  projections and norms (same shapes, dtypes, sharding) plus q/k norms and gates;
- the KV cache: bytes per token slot of all state (K and V, every layer, local KV heads,
  cache dtype) x max(batch x context, the page pool's slots);
- rope tables: cos and sin rows, head_dim values each, per position of the context;
- prefill activations: the largest set of tensors alive at once while the graph runs a
  chunk of S rows. Each activation is affine in S (the graph is propagated at two row
  counts), so the peak is max over program points of base + per_row x S. A node's output
  lives from its definition to its last reader; views (getitem) extend their source and
  cache writes alias the cache; gated_mlp also holds its two matmul outputs, as lowered.
  Weights and caches are not activations; attention is flash-style (no S x S scores);
- decode: the live set of one step, which the reference keeps in L1, against the chips'
  L1 (cores x L1 per core); it takes no DRAM here;
- collectives per decoder layer, and what a decode step reads from DRAM (all weights but
  the embedding and rope tables, plus the KV of the context) for a bandwidth bound.

Decisions (prefill graph; DRAM budget = the target's DRAM per chip, nothing reserved):
1. if the program does not fit at its minimum (min(model, 128) tokens of context, a
   128-row chunk, the page pool it allocates): refuse, naming the targets that would
   hold it (this graph's split weights re-divided over their chips, KV heads as
   passes/head_plan.py would place them), or the --max-num-blocks that fits;
2. context: --max-seq-len if given (refused if it does not fit beside a 128-row chunk),
   else the largest that fits beside a MIN_CONTEXT_CHUNK-row chunk, at most the model's;
   below the model's it is rounded down to a multiple of 2048 (the prefill padding step);
3. prefill chunk: --max-prefill-chunk if given (refused if it does not fit), else the
   largest power of two up to the context that fits beside it.
A refusal is one line in plan.refusal; the driver raises it as a CompileError (exit 2).

    layers.0.feed_forward.w1.weight [2048, 8192] bfloat4_b  ==>  weights["mlp"] += 16 layers x 16384 tiles x 576 B
    %g = gated_mlp(%x, %w1, %w3) : 1x1xSx8192               ==>  activation(S) >= x + 3 x S x 8192 x 2 B
"""
from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch
import torch.fx

from compiler import dialect
from compiler.facts import LAYER, VAL
from compiler.memory import CROSS_CACHE, GB, MemoryPlan, device_bytes, weight_category
from models_ref.names import CROSS_CACHES
from compiler.trace import ALT_SEQ_ROWS
from runtime import schedule
from runtime.blockfloat import bytes_for

from .head_plan import plan_heads

NAME = "memory_plan"

MIN_CHUNK = schedule.MIN_PREFILL_ROWS  # the smallest prefill the runtime runs
MIN_CONTEXT_CHUNK = 4096  # the chunk kept free when the context is decided (the seed's smallest)


# ---------------------------------------------------------------- weights and caches
def _layers_in_graph(ctx) -> set[int]:
    return {s.layer for s in ctx.facts.weights.values() if s.layer is not None}


def _layer_count(ctx, layer: int, layers: set[int]) -> Fraction:
    """How many decoder layers a layer of the graph stands for: its copies in the driver's
    ctx.layer_plan (layers stamped per class), else an equal share of the model's."""
    plan = getattr(ctx, "layer_plan", None)
    if plan is not None and plan.traced == len(layers):
        return Fraction(plan.count(layer))
    return Fraction(ctx.cfg.n_layers, len(layers))


def _account_weights(plan: MemoryPlan, ctx) -> None:
    """Weights of this graph and those of the program's other functions compiled before it
    (ctx.resident: Llama 3.2 Vision's tower), each weight once."""
    mesh = ctx.target.mesh_shape
    layers = _layers_in_graph(ctx)
    per_layer: dict[tuple[str, str], Fraction] = {}  # (category, dtype) -> bytes of the model's layers
    for spec in {**ctx.resident, **ctx.facts.weights}.values():
        local = spec.placement.local_shape(spec.shape, mesh)
        size = device_bytes(local, spec.dtype)
        category = weight_category(spec.role)
        if category == "rope_tables" and len(spec.shape) == 2:
            # cos / sin [context, head_dim]: accounted per position (the context is decided here)
            plan.rope_bytes_per_position += size // spec.shape[0]
            continue
        if spec.layer is None:
            plan.weights[category] = plan.weights.get(category, 0) + size
            plan.weights_by_dtype[spec.dtype] = plan.weights_by_dtype.get(spec.dtype, 0) + size
        else:
            # the graph may hold fewer layers than the model
            size = size * _layer_count(ctx, spec.layer, layers)
            per_layer[(category, spec.dtype)] = per_layer.get((category, spec.dtype), 0) + size
    for (category, dtype), size in per_layer.items():
        total = math.floor(size)
        plan.weights[category] = plan.weights.get(category, 0) + total
        plan.weights_by_dtype[dtype] = plan.weights_by_dtype.get(dtype, 0) + total


def _account_state(plan: MemoryPlan, ctx) -> None:
    """KV bytes per token slot (all layers, K and V) and the page pool's slots; Llama 3.2
    Vision's cross-attention caches (a row per user, written per image) are fixed bytes."""
    mesh = ctx.target.mesh_shape
    layers = _layers_in_graph(ctx) or {0}
    per_token, slots = Fraction(0), set()
    for spec in ctx.facts.state.values():
        local = spec.placement.local_shape(spec.shape, mesh)
        if spec.role in CROSS_CACHES:
            plan.weights[CROSS_CACHE] = plan.weights.get(CROSS_CACHE, 0) + device_bytes(local, spec.dtype)
            continue
        tokens = local[0] * local[2]  # [batch | blocks, kv heads, positions | block, head_dim]
        slots.add(tokens)
        count = _layer_count(ctx, spec.layer, layers) if spec.layer is not None else 1
        per_token += Fraction(device_bytes(local, spec.dtype), tokens) * count
    plan.kv_bytes_per_token = math.ceil(per_token)
    if not (getattr(ctx.options, "paged_attention", False) and slots):
        return
    if getattr(ctx.options, "max_num_blocks", None) is None:  # paged_kv sized the pool for the context
        plan.kv_block_size = ctx.options.block_size
    else:
        plan.kv_pool_tokens = max(slots)


# ---------------------------------------------------------------- activations
def _tensor_bytes(val) -> int:
    if isinstance(val, torch.Tensor):
        return bytes_for(tuple(val.shape), "bfloat16") if val.dim() else 0
    if isinstance(val, (tuple, list)):
        return sum(_tensor_bytes(v) for v in val)
    return 0


def _live_points(gm: torch.fx.GraphModule) -> list[int]:
    """Bytes alive at each point of the graph (activation tensors only)."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    alias = {}
    for n in nodes:  # a view or a cache write stands for what it reads
        if n.op == "call_function" and (n.target is operator.getitem or n.target in dialect.SIDE_EFFECTS):
            alias[n] = alias.get(n.args[0], n.args[0])
    last_use = {}
    for n in nodes:
        for src in n.all_input_nodes:
            root = alias.get(src, src)
            last_use[root] = max(last_use.get(root, 0), index[n])
    size = {}
    for n in nodes:
        if n in alias or n.op in ("get_attr", "output"):
            continue
        size[n] = _tensor_bytes(n.meta.get(VAL))
    points, live = [], 0
    ending: dict[int, int] = {}
    for i, n in enumerate(nodes):
        extra = 0
        if n in size:
            live += size[n]
            ending[last_use.get(n, i)] = ending.get(last_use.get(n, i), 0) + size[n]
            if n.target is dialect.gated_mlp:
                extra = 2 * size[n]  # the w1 and w3 matmul outputs before the multiply
        points.append(live + extra)
        live -= ending.pop(i, 0)
    return points


def _activation_envelope(gm, ctx) -> list[tuple[int, int]]:
    """[(base, per_row)] for every program point: bytes(S) = base + per_row x S."""
    first = _live_points(gm)
    primary = {n: n.meta.get(VAL) for n in gm.graph.nodes}
    ctx.propagate(gm, ctx.inputs_at(ALT_SEQ_ROWS))
    second = _live_points(gm)
    for n in gm.graph.nodes:
        n.meta[VAL] = primary[n]
    rows, alt = ctx.seq_rows, ALT_SEQ_ROWS
    points = set()
    for a, b in zip(first, second):
        per_row = (a - b) // (rows - alt)
        points.add((a - per_row * rows, per_row))
    # upper envelope: drop points another one dominates at every S >= 0
    return sorted(p for p in points if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points))


def _collectives_per_layer(gm) -> int:
    layers = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in dialect.COLLECTIVES and n.meta.get(LAYER) is not None:
            layers[n.meta[LAYER]] = layers.get(n.meta[LAYER], 0) + 1
    return max(layers.values(), default=0)


# ---------------------------------------------------------------- decisions
def _largest_context(plan: MemoryPlan, chunk: int) -> int:
    """Largest context (tokens per user, at most the model's) that fits beside a
    `chunk`-row prefill; 0 if none does. total_bytes grows with the context."""
    low, high = 0, plan.model_max_context
    while low < high:
        mid = (low + high + 1) // 2
        if plan.fits(mid, chunk):
            low = mid
        else:
            high = mid - 1
    return low


def _largest_chunk(plan: MemoryPlan, context: int) -> int:
    fitting = [c for c in schedule.chunk_candidates(max(context, MIN_CHUNK)) if plan.fits(context, c)]
    return fitting[-1] if fitting else 0


def _gb(n: float) -> str:
    value = n / GB
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


# Weights a tensor-parallel target splits over its chips; the rest every chip holds whole.
_SPLIT_CATEGORIES = ("attention", "mlp", "lm_head", "cross_attention", "vision")


def _kv_heads_per_chip(cfg, chips: int) -> int:
    return plan_heads(cfg.n_heads, cfg.n_kv_heads, chips).local_kv if chips > 1 else cfg.n_kv_heads


def estimate_on(plan: MemoryPlan, ctx, target) -> int:
    """Bytes per chip the same model would need on another target at a minimal context
    (128 tokens, 128-row chunk): this graph's split weights re-divided over that target's
    chips (padding ignored), whole ones kept, KV scaled by the KV heads per chip
    passes/head_plan.py would give it, activations as here (conservative)."""
    here = ctx.target.tp_size
    split = sum(v for k, v in plan.weights.items() if k in _SPLIT_CATEGORIES) * here
    whole = sum(v for k, v in plan.weights.items() if k not in _SPLIT_CATEGORIES and k != "rope_tables")
    kv = plan.kv_bytes_per_token * _kv_heads_per_chip(ctx.cfg, target.tp_size) / _kv_heads_per_chip(ctx.cfg, here)
    context = min(plan.model_max_context, MIN_CHUNK)
    return int(split / target.tp_size + whole + plan.rope_bytes_per_position * context
               + kv * plan.kv_tokens(context) + plan.activation_bytes(MIN_CHUNK))


def _suggest_targets(plan: MemoryPlan, ctx) -> list[str]:
    """Targets of the same chip architecture (the hardware the user has) that would hold it."""
    from compiler.targets import TARGETS

    return [name for name, target in TARGETS.items()
            if name != plan.target and target.arch == ctx.target.arch
            and estimate_on(plan, ctx, target) <= target.dram_bytes_per_chip]


def decide(plan: MemoryPlan, ctx, requested_context: int | None, requested_chunk: int | None) -> None:
    """Fill max_context / max_prefill_chunk / context / prefill_chunk, or refusal."""
    name, target, dram = ctx.cfg.name, plan.target, _gb(plan.dram_bytes)
    min_context = min(plan.model_max_context, MIN_CHUNK)
    if not plan.fits(min_context, MIN_CHUNK):
        need = plan.total_bytes(min_context, MIN_CHUNK)
        pool = plan.kv_bytes_per_token * plan.kv_pool_tokens
        if plan.kv_pool_tokens and need - pool + plan.kv_bytes_per_token * plan.batch * min_context <= plan.dram_bytes:
            blocks = ctx.options.max_num_blocks
            fit = blocks * (plan.dram_bytes - need + pool) // pool
            per_user = schedule.blocks_for(ctx.max_seq_len, ctx.options.block_size)
            advice = (f"use --max-num-blocks {fit} or fewer" if fit > per_user else  # ttnn: pool > one row
                      f"at most {fit} blocks fit, fewer than one {ctx.max_seq_len}-token user needs "
                      f"({per_user + 1}); use a --max-seq-len of at most "
                      f"{max(fit - 1, 0) * ctx.options.block_size} with --max-num-blocks {fit}")
            plan.refusal = (f"{name}: the KV page pool ({blocks} blocks, {_gb(pool)} GB per chip) does not "
                            f"fit beside the weights on {target}, which has {dram} GB per chip; {advice}")
            return
        others = _suggest_targets(plan, ctx)
        hint = (f"; use {' or '.join(others)}" if others else
                f"; no {ctx.target.arch} target in this version holds it")
        plan.refusal = f"{name} needs about {_gb(need)} GB per chip on {target}, which has {dram} GB per chip{hint}"
        return
    largest = _largest_context(plan, min(MIN_CONTEXT_CHUNK, plan.model_max_context))
    if largest < MIN_CHUNK:  # not even 128 tokens beside a full-size chunk: a smaller chunk then
        largest = _largest_context(plan, MIN_CHUNK)
    if largest < plan.model_max_context:  # whole prefill shapes (and so whole KV blocks)
        largest = schedule.round_context(largest)
    plan.max_context = largest
    context = plan.max_context if requested_context is None else requested_context
    if requested_context is not None and not plan.fits(context, MIN_CHUNK):
        plan.refusal = (f"{name} with --max-seq-len {context} (batch {plan.batch}) needs about "
                        f"{_gb(plan.total_bytes(context, MIN_CHUNK))} GB per chip on {target}, which has "
                        f"{dram} GB per chip; the largest context that fits is {plan.max_context}")
        return
    plan.context = context
    plan.max_prefill_chunk = _largest_chunk(plan, context)
    chunk = plan.max_prefill_chunk if requested_chunk is None else min(requested_chunk, context)
    if not plan.fits(context, chunk):
        plan.refusal = (f"{name}: a {chunk}-token prefill chunk beside a {context}-token context needs about "
                        f"{_gb(plan.total_bytes(context, chunk))} GB per chip on {target}, which has {dram} GB "
                        f"per chip; the largest chunk that fits is {plan.max_prefill_chunk}")
        return
    plan.prefill_chunk = chunk
    if plan.pool_tokens(context) and plan.pool_tokens(context) < plan.batch * context:
        plan.notes.append(f"the page pool holds {plan.pool_tokens(context)} tokens, fewer than batch x context "
                          f"= {plan.batch * context} (KV is planned for the latter)")


# ---------------------------------------------------------------- the pass
def new_plan(ctx) -> MemoryPlan:
    t = ctx.target
    return MemoryPlan(
        target=t.name, chips=t.num_chips, dram_bytes=t.dram_bytes_per_chip,
        l1_bytes=t.l1_bytes_per_core * t.core_grid[0] * t.core_grid[1], batch=ctx.options.batch_size,
        model_max_context=ctx.cfg.max_position_embeddings, dram_bandwidth_gbs=t.dram_bandwidth_gbs)


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    plan = new_plan(ctx)
    _account_weights(plan, ctx)
    _account_state(plan, ctx)
    plan.collectives_per_layer[ctx.mode] = _collectives_per_layer(gm)
    if ctx.mode == "vision":  # one image at a time, between prefills: its peak beside the weights
        plan.other_activation_bytes = max(_live_points(gm), default=0)
        plan.context = ctx.max_seq_len
    elif ctx.decode:
        plan.decode_activation_bytes = max(_live_points(gm), default=0)
        plan.context = ctx.max_seq_len
        if plan.decode_activation_bytes > plan.l1_bytes:
            plan.refusal = (f"{ctx.cfg.name}: one decode step's activations need about "
                            f"{plan.decode_activation_bytes / 2**20:.0f} MB per chip of L1 on {plan.target}, "
                            f"which has {plan.l1_bytes / 2**20:.0f} MB; use a smaller --batch-size")
    else:
        plan.activation_points = _activation_envelope(gm, ctx)
        plan.other_activation_bytes = ctx.other_activation_bytes
        explicit = ctx.options.max_seq_len is not None
        decide(plan, ctx, ctx.max_seq_len if explicit else None, ctx.options.max_prefill_chunk)
    ctx.facts.memory = plan
    ctx.counters["memory_plan.bytes_per_chip"] = sum(plan.by_category().values()) if plan.context else 0
    return gm

