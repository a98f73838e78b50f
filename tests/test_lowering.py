"""Lowering: fx graph -> Program of TTNN ops. The Program's JSON, its "S" dims, op counts
per layer, the readable Python, and a float32 program on the emulator against the graph.

Programs are compiled once per module by the real driver (`compile_model`, --no-weights)
from a tiny config.json written here; helpers are shared with tests/test_optable.py.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler.convert import RecipeEvaluator
from compiler.driver import compile_model
from compiler.options import CompileOptions
from compiler.pipeline import Observer
from lowering.emit_python import emit_program
from lowering.optable import OPS
from lowering.program import SEQ, Program, is_tensor_ref, tensor_name
from models_ref.weights import expected_shapes

from graph_builder import MAX_SEQ, random_sources, run_real, traced

MODES = ("performance", "accuracy", "float32")
BATCH = 2
# dim 64 and vocab 128 equal the two row counts the lowering propagates prefill at
# (compiler.trace ALT_SEQ_ROWS, SEQ_ROWS): a dim that merely equals a row count must not
# become "S".
TINY_HF = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=96,
               vocab_size=128, num_hidden_layers=2, max_position_embeddings=MAX_SEQ,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def write_config(root, name="tiny-test", **overrides):
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**TINY_HF, **overrides}))
    return path


def compile_tiny(model_dir, optimizations: str, batch_size: int = BATCH):
    """The driver's result (program + cfg) for a config-only model; verifier on."""
    options = CompileOptions(optimizations=optimizations, batch_size=batch_size, max_seq_len=MAX_SEQ,
                             no_weights=True, paged_attention=False)  # paged: tests/test_paged.py
    return compile_model(model_dir, options, Observer(verify=True))


