"""SmolLM2-135M on TG as 1, 2 and 4 processes (runtime/emulator/ranks.py): time per decode
token and RSS per rank, beside the single process.

    .venv/bin/python benchmarks/bench_ranks.py [--steps 16] [--ranks 2 4]
    .venv/bin/python benchmarks/bench_ranks.py --plan OUT [--ranks 1 4 8 32]

--plan: what each rank of OUT (a program, weights not needed) would hold, as the emulator
holds it (`held_per_rank`); checked against EmulatorBackend.weight_bytes on SmolLM2.

Every process runs torch with one thread (the launcher's share of 2 cores for 2 or more
ranks; the single process is timed with 1 and with 2 threads). Each rank prefills the
same 128 tokens, then decodes `steps` tokens greedily; rank 0's wall and CPU seconds per
step are printed (the ranks step together), and every rank's RSS after decode.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_emulator import PROMPT, ensure_program, rss_mb  # noqa: E402


def worker(program: str, steps: int, dest: str) -> None:
    """One process (a rank when torchrun's variables are set): figures to DEST.rank<R>.json."""
    import numpy as np

    import runtime
    from runtime.emulator.ranks import RankConfig, RankGroup

    config = RankConfig.from_env(os.environ)
    group = RankGroup(config) if config else None
    start = time.perf_counter()
    session = runtime.load(program, ranks=group)
    load_s = time.perf_counter() - start
    logits = session.prefill(PROMPT, 0)
    tokens = np.zeros(session.batch_size, dtype=np.int64)
    positions = np.full(session.batch_size, -1, dtype=np.int64)
    tokens[0], positions[0] = int(logits.argmax()), len(PROMPT)
    session.decode(tokens, positions)  # the first step's lazy set-up out of the timing
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        positions[0] = len(PROMPT) + 1 + i
        tokens[0] = session.decode(tokens, positions)[0].argmax()
    rank = group.rank if group else 0
    figures = {"load_s": load_s, "decode_s": (time.perf_counter() - wall) / steps,
               "decode_cpu_s": (time.process_time() - cpu) / steps, "rss_mb": rss_mb(),
               "weights_mb": {k: v / 2**20 for k, v in session.backend.weight_bytes().items()}, "last": int(tokens[0])}
    Path(f"{dest}.rank{rank}.json").write_text(json.dumps(figures))
    if group:
        group.close()


def held_per_rank(program, world: int) -> dict[str, float]:
    """Bytes one of `world` ranks holds for `program`, as the emulator holds them: a matmul
    weight as its [N, K] operand (bfloat16, float32 where the linear writes float32) plus,
    under an fp32 Dst, its float64 prepared weight (fidelity.prepare_weight: K doubled for
    HiFi3); other weights widened to float32; KV pools in bfloat16 (bfloat8_b is held as
    bfloat16), every block written (a full pool). Replicated weights once per rank."""
    from runtime.emulator.backend import EmulatorBackend
    from runtime.emulator.fidelity import Multiplier
    from runtime.emulator.ranks import RankLayout

    mesh = tuple(program.mesh_shape)
    chips = len(RankLayout.of(mesh, world).chips(0))
    linear = EmulatorBackend._linear_weight_names(program)
    configs = {}
    for fn in program.functions.values():
        for op in fn.ops:
            if op.op == "ttnn.linear" and isinstance(op.args[1], str) and op.args[1][1:] in linear:
                configs.setdefault(op.args[1][1:], set()).add(json.dumps(op.kwargs.get("compute_kernel_config")))
    held = {"sharded": 0.0, "replicated": 0.0, "kv": 0.0}
    for name, spec in program.weights.items():
        count = 1
        for d in spec["shape"]:
            count *= d
        placement = spec.get("placement") or {}
        parts = 1
        for axis in placement.get("axes") or []:
            parts *= mesh[axis]
        if name in linear:
            per = 4 if str(linear[name]) == "torch.float32" else 2
            for config in configs.get(name, ()):
                m = Multiplier.of(json.loads(config))
                if m.fp32_dest or not m.fidelity:
                    per += 8 * (2 if m.fidelity == "HiFi3" else 1)
        else:
            per = 4
        if placement.get("dim") is None:
            held["replicated"] += count * per
        else:
            held["sharded"] += count / parts * per * chips
    for spec in program.state.values():
        count = 1
        for d in spec.shape:
            count *= d
        parts = 1
        for axis in (spec.placement or {}).get("axes") or []:
            parts *= mesh[axis]
        held["kv"] += count / (parts if (spec.placement or {}).get("dim") is not None else 1) * 2 * chips
    return held


def plan(out: str, worlds: list[int]) -> None:
    from runtime.session import read_artifact

    program, _ = read_artifact(out)
    print(f"{out}: {program.target}, mesh {list(program.mesh_shape)}; GiB per rank as the emulator holds them")
    print("ranks | chips per rank | sharded weights | replicated weights | KV pools (full) | total")
    for world in worlds:
        h = {k: v / 2**30 for k, v in held_per_rank(program, world).items()}
        chips = program.mesh_shape[0] * program.mesh_shape[1] // world
        print(f"{world} | {chips} | {h['sharded']:.1f} | {h['replicated']:.1f} | {h['kv']:.1f} | {sum(h.values()):.1f}")


def run(program: Path, steps: int, world: int, threads: int, dest: Path) -> list[dict]:
    command = [sys.executable, __file__, "--worker", str(program), str(steps), str(dest)]
    if world == 1:
        subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    else:
        from runtime.emulator.launch import launch
        assert launch(command, world, env=dict(os.environ, OMP_NUM_THREADS=str(threads))) == 0
    return [json.loads(Path(f"{dest}.rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--single-threads", type=int, nargs="+", default=[1, 2], help="threads of the 1-process runs")
    parser.add_argument("--worker", nargs=3, metavar=("PROGRAM", "STEPS", "DEST"))
    parser.add_argument("--plan", metavar="OUT")
    args = parser.parse_args()
    if args.plan:
        plan(args.plan, args.ranks)
        return
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    program = ensure_program("TG")
    out = Path("build") / "bench-ranks"
    out.mkdir(parents=True, exist_ok=True)
    print(f"SmolLM2-135M TG, batch 1, {args.steps} decode steps after a 128-token prefill; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("processes x threads | decode s/token (wall) | CPU s/token (rank 0) | load s | RSS MB per process | "
          "weights MB per process (sharded + replicated)")
    runs = [(1, t) for t in args.single_threads] + [(n, 1) for n in args.ranks]
    for world, threads in runs:
        ranks = run(program, args.steps, world, threads, out / f"w{world}t{threads}")
        first = ranks[0]
        assert all(r["last"] == first["last"] for r in ranks)
        weights = first["weights_mb"]
        rss = " / ".join(f"{r['rss_mb']:.0f}" for r in ranks)
        print(f"{world} x {threads} | {first['decode_s']:.3f} | {first['decode_cpu_s']:.3f} | {first['load_s']:.1f} | "
              f"{rss} | {weights['sharded']:.0f} + {weights['replicated']:.0f}")


if __name__ == "__main__":
    main()
