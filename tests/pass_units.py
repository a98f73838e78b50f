"""Helpers of the pass unit tests (tests/test_pass_*.py): tiny hand-built graphs and a mesh interpreter.

No tracing of the reference model, no weights files, no emulator, no hardware: graphs are
built node by node with `test_passes.GraphBuilder` (real random weights from recipes),
brought to the fused form by the pipeline's own fuse_qkv / fuse_mlp, and every pass is
run as the pipeline runs it (`compiler.pipeline.run_pass`: rewrite, re-propagate per-chip
shapes, re-annotate placements), then verified (`compiler.verify.verify`).

Numerics are float32 on the CPU. A sharded graph is run by `run_mesh`, a small mesh
interpreter written here: it runs every node once per chip with that chip's pieces of
the weights and caches (split by their Placement as the runtime splits them) and
implements all_reduce (sum) and all_gather (concat) across the chips of a mesh axis.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx

from compiler import dialect, pipeline
from compiler.context import PassContext
from compiler.convert import RecipeEvaluator
from compiler.options import CompileOptions
from compiler.pipeline import PASS_NAMES
from compiler.targets import get_target
from compiler.verify import verify
from models_ref import ops as ref
from models_ref.names import Role
from passes import fuse_mlp, fuse_qkv
from passes.head_plan import PAD
from runtime.emulator.shards import place
from graph_builder import MAX_SEQ, TINY, GraphBuilder, _DictReader, count, run_real

BS = 32  # KV block size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only add OpenMP spin-waits, which cost a
    several-fold slowdown when the machine is shared. Restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ============================================================================ helpers
def unit_ctx(mode: str = "prefill", target="N150", cfg=TINY, rows: int = 32, seq_len: int = MAX_SEQ,
             optimizations: str = "float32", paged_attention: bool = False, **options) -> PassContext:
    """A pass context made by hand for any target row (a name or a Target)."""
    target = get_target(target) if isinstance(target, str) else target
    opts = CompileOptions(optimizations=optimizations, paged_attention=paged_attention, **options)
    return PassContext(cfg, target, opts, mode, max_seq_len=seq_len, seq_rows=rows)


def build_model(ctx: PassContext, layers: int = 1, seed: int = 0):
    """An unfused model of `layers` decoder layers in the canonical dialect (three q/k/v
    linears + split_heads, with biases and q/k norms when the config has them, silu/mul
    MLP), as canonicalize leaves a traced model. Caches
    are contiguous `[batch, Hkv, max_seq_len, hd]`; inputs are declared on the context
    (ctx.add_input) so passes that add inputs and the planner's second propagation see them."""
    cfg, decode = ctx.cfg, ctx.decode
    b = GraphBuilder(ctx, seed)
    hd, h, hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    batch = ctx.options.batch_size
    rows = batch if decode else ctx.seq_rows
    if decode:
        ctx.add_input("tokens", lambda r: (1, batch))
        ctx.add_input("positions", lambda r: (batch,))
        positions = torch.tensor([37 + 33 * i for i in range(batch)])
    else:
        ctx.add_input("tokens", lambda r: (1, r))
        ctx.add_input("positions", lambda r: (r,))
        positions = torch.arange(rows)
    tokens = b.input("tokens", (1, rows), real=torch.randint(0, cfg.vocab_size, (1, rows), generator=b.gen))
    pos = b.input("positions", (rows,), real=positions)
    user = None if decode else b.input("user_id", (), real=0)
    x = b.call(ref.embed, tokens, b.table("tok_embeddings.weight", cfg.vocab_size, cfg.dim), layer=None)
    cos, sin = (b.call(ref.rope_rows, b.table(f"rope_{w}", ctx.max_seq_len, hd), pos, decode, layer=None)
                for w in ("cos", "sin"))
    for i in range(layers):
        p = f"layers.{i}."
        normed = b.call(ref.rms_norm, x, b.vector(p + "attention_norm.weight", cfg.dim), cfg.norm_eps, layer=i)
        heads = {}
        for part, n in (("wq", h), ("wk", hkv), ("wv", hkv)):
            w = b.weight(f"{p}attention.{part}.weight", cfg.dim, n * hd)
            bias = b.bias(f"{p}attention.{part}.bias", n * hd) if cfg.qkv_bias else None
            lin = b.call(dialect.linear, normed, w, bias, layer=i)
            heads[part] = b.call(ref.split_heads, lin, n, hd, decode, layer=i)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each q and k head, before rotary
            for part, norm in (("wq", "q_norm"), ("wk", "k_norm")):
                gamma = b.vector(f"{p}attention.{norm}.weight", hd)
                heads[part] = b.call(ref.rms_norm, heads[part], gamma, cfg.norm_eps, layer=i)
        q = b.call(ref.rotary, heads["wq"], cos, sin, layer=i)
        k = b.call(ref.rotary, heads["wk"], cos, sin, layer=i)
        v = heads["wv"]
        cache_shape = (batch, hkv, ctx.max_seq_len, hd)
        k_cache, v_cache = (b.state(f"{p}attention.{n}_cache", cache_shape) for n in "kv")
        if decode:
            k_cache = b.call(ref.update_cache, k_cache, k, pos, layer=i)
            v_cache = b.call(ref.update_cache, v_cache, v, pos, layer=i)
            attn = b.call(ref.decode_attention, q, k_cache, v_cache, pos, hd ** -0.5, layer=i)
        else:
            b.call(ref.fill_cache, k_cache, k, user, layer=i)
            b.call(ref.fill_cache, v_cache, v, user, layer=i)
            attn = b.call(ref.causal_attention, q, k, v, hd ** -0.5, layer=i)
        wo = b.weight(p + "attention.wo.weight", h * hd, cfg.dim)
        merged = b.call(ref.merge_heads, attn, decode, layer=i)
        h1 = b.call(dialect.add, x, b.call(dialect.linear, merged, wo, None, layer=i), layer=i)
        normed = b.call(ref.rms_norm, h1, b.vector(p + "ffn_norm.weight", cfg.dim), cfg.norm_eps, layer=i)
        gate = b.call(dialect.linear, normed, b.weight(p + "feed_forward.w1.weight", cfg.dim, cfg.ffn_dim), None,
                      layer=i)
        up = b.call(dialect.linear, normed, b.weight(p + "feed_forward.w3.weight", cfg.dim, cfg.ffn_dim), None,
                    layer=i)
        hidden = b.call(dialect.mul, b.call(dialect.silu, gate, layer=i), up, layer=i)
        w2 = b.weight(p + "feed_forward.w2.weight", cfg.ffn_dim, cfg.dim)
        x = b.call(dialect.add, h1, b.call(dialect.linear, hidden, w2, None, layer=i), layer=i)
    final = b.call(ref.rms_norm, x, b.vector("norm.weight", cfg.dim), cfg.norm_eps, layer=None)
    logits = b.call(dialect.linear, final, b.weight("output.weight", cfg.dim, cfg.vocab_size), None, layer=None)
    return b, b.finish(logits)


