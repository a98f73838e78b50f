"""Real weights: SmolLM2-135M-Instruct through the compiled N150 program on the emulator,
against Hugging Face transformers float32 on the same (bfloat16, dequantised-from-GGUF)
weights.

Teacher forcing over real English text (the preamble and first sections of the GPL-3
from /usr/share/common-licenses), tokenized with the artifact's own tokenizer: 64 tokens
of prefill, then decode steps feeding the reference tokens, 256 predictions in all.

Token agreement is defined as in tt-metal's accuracy tables (models/tt_transformers
PERF.md and its test_accuracy / reference .refpt files): the reference stores HF's top-5
next tokens at every position; the device's prediction is its argmax;
  top-1 = fraction of positions where the program's argmax == HF's argmax,
  top-5 = fraction of positions where the program's argmax is among HF's 5 highest logits.
The mirror figure (HF's argmax among the program's top 5) and the logits PCC are printed
too, for information. Run with -s to see all figures.

Each mode is compiled once per session (the conftest memoises compiles).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime import accuracy

pytestmark = pytest.mark.slow  # the real 135M model: tens of seconds per accuracy run

PREFILL = 64
PREDICTIONS = 256
MAX_SEQ_LEN = 512
TEXT_FILE = Path("/usr/share/common-licenses/GPL-3")


def _english_text() -> str:
    """GPL-3 from its Preamble on, with the hard line wrapping undone (paragraphs kept)."""
    text = TEXT_FILE.read_text()
    return accuracy.plain_text(text[text.index("Preamble"):])


@pytest.fixture(scope="module")
def smollm2_artifact(smollm2_dir, compile_artifact):
    def get(mode, target="N150"):
        # A small page pool (64 blocks = 2048 tokens, 4x one user): the emulator holds a pool
        # per chip, and 1024 blocks x 60 caches x 32 chips would be 8 GB on TG.
        return compile_artifact(smollm2_dir, optimizations=mode, max_seq_len=MAX_SEQ_LEN, target=target,
                                max_num_blocks=64)
    return get


@pytest.fixture(scope="module")
def program_rows(smollm2_artifact, text_tokens):
    """(mode, target, predictions) -> teacher-forced logits, memoised per module."""
    memo = {}

    def get(mode, target="N150", predictions=PREDICTIONS):
        key = (mode, target, predictions)
        if key not in memo:
            session = runtime.load(smollm2_artifact(mode, target))
            memo[key] = session.teacher_forced_logits(text_tokens[:PREFILL + predictions], PREFILL)
        return memo[key]
    return get


@pytest.fixture(scope="module")
def text_tokens(smollm2_artifact):
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(smollm2_artifact("accuracy"))  # the artifact's copy
    ids = tokenizer.encode(_english_text())
    assert len(ids) >= PREFILL + PREDICTIONS, "text too short"
    return ids[:PREFILL + PREDICTIONS]


@pytest.fixture(scope="module")
def hf_rows(smollm2_dir, text_tokens) -> np.ndarray:
    """HF float32 logits aligned with Session.teacher_forced_logits rows."""
    assert accuracy.PREFILL == PREFILL
    return accuracy.hf_logits(smollm2_dir, text_tokens, PREFILL)


def token_agreement(program: np.ndarray, reference: np.ndarray, text_tokens) -> dict:
    """tt-metal's top-1 / top-5 (see the module docstring), plus figures for information."""
    return accuracy.token_agreement(program, reference, text_tokens[PREFILL:])


def _measure(mode, program_rows, text_tokens, hf_rows) -> dict:
    got = program_rows(mode)
    assert got.shape == hf_rows.shape == (PREDICTIONS, 49152)
    figures = token_agreement(got, hf_rows, text_tokens)
    print(f"\nSmolLM2-135M-Instruct N150 {mode}: top-1 {figures['top1']:.3f}, top-5 {figures['top5']:.3f} "
          f"over {figures['n']} teacher-forced tokens (HF argmax in program top-5 "
          f"{figures['hf_argmax_in_program_top5']:.3f}; logits PCC {figures['pcc']:.5f}; "
          f"next-token accuracy on the text: program {figures['program_vs_text']:.3f}, HF {figures['hf_vs_text']:.3f})")
    return figures


