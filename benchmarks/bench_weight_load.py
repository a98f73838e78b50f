"""Loading a program on the ttnn backend: without ttnn weight files, the first load (host
conversion, files written) and a second load (files read), each in a fresh process.

    .venv-ttnn/bin/python benchmarks/bench_weight_load.py OUT [OUT ...] [--rounds 3]

OUT are compiled artifacts (ttcompile ... -o OUT); without a card every load runs on the
mock mesh of the program's target. The entry of each program is deleted before each
round's first load (it is a cache: the first load writes it again). A load is what
runtime.load does: read the program, open the mesh, place weights and state; then the
warm-up (every function once). Prints the median over the rounds, in seconds: the whole
load, the weights' part of it, and the warm-up; and the entry's size on disk.
Timings on a shared 2-core machine are noisy; one ttnn process runs at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(artifact: str, files: bool) -> dict:
    from runtime.session import read_artifact
    from runtime.ttnn_backend import TtnnBackend

    start = time.perf_counter()
    program, manifest = read_artifact(artifact)
    backend = TtnnBackend(program, Path(manifest["weights"]), quiet=True, weight_files=files)
    load = time.perf_counter() - start
    warm = sum(backend.warm_up().values())
    weights_dir = Path(manifest["weights"])
    entry = backend.weight_files_entry(weights_dir).path  # also without files
    size = sum(p.stat().st_size for p in entry.iterdir()) if entry.is_dir() else 0
    result = {"load": load, "weights": backend.weight_load["seconds"], "warmup": warm,
              "from": backend.weight_load["from"], "entry": str(entry), "entry_bytes": size,
              "target": program.target, "weights_count": len(program.weights)}
    backend.close()
    return result


def run_child(artifact: str, files: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TT_METAL_")}
    done = subprocess.run([sys.executable, __file__, "--child", artifact, *([] if files else ["--no-files"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"load of {artifact} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-files", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.artifacts[0], not args.no_files)))
        return 0
    print("| program | target | weights | no weight files: load (weights) | first load: load (weights) | "
          "second load: load (weights) | warm-up (second) | entry on disk |")
    print("|---|---|---|---|---|---|---|---|")
    for artifact in args.artifacts:
        rows = {"none": [], "first": [], "second": []}
        for _ in range(args.rounds):
            rows["none"].append(run_child(artifact, False))
            shutil.rmtree(rows["none"][-1]["entry"], ignore_errors=True)
            rows["first"].append(run_child(artifact, True))
            rows["second"].append(run_child(artifact, True))
            assert rows["first"][-1]["from"] == "converted, ttnn files written", rows["first"][-1]
            assert rows["second"][-1]["from"] == "ttnn files", rows["second"][-1]

        def med(kind, key):
            return statistics.median(r[key] for r in rows[kind])

        last = rows["second"][-1]
        cells = [f"{med(k, 'load'):.2f} s ({med(k, 'weights'):.2f} s)" for k in ("none", "first", "second")]
        print(f"| {Path(artifact).name} | {last['target']} | {last['weights_count']} | {' | '.join(cells)} | "
              f"{med('second', 'warmup'):.2f} s | {last['entry_bytes'] / 1e6:.1f} MB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
