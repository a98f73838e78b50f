"""The memory planner (passes/memory_plan.py): arithmetic, verdicts, refusals, report.

- bytes per tensor: bfloat16 2 B a value, bfloat8_b 1088 B and bfloat4_b 576 B a tile;
- Llama-3.1-8B's plan on N150 and T3K equals the same sums written out by hand from the
  config (projection shapes, dtypes of performance mode, tile padding, local heads);
- the activation estimate is affine in the chunk and equals a direct walk of the graph
  propagated at another row count;
- a made-up 20B-shaped config gets the verdict its size implies, whatever it is called;
- refusals are one line (CLI exit 2) and say what fits: a larger target, a shorter
  --max-seq-len, a smaller --max-prefill-chunk, fewer --max-num-blocks;
- the default context is the largest that fits; Qwen2.5 with yarn compiles for 128k;
- `ttcompile --report` prints the table.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler.cli import main
from compiler.driver import CompileError, compile_model
from compiler.options import CompileOptions
from compiler.pipeline import run_pipeline
from compiler.targets import get_target
from compiler.trace import trace
from models_ref.config import load_config, seed_model_dirs
from compiler.memory import GB, MemoryPlan, device_bytes
from passes.memory_plan import _live_points
from runtime.blockfloat import bytes_for

SEEDS = seed_model_dirs()


def _plan(path, **options) -> MemoryPlan:
    return compile_model(path, CompileOptions(no_weights=True, **options)).plan


# ------------------------------------------------------------------ bytes per tensor
def test_bytes_per_dtype():
    assert device_bytes((64, 64), "bfloat16") == 64 * 64 * 2
    assert device_bytes((64, 64), "bfloat8_b") == 4 * 1088
    assert device_bytes((64, 64), "bfloat4_b") == 4 * 576
    assert device_bytes((33, 40), "bfloat8_b") == 4 * 1088  # padded to 64 x 64
    assert device_bytes((4096,), "bfloat16") == 4096 * 2  # a norm: [128, 32] ROW_MAJOR rows
    assert device_bytes((1, 100), "bfloat16") == 32 * 128 * 2  # a bias: one tile row high


# ------------------------------------------------------------------ a plan by hand
def _hand_8b(chips: int) -> dict:
    """Llama-3.1-8B, performance mode, bytes per chip, from the config by hand."""
    d, layers, hd, vocab = 4096, 32, 128, 128256
    q, kv = 32 // chips, max(8 // chips, 1)
    ffn = 14336 // chips
    attention = layers * (bytes_for((d, (q + 2 * kv) * hd), "bfloat8_b") + bytes_for((q * hd, d), "bfloat8_b"))
    mlp = layers * (2 * bytes_for((d, ffn), "bfloat4_b") + bytes_for((ffn, d), "bfloat8_b"))
    return {"attention": attention, "mlp": mlp, "embedding": vocab * d * 2,
            "lm_head": bytes_for((d, vocab // chips), "bfloat8_b"),
            "norms": (2 * layers + 1) * d * 2,
            "kv_per_token": layers * 2 * kv * hd * 1088 // 1024}


@pytest.mark.parametrize("target, chips", [("N150", 1), ("T3K", 8)])
def test_llama8b_plan_equals_the_sums_by_hand(target, chips):
    plan = _plan(SEEDS["llama3.1-8b"], target=target, max_seq_len=8192)
    hand = _hand_8b(chips)
    for category in ("attention", "mlp", "embedding", "lm_head", "norms"):
        assert plan.weights[category] == hand[category], category
    assert plan.kv_bytes_per_token == hand["kv_per_token"]
    assert plan.rope_bytes_per_position == 2 * 128 * 2  # cos and sin rows, bfloat16
    cats = plan.by_category()
    assert cats["kv_cache"] == hand["kv_per_token"] * plan.kv_tokens(8192) and plan.kv_tokens(8192) >= 8192
    print(f"\n8B on {target}: weights {sum(plan.weights.values()) / GB:.2f} GB per chip, "
          f"KV {plan.kv_bytes_per_token} B/token")


def test_activation_estimate_is_a_walk_of_the_graph():
    """The affine fit equals the live-set walk of the graph propagated at 256 rows."""
    cfg = load_config(SEEDS["llama3.2-1b"])
    options = CompileOptions(target="N300", no_weights=True, max_seq_len=4096)
    gm, ctx = trace(cfg, "prefill", get_target("N300"), options, 4096, layers=2)
    gm = run_pipeline(gm, ctx)
    plan = ctx.facts.memory
    ctx.propagate(gm, ctx.inputs_at(256))
    assert plan.activation_bytes(256) == max(_live_points(gm))
    # The MLP alone holds its input, w1 and w3 outputs and their product at once.
    local_ffn = 8192 // 2
    assert plan.activation_bytes(4096) >= 3 * 4096 * local_ffn * 2 + 4096 * 2048 * 2


# ------------------------------------------------------------------ verdicts from arithmetic
MADE_UP_20B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 6144, "intermediate_size": 16384,
    "num_attention_heads": 48, "num_key_value_heads": 8, "num_hidden_layers": 48,
    "vocab_size": 128256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
}


def _config_dir(tmp_path: Path, name: str, data: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def _params(data: dict) -> int:
    d, f, h, kv, layers, v = (data[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                 "num_key_value_heads", "num_hidden_layers", "vocab_size"))
    hd = d // h
    return layers * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f) + 2 * v * d


def test_made_up_20b_gets_the_verdict_its_size_implies(tmp_path):
    params = _params(MADE_UP_20B)
    assert 19e9 < params < 21e9
    path = _config_dir(tmp_path, "made-up-20b", MADE_UP_20B)
    with pytest.raises(CompileError) as info:
        _plan(path, target="N150")
    message = str(info.value)
    # performance mode: ~0.85 B a parameter (bfloat4_b/bfloat8_b projections, bfloat16
    # embedding) -> 16.3 GB of weights, plus the default page pool (32768 tokens x 102 KB)
    assert message.startswith("made-up-20b needs about 19 GB") and "on N150, which has 12 GB per chip" in message
    assert message.endswith("use N300 or T3K or TG"), message
    needed = float(message.split("about ")[1].split(" GB")[0])
    pool = 32768 * 48 * 2 * 8 * 128 * 1088 / 1024
    assert 0.75 * params / GB < needed - pool / GB < 0.9 * params / GB
    for target in ("N300", "T3K", "TG"):
        plan = _plan(path, target=target)
        weights = sum(plan.weights.values())
        chips = get_target(target).tp_size
        # split weights shrink with the chip count (on TG, 8 KV heads over 32 chips are
        # replicated and 48 q heads padded to 64); the bf16 embedding stays whole on each chip
        assert weights < 1.1 * params / chips + 6144 * 128256 * 2
        assert plan.context > 0 and plan.prefill_chunk >= 4096


def test_names_do_not_decide_verdicts(tmp_path):
    """The same 20B shape named like a seed model (the seed's chunk table and the lead's
    default table key on names) gets the same plan in performance mode."""
    plain = _plan(_config_dir(tmp_path, "made-up-20b", MADE_UP_20B), target="N300")
    disguised = _plan(_config_dir(tmp_path, "Llama3.1-8B", MADE_UP_20B), target="N300")
    assert plain.to_json() == {**disguised.to_json(), "target": plain.target}


def test_a_smaller_made_up_model_fits_everywhere(tmp_path):
    small = {**MADE_UP_20B, "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16,
             "num_hidden_layers": 20, "num_key_value_heads": 4}
    path = _config_dir(tmp_path, "made-up-1b", small)
    for target in ("N150", "N300", "T3K", "TG"):
        plan = _plan(path, target=target)
        assert plan.context == 32768 and plan.prefill_chunk == 32768


# ------------------------------------------------------------------ refusals and defaults
def _cli(tmp_path, model, *extra) -> tuple[int, str, str]:
    out = tmp_path / "out"
    rc = main([str(model), "--no-weights", "-o", str(out), "-q", *extra])
    return rc, str(out)


def test_refusal_exits_2_with_one_line(tmp_path, capsys):
    rc, out = _cli(tmp_path, SEEDS["llama3.1-70b"], "--target", "N300")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and not Path(out).exists()
    assert "llama3.1-70b needs about 30 GB per chip on N300, which has 12 GB per chip; use T3K or TG" in err


def test_too_long_a_context_says_the_longest_that_fits(tmp_path, capsys):
    rc, _ = _cli(tmp_path, SEEDS["llama3.1-8b"], "--target", "N150", "--max-seq-len", "131072")
    err = capsys.readouterr().err
    fits = _plan(SEEDS["llama3.1-8b"], target="N150").max_context  # 72k-74k: 128k does not fit
    assert 64 * 1024 <= fits < 128 * 1024
    assert rc == 2 and "--max-seq-len 131072" in err and f"the largest context that fits is {fits}" in err
    assert _plan(SEEDS["llama3.1-8b"], target="N150", max_seq_len=fits).context == fits


def test_too_large_a_chunk_says_the_largest_that_fits(tmp_path, capsys):
    rc, _ = _cli(tmp_path, SEEDS["llama3.1-8b"], "--target", "N150", "--max-seq-len", "65536",
                 "--max-prefill-chunk", "65536")
    err = capsys.readouterr().err
    assert rc == 2 and "65536-token prefill chunk" in err and "the largest chunk that fits is 8192" in err


def test_too_large_a_page_pool_says_how_many_blocks_fit(tmp_path, capsys):
    rc, _ = _cli(tmp_path, SEEDS["llama3.1-8b"], "--target", "N150", "--max-seq-len", "4096",
                 "--max-num-blocks", "8192", "--block-size", "64")
    err = capsys.readouterr().err
    assert rc == 2 and "KV page pool (8192 blocks" in err and "use --max-num-blocks" in err
    fit = int(err.split("use --max-num-blocks ")[1].split()[0])
    assert _plan(SEEDS["llama3.1-8b"], target="N150", max_seq_len=4096, max_num_blocks=fit, block_size=64)
    with pytest.raises(CompileError):
        _plan(SEEDS["llama3.1-8b"], target="N150", max_seq_len=4096, max_num_blocks=fit + 8, block_size=64)


def test_default_context_is_the_largest_that_fits():
    result = compile_model(SEEDS["llama3.1-8b"], CompileOptions(target="N150", no_weights=True))
    plan = result.plan
    assert result.program.options["max_seq_len"] == plan.context == plan.max_context
    assert plan.context % 2048 == 0 and plan.fits(plan.context, 4096)
    assert not plan.fits(plan.context + 2048, 4096)
    # the rope tables are compiled for exactly that context
    assert result.program.weights["rope_cos"]["shape"][0] == plan.context


def test_explicit_context_and_batch_scale_the_kv_cache():
    one = _plan(SEEDS["llama3.2-1b"], target="N150", max_seq_len=32768)
    many = _plan(SEEDS["llama3.2-1b"], target="N150", max_seq_len=32768, batch_size=16)
    # KV for batch x context tokens, or the page pool when that is larger (one user: the
    # pool holds at least 1024 blocks, and one block more than a user's page-table row)
    assert many.by_category()["kv_cache"] == 16 * 32768 * many.kv_bytes_per_token
    assert one.by_category()["kv_cache"] == one.kv_tokens(32768) * one.kv_bytes_per_token
    assert 32768 <= one.kv_tokens(32768) <= 32768 + 32
    # one user reaches the model's 128k; 16 users share what is left after the weights
    assert one.max_context == 131072
    free = many.dram_bytes - many.fixed_bytes() - many.activation_bytes(4096)
    assert many.max_context == free // (16 * many.kv_bytes_per_token + many.rope_bytes_per_position) // 2048 * 2048


def test_qwen25_with_yarn_compiles_for_128k(tmp_path):
    data = json.loads((SEEDS["qwen2.5-7b"] / "config.json").read_text())
    data["rope_scaling"] = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}
    path = _config_dir(tmp_path, "qwen2.5-7b-yarn", data)
    for target in ("N300", "T3K", "TG"):
        result = compile_model(path, CompileOptions(target=target, no_weights=True))
        assert result.program.options["max_seq_len"] == result.plan.context == 131072
        assert result.program.model["rope_scaling"]["kind"] == "yarn"
    # One chip holds 7.0 GB of weights and bf16 KV (57 KB a token): 128k tokens (7.5 GB) do not fit.
    plan = _plan(path, target="N150")
    assert 65536 <= plan.context < 131072


def test_vision_plan_counts_the_image_side():
    """Llama 3.2 Vision on N300: the 8 cross-attention layers (sharded like a decoder
    layer: a text layer's bytes per chip each), the vision tower and projector, and the
    cross-attention caches (one user, 8 layers, K and V, 6432 positions of 4 KV heads per
    chip in the KV dtype) are all in the plan."""
    plan = _plan(SEEDS["llama3.2-11b-vision"], target="N300", max_seq_len=8192)
    text = _plan(SEEDS["llama3.1-8b"], target="N300", max_seq_len=8192)
    per_layer = (text.weights["attention"] + text.weights["mlp"]) // 32
    cross = plan.weights["cross_attention"]
    assert per_layer * 8 <= cross < per_layer * 8 + 8 * 64 * 1024  # + norms, q/k norms, gates
    assert 0.5 * GB < plan.weights["vision"] < 1.2 * GB  # 895M parameters, matmuls split over 2 chips
    assert plan.weights["cross_attention_cache"] == 16 * device_bytes((1, 4, 6432, 128), "bfloat8_b")
    assert plan.other_activation_bytes > 0  # the vision function's live set, beside the weights


def test_decode_bandwidth_estimate():
    plan = _plan(SEEDS["llama3.1-8b"], target="N150", max_seq_len=8192)
    step = sum(plan.weights[k] for k in ("attention", "mlp", "lm_head", "norms")) + plan.kv_bytes_per_token * 1024
    assert plan.decode_step_bytes(1024) == step
    assert plan.decode_tokens_per_s_per_user(1024) == pytest.approx(288e9 / step)
    assert 30 < plan.decode_tokens_per_s_per_user(1024) < 60  # the seed measures 28 t/s/u


def test_report(tmp_path, capsys):
    rc, _ = _cli(tmp_path, SEEDS["qwen2.5-7b"], "--target", "T3K", "--report")
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("memory plan: qwen2.5-7b on T3K (8 chips, 12 GB DRAM per chip)", "attention", "mlp",
                 "embedding", "kv_cache", "activations", "total", "max context", "32768 tok",
                 "max prefill chunk", "collectives per layer", "decode 2, prefill 2",
                 "decode tokens/s/user (estimate)", "weights by dtype"):
        assert text in out, text


def test_plan_json_round_trip():
    plan = _plan(SEEDS["llama3.2-3b"], target="TG", max_seq_len=16384)
    again = MemoryPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    assert again.by_category() == plan.by_category()