# Bounds sit below the spread measured across CPU kernels and thread counts (oneDNN's
# bfloat16 GEMMs round differently per ISA): on this machine with ONEDNN_MAX_CPU_ISA =
# default / AVX512_CORE_BF16 / AVX512_CORE / AVX2 and 1 or 2 threads, accuracy mode gave
# top-1 0.949-0.961, top-5 1.000, PCC 0.99937-0.99939; performance mode top-1 0.797-0.813,
# top-5 0.996, PCC 0.9654-0.9656 (an AMX machine gave 0.949 accuracy top-1).
# With matmuls at the device's math fidelity (runtime.load's default since; their results
# no longer depend on the CPU): accuracy top-1 0.953, top-5 1.000, PCC 0.99937; performance
# 0.812, 0.996, 0.96485 (benchmarks/bench_fidelity.py, 2 threads). The bounds hold.
def test_accuracy_mode_token_agreement(program_rows, text_tokens, hf_rows):
    figures = _measure("accuracy", program_rows, text_tokens, hf_rows)
    assert figures["top1"] >= 0.93
    assert figures["top5"] >= 0.99
    assert figures["pcc"] >= 0.998


def test_performance_mode_token_agreement(program_rows, text_tokens, hf_rows):
    figures = _measure("performance", program_rows, text_tokens, hf_rows)
    # Only a loose sanity bound: performance mode puts MLP w1/w3 in bfloat4_b. The
    # reference's performance-mode figures for Llama are ~0.8-0.9 top-1 (Llama-3.2-1B on
    # N150: 79/97 top-1/top-5, Llama-3.2-3B: 89/98; anchors.md, tt-metal PERF.md).
    assert figures["top1"] >= 0.7
    assert figures["top5"] >= 0.97
    assert figures["pcc"] >= 0.95


def test_capital_of_france(smollm2_artifact):
    (answer,) = runtime.run(["What is the capital of France?"], program=smollm2_artifact("accuracy"),
                            max_generated_tokens=20)
    print(f"\nWhat is the capital of France? -> {answer!r}")
    assert "Paris" in answer


# Sharded programs differ from one chip only by float rounding (float32 programs agree to
# PCC 1 - 1e-12), but 30 layers of bfloat16 rounding flip near-tie tokens either way: over
# 128 tokens top-1 moved by up to 0.03 in both directions, over 256 by 0.008 (0.016 in
# all: N150 0.957, T3K 0.949, TG 0.965). So the full 256 rows, and a bound of 0.03.
MESH_PREDICTIONS = PREDICTIONS


@pytest.mark.slow
@pytest.mark.parametrize("target", ["T3K", "TG"])
def test_sharded_program_agrees_with_hf_like_n150(program_rows, text_tokens, hf_rows, target):
    """SmolLM2 (9 heads, 3 KV heads: padded heads, replicated KV heads) on 8 and 32 chips:
    top-1 agreement with HF within 0.03 of the single-chip program's on the same tokens."""
    reference = hf_rows[:MESH_PREDICTIONS]
    tokens = text_tokens[:PREFILL + MESH_PREDICTIONS]
    single = token_agreement(program_rows("accuracy", "N150", MESH_PREDICTIONS), reference, tokens)
    sharded = token_agreement(program_rows("accuracy", target, MESH_PREDICTIONS), reference, tokens)
    print(f"\nSmolLM2 accuracy {target}: top-1 {sharded['top1']:.3f} (N150 {single['top1']:.3f}), "
          f"top-5 {sharded['top5']:.3f} (N150 {single['top5']:.3f}) over {MESH_PREDICTIONS} tokens")
    assert abs(sharded["top1"] - single["top1"]) <= 0.03