def step(pass_module, gm, ctx):
    """One pass as the pipeline runs it (rewrite + refresh of shapes and placements), then
    the verifier, precise from precision on (as the pipeline's Observer)."""
    gm = pipeline.run_pass(pass_module, gm, ctx)
    precise = PASS_NAMES.index(pass_module.NAME) >= PASS_NAMES.index("precision")
    verify(gm, ctx, after=pass_module.NAME, precise=precise)
    return gm


def fused_model(ctx, layers: int = 1, seed: int = 0):
    """build_model, then the analyses and fuse_qkv + fuse_mlp: shard's input."""
    b, gm = build_model(ctx, layers, seed)
    pipeline.refresh(gm, ctx)
    verify(gm, ctx, after="build", precise=False)
    for p in (fuse_qkv, fuse_mlp):
        gm = step(p, gm, ctx)
    assert count(gm, dialect.qkv_heads) == layers and count(gm, dialect.gated_mlp) == layers
    return b, gm


def compile_through(ctx, passes, layers: int = 1, seed: int = 0):
    b, gm = fused_model(ctx, layers, seed)
    for p in passes:
        gm = step(p, gm, ctx)
    return b, gm


def nodes_of(gm, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


def linear_of(gm, ctx, role: Role) -> list[torch.fx.Node]:
    return [n for n in nodes_of(gm, dialect.linear) if ctx.facts.weights[n.args[1].target].role is role]


def placeholders(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


# ---------------------------------------------------------------- the mesh interpreter
def _groups(mesh_shape, axis: int) -> list[list[int]]:
    """Chips that share every mesh coordinate but `axis`, each ordered along it (row-major ids)."""
    rows, cols = mesh_shape
    if axis == 1:
        return [[r * cols + c for c in range(cols)] for r in range(rows)]
    return [[r * cols + c for r in range(rows)] for c in range(cols)]


def run_mesh(gm, ctx, sources: dict, inputs: dict, state: dict | None = None, trace: dict | None = None):
    """Run a per-chip graph on every chip of ctx.target's mesh, in lockstep.

    Weights are evaluated from their recipes to the global tensor and split by their
    Placement (runtime.emulator.shards.place: torch.chunk over the tp axes' chips,
    row-major); `state` holds global caches (zeros if absent), split the same way.
    Collectives combine the chips of one mesh axis: all_reduce sums, all_gather concatenates
    in chip order. Returns (per-chip outputs, per-chip final state); `trace`, if given,
    receives every node's per-chip values."""
    mesh = ctx.target.mesh_shape
    chips = mesh[0] * mesh[1]
    evaluate = RecipeEvaluator(_DictReader(sources), ctx.cfg)
    env, final_state, result = {}, {}, None
    state = state or {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = [inputs[node.target]] * chips
            elif node.op == "get_attr":
                if node.target in ctx.facts.weights:
                    spec = ctx.facts.weights[node.target]
                    env[node] = place(evaluate(spec.recipe).float(), spec.placement.to_json(), mesh)
                else:
                    spec = ctx.facts.state[node.target]
                    full = state.get(node.target, torch.zeros(spec.shape))
                    assert tuple(full.shape) == spec.shape, (node.target, full.shape, spec.shape)
                    env[node] = [p.clone() for p in place(full, spec.placement.to_json(), mesh)]
                    final_state[node.target] = env[node]
            elif node.op == "call_function" and node.target is dialect.all_reduce:
                x, axis = node.args
                out = [None] * chips
                for group in _groups(mesh, axis):
                    total = sum(env[x][c] for c in group)
                    for c in group:
                        out[c] = total
                env[node] = out
            elif node.op == "call_function" and node.target is dialect.all_gather:
                x, dim, axis, size = node.args
                out = [None] * chips
                for group in _groups(mesh, axis):
                    assert len(group) == size
                    whole = torch.cat([env[x][c] for c in group], dim=dim)
                    for c in group:
                        out[c] = whole
                env[node] = out
            elif node.op == "call_function":
                env[node] = [node.target(*torch.fx.node.map_arg(node.args, lambda n: env[n][c]),
                                         **torch.fx.node.map_arg(node.kwargs, lambda n: env[n][c]))
                             for c in range(chips)]
            elif node.op == "output":
                result = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
    if trace is not None:
        trace.update(env)
    return result, final_state


def _heads(t: torch.Tensor, heads, head_dim: int, dim: int) -> torch.Tensor:
    """Head blocks of `t` along `dim`, zeros for PAD (what select_heads should produce)."""
    blocks = [t.narrow(dim, h * head_dim, head_dim) if h != PAD else
              torch.zeros_like(t.narrow(dim, 0, head_dim)) for h in heads]
    return torch.cat(blocks, dim=dim)


def shard_cache(t: torch.Tensor, plan) -> torch.Tensor:
    """A global `[B, Hkv, L, hd]` cache as the sharded global `[B, chips x local_kv, L, hd]`."""
    return torch.cat([_heads(t, kvs, 1, 1) for kvs in plan.kv_heads], dim=1)


# ---------------------------------------------------------------- shared by several pass tests
MEM_CFG = TINY.replace(name="tiny-mem", n_layers=3, ffn_dim=80, vocab_size=100, max_position_embeddings=8192)


TINY_6x2 = TINY.replace(name="tiny-6x2", n_heads=6, n_kv_heads=2)  # 6 heads do not divide 8 or 32 chips


def _unsharded_run(mode, target, cfg):
    """A fused 2-layer graph (batch 2 in decode, from random caches) and its unsharded
    outputs: (ctx, built model, graph, state, logits, state after)."""
    ctx = unit_ctx(mode, target, cfg, batch_size=2 if mode == "decode" else 1)
    b, gm = fused_model(ctx, layers=2)
    g = torch.Generator().manual_seed(1)
    state = {n: 0.5 * torch.randn(s.shape, generator=g) for n, s in ctx.facts.state.items()} if ctx.decode else {}
    before, before_state = run_real(gm, ctx.facts, b.sources, b.real_inputs, cfg, state)
    return ctx, b, gm, state, before, before_state


def mem_ctx(dram: int | None = None, target: str = "N150", mode: str = "prefill", max_seq_len: int = 2048,
            cfg=MEM_CFG, **options) -> PassContext:
    row = get_target(target)
    if dram is not None:
        row = dataclasses.replace(row, dram_bytes_per_chip=dram)
    explicit = options.pop("explicit_context", False)
    return unit_ctx(mode, row, cfg, rows=128, seq_len=max_seq_len, optimizations="performance",
                    max_seq_len=max_seq_len if explicit else None, **options)


def _gather(pool: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """A user's positions `[Hkv, len(row) x bs, hd]` read through its page-table row."""
    return pool[row.long()].permute(1, 0, 2, 3).reshape(pool.shape[1], -1, pool.shape[3])


def _paged(mode: str, rows: int = 64, batch: int = 1, **options):
    return unit_ctx(mode, rows=rows, batch_size=batch, paged_attention=True, block_size=BS, **options)


def _same_sources(a: GraphBuilder, b: GraphBuilder) -> None:
    assert a.sources.keys() == b.sources.keys()
    assert all(torch.equal(a.sources[k], b.sources[k]) for k in a.sources)


def _scrambled_table(users: int, blocks: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(blocks, generator=g)[: users * (MAX_SEQ // BS)].reshape(users, -1)
    assert not torch.equal(table.flatten(), table.flatten().sort().values)  # really scrambled
    return table
