"""The emulator executes the program artifact, not the reference module.

Each test copies a compiled tiny-model artifact (float32 mode, so that results can be
compared with Hugging Face to float rounding), edits its program.json, and checks that the
output changes exactly as the edit says it should: the edited program must agree with an
HF model altered the same way, and disagree with the unedited program.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import runtime
from fixtures import hf_logits, hf_reference, pcc

PREFILL = 12
TOKENS = list(range(7, 1000, 23))[:PREFILL + 16]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def artifact(model, compile_artifact):
    return compile_artifact(model, optimizations="float32", max_seq_len=256, sampling="host")  # decode = logits


@pytest.fixture(scope="module")
def original_logits(artifact):
    return runtime.load(artifact, matmul="exact").teacher_forced_logits(TOKENS, PREFILL)


def _edited_copy(artifact, dest, edit):
    """Copy the artifact to `dest`, apply `edit(program_dict)` to program.json."""
    shutil.copytree(artifact, dest)
    program = json.loads((dest / "program.json").read_text())
    edit(program)
    (dest / "program.json").write_text(json.dumps(program))
    return dest


def _hf_rows(model) -> np.ndarray:
    return hf_logits(model, TOKENS)[PREFILL - 1: len(TOKENS) - 1].numpy()


def _rename(value, old, new):
    if isinstance(value, str):
        return new if value == old else value
    if isinstance(value, list):
        return [_rename(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _rename(v, old, new) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- (a) drop an op
def _drop_last_residual_add(program):
    """Remove the decode program's last ttnn.add of the last decoder layer (the MLP
    residual, h + mlp(h)) and make its readers read h instead."""
    fn = program["functions"]["decode"]
    last_layer = program["model"]["n_layers"] - 1
    adds = [i for i, op in enumerate(fn["ops"]) if op["op"] == "ttnn.add" and op["layer"] == last_layer]
    assert len(adds) == 2, "expected the attention and MLP residual adds in the last layer"
    index = adds[-1]
    op = fn["ops"][index]
    producers = {out: o["op"] for o in fn["ops"] for out in o["out"]}
    residual = [a for a in op["args"] if producers.get(a[1:]) != "ttnn.linear"]
    mlp_out = [a for a in op["args"] if producers.get(a[1:]) == "ttnn.linear"]
    assert len(residual) == 1 and len(mlp_out) == 1, op
    (out,) = op["out"]
    del fn["ops"][index]
    for later in fn["ops"][index:]:
        later["args"] = _rename(later["args"], "%" + out, residual[0])
        later["kwargs"] = _rename(later["kwargs"], "%" + out, residual[0])
    fn["outputs"] = _rename(fn["outputs"], out, residual[0][1:])


def test_dropping_the_last_residual_add_changes_decode_like_hf(artifact, model, original_logits, tmp_path):
    edited = _edited_copy(artifact, tmp_path / "edited", _drop_last_residual_add)
    session = runtime.load(edited, matmul="exact")
    assert len(session.program.functions["decode"].ops) == len(runtime.load(artifact).program.functions["decode"].ops) - 1
    got = session.teacher_forced_logits(TOKENS, PREFILL)

    # Prefill was not edited: its row is bit-identical. Decode rows change a lot.
    np.testing.assert_array_equal(got[0], original_logits[0])
    change = pcc(got[1:], original_logits[1:])
    print(f"\ndropped add: decode logits PCC vs the unedited program {change:.4f}")
    assert change < 0.99

    # ... and they change the way the edit says: HF with the last layer's MLP output
    # zeroed (its residual add becomes the identity). The KV caches do not depend on the
    # last MLP, so HF's teacher-forced logits are the program's from row 1 on.
    hf = hf_reference(model)
    hf.model.layers[-1].mlp.register_forward_hook(lambda mod, args, output: torch.zeros_like(output))
    want = _hf_rows(hf)
    agreement = pcc(got[1:], want[1:])
    print(f"dropped add: decode logits PCC vs HF without the last MLP {agreement:.9f}")
    assert agreement > 0.99999
    assert np.abs(got[1:] - want[1:]).max() < 1e-3 * np.abs(want).max()


# --------------------------------------------------------------------------- (b) alter attributes
def _scale_kwarg(op_filter, key, factor):
    def edit(program):
        count = 0
        for fn in program["functions"].values():
            for op in fn["ops"]:
                if op_filter(op["op"]):
                    assert key in op["kwargs"], f"{op['op']} has no {key} attribute"
                    op["kwargs"][key] *= factor
                    count += 1
        assert count >= 2 * program["model"]["n_layers"]
    return edit


def test_rms_norm_epsilon_is_read_from_the_program(artifact, model, original_logits, tmp_path):
    edited = _edited_copy(artifact, tmp_path / "eps", _scale_kwarg(lambda n: n == "ttnn.rms_norm", "epsilon", 1e4))
    got = runtime.load(edited, matmul="exact").teacher_forced_logits(TOKENS, PREFILL)
    change = pcc(got, original_logits)

    hf = hf_reference(model)
    norms = [m for m in hf.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == 2 * hf.config.num_hidden_layers + 1
    for m in norms:
        m.variance_epsilon *= 1e4
    agreement = pcc(got, _hf_rows(hf))
    print(f"\nepsilon x1e4: PCC vs unedited program {change:.4f}, vs HF with the same epsilon {agreement:.9f}")
    assert change < 0.999
    assert agreement > 0.99999


def test_sdpa_scale_is_read_from_the_program(artifact, model, original_logits, tmp_path):
    is_sdpa = lambda n: "scaled_dot_product_attention" in n  # noqa: E731 (paged, chunked or plain)
    edited = _edited_copy(artifact, tmp_path / "scale", _scale_kwarg(is_sdpa, "scale", 4.0))
    got = runtime.load(edited, matmul="exact").teacher_forced_logits(TOKENS, PREFILL)
    change = pcc(got, original_logits)

    hf = hf_reference(model)
    for layer in hf.model.layers:
        layer.self_attn.scaling *= 4.0
    agreement = pcc(got, _hf_rows(hf))
    print(f"\nSDPA scale x4: PCC vs unedited program {change:.4f}, vs HF with the same scale {agreement:.9f}")
    assert change < 0.999
    assert agreement > 0.99999


# --------------------------------------------------------------------------- (c) unknown op
def test_unknown_op_fails_to_load_with_a_clear_error(artifact, tmp_path):
    def rename_an_op(program):
        op = next(o for o in program["functions"]["decode"]["ops"] if o["op"] == "ttnn.add")
        op["op"] = "ttnn.frobnicate"

    edited = _edited_copy(artifact, tmp_path / "unknown", rename_an_op)
    with pytest.raises(Exception, match=r"ttnn\.frobnicate") as info:
        runtime.load(edited)
    print(f"\nunknown op: {type(info.value).__name__}: {info.value}")
