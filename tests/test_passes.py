"""Pass-level tests: each pass on a small hand-built graph, then the whole pipeline.

Every test runs the verifier after each pass, counts ops in `str(gm.graph)`, and checks
that the graph computes the same numbers before and after (float32, on the CPU, with
real random weights built from the weight recipes); the helpers are tests/graph_builder.py.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from compiler import dialect
from compiler.errors import CompileError, InternalCompilerError
from compiler.facts import LAYER, PRECISION, VAL
from compiler.pipeline import ORDER_CONSTRAINTS, PASS_NAMES, PIPELINE, Observer, run_pipeline
from compiler.shapes import propagate
from compiler.verify import verify
from models_ref import ops as ref
from models_ref.config import ModelConfig
from models_ref.modules import RMSNorm
from passes import canonicalize, fuse_mlp, fuse_qkv, precision
from passes.util import layer_of_name

from graph_builder import (TINY, GraphBuilder, assert_same_outputs, build_attention_inputs, build_fused_layer,
                           build_mlp, count, make_ctx, random_sources, real_inputs, rows_shape, run_pass, run_real,
                           spec_for, traced)


# ============================================================================ canonicalize
class _FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=True)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.ffn_norm = RMSNorm(dim, 1e-5)
        self.feed_forward = _FeedForward(dim, hidden)

    def forward(self, x):
        return x + self.feed_forward(self.ffn_norm(x))


class _TinyNet(nn.Module):
    """Reference-style names (layers.i.feed_forward.w1) so layers and recipes are checkable."""

    def __init__(self, dim=16, hidden=40, vocab=24):
        super().__init__()
        self.layers = nn.ModuleList([_Block(dim, hidden), _Block(dim, hidden)])
        self.norm = RMSNorm(dim, 1e-5)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, x, unused):
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def _traced_tiny_net():
    with torch.device("meta"):
        module = _TinyNet()
    gm = torch.fx.symbolic_trace(module)
    ctx = make_ctx()
    for name, p in module.named_parameters():
        ctx.facts.weights[name] = spec_for(name, p.shape, ["source", name])
    ctx.example_inputs = {"x": torch.empty(1, 1, 8, 16, device="meta"),
                          "unused": torch.empty(1, device="meta")}
    propagate(gm, ctx.facts, ctx.example_inputs)
    return gm, ctx


def test_canonicalize_linears_adds_layers_and_placeholders():
    gm, ctx = _traced_tiny_net()
    sources = random_sources(ctx.facts)
    x = torch.randn(1, 1, 8, 16)
    before, _ = run_real(gm, ctx.facts, sources, {"x": x, "unused": torch.zeros(1)})
    assert str(gm.graph).count("call_module") == 7
    assert count(gm, operator.add) == 2

    gm = run_pass(canonicalize, gm, ctx)

    text = str(gm.graph)
    assert "call_module" not in text and not list(gm.named_children())
    assert count(gm, dialect.linear) == 7 and ctx.counters["canonicalize.linears"] == 7
    assert count(gm, operator.add) == 0 and count(gm, dialect.add) == 2
    assert count(gm, operator.mul) == 0 and count(gm, dialect.mul) == 2
    assert count(gm, F.silu) == 0 and count(gm, dialect.silu) == 2
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    # Weights: [K, N] via a transpose recipe; biases [1, N] via reshape.
    w1 = ctx.facts.weights["layers.0.feed_forward.w1.weight"]
    assert w1.shape == (16, 40) and w1.recipe == ["transpose", ["source", "layers.0.feed_forward.w1.weight"]]
    b1 = ctx.facts.weights["layers.1.feed_forward.w1.bias"]
    assert b1.shape == (1, 40) and b1.recipe == ["reshape", [1, -1], ["source", "layers.1.feed_forward.w1.bias"]]
    assert ctx.facts.weights["output.weight"].shape == (16, 24)
    assert ctx.facts.weights["layers.0.ffn_norm.weight"].recipe == ["source", "layers.0.ffn_norm.weight"]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is dialect.linear:
            w = node.args[1].target
            assert node.meta[LAYER] == layer_of_name(w), (node.name, w)
            assert tuple(node.args[1].meta[VAL].shape) == ctx.facts.weights[w].shape
    adds = [n for n in gm.graph.nodes if n.target is dialect.add]
    assert [n.meta[LAYER] for n in adds] == [0, 1]

    after, _ = run_real(gm, ctx.facts, sources, {"x": x})
    assert_same_outputs(before, after)


def test_canonicalize_tied_embeddings():
    """The lm head reads the embedding table transposed; the table itself is untouched."""
    gm, ctx = traced("decode", cfg=TINY.replace(tie_word_embeddings=True))
    gm = run_pass(canonicalize, gm, ctx)
    head = ctx.facts.weights["output.weight"]
    assert head.recipe == ["transpose", ["source", "tok_embeddings.weight"]]
    assert head.shape == (TINY.dim, TINY.vocab_size)
    table = ctx.facts.weights["tok_embeddings.weight"]
    assert table.recipe == ["source", "tok_embeddings.weight"] and table.shape == (TINY.vocab_size, TINY.dim)
    assert [n for n in gm.graph.nodes if n.op == "placeholder" and n.target in ("user_id", "last_index")] == []


# ============================================================================ fuse_qkv
@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "qkv_bias"])
def test_fuse_qkv_fuses_three_projections(mode, bias):
    ctx = make_ctx(mode, batch_size=4)
    b, gm = build_attention_inputs(ctx, bias=bias)
    verify(gm, ctx, after="build", precise=False)
    before = b.run()
    assert count(gm, dialect.linear) == 3 and count(gm, ref.split_heads) == 3

    gm = run_pass(fuse_qkv, gm, ctx)

    assert count(gm, dialect.linear) == 1 and count(gm, dialect.qkv_heads) == 1
    assert count(gm, operator.getitem) == 3 and count(gm, ref.split_heads) == 0
    assert ctx.counters["fuse_qkv"] == 1
    prefix = "layers.0.attention"
    parts = [["transpose", ["source", f"{prefix}.{p}.weight"]] for p in ("wq", "wk", "wv")]
    wqkv = ctx.facts.weights[f"{prefix}.wqkv.weight"]
    assert wqkv.recipe == ["concat", 1, parts]
    assert wqkv.shape == (TINY.dim, TINY.qkv_dim) and wqkv.layer == 0
    assert not any(f".{p}." in name for name in ctx.facts.weights for p in ("wq", "wk", "wv"))
    linear = next(n for n in gm.graph.nodes if n.target is dialect.linear)
    if bias:
        bqkv = ctx.facts.weights[f"{prefix}.wqkv.bias"]
        assert bqkv.shape == (1, TINY.qkv_dim)
        assert bqkv.recipe == ["concat", 1, [["reshape", [1, -1], ["source", f"{prefix}.{p}.bias"]]
                                             for p in ("wq", "wk", "wv")]]
        assert linear.args[2].target == f"{prefix}.wqkv.bias"
    else:
        assert linear.args[2] is None and f"{prefix}.wqkv.bias" not in ctx.facts.weights
    heads = next(n for n in gm.graph.nodes if n.target is dialect.qkv_heads)
    assert heads.args[1:] == (TINY.n_heads, TINY.n_kv_heads, TINY.head_dim, ctx.decode)
    assert all(n.meta[LAYER] == 0 for n in gm.graph.nodes if n.op == "call_function")

    assert_same_outputs(before, b.run(gm))


@pytest.mark.parametrize("case", ["missing_v", "k_has_another_user", "v_reads_another_input"])
def test_fuse_qkv_does_not_fire(case):
    ctx = make_ctx("prefill")
    kwargs = {"missing_v": dict(parts=("wq", "wk")),
              "k_has_another_user": dict(extra_user="wk"),
              "v_reads_another_input": dict(v_from_other_input=True)}[case]
    b, gm = build_attention_inputs(ctx, **kwargs)
    before_text, before_weights = str(gm.graph), set(ctx.facts.weights)
    before = b.run()

    gm = run_pass(fuse_qkv, gm, ctx)

    assert str(gm.graph) == before_text
    assert set(ctx.facts.weights) == before_weights and ctx.counters["fuse_qkv"] == 0
    assert count(gm, dialect.qkv_heads) == 0
    assert_same_outputs(before, b.run(gm))


def test_fuse_qkv_with_bias_on_some_projections_keeps_numerics():
    ctx = make_ctx("prefill")
    b = GraphBuilder(ctx)
    x = b.input("x", rows_shape(ctx))
    outputs = []
    for part, heads in (("wq", TINY.n_heads), ("wk", TINY.n_kv_heads), ("wv", TINY.n_kv_heads)):
        width = heads * TINY.head_dim
        prefix = f"layers.0.attention.{part}"
        bias = b.bias(f"{prefix}.bias", width) if part != "wv" else None
        lin = b.call(dialect.linear, x, b.weight(f"{prefix}.weight", TINY.dim, width), bias)
        outputs.append(b.call(ref.split_heads, lin, heads, TINY.head_dim, False))
    gm = b.finish(tuple(outputs))
    before = b.run()
    gm = run_pass(fuse_qkv, gm, ctx)
    assert_same_outputs(before, b.run(gm))


# ============================================================================ fuse_mlp
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_fuse_mlp_replaces_gate_and_up(mode):
    ctx = make_ctx(mode, batch_size=2)
    b, gm = build_mlp(ctx)
    verify(gm, ctx, after="build", precise=False)
    before = b.run()
    weights = dict(ctx.facts.weights)

    gm = run_pass(fuse_mlp, gm, ctx)

    assert count(gm, dialect.gated_mlp) == 1 and ctx.counters["fuse_mlp"] == 1
    assert count(gm, dialect.silu) == 0 and count(gm, dialect.mul) == 0
    assert count(gm, dialect.linear) == 1  # w2 only
    mlp = next(n for n in gm.graph.nodes if n.target is dialect.gated_mlp)
    assert [a.target for a in mlp.args[1:]] == ["layers.0.feed_forward.w1.weight",
                                                "layers.0.feed_forward.w3.weight"]
    assert mlp.meta[LAYER] == 0
    assert ctx.facts.weights == weights  # w1 and w3 stay two weights, unchanged
    assert_same_outputs(before, b.run(gm))


@pytest.mark.parametrize("case", ["gate_bias", "gate_second_user", "silu_second_user"])
def test_fuse_mlp_does_not_fire(case):
    ctx = make_ctx("prefill")
    b, gm = build_mlp(ctx, **{case: True})
    before_text, before = str(gm.graph), b.run()

    gm = run_pass(fuse_mlp, gm, ctx)

    assert str(gm.graph) == before_text and ctx.counters["fuse_mlp"] == 0
    assert count(gm, dialect.gated_mlp) == 0
    assert_same_outputs(before, b.run(gm))


# ============================================================================ precision
ATTN, MLP13, MLP2, KV = "attention", "w1/w3", "w2", "kv"
_W = {ATTN: ("layers.0.attention.wqkv.weight", "layers.0.attention.wo.weight"),
      MLP13: ("layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w3.weight"),
      MLP2: ("layers.0.feed_forward.w2.weight",)}

def _seed(name: str) -> ModelConfig:
    from models_ref.config import load_config, seed_model_dirs
    return load_config(seed_model_dirs()[name])


PRECISION_CASES = [
    # (model facts: a config whose family and size the policy reads, mode, dtypes by role, activations)
    ("tiny-llama", "performance",
     {ATTN: "bfloat8_b", MLP13: "bfloat4_b", MLP2: "bfloat8_b", KV: "bfloat8_b"}, "bfloat16"),
    ("tiny-llama", "accuracy",  # below 1B parameters: no Llama rule (SmolLM2 is such a model)
     {ATTN: "bfloat16", MLP13: "bfloat8_b", MLP2: "bfloat8_b", KV: "bfloat16"}, "bfloat16"),
    ("llama3.2-1b", "accuracy",
     {ATTN: "bfloat8_b", MLP13: "bfloat8_b", MLP2: "bfloat8_b", KV: "bfloat8_b"}, "bfloat16"),
    ("llama3.1-8b", "performance",
     {ATTN: "bfloat8_b", MLP13: "bfloat4_b", MLP2: "bfloat8_b", KV: "bfloat8_b"}, "bfloat16"),
    ("qwen2.5-7b", "performance",
     {ATTN: "bfloat16", MLP13: "bfloat4_b", MLP2: "bfloat8_b", KV: "bfloat16"}, "bfloat16"),
    ("qwen2.5-72b", "performance",
     {ATTN: "bfloat8_b", MLP13: "bfloat4_b", MLP2: "bfloat8_b", KV: "bfloat8_b"}, "bfloat16"),
    ("llama3.1-70b", "accuracy",
     {ATTN: "bfloat8_b", MLP13: "bfloat4_b", MLP2: "bfloat8_b", KV: "bfloat8_b"}, "bfloat16"),
    ("qwen2.5-72b", "accuracy",
     {ATTN: "bfloat16", MLP13: "bfloat4_b", MLP2: "bfloat8_b", KV: "bfloat16"}, "bfloat16"),
    ("llama3.2-1b", "float32",
     {ATTN: "float32", MLP13: "float32", MLP2: "float32", KV: "float32"}, "float32"),
]


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("facts,optimizations,expected,activations", PRECISION_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in PRECISION_CASES])
def test_precision_policy(mode, facts, optimizations, expected, activations):
    """The policy follows the model's facts (family, size); the graph is the same tiny one."""
    cfg = TINY if facts == "tiny-llama" else _seed(facts)
    ctx = make_ctx(mode, optimizations=optimizations, batch_size=2, cfg=cfg)
    b, gm = build_fused_layer(ctx)
    verify(gm, ctx, after="build", precise=False)
    state = {n: torch.randn(s.shape) for n, s in ctx.facts.state.items()}
    before = b.run(state=state)
    text = str(gm.graph)

    gm = run_pass(precision, gm, ctx)

    weights = ctx.facts.weights
    for role, names in _W.items():
        for w in names:
            assert weights[w].dtype == expected[role], (w, weights[w].dtype)
    for spec in ctx.facts.state.values():
        assert spec.dtype == expected[KV], spec.name
    lm_head = "float32" if optimizations == "float32" else "bfloat8_b"
    assert weights["output.weight"].dtype == lm_head
    for w in ("tok_embeddings.weight", "norm.weight", "layers.0.attention_norm.weight", "rope_cos"):
        assert weights[w].dtype == activations, w
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert all(n.meta[PRECISION].dtype == activations for n in calls)
    mlp = next(n for n in calls if n.target is dialect.gated_mlp)
    assert mlp.meta[PRECISION].fidelity == ("LoFi" if expected[MLP13] == "bfloat4_b" else
                                            "HiFi4" if optimizations == "float32" else "HiFi2")
    assert str(gm.graph) == text  # annotations only
    assert_same_outputs(before, b.run(gm, state=state), atol=0, rtol=0)
    assert ctx.facts.precision["policy"]["attention"] == expected[ATTN]


