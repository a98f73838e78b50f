"""The verifier catches real violations, and names the pass and the node when it does.

Each test starts from a small valid graph (the verifier accepts it), breaks one invariant
the way a buggy pass would, and expects VerifyError.
"""
from __future__ import annotations

import operator

import pytest
import torch

from compiler import dialect
from compiler.facts import LAYER, PRECISION, VAL, Precision, WeightSpec
from compiler.verify import VerifyError, verify
from models_ref import ops as ref
from passes import precision
from passes.util import get_attr

from graph_builder import GraphBuilder, build_fused_layer, build_mlp, make_ctx


def _mlp():
    ctx = make_ctx("prefill")
    _, gm = build_mlp(ctx)
    verify(gm, ctx, after="build", precise=False)
    return gm, ctx


def _node(gm, target, index=0):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target][index]


def _precise_layer(mode="prefill", optimizations="performance"):
    ctx = make_ctx(mode, optimizations=optimizations)
    _, gm = build_fused_layer(ctx)
    gm = precision.run(gm, ctx)
    verify(gm, ctx, after="precision", precise=True)
    return gm, ctx


def test_valid_graphs_pass():
    _mlp()
    for mode in ("prefill", "decode"):
        for optimizations in ("performance", "accuracy", "float32"):
            _precise_layer(mode, optimizations)


def test_linear_weight_shape_mismatch():
    """A pass that forgot to transpose: the weight is [N, K] where [K, N] is needed."""
    gm, ctx = _mlp()
    w2 = _node(gm, dialect.linear, 2).args[1]
    spec = ctx.facts.weights[w2.target]
    spec.shape = spec.shape[::-1]
    w2.meta[VAL] = torch.empty(spec.shape, device="meta")
    with pytest.raises(VerifyError, match=r"after pass 'broken' \(prefill\), node %linear_2: linear: input"):
        verify(gm, ctx, after="broken", precise=False)


def test_weight_spec_disagrees_with_graph():
    gm, ctx = _mlp()
    ctx.facts.weights["layers.0.feed_forward.w2.weight"].shape = (96, 65)
    with pytest.raises(VerifyError, match="'layers.0.feed_forward.w2.weight': spec"):
        verify(gm, ctx, after="broken", precise=False)


def test_linear_bias_shape():
    """Biases are [1, N]; a 1-D bias (canonicalize's reshape forgotten) is rejected."""
    ctx = make_ctx("prefill")
    b = GraphBuilder(ctx)
    x = b.input("x", (1, 1, 8, 64))
    w = b.weight("layers.0.attention.wo.weight", 64, 32)
    bias = b.vector("layers.0.attention.wo.bias", 32)
    gm = b.finish(b.call(dialect.linear, x, w, bias))
    with pytest.raises(VerifyError, match="linear: bias"):
        verify(gm, ctx, after="broken", precise=False)


def test_dead_node():
    gm, ctx = _mlp()
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(x):
        dead = gm.graph.call_function(dialect.silu, (x,))
    dead.meta[LAYER], dead.meta[VAL] = 0, x.meta[VAL]
    with pytest.raises(VerifyError, match=f"node %{dead.name}: dead node"):
        verify(gm, ctx, after="broken", precise=False)


def test_cache_writes_are_not_dead():
    """fill_cache has no users but writes state: the verifier keeps it (SIDE_EFFECTS)."""
    gm, ctx = _precise_layer("prefill")
    fills = [n for n in gm.graph.nodes if n.target is ref.fill_cache]
    assert len(fills) == 2 and all(not n.users for n in fills)


def test_dead_get_attr():
    gm, ctx = _mlp()
    ctx.facts.weights["layers.0.feed_forward.w4.weight"] = WeightSpec(
        "layers.0.feed_forward.w4.weight", (64, 96), ["source", "w4"], layer=0)
    dead = get_attr(gm, _node(gm, dialect.linear), "layers.0.feed_forward.w4.weight")
    dead.meta[VAL] = torch.empty(64, 96, device="meta")
    assert not dead.users
    with pytest.raises(VerifyError):
        verify(gm, ctx, after="broken", precise=False)


def test_get_attr_names_unknown_weight():
    gm, ctx = _mlp()
    del ctx.facts.weights["layers.0.feed_forward.w3.weight"]
    with pytest.raises(VerifyError, match="get_attr 'layers.0.feed_forward.w3.weight' names no weight or state"):
        verify(gm, ctx, after="broken", precise=False)


def test_weight_read_by_no_node():
    gm, ctx = _mlp()
    ctx.facts.weights["orphan.weight"] = WeightSpec("orphan.weight", (4, 4), ["source", "orphan.weight"])
    with pytest.raises(VerifyError, match="weight 'orphan.weight' is read by no node"):
        verify(gm, ctx, after="broken", precise=False)


def test_block_float_weight_read_by_rms_norm():
    gm, ctx = _precise_layer("prefill", "performance")
    ctx.facts.weights["layers.0.ffn_norm.weight"].dtype = "bfloat8_b"
    with pytest.raises(VerifyError, match="block-float 'layers.0.ffn_norm.weight' read by rms_norm"):
        verify(gm, ctx, after="precision", precise=True)
    # The same fact is fine before precision has run (dtypes are not checked yet).
    verify(gm, ctx, after="fuse_mlp", precise=False)


