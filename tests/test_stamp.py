"""Layer stamping (lowering/stamp.py): compiling two decoder layers and stamping the rest
gives exactly the program that tracing every layer gives.

- program.json (prefill and decode functions, weight and state tables, specs) is byte for
  byte the same, stamped or fully traced, on tiny Llama and Qwen2 models with 5 layers, on
  N150 and T3K (head padding and collectives included), and on a seed config;
- the program's layers are contiguous, named by layer (`l3.linear`), and every layer
  reads the previous layer's output;
- a stamped program with weights runs and gives the logits the fully traced one gives.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from compiler.driver import compile_model
from compiler.options import CompileOptions
from fixtures import hf_config
from lowering.program import tensor_refs
from lowering.stamp import canonical_names, stamp_function
from models_ref.config import seed_model_dirs

LAYERS = 5


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    def make(arch: str):
        path = tmp_path_factory.mktemp(f"{arch}-{LAYERS}-layers")
        hf_config(arch, num_hidden_layers=LAYERS).save_pretrained(path)
        return path
    return {arch: make(arch) for arch in ("llama", "qwen2")}


def _both(model_dir, **options):
    opts = CompileOptions(no_weights=True, **options)
    return compile_model(model_dir, opts).program, compile_model(model_dir, opts, full_trace=True).program


@pytest.mark.parametrize("target", ["N150", "T3K"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_stamped_program_equals_fully_traced(arch, target, config_dir):
    stamped, full = _both(config_dir[arch], target=target, max_seq_len=256)
    for name in ("prefill", "decode"):
        assert [op.layer for op in stamped.functions[name].ops] == [op.layer for op in full.functions[name].ops]
    assert stamped.dumps() == full.dumps()
    assert {w["layer"] for w in stamped.weights.values()} == {None, *range(LAYERS)}


def test_stamped_equals_full_on_a_seed_model_with_options():
    stamped, full = _both(seed_model_dirs()["llama3.2-1b"], target="TG", batch_size=4,
                          optimizations="accuracy", max_seq_len=8192)
    assert stamped.dumps() == full.dumps()


def test_layers_are_contiguous_and_chained(config_dir):
    program, _ = _both(config_dir["llama"], target="T3K", max_seq_len=256)
    for fn in program.functions.values():
        layers = [op.layer for op in fn.ops]
        inner = [layer for layer in layers if layer is not None]
        assert inner == sorted(inner) and set(inner) == set(range(LAYERS))
        first, last = layers.index(0), len(layers) - layers[::-1].index(LAYERS - 1)
        assert all(layer is not None for layer in layers[first:last])
        per_layer = Counter(inner)
        assert len(set(per_layer.values())) == 1, "every layer has the same ops"
        for op in fn.ops:
            if op.layer is not None:
                assert all(name.startswith(f"l{op.layer}.") for name in op.out)
                assert op.node.startswith(f"l{op.layer}.")
        # Layer i (i > 0) reads exactly one tensor of layer i-1: the residual stream.
        for i in range(1, LAYERS):
            reads = {r for op in fn.ops if op.layer == i for r in tensor_refs(op)}
            assert len({r for r in reads if r.startswith(f"l{i - 1}.")}) == 1
            assert not {r for r in reads if r.startswith("l") and r[1:2].isdigit()
                        and not r.startswith((f"l{i}.", f"l{i - 1}."))}
        # Weights and caches are the layer's own.
        for op in fn.ops:
            if op.layer is not None:
                assert not [r for r in tensor_refs(op) if r.startswith("layers.")
                            and not r.startswith(f"layers.{op.layer}.")]


def test_canonical_names_do_not_depend_on_fx_numbering(config_dir):
    """Renaming is a function of (layer, kind, rank): applying it twice changes nothing,
    and stamping a 2-layer function to 2 layers is the identity."""
    program, _ = _both(config_dir["qwen2"], target="N150", max_seq_len=256)
    fn = program.functions["decode"]
    again = canonical_names(fn)
    assert json.dumps(again.__dict__, default=lambda o: o.__dict__) == \
        json.dumps(fn.__dict__, default=lambda o: o.__dict__)
    names = [name for op in fn.ops if op.layer == 3 for name in op.out]
    assert "l3.linear" in names and "l3.gated_mlp_w1" in names


def test_stamped_program_runs_like_the_fully_traced_one(tiny_model, tmp_path):
    import runtime
    from compiler import artifact
    from compiler.driver import compile_model as compile_

    path = tiny_model("llama-4-layers", "llama", num_hidden_layers=4)
    options = CompileOptions(optimizations="float32", max_seq_len=256, cache_dir=tmp_path / "cache")
    logits = []
    for full in (False, True):
        result = compile_(path, options, full_trace=full)
        weights_dir, _ = artifact.convert_weights(result, options.cache_dir)
        out = artifact.write_artifact(result, tmp_path / f"out-{full}", path, weights_dir,
                                      result.reader.fingerprint())
        logits.append(runtime.load(out).teacher_forced_logits(list(range(3, 40)), 20))
    assert np.array_equal(logits[0], logits[1])


def test_stamp_refuses_a_function_whose_layers_interleave(config_dir):
    program, _ = _both(config_dir["llama"], target="N150", max_seq_len=256)
    fn = program.functions["decode"]
    fn.ops[0].layer = 1  # an op of layer 1 before layer 0
    with pytest.raises(AssertionError, match="not contiguous"):
        stamp_function(fn, 8)