def test_precision_ignores_the_model_name():
    """Same facts under names that used to select other policies: same dtypes."""
    chosen = set()
    for name in ("Qwen2.5-7B-Instruct", "Llama-3.1-70B", "my-model"):
        for mode in ("performance", "accuracy"):
            policy, _ = precision.choose_policy(_seed("llama3.1-8b").replace(name=name), mode)
            chosen.add((mode, policy))
    assert len(chosen) == 2


# ============================================================================ the pipeline
def test_pipeline_order_constraints_hold():
    assert PASS_NAMES == [p.NAME for p in PIPELINE]
    assert len(set(PASS_NAMES)) == len(PASS_NAMES)
    for before, after in ORDER_CONSTRAINTS:
        assert before in PASS_NAMES and after in PASS_NAMES
        assert PASS_NAMES.index(before) < PASS_NAMES.index(after), (before, after)
    assert PASS_NAMES[0] == "canonicalize"  # every other pass expects the dialect
    for p in PIPELINE:  # the pass contract: run(gm, ctx) and a docstring with IR before/after
        assert callable(p.run) and "==>" in p.__doc__ and "Expects" in p.__doc__, p.NAME


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen"])
def test_pipeline_on_traced_model(mode, qkv_bias):
    cfg = TINY.replace(qkv_bias=qkv_bias, family="qwen2" if qkv_bias else "llama")
    batch = 2 if mode == "decode" else 1
    gm, ctx = traced(mode, cfg=cfg, batch_size=batch)
    sources = random_sources(ctx.facts)
    inputs = real_inputs(mode, batch, cfg)
    state = {n: 0.5 * torch.randn(s.shape) for n, s in ctx.facts.state.items()}
    before, before_state = run_real(gm, ctx.facts, sources, inputs, cfg, state)

    observer = Observer(verify=True, print_after={"all"})
    gm = run_pipeline(gm, ctx, observer)

    assert len(observer.printed) == len(PIPELINE)
    for text, name in zip(observer.printed, PASS_NAMES):
        assert text.splitlines()[0] == f"// ----- IR after {name} ({mode}) -----"
    after = dict(zip(PASS_NAMES, observer.printed))
    assert "qkv_heads(" in after["fuse_qkv"] and "gated_mlp(" not in after["fuse_qkv"]
    assert "gated_mlp(" in after["fuse_mlp"]
    n = cfg.n_layers
    assert count(gm, dialect.qkv_heads) == n and count(gm, dialect.gated_mlp) == n
    assert count(gm, dialect.linear) == 3 * n + 1  # wqkv, wo, w2 per layer + lm head
    assert count(gm, ref.split_heads) == 0 and "call_module" not in str(gm.graph)
    cache_op = ref.update_cache if mode == "decode" else ref.fill_cache
    assert count(gm, cache_op) == 2 * n
    assert ("layers.0.attention.wqkv.bias" in ctx.facts.weights) == qkv_bias
    for name in ("wq", "wk", "wv"):
        assert f"layers.0.attention.{name}.weight" not in ctx.facts.weights

    after, after_state = run_real(gm, ctx.facts, sources, inputs, cfg, state)
    assert_same_outputs(before, after, atol=2e-5, rtol=1e-4)
    for name in before_state:
        torch.testing.assert_close(after_state[name], before_state[name], atol=2e-5, rtol=1e-4)


