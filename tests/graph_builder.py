"""Hand-built graphs for the pass tests: a tiny config, GraphBuilder (graphs node by node
with real random weights from their recipes), an interpreter that runs a graph on real
tensors, and traced tiny models. Used by tests/test_passes.py, tests/test_pass_*.py,
tests/test_verify.py and tests/test_lowering.py."""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import _get_qualified_name

from compiler import dialect
from compiler.context import PassContext
from compiler.convert import RecipeEvaluator
from compiler.facts import LAYER, GraphFacts, StateSpec, WeightSpec, weight_spec
from compiler.options import CompileOptions
from compiler.shapes import propagate
from compiler.targets import get_target
from compiler.trace import trace
from compiler.verify import verify
from models_ref import ops as ref
from models_ref.config import ModelConfig
from models_ref.names import role_of
from passes import precision
from passes.util import layer_of_name

MAX_SEQ = 256
# Small but GQA (2 query heads per KV head), head_dim one tile, odd-ish FFN width.
TINY = ModelConfig(name="tiny-test", family="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=32, ffn_dim=96, vocab_size=128, norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=MAX_SEQ, tie_word_embeddings=False, qkv_bias=False)


# ============================================================================ helpers
def make_ctx(mode: str = "prefill", optimizations: str = "float32", name: str = TINY.name,
             batch_size: int = 1, cfg: ModelConfig = TINY) -> PassContext:
    """A pass context made by hand: empty facts, the N150 row, the given options."""
    return PassContext(cfg.replace(name=name), get_target("N150"),
                       CompileOptions(optimizations=optimizations, batch_size=batch_size,
                                      paged_attention=False),
                       mode, max_seq_len=MAX_SEQ, seq_rows=8)


def count(gm: torch.fx.GraphModule, target) -> int:
    """How often `target` (a function) is called in the printed graph."""
    name = _get_qualified_name(target).replace("_operator.", "operator.")
    return str(gm.graph).count(f"target={name}]")


def run_pass(pass_module, gm, ctx):
    """One pass as the pipeline runs it: rewrite, re-propagate shapes, verify."""
    gm = pass_module.run(gm, ctx)
    propagate(gm, ctx.facts, ctx.example_inputs)
    verify(gm, ctx, after=pass_module.NAME, precise=pass_module is precision)
    return gm


class _DictReader:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class RealInterpreter(torch.fx.Interpreter):
    """Runs a graph on CPU float32 tensors: weights from their recipes, state from `state`.

    Understands the traced form (call_module nn.Linear reading `<module>.weight`) and
    every later form (get_attr of a WeightSpec / StateSpec). State is copied per run.
    """

    def __init__(self, gm, facts: GraphFacts, sources: dict, cfg: ModelConfig, state=None):
        super().__init__(gm)
        self.facts = facts
        self.evaluate = RecipeEvaluator(_DictReader(sources), cfg)
        self.state = {k: v.clone() for k, v in (state or {}).items()}

    def get_attr(self, target, args, kwargs):
        if target in self.facts.weights:
            return self.evaluate(self.facts.weights[target].recipe).float()
        if target not in self.state:
            self.state[target] = torch.zeros(self.facts.state[target].shape)
        return self.state[target]

    def call_module(self, target, args, kwargs):
        weight = self.get_attr(f"{target}.weight", (), {})
        bias = self.get_attr(f"{target}.bias", (), {}) if f"{target}.bias" in self.facts.weights else None
        return F.linear(args[0], weight, bias)


def run_real(gm, facts, sources, inputs: dict, cfg: ModelConfig = TINY, state=None):
    """(output, final state) of the graph on real inputs, matched to placeholders by name
    (optional ones the model does not use, e.g. xattn_mask, take their defaults)."""
    interp = RealInterpreter(gm, facts, sources, cfg, state)
    args = [inputs[n.target] if n.target in inputs or not n.args else n.args[0]
            for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        out = interp.run(*args)
    return out, interp.state


def random_sources(facts: GraphFacts, seed: int = 0) -> dict:
    """Random checkpoint tensors for every ["source", name] recipe (norm-like 1-D near one)."""
    g = torch.Generator().manual_seed(seed)
    sources = {}
    for spec in facts.weights.values():
        if spec.recipe[0] == "source" and spec.recipe[1] not in sources:
            t = torch.randn(spec.shape, generator=g)
            sources[spec.recipe[1]] = 1.0 + 0.1 * t if len(spec.shape) == 1 else 0.1 * t
    return sources


def assert_same_outputs(before, after, atol=1e-5, rtol=1e-5):
    before = before if isinstance(before, (tuple, list)) else (before,)
    after = after if isinstance(after, (tuple, list)) else (after,)
    assert len(before) == len(after)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def spec_for(name: str, shape, recipe: list) -> WeightSpec:
    """The spec trace would make (role from the name table); names the table lacks (an
    MLP bias, which configs cannot ask for) get no role, as the passes must tolerate."""
    if role_of(name):
        return weight_spec(name, shape, recipe)
    return WeightSpec(name, tuple(shape), recipe, layer=layer_of_name(name))


class GraphBuilder:
    """A canonical-dialect graph built node by node, with its weight table and real weights.

    Weights are declared the way canonicalize leaves them: `[K, N]` with a transpose
    recipe over an `[N, K]` checkpoint tensor; biases `[1, N]` via a reshape recipe.
    """

    def __init__(self, ctx: PassContext, seed: int = 0):
        self.ctx = ctx
        self.gm = torch.fx.GraphModule(nn.Module(), torch.fx.Graph())
        self.graph = self.gm.graph
        self.sources: dict[str, torch.Tensor] = {}
        self.real_inputs: dict[str, object] = {}
        self.gen = torch.Generator().manual_seed(seed)

    def _random(self, shape, scale=0.1, offset=0.0):
        return offset + scale * torch.randn(shape, generator=self.gen)

    def input(self, name: str, shape, real=None) -> torch.fx.Node:
        node = self.graph.placeholder(name)
        if isinstance(real, int):  # scalars: compiler.shapes.SCALAR_EXAMPLES stands in
            self.real_inputs[name] = real
            return node
        if real is None:
            real = self._random(shape, scale=1.0)
        self.ctx.example_inputs[name] = torch.empty(real.shape, dtype=real.dtype, device="meta")
        self.real_inputs[name] = real
        return node

    def _get_attr(self, name: str) -> torch.fx.Node:
        with warnings.catch_warnings():  # weights live in ctx.facts, not on the module
            warnings.simplefilter("ignore", UserWarning)
            node = self.graph.get_attr(name)
        node.meta[LAYER] = layer_of_name(name)
        return node

    def weight(self, name: str, k: int, n: int) -> torch.fx.Node:
        """A linear weight `[K, N]` read from an `[N, K]` checkpoint tensor."""
        self.sources[name] = self._random((n, k))
        self.ctx.facts.weights[name] = spec_for(name, (k, n), ["transpose", ["source", name]])
        return self._get_attr(name)

    def bias(self, name: str, n: int) -> torch.fx.Node:
        self.sources[name] = self._random((n,))
        self.ctx.facts.weights[name] = spec_for(name, (1, n), ["reshape", [1, -1], ["source", name]])
        return self._get_attr(name)

    def vector(self, name: str, n: int) -> torch.fx.Node:
        """A 1-D weight (norms), near one."""
        self.sources[name] = self._random((n,), offset=1.0)
        self.ctx.facts.weights[name] = spec_for(name, (n,), ["source", name])
        return self._get_attr(name)

    def table(self, name: str, rows: int, dim: int) -> torch.fx.Node:
        self.sources[name] = self._random((rows, dim))
        self.ctx.facts.weights[name] = spec_for(name, (rows, dim), ["source", name])
        return self._get_attr(name)

    def state(self, name: str, shape) -> torch.fx.Node:
        role, layer = role_of(name)
        self.ctx.facts.state[name] = StateSpec(name, tuple(shape), layer=layer, role=role)
        return self._get_attr(name)

    def call(self, fn, *args, layer: int | None = 0) -> torch.fx.Node:
        node = self.graph.call_function(fn, args)
        node.meta[LAYER] = layer
        return node

    def finish(self, result) -> torch.fx.GraphModule:
        self.graph.output(result)
        propagate(self.gm, self.ctx.facts, self.ctx.example_inputs)
        return self.gm

    def run(self, gm=None, state=None):
        gm = gm or self.gm
        return run_real(gm, self.ctx.facts, self.sources, self.real_inputs, self.ctx.cfg, state)[0]


def rows_shape(ctx: PassContext, rows: int = 8, width: int = TINY.dim) -> tuple:
    return (1, 1, ctx.options.batch_size if ctx.decode else rows, width)


def build_attention_inputs(ctx, parts=("wq", "wk", "wv"), bias=False, extra_user=None,
                           v_from_other_input=False):
    """x -> linear(w_p) -> split_heads, for each part; returns the head tensors as outputs."""
    b = GraphBuilder(ctx)
    x = b.input("x", rows_shape(ctx))
    other = b.input("x2", rows_shape(ctx)) if v_from_other_input else None
    heads = {"wq": TINY.n_heads, "wk": TINY.n_kv_heads, "wv": TINY.n_kv_heads}
    hd = TINY.head_dim
    outputs, linears = [], {}
    for part in parts:
        prefix = f"layers.0.attention.{part}"
        w = b.weight(f"{prefix}.weight", TINY.dim, heads[part] * hd)
        bias_node = b.bias(f"{prefix}.bias", heads[part] * hd) if bias else None
        source = other if (part == "wv" and other is not None) else x
        lin = b.call(dialect.linear, source, w, bias_node)
        linears[part] = lin
        outputs.append(b.call(ref.split_heads, lin, heads[part], hd, ctx.decode))
    if extra_user:
        outputs.append(b.call(dialect.silu, linears[extra_user]))
    return b, b.finish(tuple(outputs))


def build_mlp(ctx, gate_bias=False, gate_second_user=False, silu_second_user=False):
    """x -> mul(silu(linear(x, w1)), linear(x, w3)) -> linear(w2) -> add(x, .)"""
    b = GraphBuilder(ctx)
    x = b.input("x", rows_shape(ctx))
    prefix = "layers.0.feed_forward"
    w1 = b.weight(f"{prefix}.w1.weight", TINY.dim, TINY.ffn_dim)
    b1 = b.bias(f"{prefix}.w1.bias", TINY.ffn_dim) if gate_bias else None
    w3 = b.weight(f"{prefix}.w3.weight", TINY.dim, TINY.ffn_dim)
    w2 = b.weight(f"{prefix}.w2.weight", TINY.ffn_dim, TINY.dim)
    gate = b.call(dialect.linear, x, w1, b1)
    act = b.call(dialect.silu, gate)
    up = b.call(dialect.linear, x, w3, None)
    hidden = b.call(dialect.mul, act, up)
    out = b.call(dialect.add, x, b.call(dialect.linear, hidden, w2, None))
    outputs = [out]
    if gate_second_user:
        outputs.append(gate)
    if silu_second_user:
        outputs.append(act)
    return b, b.finish(tuple(outputs))


def build_fused_layer(ctx):
    """A one-layer model in the form fuse_qkv and fuse_mlp leave it (precision's input)."""
    b = GraphBuilder(ctx)
    cfg, rows = TINY, rows_shape(ctx)[2]
    hd, h, hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    tokens = b.input("tokens", (1, rows), real=torch.randint(0, cfg.vocab_size, (1, rows)))
    positions = b.input("positions", (rows,), real=torch.arange(rows) + 3)
    table = b.table("tok_embeddings.weight", cfg.vocab_size, cfg.dim)
    x = b.call(ref.embed, tokens, table, layer=None)
    cos, sin = (b.call(ref.rope_rows, b.table(f"rope_{w}", MAX_SEQ, hd), positions, ctx.decode, layer=None)
                for w in ("cos", "sin"))
    normed = b.call(ref.rms_norm, x, b.vector("layers.0.attention_norm.weight", cfg.dim), cfg.norm_eps)
    wqkv = b.weight("layers.0.attention.wqkv.weight", cfg.dim, cfg.qkv_dim)
    heads = b.call(dialect.qkv_heads, b.call(dialect.linear, normed, wqkv, None), h, hkv, hd, ctx.decode)
    q, k, v = (b.call(operator.getitem, heads, i) for i in range(3))
    q, k = b.call(ref.rotary, q, cos, sin), b.call(ref.rotary, k, cos, sin)
    cache_shape = (ctx.options.batch_size, hkv, MAX_SEQ, hd)
    k_cache, v_cache = (b.state(f"layers.0.attention.{n}_cache", cache_shape) for n in "kv")
    if ctx.decode:
        k_cache = b.call(ref.update_cache, k_cache, k, positions)
        v_cache = b.call(ref.update_cache, v_cache, v, positions)
        attn = b.call(ref.decode_attention, q, k_cache, v_cache, positions, hd ** -0.5)
    else:
        user = b.input("user_id", (), real=0)
        b.call(ref.fill_cache, k_cache, k, user)
        b.call(ref.fill_cache, v_cache, v, user)
        attn = b.call(ref.causal_attention, q, k, v, hd ** -0.5)
    wo = b.weight("layers.0.attention.wo.weight", h * hd, cfg.dim)
    h1 = b.call(dialect.add, x, b.call(dialect.linear, b.call(ref.merge_heads, attn, ctx.decode), wo, None))
    normed = b.call(ref.rms_norm, h1, b.vector("layers.0.ffn_norm.weight", cfg.dim), cfg.norm_eps)
    mlp = b.call(dialect.gated_mlp, normed, b.weight("layers.0.feed_forward.w1.weight", cfg.dim, cfg.ffn_dim),
                 b.weight("layers.0.feed_forward.w3.weight", cfg.dim, cfg.ffn_dim))
    w2 = b.weight("layers.0.feed_forward.w2.weight", cfg.ffn_dim, cfg.dim)
    h2 = b.call(dialect.add, h1, b.call(dialect.linear, mlp, w2, None))
    final = b.call(ref.rms_norm, h2, b.vector("norm.weight", cfg.dim), cfg.norm_eps, layer=None)
    logits = b.call(dialect.linear, final, b.weight("output.weight", cfg.dim, cfg.vocab_size), None, layer=None)
    return b, b.finish(logits)


def traced(mode: str, optimizations: str = "float32", cfg: ModelConfig = TINY, batch_size: int = 1):
    # The contiguous-cache pipeline (--no-paged-attention); tests/test_paged.py covers paging.
    return trace(cfg, mode, get_target("N150"), CompileOptions(optimizations=optimizations,
                                                               batch_size=batch_size,
                                                               paged_attention=False), MAX_SEQ)


def real_inputs(mode: str, batch_size: int, cfg: ModelConfig = TINY, rows: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if mode == "decode":
        return {"tokens": torch.randint(0, cfg.vocab_size, (1, batch_size), generator=g),
                "positions": torch.tensor([5 + 7 * i for i in range(batch_size)]),
                "user_id": 0, "last_index": 0}
    return {"tokens": torch.randint(0, cfg.vocab_size, (1, rows), generator=g),
            "positions": torch.arange(rows), "user_id": 0, "last_index": rows - 1}
