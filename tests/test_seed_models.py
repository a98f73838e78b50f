"""Every seed model on every target, weight-free: verdicts and chunk sizes.

All 36 Wormhole (model, target) combinations are compiled once, as `ttcompile CONFIG
--target T --no-weights` does (benchmarks/bench_seed_compile.py times them), and the 27
Blackhole ones (P150, P300, P150X4: rows of the same target table). The verdicts and decisions come from the memory
planner's arithmetic; here they are compared with the seed's statements (its README's
support list and chunk-size table, ../shared/notes/anchors.md section 3). Where we
differ, the README section "Seed models: verdicts against the seed" explains why with the
numbers; this file pins each difference so that a change to the arithmetic shows up.
"""
from __future__ import annotations

import json
import time

import pytest

from compiler.driver import CompileError, compile_model
from compiler.options import CompileOptions
from models_ref.config import seed_model_dirs

pytestmark = pytest.mark.slow  # compiles 9 models x 7 targets (about 50 s)

TARGETS = ("N150", "N300", "T3K", "TG")
K = 1024

# The seed's MAX_PREFILL_CHUNK_SIZES_DIV1024 (None: the seed does not support it there).
SEED_CHUNKS = {
    "llama3.2-1b": {"N150": 128, "N300": 128, "T3K": 128, "TG": 128},
    "llama3.2-3b": {"N150": 8, "N300": 128, "T3K": 128, "TG": 128},
    "llama3.1-8b": {"N150": 4, "N300": 64, "T3K": 128, "TG": 128},
    "llama3.2-11b-vision": {"N150": 4, "N300": 64, "T3K": 128, "TG": 128},
    "llama3.1-70b": {"N150": None, "N300": None, "T3K": 32, "TG": 128},
    "deepseek-r1-distill-llama-70b": {"N150": None, "N300": None, "T3K": 32, "TG": 128},
    "qwen2.5-7b": {"N150": 4, "N300": 32, "T3K": None, "TG": None},
    "qwen2.5-72b": {"N150": None, "N300": None, "T3K": 16, "TG": None},
    "qwq-32b": {"N150": None, "N300": None, "T3K": 64, "TG": None},
}

# Where our planner's chunk (in K tokens) differs from the seed's, and why (README).
OUR_CHUNK_DIFFERENCES = {
    ("llama3.2-3b", "N150"): 16,  # our activations at 16k fit beside 128k of KV; the seed keeps 8k
    # Llama 3.2 Vision with its image side: the vision tower (0.95 GB per chip on N300: its
    # tables, patch embedding and projector are replicated) and the cross-attention layers
    # (0.64 GB) beside the text model; a 32k chunk's activations would not fit
    ("llama3.2-11b-vision", "N300"): 16,
    ("llama3.1-70b", "T3K"): 16,  # embedding table replicated on every chip (2 GB), seed shards it
    ("llama3.1-70b", "TG"): 64,  # residual stream replicated (seed: split over 4 columns)
    ("deepseek-r1-distill-llama-70b", "T3K"): 16,
    ("deepseek-r1-distill-llama-70b", "TG"): 64,
    ("qwen2.5-7b", "N150"): 16,  # fits: 7.0 GB of weights + 1.75 GB of bf16 KV at 32k
    ("qwen2.5-72b", "T3K"): 32,  # context is 32k (the model's maximum), so KV is small
    ("qwq-32b", "T3K"): 32,  # embedding replicated (1.5 GB); context 40k (current config)
}
# Combinations the seed does not support that compile here (head padding, more chips).
OUR_EXTRA_SUPPORT = {("qwen2.5-7b", "T3K"), ("qwen2.5-7b", "TG"), ("qwen2.5-72b", "TG"), ("qwq-32b", "TG")}


@pytest.fixture(scope="module")
def all_results():
    results, seconds = {}, {}
    for name, path in seed_model_dirs().items():
        for target in TARGETS:
            start = time.perf_counter()
            try:
                results[name, target] = compile_model(path, CompileOptions(target=target, no_weights=True))
            except CompileError as e:
                results[name, target] = e
            seconds[name, target] = time.perf_counter() - start
    return results, seconds


def test_all_36_combinations_compile_or_are_refused(all_results):
    results, seconds = all_results
    assert len(results) == 36
    assert sum(not isinstance(r, Exception) for r in results.values()) == 28
    total = sum(seconds.values())
    slowest = max(seconds, key=seconds.get)
    print(f"\n36 weight-free compiles in {total:.1f} s (slowest {slowest}: {seconds[slowest]:.2f} s)")


# Blackhole (32 GB per chip): (context, prefill chunk) in K tokens, or None for a refusal.
# The README's verdict table shows the same; the arithmetic is the same planner's.
BLACKHOLE = {
    "llama3.2-1b": ((128, 128), (128, 128), (128, 128)),
    "llama3.2-3b": ((128, 128), (128, 128), (128, 128)),
    "llama3.1-8b": ((128, 128), (128, 128), (128, 128)),
    "llama3.2-11b-vision": ((128, 64), (128, 128), (128, 128)),
    "llama3.1-70b": (None, (46, 4), (128, 128)),
    "deepseek-r1-distill-llama-70b": (None, (46, 4), (128, 128)),
    "qwen2.5-7b": ((32, 32), (32, 32), (32, 32)),
    "qwen2.5-72b": (None, (32, 4), (32, 32)),
    "qwq-32b": ((40, 8), (40, 32), (40, 32)),
}


