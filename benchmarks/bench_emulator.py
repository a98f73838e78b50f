"""The emulator's speed and memory, each figure beside its baseline, from one run:

- SmolLM2-135M batch-1 decode and 512-token prefill on N150 vs HF transformers eager
  bfloat16 (sdpa) on the same weights; batch-32 decode total tokens/s vs batch-1;
- decode time per token and RSS of the N150, T3K and TG programs (each in its own process);
- the memory-bandwidth roofline of N150 decode: bytes the emulator reads per token (its
  matmul operands as held: int8 block mantissas, bfloat16, float32) / copy bandwidth
  measured in this run;
- start-up: a weight-free `ttcompile` of Llama 3.1 70B for TG, as a separate process.

    .venv/bin/python benchmarks/bench_emulator.py [--steps 16] [--rounds 3] [--skip-batch32]

Timings on a shared machine are noisy: contenders alternate over rounds; medians are
printed with the rounds. CPU seconds per token are printed too (less sensitive to load).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
PROMPT = list(range(1000, 1128))  # 128 tokens, as the seed's batch-1 preset


def ensure_program(target: str, batch: int = 1) -> Path:
    out = ROOT / "build" / f"bench-emulator-SmolLM2-{target}-b{batch}"
    if not (out / "program.json").exists():
        subprocess.run([sys.executable, "-m", "compiler.cli", str(MODEL), "--target", target, "--batch-size",
                        str(batch), "-o", str(out), "-q"], check=True, cwd=ROOT)
    return out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- worker (one process per program)
def worker(program: Path, steps: int, batch: int, prefill_len: int) -> dict:
    import numpy as np
    import torch

    import runtime
    from runtime.emulator import exact_gemm

    torch.set_num_threads(2)
    start = time.perf_counter()
    session = runtime.load(program)
    load_s = time.perf_counter() - start
    prompt = list(range(1000, 1000 + prefill_len))
    t0 = time.perf_counter()
    logits = session.prefill(prompt, 0)
    prefill_s = time.perf_counter() - t0
    users = min(batch, session.batch_size)
    for user in range(1, users):
        session.prefill(PROMPT, user)
    tokens = np.zeros(session.batch_size, dtype=np.int64)
    positions = np.full(session.batch_size, -1, dtype=np.int64)
    tokens[:users] = int(logits.argmax())
    positions[:users] = len(PROMPT)
    session.decode(tokens, positions)  # first step: lazy set-up out of the timing
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        positions[:users] = len(PROMPT) + 1 + i
        tokens[:users] = session.decode(tokens, positions)[:users].argmax(-1)
    wall, cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
    return {"load_s": load_s, "prefill_s": prefill_s, "decode_s": wall, "decode_cpu_s": cpu, "users": users,
            "rss_mb": rss_mb(), "bytes_per_token": operand_bytes(session.backend, "decode"),
            "matmuls": exact_gemm.status()}


def operand_bytes(backend, fn: str) -> int:
    """Bytes of the weights (as the emulator holds them: matmul operands) one call of
    `fn` reads; every chip's piece counted once."""
    seen, total = set(), 0
    for step in backend.steps[fn]:
        for kind, value in step.args[1:2] if step.op.op == "ttnn.linear" else []:
            if kind != "t":
                continue
            for piece in backend.env[value]:
                t = getattr(piece, "values", piece)
                if id(t) not in seen and t.data_ptr() not in seen:
                    seen.update((id(t), t.data_ptr()))
                    total += t.numel() * t.element_size()
    return total


def run_worker(program: Path, steps: int, batch: int = 1, prefill_len: int = len(PROMPT)) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(program), "--steps", str(steps),
                          "--batch", str(batch), "--prefill-len", str(prefill_len)],
                         check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- baselines