def test_block_float_linear_bias_is_rejected():
    """Only a linear's weight operand may be block-float, not its bias."""
    ctx = make_ctx("prefill", optimizations="performance")
    b = GraphBuilder(ctx)
    x = b.input("x", (1, 1, 8, 64))
    w = b.weight("layers.0.attention.wqkv.weight", 64, 128)
    bias = b.bias("layers.0.attention.wqkv.bias", 128)
    gm = b.finish(b.call(dialect.linear, x, w, bias))
    gm = precision.run(gm, ctx)
    verify(gm, ctx, after="precision", precise=True)
    ctx.facts.weights["layers.0.attention.wqkv.bias"].dtype = "bfloat8_b"
    with pytest.raises(VerifyError, match="block-float 'layers.0.attention.wqkv.bias'"):
        verify(gm, ctx, after="precision", precise=True)


def test_unknown_device_dtype():
    gm, ctx = _precise_layer("decode", "accuracy")
    ctx.facts.weights["output.weight"].dtype = "float16"
    with pytest.raises(VerifyError, match="dtype float16"):
        verify(gm, ctx, after="precision", precise=True)


def test_missing_precision_fact():
    gm, ctx = _precise_layer("decode", "accuracy")
    del _node(gm, dialect.gated_mlp).meta[PRECISION]
    with pytest.raises(VerifyError, match="no precision"):
        verify(gm, ctx, after="precision", precise=True)


@pytest.mark.parametrize("target", [operator.add, torch.add], ids=["operator.add", "torch.add"])
def test_op_outside_the_dialect(target):
    gm, ctx = _mlp()
    add = _node(gm, dialect.add)
    add.target = target
    with pytest.raises(VerifyError, match=f"node %{add.name}: op .* is not in the dialect"):
        verify(gm, ctx, after="broken", precise=False)


def test_missing_layer_annotation():
    gm, ctx = _mlp()
    del _node(gm, dialect.mul).meta[LAYER]
    with pytest.raises(VerifyError, match="no layer annotation"):
        verify(gm, ctx, after="broken", precise=False)


def test_missing_shape():
    gm, ctx = _mlp()
    del _node(gm, dialect.silu).meta[VAL]
    with pytest.raises(VerifyError, match="no shape"):
        verify(gm, ctx, after="broken", precise=False)


def test_operand_shapes_of_binary_ops():
    gm, ctx = _mlp()
    _node(gm, dialect.silu).meta[VAL] = torch.empty(1, 1, 8, 95, device="meta")
    with pytest.raises(VerifyError, match="mul: operand shapes differ"):
        verify(gm, ctx, after="broken", precise=False)


def test_qkv_heads_width():
    gm, ctx = _precise_layer("prefill", "float32")
    heads = _node(gm, dialect.qkv_heads)
    heads.args = (heads.args[0], heads.args[1] + 1, *heads.args[2:])
    with pytest.raises(VerifyError, match="qkv_heads: width"):
        verify(gm, ctx, after="broken", precise=True)


def test_gated_mlp_weights_must_agree():
    gm, ctx = _precise_layer("prefill", "float32")
    mlp = _node(gm, dialect.gated_mlp)
    mlp.args = (mlp.args[0], mlp.args[1], _node(gm, dialect.linear, 2).args[1])  # w3 := w2
    with pytest.raises(VerifyError, match="gated_mlp|dead get_attr"):
        verify(gm, ctx, after="broken", precise=True)


def test_two_outputs():
    gm, ctx = _mlp()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        gm.graph.create_node("output", "output", (out.args[0],), name="output_2")
    with pytest.raises(VerifyError, match="2 outputs"):
        verify(gm, ctx, after="broken", precise=False)


def test_precision_facts_are_typed():
    with pytest.raises(ValueError, match="float16"):
        Precision("float16")
    with pytest.raises(ValueError, match="HiFi5"):
        Precision("bfloat16", "HiFi5")


@pytest.mark.slow
def test_the_verifier_works_under_python_O():
    """Checks are raises, not asserts: `python -O` (which strips asserts) still catches a
    broken graph, and the error is a compiler bug (exit 3), not the user's ValueError."""
    import subprocess
    import sys
    code = (
        "import sys; sys.path.insert(0, 'tests'); import pytest\n"
        "from test_verify import _mlp, _node\n"
        "from compiler import dialect\n"
        "from compiler.verify import verify, VerifyError\n"
        "from compiler.errors import InternalCompilerError\n"
        "gm, ctx = _mlp()\n"
        "node = _node(gm, dialect.add, 0)\n"
        "node.meta.pop('tt_layer')\n"
        "try:\n"
        "    verify(gm, ctx, after='broken', precise=False)\n"
        "except VerifyError as e:\n"
        "    assert isinstance(e, InternalCompilerError) and not isinstance(e, ValueError)\n"
        "    print('caught', e.node)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("caught add"), out.stdout