@functools.lru_cache(maxsize=1)
def compiled_tiny_models() -> dict:
    """{(optimizations, arch): CompileResult} for a llama and a qwen2 (QKV bias) config,
    compiled once per session (tests/test_optable.py uses them too)."""
    root = Path(tempfile.mkdtemp(prefix="tiny-configs-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    dirs = {"llama": write_config(root),
            "qwen2": write_config(root, "tiny-qwen", architectures=["Qwen2ForCausalLM"],
                                  model_type="qwen2", hidden_size=128)}
    return {(mode, arch): compile_tiny(path, mode) for mode in MODES for arch, path in dirs.items()}


@pytest.fixture
def compiled():
    return compiled_tiny_models()


def ops_by_layer(fn) -> dict:
    counts: dict = {}
    for op in fn.ops:
        counts.setdefault(op.layer, Counter())[op.op] += 1
    return counts


# ============================================================================ JSON
@pytest.mark.parametrize("mode", MODES)
def test_program_json_round_trip(compiled, mode):
    program = compiled[(mode, "qwen2")].program
    text = program.dumps()
    again = Program.loads(text)
    assert again == program
    assert again.dumps() == text
    assert json.loads(text)["format_version"] == program.format_version


def test_program_rejects_other_format_version(compiled):
    data = compiled[("performance", "llama")].program.to_json()
    data["format_version"] = 999
    with pytest.raises(ValueError, match="format"):
        Program.from_json(data)


# ============================================================================ "S" dims
def _has_seq(shape) -> bool:
    return any(d == SEQ or (isinstance(d, str) and d.startswith(SEQ + "/")) for d in shape)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_shapes_scale_with_rows_only_where_they_should(compiled, arch):
    program = compiled[("performance", arch)].program
    for name, spec in program.weights.items():
        assert not _has_seq(spec["shape"]), name
    for name, spec in program.state.items():
        assert not _has_seq(spec.shape), name
    for fn in program.functions.values():
        for spec in fn.inputs:
            # Per-call rows scale with S in prefill; the user's page-table row does not.
            scales = fn.name == "prefill" and spec.name != "page_table"
            assert _has_seq(spec.shape) == scales, (fn.name, spec)
    for spec in program.functions["decode"].tensors.values():
        assert not _has_seq(spec.shape), spec

    prefill = program.functions["prefill"]
    after_last_tile = False
    for op in prefill.ops:
        after_last_tile |= op.op == "ttnn.slice"
        for out in op.out:
            shape = prefill.tensors[out].shape
            if after_last_tile:  # the 32-row tile holding the last token, then the head
                assert not _has_seq(shape) and shape[-2] == 32, (op.op, out, shape)
            else:
                assert shape.count(SEQ) == 1, (op.op, out, shape)
    logits = prefill.tensors[prefill.outputs[0]]
    assert logits.shape == [1, 1, 32, TINY_HF["vocab_size"]]
    rows = prefill.tensors[next(o.out[0] for o in prefill.ops if o.op == "ttnn.linear")]
    assert rows.shape == [1, 1, SEQ, (4 + 2 * 2) * 32] and rows.concrete(96) == (1, 1, 96, 256)


# ============================================================================ op counts
def test_decode_ops_per_layer(compiled):
    program = compiled[("performance", "llama")].program
    decode = program.functions["decode"]
    by_layer = ops_by_layer(decode)
    assert sorted(k for k in by_layer if k is not None) == [0, 1]
    for layer in (0, 1):
        c = by_layer[layer]
        assert c["ttnn.experimental.nlp_create_qkv_heads_decode"] == 1
        assert c["ttnn.linear"] == 5  # wqkv, wo, w1, w3, w2
        assert c["ttnn.mul"] == 1 and c["ttnn.add"] == 2 and c["ttnn.rms_norm"] == 2
        assert c["ttnn.experimental.rotary_embedding_llama"] == 2
        assert c["ttnn.experimental.paged_update_cache"] == 2
        assert c["ttnn.transformer.scaled_dot_product_attention_decode"] == 1
        assert c["ttnn.experimental.nlp_concat_heads_decode"] == 1
        assert c["ttnn.to_memory_config"] == 1  # SDPA-decode output resharded for concat
        assert sum(c.values()) == 18, c
        weights = sorted(tensor_name(op.args[1]).split(".", 2)[2] for op in decode.ops
                         if op.op == "ttnn.linear" and op.layer == layer)
        assert weights == ["attention.wo.weight", "attention.wqkv.weight", "feed_forward.w1.weight",
                           "feed_forward.w2.weight", "feed_forward.w3.weight"]
    head = by_layer[None]
    assert head["ttnn.linear"] == 1 and head["ttnn.rms_norm"] == 1
    assert head["ttnn.embedding"] == 3  # tokens, cos rows, sin rows
    prefill_only = {"ttnn.fill_cache", "ttnn.slice", "ttnn.experimental.nlp_create_qkv_heads",
                    "ttnn.transformer.scaled_dot_product_attention", "ttnn.experimental.nlp_concat_heads"}
    assert not prefill_only & {op.op for op in decode.ops}
    for op in decode.ops:
        if op.op == "ttnn.mul":
            assert op.kwargs["input_tensor_a_activations"] == ["silu"]
        if op.op in ("ttnn.experimental.paged_update_cache",
                     "ttnn.transformer.scaled_dot_product_attention_decode"):
            key = "update_idxs_tensor" if "update" in op.op else "cur_pos_tensor"
            assert op.kwargs[key] == "%cur_pos"


@pytest.mark.parametrize("mode,typecasts", [("performance", 2), ("accuracy", 0), ("float32", 0)])
def test_prefill_ops_per_layer(compiled, mode, typecasts):
    """KV goes through a typecast to the cache dtype only when it differs (bfloat8_b KV)."""
    prefill = compiled[(mode, "llama")].program.functions["prefill"]
    by_layer = ops_by_layer(prefill)
    for layer in (0, 1):
        c = by_layer[layer]
        assert c["ttnn.experimental.nlp_create_qkv_heads"] == 1
        assert c["ttnn.linear"] == 5 and c["ttnn.mul"] == 1
        assert c["ttnn.fill_cache"] == 2 and c["ttnn.typecast"] == typecasts
        assert c["ttnn.transformer.scaled_dot_product_attention"] == 1
        assert c["ttnn.experimental.nlp_concat_heads"] == 1
    assert by_layer[None]["ttnn.linear"] == 1
    assert sum(op.op == "ttnn.slice" for op in prefill.ops) == 1
    for op in prefill.ops:
        if op.op == "ttnn.experimental.nlp_create_qkv_heads":
            assert op.kwargs == {"num_heads": 4, "num_kv_heads": 2, "transpose_k_heads": False}
        if op.op == "ttnn.transformer.scaled_dot_product_attention":
            assert op.kwargs["is_causal"] is True


def test_qkv_bias_is_passed_to_the_fused_linear(compiled):
    for fn in compiled[("accuracy", "qwen2")].program.functions.values():
        biases = [op.kwargs.get("bias") for op in fn.ops
                  if op.op == "ttnn.linear" and "wqkv" in op.args[1]]
        assert biases == ["%layers.0.attention.wqkv.bias", "%layers.1.attention.wqkv.bias"]
    for fn in compiled[("accuracy", "llama")].program.functions.values():
        assert not any("bias" in op.kwargs for op in fn.ops if op.op == "ttnn.linear")


@pytest.mark.parametrize("mode", MODES)
def test_dtypes_and_fidelity_follow_precision(compiled, mode):
    program = compiled[(mode, "llama")].program
    w = program.weights
    expect = {"performance": ("bfloat8_b", "bfloat4_b", "bfloat8_b", "LoFi"),
              "accuracy": ("bfloat16", "bfloat8_b", "bfloat16", "HiFi2"),
              "float32": ("float32", "float32", "float32", "HiFi4")}[mode]
    assert w["layers.0.attention.wqkv.weight"]["dtype"] == expect[0]
    assert w["layers.1.feed_forward.w3.weight"]["dtype"] == expect[1]
    assert program.state["layers.0.attention.k_cache"].dtype == expect[2]
    mlp_linears = [op for op in program.functions["decode"].ops
                   if op.op == "ttnn.linear" and "feed_forward.w1" in op.args[1]]
    assert mlp_linears and all(op.kwargs["compute_kernel_config"]["math_fidelity"] == expect[3]
                               for op in mlp_linears)


def test_device_weight_layouts(compiled):
    program = compiled[("performance", "llama")].program
    w = program.weights
    norm = w["layers.0.attention_norm.weight"]
    assert norm["layout"] == "ROW_MAJOR" and norm["shape"] == [1, 1, 2, 32]
    assert norm["recipe"] == ["reshape", [1, 1, 2, 32], ["source", "layers.0.attention_norm.weight"]]
    assert w["tok_embeddings.weight"]["layout"] == "ROW_MAJOR"
    assert w["rope_cos"]["layout"] == "ROW_MAJOR" and w["rope_cos"]["shape"] == [MAX_SEQ, 32]
    assert w["rope_trans_mat"]["recipe"] == ["rope_trans_mat"] and w["rope_trans_mat"]["shape"] == [1, 1, 32, 32]
    assert w["output.weight"]["shape"] == [64, 128] and w["output.weight"]["layout"] == "TILE"
    assert w["layers.0.feed_forward.w2.weight"]["shape"] == [96, 64]
    assert not any(".wq." in n or ".wk." in n or ".wv." in n for n in w)


# ============================================================================ well-formedness
@pytest.mark.parametrize("mode", MODES)
def test_every_tensor_is_defined_before_use(compiled, mode):
    program = compiled[(mode, "qwen2")].program
    for fn in program.functions.values():
        defined = set(program.weights) | set(program.state) | {i.name for i in fn.inputs}
        for op in fn.ops:
            for a in list(op.args) + list(op.kwargs.values()):
                if is_tensor_ref(a):
                    assert tensor_name(a) in defined, (fn.name, op.op, a)
                elif isinstance(a, str) and a.startswith("$"):
                    assert a[1:].split("+")[0] in fn.scalars, (fn.name, op.op, a)
            assert len(op.out) == OPS[op.op].outputs, (op.op, op.out)
            for out in op.out:
                assert out not in defined and out in fn.tensors, (fn.name, out)
                defined.add(out)
        assert fn.outputs and all(o in defined for o in fn.outputs)


# ============================================================================ readable Python
def test_emit_python(compiled):
    program = compiled[("performance", "qwen2")].program
    text = emit_program(program)
    assert "import ttnn" in text
    assert "def prefill(" in text and "def decode(" in text and "def decode_logits(" in text
    assert text.count("ttnn.experimental.nlp_create_qkv_heads_decode(") == 4  # decode and decode_logits
    assert "ttnn.sampling(" in text and "ttnn.topk(" in text
    assert "input_tensor_a_activations=['silu']" in text
    assert "# layer 1" in text


def test_emit_python_parses(compiled):
    compile(emit_program(compiled[("performance", "llama")].program), "<emitted>", "exec")


# ============================================================================ numerics
def test_float32_program_on_the_emulator_matches_the_graph(compiled):
    """Two users prefilled through the program, then one decode step for both, against
    the traced reference graph run in float32 with the same weights."""
    from runtime.emulator.backend import EmulatorBackend

    result = compiled[("float32", "qwen2")]
    program, cfg = result.program, result.cfg
    sources = _sources(cfg)
    evaluate = RecipeEvaluator(_Reader(sources), cfg)
    backend = EmulatorBackend(program, None, weights={n: evaluate(s["recipe"]) for n, s in program.weights.items()},
                              emulate_fidelity=False)  # exact products, as the graph

    graphs = {mode: traced(mode, "float32", cfg, BATCH) for mode in ("prefill", "decode")}
    rng = np.random.default_rng(0)
    lengths = [40, 19]
    state = None
    for user, length in enumerate(lengths):
        tokens = rng.integers(0, cfg.vocab_size, (1, length))
        start = (length - 1) // 32 * 32
        (out,) = backend.run("prefill", {"tokens": tokens, "positions": np.arange(length)[None]},
                             {"user_id": user, "last_tile_start": start})
        gm, ctx = graphs["prefill"]
        want, state = run_real(gm, ctx.facts, sources, {
            "tokens": torch.from_numpy(tokens), "positions": torch.arange(length),
            "user_id": user, "last_index": length - 1}, cfg, state)
        np.testing.assert_allclose(out, want.numpy(), atol=2e-4, rtol=1e-4)

    tokens = rng.integers(0, cfg.vocab_size, (1, BATCH))
    (out,) = backend.run("decode_logits", {"tokens": tokens, "positions": np.array([lengths])})
    gm, ctx = graphs["decode"]
    want, _ = run_real(gm, ctx.facts, sources, {
        "tokens": torch.from_numpy(tokens), "positions": torch.tensor(lengths),
        "user_id": 0, "last_index": 0}, cfg, state)
    np.testing.assert_allclose(out, want.numpy(), atol=2e-4, rtol=1e-4)


class _Reader:
    def __init__(self, tensors):
        self.tensors = tensors

    def get(self, name):
        return self.tensors[name]


def _sources(cfg) -> dict:
    from compiler.facts import GraphFacts, WeightSpec

    facts = GraphFacts({n: WeightSpec(n, s, ["source", n]) for n, s in expected_shapes(cfg).items()})
    return random_sources(facts, seed=1)


@pytest.mark.parametrize("head_dim", [100, 160])
def test_heads_that_are_not_whole_tiles_lower_as_ttnn_takes_them(tmp_path, head_dim):
    """passes/pad_heads.py: heads of 100 (160) are split, rotated, cached and attended as
    heads of 128 (160 is whole tiles), with the scale of the real head_dim; rotary on heads
    wider than 128 turns fp32 dest accumulation off ("If head_dim is > 128,
    fp32_dest_acc_en must be False", ttnn 0.81.1)."""
    padded = -(-head_dim // 32) * 32
    program = compile_tiny(write_config(tmp_path, head_dim=head_dim), "performance").program
    assert {spec.shape[-1] for spec in program.state.values()} == {padded}
    for fn in program.functions.values():
        if fn.name not in ("prefill", "decode"):
            continue
        heads = [op for op in fn.ops if op.op.startswith("ttnn.experimental.nlp_create_qkv_heads")]
        rotary = [op for op in fn.ops if op.op == "ttnn.experimental.rotary_embedding_llama"]
        attention = [op for op in fn.ops if op.op.startswith("ttnn.transformer.")]
        assert heads and rotary and attention
        assert {fn.tensors[out].shape[-1] for op in heads for out in op.out} == {padded}
        assert {op.kwargs["compute_kernel_config"]["fp32_dest_acc_en"] for op in rotary} == {padded <= 128}
        assert {op.kwargs["scale"] for op in attention} == {head_dim ** -0.5}
