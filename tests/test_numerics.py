"""Numerics of compiled programs on tiny random checkpoints, against Hugging Face
transformers (float32) on the same weights.

Variants: Llama without rope scaling (untied and tied embeddings), Llama with llama3 rope
scaling (original_max_position_embeddings 64, so the scaling changes logits inside the
test sequence), Qwen2 with QKV bias; all at the odd TINY_LLAMA sizes (hidden 192, 6 heads
of 32, 2 KV heads, intermediate 328, vocabulary 1000).

- accuracy mode: teacher-forced logits (prefill 20 tokens, then 40 decode steps) have
  PCC >= 0.999 against HF;
- float32 mode: greedy generation equals HF `generate` token for token for 32 tokens;
- a Meta checkpoint of the same weights (1 and 2 model-parallel shards) gives the same
  program logits as the HF directory;
- batch: a --batch-size 4 program gives every user what that user gets alone, with one
  decode invocation per step for all users;
- heads that are not whole tiles (16, 48, 80, 100; Qwen3's q/k norms over 80), padded to
  whole tiles for ttnn, give HF's logits in float32 (PCC >= 0.99999) on N150 and T3K.

Run with -s to see the measured figures.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import runtime
from fixtures import hf_logits, hf_reference, make_meta_model, pcc

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (arch, config overrides)
VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-rope3": ("llama", {"rope_scaling": LLAMA3_SCALING}),
    "llama-rope3-tied": ("llama", {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True}),
    "qwen2-bias": ("qwen2", {}),
}

PREFILL = 20
TOKENS = list(range(3, 1000, 17))[:PREFILL + 41]  # 20 prefill + 40 decode steps -> 41 rows
MAX_SEQ_LEN = 256


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    def get(name):
        arch, overrides = VARIANTS[name]
        return tiny_model(name, arch, **overrides)
    return get


@pytest.fixture(scope="module")
def reference():
    """HF float32 models, loaded once per directory."""
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = hf_reference(path)
        return cache[path]
    return get


def _teacher_forced(out, tokens=TOKENS, prefill=PREFILL, matmul="device") -> np.ndarray:
    """`matmul="exact"` for the float32 "program equals HF" checks: on the device a float32
    program's matmuls are TF32 (runtime/emulator/fidelity.py)."""
    return runtime.load(out, matmul=matmul).teacher_forced_logits(tokens, prefill)


def _hf_rows(model, tokens=TOKENS, prefill=PREFILL) -> np.ndarray:
    """HF logits aligned with Session.teacher_forced_logits rows."""
    return hf_logits(model, tokens)[prefill - 1: len(tokens) - 1].numpy()


# --------------------------------------------------------------------------- checks on the fixtures
def test_variants_exercise_what_they_claim(model_dir, reference):
    """Guard the test set itself: the rope-scaled model's logits really differ from the
    unscaled one with the same weights within the tested positions, and the Qwen2 model
    really has (non-zero) q/k/v biases."""
    plain, scaled = reference(model_dir("llama")), reference(model_dir("llama-rope3"))
    for (n, a), (_, b) in zip(plain.state_dict().items(), scaled.state_dict().items()):
        assert torch.equal(a, b), f"same seed should give the same weights ({n})"
    p = pcc(_hf_rows(plain), _hf_rows(scaled))
    print(f"\nHF logits PCC, llama3 rope scaling vs none on the same weights: {p:.4f}")
    assert p < 0.99, "rope scaling does not matter within the test sequence; lengthen it"
    qwen = reference(model_dir("qwen2-bias"))
    attn = qwen.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().max() > 0.1


# --------------------------------------------------------------------------- (a) accuracy PCC
@pytest.mark.parametrize("name", list(VARIANTS))
def test_accuracy_mode_teacher_forced_pcc(name, model_dir, reference, compile_artifact):
    path = model_dir(name)
    out = compile_artifact(path, optimizations="accuracy", max_seq_len=MAX_SEQ_LEN)
    got = _teacher_forced(out)
    want = _hf_rows(reference(path))
    assert got.shape == want.shape == (len(TOKENS) - PREFILL, 1000)
    overall = pcc(got, want)
    per_row = [pcc(g, w) for g, w in zip(got, want)]
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    print(f"\n{name}: accuracy mode, teacher-forced PCC {overall:.6f} "
          f"(prefill row {per_row[0]:.6f}, worst decode row {min(per_row[1:]):.6f}), top-1 {top1:.3f}")
    assert overall >= 0.999
    assert min(per_row) >= 0.995, f"a single step is off: row {int(np.argmin(per_row))}"


# --------------------------------------------------------------------------- (b) float32 greedy
@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_float32_greedy_equals_hf_generate(name, model_dir, reference, compile_artifact):
    path = model_dir(name)
    out = compile_artifact(path, optimizations="float32", max_seq_len=MAX_SEQ_LEN)
    session = runtime.load(out, matmul="exact")
    model = reference(path)
    prompts = [[5, 17, 123, 999, 42, 7, 300, 301, 302, 11, 600, 64], list(range(100, 135))]
    for prompt in prompts:
        (ours,) = session.generate([prompt], max_generated_tokens=32, stop_at_eos=False)
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0)
        theirs = hf[0, len(prompt):].tolist()
        assert len(theirs) == 32, "HF stopped early; the comparison needs 32 tokens"
        first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert ours == theirs, f"{name}: first difference at generated token {first_diff}"
    # float32 is the exact mode: the logits agree to float rounding, not just the argmax.
    p = pcc(_teacher_forced(out, matmul="exact"), _hf_rows(model))
    print(f"\n{name}: float32 greedy == HF for 2 prompts x 32 tokens; teacher-forced PCC {p:.9f}")
    assert p > 0.99999


