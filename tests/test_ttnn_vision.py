"""Llama 3.2 Vision programs replayed through real ttnn 0.81.1 on the mock N300 and T3K.

A compiled Llama 3.2 Vision program has three functions: "vision" (one image of one user:
the tower, the projector, and every cross-attention layer's K/V written into that user's
row of the cross-attention caches), then "prefill" and "decode" (the text decoder, whose
gated cross-attention layers read those caches through host masks). TtnnBackend.validate()
replays them in that order with the host inputs the runtime gives (runtime/image_slots.py):
pixels and masks as float32 arrays (zeros), aspect ratio 1, user 0.

Two programs per target, replayed in one .venv-ttnn process (ttnn builds its mock cluster
once per process):
- a tiny random MllamaForConditionalGeneration (text 128 wide, 4 heads of 32, 2 KV heads,
  cross-attention at HF layers 1 and 3; vision 32 wide, 2 heads, 56-pixel tiles of 14-pixel
  patches, up to 4 tiles), with its weights;
- two full-width layers of each kind of the real 11B config, weight-free: self-attention,
  cross-attention, self-attention in the text decoder (4096 wide, 32/8 heads, 14336 MLP,
  the 128256 vocabulary); 2 local and 2 global vision layers (1280 wide, 16 heads of 80
  padded to 96, 560-pixel tiles: 4 x 1601 tokens padded to 6528), both taps, the projector.
Every op of every function issued (ops issued == ops in the program), zero ttnn errors, no
op over a core's L1; then each program's cross-attention caches zeroed for user 0 the way
the runtime clears a user without an image (TtnnBackend.zero_state_rows). Run with -s to
see ops per function and replay times.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_ttnn_backend import check_replayed, failures, replay_all, ttnn_python  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test replays through ttnn in another process

TEXT = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
            vocab_size=1000, num_hidden_layers=5, cross_attention_layers=[1, 3], rms_norm_eps=1e-5,
            max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=2,
              image_size=56, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3],
              vision_output_dim=96)
FUNCTIONS = ("vision", "prefill", "decode", "decode_logits")
MAX_SEQ_LEN = 2048
ZERO_ROW = 0  # the slot runtime/image_slots.py clears for a user without an image


@pytest.fixture(scope="module")
def tiny_mllama(tmp_path_factory) -> Path:
    """A tiny random HF Llama 3.2 Vision checkpoint (as tests/test_vision_ref.py builds it)."""
    from fixtures import random_mllama

    model = random_mllama(TEXT, VISION, TEXT["vocab_size"])
    path = tmp_path_factory.mktemp("tiny-mllama-ttnn")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mllama_11b_two_of_each(tmp_path_factory) -> Path:
    """The shipped 11B config with 3 text layers (cross-attention at 1, between two
    self-attention layers) and 2 local + 2 global vision layers, both tapped; every width
    and head count kept (vision_output_dim follows the taps: 1280 x (1 + 2))."""
    config = json.loads((ROOT / "models_ref" / "seed_configs" / "llama3.2-11b-vision" / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    text["num_hidden_layers"], text["cross_attention_layers"] = 3, [1]
    vision["num_hidden_layers"], vision["num_global_layers"] = 2, 2
    vision["intermediate_layers_indices"] = [0, 1]
    vision["vision_output_dim"] = vision["hidden_size"] * (1 + len(vision["intermediate_layers_indices"]))
    path = tmp_path_factory.mktemp("mllama-11b-x2") / "llama3.2-11b-vision-x2"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module", params=["N300", "T3K"])
def replayed(request, ttnn_python, tiny_mllama, mllama_11b_two_of_each, compile_artifact):  # noqa: F811
    """(target, results by label, stderr): both programs of one target compiled and replayed
    in one process (the larger first), their cross-attention caches zeroed at user 0 after."""
    target = request.param
    artifacts = {
        "llama3.2-11b-vision x2": compile_artifact(mllama_11b_two_of_each, no_weights=True, target=target,
                                                   max_seq_len=MAX_SEQ_LEN),
        "tiny-mllama": compile_artifact(tiny_mllama, target=target, max_seq_len=MAX_SEQ_LEN),
    }
    results, stderr = replay_all(ttnn_python, artifacts, "--zero-state-rows", str(ZERO_ROW))
    return target, results, stderr


def test_vision_prefill_and_decode_replay_every_op(replayed):
    target, results, stderr = replayed
    assert not failures(results), failures(results)
    for label, result in results.items():
        summary = check_replayed(result, stderr, target, FUNCTIONS)
        assert list(summary["functions"]) == list(FUNCTIONS)  # the image first: prefill reads its caches
        assert summary["l1"]["over_capacity"] == [], (label, summary["l1"]["over_capacity"])
        assert summary["memory_moves"] == [], (label, summary["memory_moves"])
        assert summary["weights"] == ("device" if "11b" in label else "host")
        vision, prefill, decode = (summary["functions"][f]["op_counts"] for f in FUNCTIONS[:3])
        cross_layers = 1 if "11b" in label else 2
        assert vision["ttnn.fill_cache"] == 2 * cross_layers  # K and V of every cross-attention layer
        assert vision["ttnn.transformer.scaled_dot_product_attention"] == (4 if "11b" in label else 6)
        assert prefill["ttnn.transformer.scaled_dot_product_attention"] == cross_layers
        assert decode["ttnn.transformer.scaled_dot_product_attention_decode"] == cross_layers
        print(f"\n{target} {label}: " + ", ".join(
            f"{f} {summary['functions'][f]['ops_issued']} ops in {summary['functions'][f]['seconds']:.2f} s"
            for f in FUNCTIONS))


def test_zero_state_rows_is_accepted(replayed):
    """A text-only user's cross-attention caches are zeroed row by row (one fill_cache from
    a zero row per cache); on a mock nothing is computed, so this checks ttnn accepts it."""
    _, results, _ = replayed
    assert not failures(results), failures(results)
    for label, result in results.items():
        cross_layers = 1 if "11b" in label else 2
        zeroed = result["zeroed"]
        assert zeroed["rows"] == [ZERO_ROW]
        assert sorted(zeroed["names"]) == sorted(f"cross_attention_layers.{i}.attention.{kv}_cache"
                                                 for i in range(cross_layers) for kv in "kv")
