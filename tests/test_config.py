"""Config parsing: the shipped seed configs, Meta params.json against HF config.json,
bad configs, and YaRN RoPE against Hugging Face.

- every seed config (models_ref/seed_configs) parses to the architecture its model card
  states;
- a Meta params.json gives the same normalised config as the HF config.json of the same
  model, for the five Meta seed models, also when params.json lies alone in a folder
  named the way Meta's downloader names it;
- malformed configs fail with one ConfigError line naming the file and the field;
- YaRN: our inverse frequencies and attention factor equal transformers' for several
  parameter sets, and a compiled tiny Qwen2 with yarn (factor 4, original length 64)
  matches HF's logits at positions far beyond 64.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import hf_logits, hf_reference, pcc
from models_ref.config import (SEED_CONFIG_DIR, ConfigError, ModelConfig, from_hf_config,
                               from_meta_params, load_config, seed_model_dirs)
from models_ref.rope import inv_freq_and_scale

META_SEEDS = ["llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.2-11b-vision", "llama3.1-70b"]

# name -> (layers, hidden, heads, kv heads, ffn, vocab, llama3 rope factor or None, tied, cross-attention)
EXPECTED = {
    "llama3.2-1b": (16, 2048, 32, 8, 8192, 128256, 32.0, True, 0),
    "llama3.2-3b": (28, 3072, 24, 8, 8192, 128256, 32.0, True, 0),
    "llama3.1-8b": (32, 4096, 32, 8, 14336, 128256, 8.0, False, 0),
    "llama3.2-11b-vision": (32, 4096, 32, 8, 14336, 128256, 8.0, False, 8),
    "llama3.1-70b": (80, 8192, 64, 8, 28672, 128256, 8.0, False, 0),
    "deepseek-r1-distill-llama-70b": (80, 8192, 64, 8, 28672, 128256, 8.0, False, 0),
    "qwen2.5-7b": (28, 3584, 28, 4, 18944, 152064, None, False, 0),
    "qwen2.5-72b": (80, 8192, 64, 8, 29568, 152064, None, False, 0),
    "qwq-32b": (64, 5120, 40, 8, 27648, 152064, None, False, 0),
}


# ------------------------------------------------------------------ seed configs
def test_every_seed_config_is_shipped():
    assert set(seed_model_dirs()) == set(EXPECTED)
    assert (SEED_CONFIG_DIR / "SOURCES.md").is_file()
    for name in META_SEEDS:
        assert (SEED_CONFIG_DIR / name / "params.json").is_file()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_seed_config_parses_to_its_architecture(name):
    cfg = load_config(seed_model_dirs()[name])
    layers, dim, heads, kv, ffn, vocab, factor, tied, cross = EXPECTED[name]
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size) == \
        (layers, dim, heads, kv, ffn, vocab)
    assert cfg.head_dim == 128 or (name == "llama3.2-1b" and cfg.head_dim == 64)
    assert (cfg.rope_scaling.factor if cfg.rope_scaling else None) == factor
    assert cfg.tie_word_embeddings is tied
    assert len(cfg.cross_attention_layers) == cross
    assert cfg.qkv_bias is (cfg.family == "qwen2")


def test_vision_config_numbers_cross_attention_by_self_attention_layer():
    """HF numbers 40 layers with cross-attention at [3, 8, ..., 38]; Meta runs cross-attention
    layer k before self-attention layer 4k + 3. Both give the same normalised positions."""
    cfg = load_config(seed_model_dirs()["llama3.2-11b-vision"])
    assert cfg.cross_attention_layers == (3, 7, 11, 15, 19, 23, 27, 31)
    hf = json.loads((seed_model_dirs()["llama3.2-11b-vision"] / "config.json").read_text())
    hf_indices = hf["text_config"]["cross_attention_layers"]
    assert [i + rank for rank, i in enumerate(cfg.cross_attention_layers)] == hf_indices


def _comparable(cfg: ModelConfig) -> ModelConfig:
    """Everything but the name, the source format and, for Llama 3.2 Vision, where the
    vision taps are read (HF 5.x reads layer outputs, Meta's reference layer inputs)."""
    vision = cfg.vision.replace(intermediate_taps="") if cfg.vision else None
    return cfg.replace(name="", source_format="", vision=vision)


@pytest.mark.parametrize("name", META_SEEDS)
def test_meta_params_give_the_same_config_as_hf(name):
    folder = seed_model_dirs()[name]
    hf = from_hf_config(folder / "config.json")
    meta = from_meta_params(folder / "params.json")
    assert _comparable(meta) == _comparable(hf)


@pytest.mark.parametrize("name, meta_folder", [
    ("llama3.2-1b", "Llama3.2-1B-Instruct"), ("llama3.2-3b", "Llama3.2-3B"),
    ("llama3.1-8b", "Llama3.1-8B-Instruct"), ("llama3.2-11b-vision", "Llama3.2-11B-Vision-Instruct"),
    ("llama3.1-70b", "Llama3.1-70B-Instruct")])
def test_meta_params_alone_in_a_meta_download_folder(name, meta_folder, tmp_path):
    """Without config.json beside it, the rope factor and tying come from the release in
    the folder name (Llama 3.2 text models: 32 and tied; everything else: 8, untied)."""
    folder = tmp_path / meta_folder
    folder.mkdir()
    shutil.copy(seed_model_dirs()[name] / "params.json", folder)
    hf = from_hf_config(seed_model_dirs()[name] / "config.json")
    assert _comparable(load_config(folder)) == _comparable(hf)


def test_meta_params_in_an_hf_repository_original_folder(tmp_path):
    """HF repositories keep Meta's files in original/ with config.json one level up."""
    repo = tmp_path / "some-fine-tune"
    (repo / "original").mkdir(parents=True)
    shutil.copy(seed_model_dirs()["llama3.2-1b"] / "config.json", repo)
    shutil.copy(seed_model_dirs()["llama3.2-1b"] / "params.json", repo / "original")
    cfg = load_config(repo / "original")
    assert cfg.rope_scaling.factor == 32.0 and cfg.tie_word_embeddings


def test_meta_params_without_any_release_hint_use_factor_8(tmp_path):
    """Nothing says which release it is: Meta's reference value (8), untied; a
    `rope_scaling_factor` key in params.json wins over everything."""
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    params = json.loads((seed_model_dirs()["llama3.2-1b"] / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps(params))
    cfg = load_config(folder)
    assert cfg.rope_scaling.factor == 8.0 and not cfg.tie_word_embeddings
    (folder / "params.json").write_text(json.dumps({**params, "rope_scaling_factor": 32}))
    assert load_config(folder).rope_scaling.factor == 32.0


def test_config_json_roundtrip_keeps_cross_attention():
    cfg = load_config(seed_model_dirs()["llama3.2-11b-vision"])
    assert ModelConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


# ------------------------------------------------------------------ bad configs
def _write(tmp_path: Path, data: dict, name="config.json") -> Path:
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def _qwen7b() -> dict:
    return json.loads((seed_model_dirs()["qwen2.5-7b"] / "config.json").read_text())


def _meta8b() -> dict:
    return json.loads((seed_model_dirs()["llama3.1-8b"] / "params.json").read_text())


_DROP = object()


def _edited(data: dict, **changes) -> dict:
    out = dict(data)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


BAD_HF = {
    "missing hidden_size": (dict(hidden_size=_DROP), ["missing field 'hidden_size'"]),
    "missing intermediate_size": (dict(intermediate_size=_DROP), ["missing field 'intermediate_size'"]),
    "missing vocab_size": (dict(vocab_size=_DROP), ["missing field 'vocab_size'"]),
    "heads wrong type": (dict(num_attention_heads="28"), ["num_attention_heads", "positive integer"]),
    "inconsistent head_dim": (dict(head_dim=96), ["head_dim 96", "28 heads", "hidden_size 3584"]),
    "odd head_dim": (dict(head_dim=127, architectures=["LlamaForCausalLM"], model_type="llama",
                          sliding_window=_DROP, use_sliding_window=_DROP, max_window_layers=_DROP),
                     ["head_dim 127", "even"]),
    "hidden not divisible by heads": (dict(hidden_size=3590), ["hidden_size 3590", "not divisible", "28"]),
    "heads not a multiple of kv heads": (dict(num_key_value_heads=3), ["(28)", "not a multiple", "(3)"]),
    "unsupported rope type (dynamic)": (dict(rope_scaling={"type": "dynamic", "factor": 2.0}),
                                        ["unsupported rope_scaling type 'dynamic'", "yarn"]),
    "unsupported rope type (longrope)": (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}),
                                         ["unsupported rope_scaling type 'longrope'"]),
    "rope without factor": (dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 32768}),
                            ["'yarn'", "needs a 'factor'"]),
    "rope factor not a number": (dict(rope_scaling={"type": "linear", "factor": "4"}),
                                 ["'factor' must be a number"]),
    "rope original not an integer": (dict(rope_scaling={"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 0.5}),
                                     ["original_max_position_embeddings", "positive integer"]),
    "unknown architecture": (dict(architectures=["GemmaForCausalLM"], model_type="gemma"),
                             ["unknown architecture", "GemmaForCausalLM"]),
    "not silu": (dict(hidden_act="gelu"), ["'hidden_act' = 'gelu'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_HF))
def test_bad_hf_config_fails_with_a_clear_line(case, tmp_path):
    changes, expected = BAD_HF[case]
    path = _write(tmp_path, _edited(_qwen7b(), **changes))
    with pytest.raises(ConfigError) as info:
        load_config(path.parent)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


BAD_META = {
    "missing dim": (dict(dim=_DROP), ["missing field 'dim'"]),
    "missing n_layers": (dict(n_layers=_DROP), ["missing field 'n_layers'"]),
    "missing multiple_of": (dict(multiple_of=_DROP), ["missing field 'multiple_of'"]),
    "dim not divisible by heads": (dict(n_heads=30), ["dim 4096", "not divisible", "30"]),
    "inconsistent head_dim": (dict(head_dim=64), ["head_dim 64", "inconsistent", "128"]),
    "heads not a multiple of kv heads": (dict(n_kv_heads=5), ["(32)", "not a multiple", "(5)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_bad_meta_params_fail_with_a_clear_line(case, tmp_path):
    changes, expected = BAD_META[case]
    path = _write(tmp_path, _edited(_meta8b(), **changes), name="params.json")
    with pytest.raises(ConfigError) as info:
        load_config(path.parent)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"


def test_bad_config_exits_2_from_the_cli(tmp_path, capsys):
    from compiler.cli import main

    path = _write(tmp_path, _edited(_qwen7b(), rope_scaling={"type": "dynamic", "factor": 2.0}))
    rc = main([str(path.parent), "--no-weights", "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unsupported rope_scaling type 'dynamic'" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ YaRN
YARN_CASES = {
    "qwen2.5 recipe": dict(factor=4.0, original_max_position_embeddings=32768, max_pos=131072,
                           theta=1e6, head_dim=128),
    "tiny": dict(factor=4.0, original_max_position_embeddings=64, max_pos=256, theta=10000.0, head_dim=32),
    "betas and mscale": dict(factor=8.0, original_max_position_embeddings=4096, max_pos=32768, theta=10000.0,
                             head_dim=64, beta_fast=16, beta_slow=2, mscale=0.707, mscale_all_dim=0.707),
    "attention factor, no truncation": dict(factor=2.0, original_max_position_embeddings=2048, max_pos=4096,
                                            theta=500000.0, head_dim=128, attention_factor=1.25,
                                            truncate=False),
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_frequencies_equal_transformers(case, tmp_path):
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(YARN_CASES[case])
    max_pos, theta, head_dim = params.pop("max_pos"), params.pop("theta"), params.pop("head_dim")
    scaling = {"rope_type": "yarn", **params}
    heads = 4
    hf_cfg = Qwen2Config(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=2,
                         head_dim=head_dim, max_position_embeddings=max_pos, rope_theta=theta,
                         rope_scaling=dict(scaling), intermediate_size=64, vocab_size=100,
                         num_hidden_layers=1)
    want_inv, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    path = _write(tmp_path, {"architectures": ["Qwen2ForCausalLM"], "hidden_size": heads * head_dim,
                             "num_attention_heads": heads, "num_key_value_heads": 2,
                             "intermediate_size": 64, "vocab_size": 100, "num_hidden_layers": 1,
                             "max_position_embeddings": max_pos, "rope_theta": theta,
                             "rope_scaling": scaling})
    cfg = load_config(path.parent)
    inv, scale = inv_freq_and_scale(cfg)
    torch.testing.assert_close(inv, want_inv.float(), rtol=1e-6, atol=0)
    assert math.isclose(scale, want_scale, rel_tol=1e-9)


def test_yarn_context_length_is_factor_times_original(tmp_path):
    """Qwen2.5's model card reaches 128k by adding yarn (factor 4, original 32768) to a
    config whose max_position_embeddings stays 32768."""
    data = _qwen7b()
    data["rope_scaling"] = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
    cfg = load_config(_write(tmp_path, data).parent)
    assert cfg.max_position_embeddings == 131072
    assert cfg.rope_scaling.kind == "yarn" and cfg.rope_scaling.factor == 4.0


YARN_TINY = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
YARN_TOKENS = list(range(5, 1000, 7))[:160]
YARN_PREFILL = 100  # prefill ends at position 99, decode runs to 141: all beyond 64


def test_compiled_yarn_qwen2_matches_hf_beyond_the_original_length(tiny_model, compile_artifact):
    import runtime

    path = tiny_model("qwen2-yarn", "qwen2", rope_scaling=dict(YARN_TINY), max_position_embeddings=256)
    plain = tiny_model("qwen2-plain256", "qwen2", max_position_embeddings=256)
    model, model_plain = hf_reference(path), hf_reference(plain)
    want = hf_logits(model, YARN_TOKENS)[YARN_PREFILL - 1: len(YARN_TOKENS) - 1].numpy()
    unscaled = hf_logits(model_plain, YARN_TOKENS)[YARN_PREFILL - 1: len(YARN_TOKENS) - 1].numpy()
    assert pcc(want, unscaled) < 0.99, "yarn should change these logits; the test would prove nothing"
    out = compile_artifact(path, optimizations="float32", max_seq_len=256)
    program = json.loads((out / "program.json").read_text())
    assert program["model"]["rope_scaling"]["kind"] == "yarn"
    got = runtime.load(out, matmul="exact").teacher_forced_logits(YARN_TOKENS, YARN_PREFILL)
    p = pcc(got, want)
    print(f"\nyarn tiny Qwen2, float32: teacher-forced PCC vs HF {p:.9f} over positions "
          f"{YARN_PREFILL - 1}..{len(YARN_TOKENS) - 2} (original length 64)")
    assert p > 0.99999
    assert float(np.abs(got - want).max()) <= 1e-3 * float(np.abs(want).max())


# Every field that would change the maths and is not implemented, set to a value that
# turns it on; plus fields the table does not know. Each is refused, naming the field.
from models_ref.fields import HF_FIELDS, OFF_ONLY  # noqa: E402

ON_VALUES = {"attention_bias": True, "mlp_bias": True, "attn_logit_softcapping": 50.0,
             "final_logit_softcapping": 30.0, "partial_rotary_factor": 0.5, "use_mrope": True,
             "quantization_config": {"quant_method": "gptq", "bits": 4}}
UNSUPPORTED = {**{name: {name: value} for name, value in ON_VALUES.items()},
               "unknown field": {"rope_magic": 2},
               "hidden_act gelu": {"hidden_act": "gelu_pytorch_tanh"},
               "mixed layer types": {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 14}}


def test_every_off_only_field_has_a_refusal_case():
    assert {n for n, f in HF_FIELDS.items() if f.status == OFF_ONLY} == set(ON_VALUES)


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_fields_are_refused_naming_the_field(case, tmp_path):
    changes = UNSUPPORTED[case]
    path = _write(tmp_path, _edited(_qwen7b(), **changes))
    with pytest.raises(ConfigError) as info:
        load_config(path.parent)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    field = "layer_types" if case == "mixed layer types" else next(iter(changes))
    assert f"'{field}'" in message, message


@pytest.mark.parametrize("name", ["qwen3-8b", "mistral-7b-v0.1"])
def test_off_values_and_implemented_fields_are_accepted(name):
    from models_ref.config import public_config_dirs
    cfg = load_config(public_config_dirs()[name])
    assert cfg.family == name.split("-")[0]
    assert (cfg.sliding_window, cfg.qk_norm) == ((4096, False) if name.startswith("mistral") else (None, True))