def test_blackhole_verdicts():
    for name, path in seed_model_dirs().items():
        if name not in BLACKHOLE:
            continue
        for target, expected in zip(("P150", "P300", "P150X4"), BLACKHOLE[name]):
            try:
                plan = compile_model(path, CompileOptions(target=target, no_weights=True)).plan
                got = (plan.context // K, plan.prefill_chunk // K)
            except CompileError as e:
                assert "32 GB per chip" in str(e) and "use P300" in str(e), str(e)  # same-arch suggestions
                got = None
            assert got == expected, (name, target, got)


def test_verdicts_agree_with_the_seed_support_statements(all_results):
    results, _ = all_results
    for (name, target), result in results.items():
        seed_supports = SEED_CHUNKS[name][target] is not None
        ours = not isinstance(result, Exception)
        if (name, target) in OUR_EXTRA_SUPPORT:
            assert ours and not seed_supports
        else:
            assert ours == seed_supports, (name, target, result)


def test_refusals_say_what_fits(all_results):
    results, _ = all_results
    for (name, target), result in results.items():
        if isinstance(result, Exception):
            message = str(result)
            assert "\n" not in message
            assert message.startswith(f"{name} needs about ") and f"GB per chip on {target}" in message
            assert message.endswith("use T3K or TG"), message


def test_chunk_sizes_against_the_seed_table(all_results):
    results, _ = all_results
    for (name, target), result in results.items():
        if isinstance(result, Exception):
            continue
        ours = result.plan.prefill_chunk
        assert result.program.options["prefill_chunk"] == ours
        expected = OUR_CHUNK_DIFFERENCES.get((name, target), SEED_CHUNKS[name][target])
        if expected is None:  # supported here only (head padding, more chips)
            continue
        assert ours == expected * K, (name, target, ours // K, expected)


def test_contexts(all_results):
    """The seed: 128k everywhere it runs, except 8B and 11B on N150 (64k)."""
    results, _ = all_results
    for (name, target), result in results.items():
        if isinstance(result, Exception):
            continue
        plan = result.plan
        model_max = plan.model_max_context
        if (name, target) == ("llama3.1-8b", "N150"):
            assert 64 * K <= plan.context < 128 * K  # 72k: 128k does not fit, 64k does
        elif (name, target) == ("llama3.2-11b-vision", "N150"):
            assert 24 * K <= plan.context < 32 * K  # vision tower + cross-attention layers: 2.7 GB
        else:
            assert plan.context == model_max, (name, target, plan.context)
        assert result.program.options["max_seq_len"] == plan.context


def test_qwen7b_compiles_with_head_padding_on_t3k_and_tg(all_results):
    results, _ = all_results
    for target, padded in (("T3K", 4), ("TG", 4)):
        program = results["qwen2.5-7b", target].program
        # 28 heads over 8 chips: 4 KV heads, each shared by 2 chips with 4 q heads apiece (one padded).
        assert program.mesh_shape in ([1, 8], [8, 4])
        create = next(op for op in program.functions["decode"].ops
                      if op.op == "ttnn.experimental.nlp_create_qkv_heads_decode")
        assert create.kwargs["num_heads"] * (8 if target == "T3K" else 32) >= 28
    assert results["qwen2.5-7b", "T3K"].counters["prefill.shard.padded_q_heads"] == padded


def test_every_program_carries_its_plan(all_results):
    results, _ = all_results
    result = results["llama3.1-8b", "N300"]
    data = json.loads(result.program.dumps())["memory_plan"]
    assert data["target"] == "N300" and data["context"] == result.plan.context
    assert set(data["summary"]["bytes_per_chip"]) >= {"attention", "mlp", "embedding", "kv_cache", "activations"}


# Families added beside the seed (Qwen3, Mistral), every target of the table: (context,
# chunk) in K tokens or None for a refusal. Same planner, same README table.
ADDED = {
    "qwen3-4b": ((40, 32), (40, 32), (40, 32), (40, 32), (40, 32), (40, 32), (40, 32)),
    "qwen3-8b": ((40, 16), (40, 32), (40, 32), (40, 32), (40, 32), (40, 32), (40, 32)),
    "qwen3-32b": (None, None, (40, 32), (40, 32), (40, 8), (40, 32), (40, 32)),
    "mistral-7b-v0.1": ((32, 32),) * 7,
    "mistral-7b-v0.3": ((32, 32),) * 7,
}


def test_added_families_verdicts():
    from compiler.targets import TARGETS as ALL
    from models_ref.config import public_config_dirs

    dirs = public_config_dirs()
    for name, expected_row in ADDED.items():
        for target, expected in zip(ALL, expected_row):
            try:
                result = compile_model(dirs[name], CompileOptions(target=target, no_weights=True))
                got = (result.plan.context // K, result.plan.prefill_chunk // K)
            except CompileError as e:
                assert "GB per chip" in str(e), str(e)
                got = None
            assert got == expected, (name, target, got)
