"""SmolLM2 with the matrix unit's math fidelity emulated (matmul="device") and not
(matmul="exact"), side by side: teacher-forced top-1 / top-5 / logits PCC against HF
float32 (the measure and text of tests/test_real_model.py), and batch-1 decode speed.

    .venv/bin/python benchmarks/bench_fidelity.py [--modes accuracy performance] [--steps 16] [--rounds 3]

Timings on a shared 2-core machine are noisy: the two settings alternate over rounds and
the median of each is printed with their ratio.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_decode import decode_rate  # noqa: E402
from test_real_model import MAX_SEQ_LEN, PREDICTIONS, PREFILL, _english_text, token_agreement  # noqa: E402

MATMULS = ("device", "exact")


def ensure_program(mode: str) -> Path:
    """SmolLM2 for N150 in `mode`, compiled as tests/test_real_model.py compiles it."""
    from compiler import cli

    out = ROOT / "build" / f"bench-fidelity-SmolLM2-N150-{mode}"
    if not (out / "program.json").exists():
        argv = [str(MODEL), "--target", "N150", "--optimizations", mode, "--max-seq-len", str(MAX_SEQ_LEN),
                "--max-num-blocks", "64", "-o", str(out), "-q"]
        if cli.main(argv) != 0:
            raise SystemExit(f"compiling {mode} failed")
    return out


def hf_rows(tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    return logits[PREFILL - 1: len(tokens) - 1].numpy()


def main() -> None:
    import runtime
    from runtime.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["accuracy", "performance"])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    programs = {mode: ensure_program(mode) for mode in args.modes}
    tokens = Tokenizer.from_dir(programs[args.modes[0]]).encode(_english_text())[:PREFILL + PREDICTIONS]
    reference = hf_rows(tokens)
    print(f"SmolLM2-135M-Instruct N150, {PREDICTIONS} teacher-forced tokens vs HF float32; "
          f"decode: batch 1, {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} threads")
    for mode in args.modes:
        sessions = {m: runtime.load(programs[mode], matmul=m) for m in MATMULS}
        for matmul, session in sessions.items():
            f = token_agreement(session.teacher_forced_logits(tokens, PREFILL), reference, tokens)
            print(f"  {mode:<11} matmul={matmul:<6} top-1 {f['top1']:.3f}  top-5 {f['top5']:.3f}  "
                  f"PCC {f['pcc']:.5f}", flush=True)
        rates = {m: [] for m in MATMULS}
        for _ in range(args.rounds):  # alternate the two, so that load from elsewhere hits both
            for matmul, session in sessions.items():
                rates[matmul].append(decode_rate(session, tokens[:PREFILL], args.steps))
        del sessions
        gc.collect()
        device, exact = (statistics.median(rates[m]) for m in MATMULS)
        print(f"  {mode:<11} decode tok/s: device {device:.2f}, exact {exact:.2f}  "
              f"(device / exact {device / exact:.2f})", flush=True)


if __name__ == "__main__":
    main()
