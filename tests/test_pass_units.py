"""Unit tests for pad_heads, shard, paged_kv, chunked_prefill and memory_plan on tiny hand-built graphs.

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
import math
import operator

import pytest
import torch
import torch.fx

from compiler import dialect, pipeline
from compiler.context import PassContext
from compiler.convert import RecipeEvaluator
from compiler.errors import CompileError
from compiler.facts import LAYER, PLACEMENT, REPLICATED, VAL, Placement
from compiler.options import CompileOptions
from compiler.pipeline import PASS_NAMES
from compiler.targets import TARGETS, get_target
from compiler.verify import verify
from models_ref import ops as ref
from models_ref.names import Role
from passes import chunked_prefill, fuse_mlp, fuse_qkv, memory_plan, paged_kv, precision, shard
from passes.head_plan import PAD, padded_size, plan_heads
from runtime.emulator.backend import place
from test_passes import MAX_SEQ, TINY, GraphBuilder, _DictReader, assert_same_outputs, count, run_real

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
    Placement (runtime.emulator.backend.place: torch.chunk over the tp axes' chips,
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


# ============================================================================ pad_heads
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


# ============================================================================ shard
TINY_6x2 = TINY.replace(name="tiny-6x2", n_heads=6, n_kv_heads=2)  # 6 heads do not divide 8 or 32 chips
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


def _unsharded_run(mode, target, cfg):
    """A fused 2-layer graph (batch 2 in decode, from random caches) and its unsharded
    outputs: (ctx, built model, graph, state, logits, state after)."""
    ctx = unit_ctx(mode, target, cfg, batch_size=2 if mode == "decode" else 1)
    b, gm = fused_model(ctx, layers=2)
    g = torch.Generator().manual_seed(1)
    state = {n: 0.5 * torch.randn(s.shape, generator=g) for n, s in ctx.facts.state.items()} if ctx.decode else {}
    before, before_state = run_real(gm, ctx.facts, b.sources, b.real_inputs, cfg, state)
    return ctx, b, gm, state, before, before_state


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


# ============================================================================ paged_kv
def _paged(mode: str, rows: int = 64, batch: int = 1, **options):
    return unit_ctx(mode, rows=rows, batch_size=batch, paged_attention=True, block_size=BS, **options)


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


def _scrambled_table(users: int, blocks: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(blocks, generator=g)[: users * (MAX_SEQ // BS)].reshape(users, -1)
    assert not torch.equal(table.flatten(), table.flatten().sort().values)  # really scrambled
    return table


def _gather(pool: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """A user's positions `[Hkv, len(row) x bs, hd]` read through its page-table row."""
    return pool[row.long()].permute(1, 0, 2, 3).reshape(pool.shape[1], -1, pool.shape[3])


def _same_sources(a: GraphBuilder, b: GraphBuilder) -> None:
    assert a.sources.keys() == b.sources.keys()
    assert all(torch.equal(a.sources[k], b.sources[k]) for k in a.sources)


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


# ============================================================================ chunked_prefill
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


# ============================================================================ memory_plan
BF8, BF4, BF16_TILE = 1088, 576, 32 * 32 * 2
# dim 64, 3 layers (the graph holds one: the planner scales), ffn 80 and vocab 100 (tile padding)
MEM_CFG = TINY.replace(name="tiny-mem", n_layers=3, ffn_dim=80, vocab_size=100, max_position_embeddings=8192)


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


def mem_ctx(dram: int | None = None, target: str = "N150", mode: str = "prefill", max_seq_len: int = 2048,
            cfg=MEM_CFG, **options) -> PassContext:
    row = get_target(target)
    if dram is not None:
        row = dataclasses.replace(row, dram_bytes_per_chip=dram)
    explicit = options.pop("explicit_context", False)
    return unit_ctx(mode, row, cfg, rows=128, seq_len=max_seq_len, optimizations="performance",
                    max_seq_len=max_seq_len if explicit else None, **options)


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