# --------------------------------------------------------------------------- (c) Meta checkpoints
@pytest.fixture(scope="module")
def meta_dirs(model_dir, tmp_path_factory):
    hf = model_dir("llama")
    root = tmp_path_factory.mktemp("meta")
    return hf, make_meta_model(hf, root / "meta-1", shards=1), make_meta_model(hf, root / "meta-2", shards=2)


def test_meta_checkpoint_gives_the_same_program_logits(meta_dirs, compile_artifact, reference):
    hf, meta1, meta2 = meta_dirs
    assert not list(meta1.glob("*.safetensors")) and (meta1 / "params.json").exists()
    assert sorted(p.name for p in meta2.glob("consolidated.*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    logits = {}
    for label, path in (("hf", hf), ("meta-1", meta1), ("meta-2", meta2)):
        out = compile_artifact(path, optimizations="float32", max_seq_len=MAX_SEQ_LEN)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["source"]["format"] == ("hf" if label == "hf" else "meta")
        logits[label] = _teacher_forced(out, matmul="exact")
    d_meta = float(np.abs(logits["meta-1"] - logits["hf"]).max())
    d_shards = float(np.abs(logits["meta-2"] - logits["meta-1"]).max())
    scale = float(np.abs(logits["hf"]).max())
    print(f"\nmeta vs HF dir: max |diff| {d_meta:.3g}; 2-shard vs 1-shard: {d_shards:.3g} (logits up to {scale:.3g})")
    assert d_meta <= 1e-4 * scale
    assert d_shards <= 1e-4 * scale
    # ... and they are right, not just equal to each other.
    assert pcc(logits["meta-2"], _hf_rows(reference(hf))) > 0.99999


# --------------------------------------------------------------------------- (e) heads of any width
# Heads that are not whole tiles (OpenLLaMA 3B has heads of 100): passes/pad_heads.py pads
# them to whole tiles for ttnn (wqkv columns, q/k norms, cos/sin, caches, wo rows; the
# attention scale stays 1/sqrt(head_dim)). 4 heads, 2 KV heads, hidden 4 x head_dim.
PADDED_HEADS = {"llama-hd16": ("llama", 16), "llama-hd48": ("llama", 48), "llama-hd80": ("llama", 80),
                "llama-hd100": ("llama", 100), "qwen3-hd80": ("qwen3", 80)}


@pytest.mark.parametrize("target", ["N150", "T3K"])
@pytest.mark.parametrize("name", list(PADDED_HEADS))
def test_heads_padded_to_whole_tiles_equal_hf_float32(name, target, tiny_model, reference, compile_artifact):
    arch, head_dim = PADDED_HEADS[name]
    path = tiny_model(name, arch, hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=head_dim)
    out = compile_artifact(path, optimizations="float32", max_seq_len=MAX_SEQ_LEN, target=target)
    program = json.loads((out / "program.json").read_text())
    padded = -(-head_dim // 32) * 32
    assert {spec["shape"][-1] for spec in program["state"].values()} == {padded}  # caches hold padded heads
    assert program["weights"]["rope_cos"]["shape"][-1] == padded
    got, want = _teacher_forced(out, matmul="exact"), _hf_rows(reference(path))
    overall = pcc(got, want)
    print(f"\n{name} on {target}: heads of {head_dim} padded to {padded}, float32 teacher-forced PCC "
          f"{overall:.9f} (1 - PCC {1 - overall:.1e}), max |diff| {float(np.abs(got - want).max()):.2e}")
    assert overall >= 0.99999


# --------------------------------------------------------------------------- (d) batch
BATCH_PROMPTS = [[11, 12, 13], list(range(200, 219)), [900, 5, 77, 31, 2, 640, 8], list(range(40, 80, 3))]


@pytest.mark.parametrize("mode", ["float32", "accuracy"])
def test_batched_users_are_independent(mode, model_dir, compile_artifact):
    path = model_dir("qwen2-bias")
    single = runtime.load(compile_artifact(path, optimizations=mode, max_seq_len=MAX_SEQ_LEN))
    alone = [single.generate([p], max_generated_tokens=24, stop_at_eos=False)[0] for p in BATCH_PROMPTS]

    batched = runtime.load(compile_artifact(path, optimizations=mode, max_seq_len=MAX_SEQ_LEN, batch_size=4))
    assert batched.batch_size == 4
    before = batched.backend.invocations["decode"]
    together = batched.generate(BATCH_PROMPTS, max_generated_tokens=24, stop_at_eos=False)
    steps = batched.backend.invocations["decode"] - before
    print(f"\nbatch 4 ({mode}): {steps} decode invocations for {len(BATCH_PROMPTS)} users x 24 tokens")
    assert [len(t) for t in together] == [24] * 4
    for user, (a, b) in enumerate(zip(together, alone)):
        assert a == b, f"user {user} (prompt of {len(BATCH_PROMPTS[user])} tokens) differs when batched"
    assert len({tuple(t) for t in together}) == 4, "prompts should give distinct continuations"
    # The first token comes from prefill; each further token is one decode step for everyone.
    assert steps == 23 == batched.stats.decode_steps
    assert batched.backend.invocations["prefill"] >= 4