def hf_figures(steps: int, prefill_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    from bench_decode import hf_decode  # the same HF decode loop bench_decode.py times

    with torch.inference_mode():
        t0 = time.perf_counter()
        model(torch.tensor([list(range(1000, 1000 + prefill_len))]), use_cache=True)
        prefill_s = time.perf_counter() - t0
    return {"decode_s": 1 / hf_decode(model, PROMPT, steps), "prefill_s": prefill_s}


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write), best of five."""
    import torch

    src = torch.ones(64 << 20, dtype=torch.float64)  # 512 MB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def startup_seconds() -> float:
    seed = ROOT / "models_ref" / "seed_configs" / "llama3.1-70b"
    out = ROOT / "build" / "bench-startup-70b-TG"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compiler.cli", str(seed), "--target", "TG", "--no-weights",
                    "-o", str(out), "-q"], check=True, cwd=ROOT, capture_output=True)
    return time.perf_counter() - t0


def med(values):
    return statistics.median(values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-batch32", action="store_true")
    p.add_argument("--worker", type=Path)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefill-len", type=int, default=len(PROMPT))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.prefill_len)))
        return

    programs = {t: ensure_program(t) for t in ("N150", "T3K", "TG")}
    mesh = {t: [] for t in programs}
    hf, emu_prefill = [], []
    for _ in range(args.rounds):
        for target, program in programs.items():
            mesh[target].append(run_worker(program, args.steps))
        emu_prefill.append(run_worker(programs["N150"], 1, prefill_len=512)["prefill_s"])
        hf.append(hf_figures(args.steps, 512))
    n150 = mesh["N150"]
    e_dec, h_dec = med([r["decode_s"] for r in n150]), med([r["decode_s"] for r in hf])
    e_pre, h_pre = med(emu_prefill), med([r["prefill_s"] for r in hf])
    print(f"SmolLM2-135M, {args.steps} decode steps after a 128-token prompt, median of {args.rounds} rounds; "
          f"matmuls: {mesh['N150'][0]['matmuls']}")
    print(f"  batch-1 decode   emulator N150 {1 / e_dec:7.1f} tok/s  HF eager bf16 {1 / h_dec:7.1f} tok/s"
          f"  ratio {h_dec / e_dec:5.2f}x (goal >= 1.5x)")
    print(f"  512-token prefill emulator N150 {512 / e_pre:6.0f} tok/s  HF eager bf16 {512 / h_pre:7.0f} tok/s"
          f"  ratio {h_pre / e_pre:5.2f}x (goal >= 1.0x)")
    if not args.skip_batch32:
        b32 = run_worker(ensure_program("N150", 32), args.steps, batch=32)
        total = b32["users"] / b32["decode_s"]
        print(f"  batch-32 decode  {total:7.1f} tok/s total vs batch-1 {1 / e_dec:6.1f} tok/s"
              f"  ratio {total * e_dec:5.2f}x (goal >= 15x)")
    print("  mesh decode (s/token wall | CPU s/token | RSS after decode MB | load s):")
    for target, rows in mesh.items():
        d, c = med([r["decode_s"] for r in rows]), med([r["decode_cpu_s"] for r in rows])
        rss, load = med([r["rss_mb"] for r in rows]), med([r["load_s"] for r in rows])
        print(f"    {target:5s} {d:7.3f} | {c:7.3f} | {rss:7.0f} | {load:5.1f}   time vs N150 {d / e_dec:5.2f}x"
              f"  RSS vs N150 {rss / med([r['rss_mb'] for r in n150]):5.2f}x (goals <= 1.5x)")
    bandwidth = copy_bandwidth()
    per_token = n150[0]["bytes_per_token"]
    roof = bandwidth / per_token
    print(f"  roofline: {per_token / 1e6:.0f} MB of matmul operands read per decode token, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s -> {roof:.1f} tok/s; N150 reaches {1 / e_dec:.1f} ({(1 / e_dec) / roof:.0%})")
    print(f"  start-up: weight-free ttcompile of Llama 3.1 70B for TG {startup_seconds():.1f} s (goal < 3 s)")


if __name__ == "__main__":
    main()