# ---------------------------------------------------------------- --precision auto
def _weight_bytes(program, dtype: str | None = None) -> int:
    """Device bytes of the weights the precision search chooses for (decoder matmul weights
    and the LM head), as the program stores them (or all in `dtype`)."""
    from runtime.blockfloat import bytes_for
    return sum(bytes_for(spec["shape"], dtype or spec["dtype"]) for name, spec in program.weights.items()
               if name == "output.weight" or (name.startswith("layers.") and ".w" in name))


@pytest.fixture(scope="module")
def auto_artifact(smollm2_dir, compile_artifact):
    """SmolLM2 with --precision auto --min-top1 0.90, calibrated on the shipped text (not GPL-3)."""
    return compile_artifact(smollm2_dir, precision="auto", min_top1=0.90, max_seq_len=MAX_SEQ_LEN,
                            max_num_blocks=64)


# The bar: top-1 >= 0.90 and top-5 >= 0.99 against HF float32 on a text the search
# never saw (GPL-3; it calibrates on runtime/presets/calibration.txt), keeping >= 85% of
# performance mode's weight-byte saving over bfloat16. Measured (emulator, fidelity
# emulated; the search chose the same plan with 1 and 2 torch threads, and the device
# matmuls do not depend on them): GPL-3 top-1 0.934, top-5 1.000, PCC 0.99454; 85.7% of
# performance's saving; calibration top-1 0.938 (bound 0.90 + margin 0.035). Apache-2.0,
# also unseen: 0.926 / 1.000 / 0.99725. With exact matmuls, GPL-3: 0.926 / 1.000 / 0.99426.
# (Margin 0.03 chose one w1/w3 and one wo more: GPL-3 top-1 0.918, 86.3% of the saving.)
def test_auto_precision_keeps_top1_on_another_text_and_most_of_the_performance_saving(
        auto_artifact, smollm2_artifact, text_tokens, hf_rows):
    session = runtime.load(auto_artifact)
    figures = token_agreement(session.teacher_forced_logits(text_tokens, PREFILL), hf_rows, text_tokens)
    chosen = json.loads((auto_artifact / "precision.json").read_text())["chosen"]
    performance = runtime.load(smollm2_artifact("performance")).program
    sizes = {"bfloat16": _weight_bytes(session.program, "bfloat16"), "performance": _weight_bytes(performance),
             "auto": _weight_bytes(session.program)}
    kept = (sizes["bfloat16"] - sizes["auto"]) / (sizes["bfloat16"] - sizes["performance"])
    print(f"\nSmolLM2 --precision auto on GPL-3: top-1 {figures['top1']:.3f}, top-5 {figures['top5']:.3f}, "
          f"PCC {figures['pcc']:.5f}; weights {sizes} ({100 * kept:.1f}% of performance's saving); "
          f"{chosen['summary']}")
    assert session.program.precision["source"] == "auto"
    assert chosen["calibration_top1"] >= chosen["bound"] + chosen["margin"]
    assert figures["top1"] >= 0.90
    assert figures["top5"] >= 0.99
    assert figures["pcc"] >= 0.99
    assert kept >= 0.85


def test_ttrun_accuracy_prints_the_table_and_caches_the_reference(smollm2_artifact, smollm2_dir, tmp_path, capsys):
    from runtime import cli as ttrun

    program = smollm2_artifact("accuracy")
    text = tmp_path / "gpl.txt"
    text.write_text(_english_text())
    for cached in (False, True):
        rc = ttrun.main(["accuracy", "--program", str(program), "--reference", str(smollm2_dir),
                         "--text", str(text), "--tokens", "32"])
        out = capsys.readouterr().out
        assert rc == 0
        assert "| Model | Device | Optimizations | Top-1 (%) | Top-5 (%) | PCC | Tokens |" in out
        row = out.strip().splitlines()[-1].split("|")
        assert row[2].strip() == "N150" and row[3].strip() == "accuracy" and row[-2].strip() == "32"
        assert float(row[4]) >= 80 and float(row[5]) >= 95
        assert len(list(Path(program).glob("reference-*.safetensors"))) == 1
