"""Weight-free compilation of every seed model on every target: the table and the time.

    .venv/bin/python benchmarks/bench_seed_compile.py [--full-trace] [--out DIR]

For each of the nine shipped seed configs (models_ref/seed_configs) and each target it
runs what `ttcompile CONFIG_DIR --target T --no-weights` runs (compile, then write the
artifact), in one process, and prints: ok or refused (with the planner's reason), prefill
and decode op counts, the planned context and prefill chunk, bytes per chip, seconds.
The total excludes interpreter start-up and imports (printed separately): a shell loop
of 36 `ttcompile` processes pays those 36 times.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-trace", action="store_true", help="trace every layer (no stamping)")
    parser.add_argument("--out", help="keep the artifacts here (default: a temporary folder)")
    parser.add_argument("--targets", default="N150,N300,T3K,TG")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    from compiler.artifact import write_artifact
    from compiler.driver import compile_model
    from compiler.options import CompileOptions
    from models_ref.config import seed_model_dirs
    imports = time.perf_counter() - t0

    targets = args.targets.split(",")
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="seed-compile-"))
    header = f"{'model':<30} {'target':<6} {'verdict':<8} {'prefill':>7} {'decode':>6} " \
             f"{'context':>8} {'chunk':>7} {'GB/chip':>7} {'seconds':>7}"
    print(header)
    print("-" * len(header))
    total, rows, refusals = 0.0, 0, []
    for name, config_dir in seed_model_dirs().items():
        for target in targets:
            start = time.perf_counter()
            try:
                result = compile_model(config_dir, CompileOptions(target=target, no_weights=True),
                                       full_trace=args.full_trace)
                write_artifact(result, out_root / f"{name}-{target}", config_dir, None, None)
            except ValueError as e:  # the planner's refusal (CompileError) or a config error
                seconds = time.perf_counter() - start
                total += seconds
                refusals.append((name, target, str(e)))
                print(f"{name:<30} {target:<6} {'refused':<8} {'':>7} {'':>6} {'':>8} {'':>7} {'':>7} {seconds:7.2f}")
                continue
            seconds = time.perf_counter() - start
            total += seconds
            rows += 1
            fns, plan = result.program.functions, result.plan
            gb = sum(plan.by_category().values()) / 2**30
            print(f"{name:<30} {target:<6} {'ok':<8} {len(fns['prefill'].ops):>7} {len(fns['decode'].ops):>6} "
                  f"{plan.context:>8} {plan.prefill_chunk:>7} {gb:>7.2f} {seconds:7.2f}", flush=True)
    print("-" * len(header))
    print(f"{rows} compiled, {len(refusals)} refused, {rows + len(refusals)} combinations in {total:.1f} s "
          f"({'full trace' if args.full_trace else 'stamped layers'}); imports {imports:.1f} s once")
    for name, target, reason in refusals:
        print(f"  {name} on {target}: {reason}")
    if not args.out:
        import shutil
        shutil.rmtree(out_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
