"""SmolLM2 batch-1 decode: the compiled program on the emulator vs HF transformers eager
(bfloat16, sdpa), side by side in one run. Prints tokens/s for both and their ratio.

    .venv/bin/python benchmarks/bench_decode.py [--program OUT] [--steps 64]

Timings on a shared 2-core machine are noisy: the script alternates the two contenders
over several rounds and reports the median of each.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def ensure_program(optimizations: str) -> Path:
    out = ROOT / "build" / f"bench-SmolLM2-N150-{optimizations}"
    if not (out / "program.json").exists():
        subprocess.run([sys.executable, "-m", "compiler.cli", str(MODEL), "--target", "N150",
                        "--optimizations", optimizations, "-o", str(out), "-q"], check=True, cwd=ROOT)
    return out


def emulator_decode(program: Path, prompt: list[int], steps: int) -> float:
    import runtime

    return decode_rate(runtime.load(program), prompt, steps)


def decode_rate(session, prompt: list[int], steps: int) -> float:
    """Batch-1 decode steps per second of an emulator session after a prefill of `prompt`."""
    session.backend.reset()
    token = int(session.prefill(prompt, 0).argmax())
    tokens = np.zeros(session.batch_size, dtype=np.int64)
    positions = np.zeros(session.batch_size, dtype=np.int64)
    start = time.perf_counter()
    for i in range(steps):
        tokens[0], positions[0] = token, len(prompt) + i
        token = int(session.decode(tokens, positions)[0].argmax())
    return steps / (time.perf_counter() - start)


def hf_decode(model, prompt: list[int], steps: int) -> float:
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, token = out.past_key_values, out.logits[0, -1].argmax()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
        return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--program", type=Path)
    p.add_argument("--optimizations", default="performance")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM

    program = args.program or ensure_program(args.optimizations)
    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    prompt = list(range(1000, 1128))  # 128-token prompt, as the seed's batch-1 preset
    emulator, baseline = [], []
    for _ in range(args.rounds):
        emulator.append(emulator_decode(program, prompt, args.steps))
        baseline.append(hf_decode(hf, prompt, args.steps))
    e, b = statistics.median(emulator), statistics.median(baseline)
    print(f"SmolLM2-135M batch-1 decode, {args.steps} steps after a 128-token prompt, median of {args.rounds}")
    print(f"  emulator ({program.name}): {e:6.1f} tokens/s   rounds {[round(x, 1) for x in emulator]}")
    print(f"  HF eager bf16 sdpa:        {b:6.1f} tokens/s   rounds {[round(x, 1) for x in baseline]}")
    print(f"  ratio emulator / HF:       {e / b:6.2f}x")


if __name__ == "__main__":
    main()