def test_pipeline_print_after_one_pass_and_dump(tmp_path):
    gm, ctx = traced("decode")
    observer = Observer(verify=True, print_after={"fuse_mlp"}, dump_dir=tmp_path)
    run_pipeline(gm, ctx, observer)
    assert len(observer.printed) == 1
    assert observer.printed[0].startswith("// ----- IR after fuse_mlp (decode) -----")
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped == [f"decode_{i:02d}_{name}.txt" for i, name in enumerate(PASS_NAMES, start=1)]
    index = PASS_NAMES.index("fuse_mlp") + 1
    assert (tmp_path / f"decode_{index:02d}_fuse_mlp.txt").read_text() == observer.printed[0]


def test_pipeline_names_the_failing_pass_and_node(monkeypatch):
    """A crash inside a pass is the compiler's bug: an InternalCompilerError naming the
    pass and the node it was working on, not a ValueError blamed on the user."""
    gm, ctx = traced("prefill")

    def broken(gm, ctx):
        for node in gm.graph.nodes:
            if node.target is dialect.gated_mlp or node.target is dialect.mul:
                raise ValueError("boom")

    monkeypatch.setattr(fuse_mlp, "run", broken)
    with pytest.raises(InternalCompilerError) as info:
        run_pipeline(gm, ctx, Observer(verify=True))
    assert not isinstance(info.value, ValueError)
    message = str(info.value)
    assert "pass 'fuse_mlp' (prefill)" in message and "node %mul" in message and "bug in ttcompile" in message


def test_a_user_error_inside_a_pass_stays_the_users(monkeypatch):
    gm, ctx = traced("prefill")

    def refuses(gm, ctx):
        raise CompileError("does not fit")

    monkeypatch.setattr(fuse_mlp, "run", refuses)
    with pytest.raises(CompileError, match="does not fit"):
        run_pipeline(gm, ctx, Observer(verify=True))
