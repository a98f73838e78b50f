"""`ttcompile MODEL_DIR --target T`: compile a model directory into a program artifact."""
from __future__ import annotations

import argparse
import gc
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import EXIT_INTERNAL, EXIT_USER, InternalCompilerError, missing_dependency
from .options import BATCH_SIZES, OPTIMIZATIONS, SAMPLING, CompileOptions, apply_env
from .targets import TARGETS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as for every other bad input (usage is in --help)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ttcompile", description="Compile a Llama-3 / Qwen2.5 model into a TTNN program.",
        epilog="Environment overrides: TT_CACHE_PATH (--cache), MAX_PREFILL_CHUNK_SIZE "
               "(thousands of tokens, --max-prefill-chunk), PAD_MLP_CORES, FAKE_DEVICE (--target).")
    p.add_argument("model_dir", help="Hugging Face or Meta model directory (or a config-only dir with --no-weights)")
    p.add_argument("--target", help=f"one of {', '.join(TARGETS)} (default N150, or $FAKE_DEVICE)")
    p.add_argument("-o", "--output", help="artifact folder (default build/<model>-<target>-<optimizations>)")
    p.add_argument("--optimizations", choices=OPTIMIZATIONS, default="performance")
    p.add_argument("--batch-size", type=int, default=1,
                   help=f"users per decode batch: {BATCH_SIZES} (with --data-parallel N: N times one of them)")
    p.add_argument("--max-seq-len", type=int,
                   help="longest prompt + generation per user (default: the model's maximum, "
                        "capped to what fits on the target)")
    p.add_argument("--max-prefill-chunk", type=int,
                   help="longest prefill chunk in tokens (default: the largest that fits beside the context)")
    p.add_argument("--no-paged-attention", action="store_true",
                   help="contiguous per-user KV caches instead of a paged block pool (no chunked prefill)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-num-blocks", type=int, help="KV page pool size in blocks (default 1024, "
                   "or one more than a full-length user's page table if that is larger)")
    p.add_argument("--sampling", choices=SAMPLING, default="device",
                   help="device: decode ends in top-k/top-p sampling on the device, one token id per user leaves "
                        "it; host: decode returns logits (every program also has a logits variant of decode "
                        "for teacher forcing)")
    p.add_argument("--data-parallel", type=int, default=1, metavar="N",
                   help="N replicas of the program on equal sub-meshes of the target (T3K: 4 N300s or 8 N150s; "
                        "TG: 4 T3Ks, 16 N300s or 32 N150s), --batch-size users split over them")
    p.add_argument("--precision", metavar="FILE.json|auto",
                   help="per decoder layer dtypes and math fidelities: a tt_transformers decoder config file "
                        "(merged onto --optimizations), or 'auto': measure each layer's sensitivity and keep "
                        "the fewest weight bytes with calibration top-1 >= --min-top1")
    p.add_argument("--min-top1", type=float, default=0.90,
                   help="with --precision auto: the teacher-forced top-1 agreement to keep (default 0.90)")
    p.add_argument("--calibration", metavar="FILE",
                   help="with --precision auto: the calibration text (default: the one shipped with ttcompile)")
    p.add_argument("--no-weights", action="store_true", help="compile from the config alone")
    p.add_argument("--cache", help="converted-weight cache root (default $TT_CACHE_PATH or ~/.cache/ttcompile)")
    p.add_argument("--print-after", action="append", default=[], metavar="PASS")
    p.add_argument("--print-after-all", action="store_true")
    p.add_argument("--dump", metavar="DIR", help="write the IR after every pass and the program")
    p.add_argument("--verify", action="store_true", help="run the graph verifier after every pass")
    p.add_argument("--full-trace", action="store_true",
                   help="trace every decoder layer instead of stamping layers 2..N-1 from layer 1 "
                        "(the same program; IR dumps then show every layer)")
    p.add_argument("--emit", choices=["python"], help="print the program as ttnn calls")
    p.add_argument("--report", action="store_true",
                   help="print the target's memory plan: bytes per chip by category, max context and "
                        "prefill chunk, collectives per layer, estimated decode tokens/s/user")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def options_from_args(args, environ=os.environ) -> CompileOptions:
    explicit = {name for name, value in (("target", args.target), ("cache_dir", args.cache),
                                         ("max_prefill_chunk", args.max_prefill_chunk)) if value}
    options = CompileOptions(
        target=(args.target or "N150"), optimizations=args.optimizations,
        batch_size=args.batch_size, max_seq_len=args.max_seq_len,
        max_prefill_chunk=args.max_prefill_chunk, block_size=args.block_size,
        paged_attention=not args.no_paged_attention,
        max_num_blocks=args.max_num_blocks, no_weights=args.no_weights, sampling=args.sampling,
        data_parallel=args.data_parallel, precision=args.precision, min_top1=args.min_top1,
        calibration=args.calibration,
        **({"cache_dir": Path(args.cache)} if args.cache else {}))
    return apply_env(options, environ, explicit)


@contextmanager
def _frozen_imports():
    """Imports made in here (torch's, mostly) with the collector paused, then frozen
    (gc.freeze): module-level objects live as long as the process, and each full
    collection during a compile, and the one at exit, would walk torch's quarter of a
    million objects again (0.4 s of a 70B weight-free compile). Only in a process that has
    not imported torch yet: an in-process caller (tests) that holds it is left alone."""
    fresh = "torch" not in sys.modules and gc.isenabled()
    if fresh:
        gc.disable()
    try:
        yield
    finally:
        if fresh:
            gc.freeze()
            gc.enable()


def _run(args) -> int:
    with _frozen_imports():
        from . import artifact
        from .driver import compile_model
        from .pipeline import PASS_NAMES, Observer

    options = options_from_args(args)
    unknown = set(args.print_after) - set(PASS_NAMES)
    if unknown:
        raise ValueError(f"--print-after: unknown pass {sorted(unknown)[0]} (passes: {', '.join(PASS_NAMES)})")
    model_dir = Path(args.model_dir)
    observer = Observer(verify=args.verify, print_after=set(args.print_after) | ({"all"} if args.print_after_all else set()),
                        dump_dir=Path(args.dump) if args.dump else None)
    result = compile_model(model_dir, options, observer, full_trace=args.full_trace)
    for text in result.printed:
        print(text)
    if result.precision_file and result.precision_file.get("chosen") and not args.quiet:
        print(result.precision_file["chosen"]["summary"])
    if args.report:
        from .report import format_report
        print(format_report(result.plan, result.cfg.name, options.optimizations, result.program.precision,
                            program=result.program))
    if args.emit == "python":
        from lowering.emit_python import emit_program
        print(emit_program(result.program))
    replicas = f"-dp{options.data_parallel}" if options.data_parallel > 1 else ""
    out = Path(args.output) if args.output else Path("build") / (
        f"{model_dir.resolve().name}-{result.target.name}{replicas}-{options.optimizations}")
    weights_dir, fingerprint = None, None
    if result.reader is not None:
        progress = None
        if not args.quiet:
            from tqdm import tqdm
            progress = lambda items: tqdm(items, desc="converting weights", unit="shard", file=sys.stderr)
        fingerprint = result.reader.fingerprint(options.cache_dir / "file-hashes.json")
        weights_dir, converted = artifact.convert_weights(result, options.cache_dir, progress)
        if not args.quiet and not converted:
            print(f"reusing converted weights in {weights_dir}", file=sys.stderr)
    if args.dump:
        (Path(args.dump) / "program.json").write_text(result.program.dumps())
    artifact.write_artifact(result, out, model_dir, weights_dir, fingerprint)
    n_ops = {k: len(f.ops) for k, f in result.program.functions.items()}
    on = result.target.name + (f" as {options.data_parallel} x {result.program.target}" if replicas else "")
    print(f"wrote {out} ({on}, {options.optimizations}, "
          f"{n_ops['prefill']} prefill ops, {n_ops['decode']} decode ops)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except InternalCompilerError as e:  # a bug: says so, names pass and node, exit 3
        print(f"ttcompile: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    except ModuleNotFoundError as e:  # the user's environment, not a crash
        print(f"ttcompile: error: {missing_dependency(e, 'ttcompile')}", file=sys.stderr)
        return EXIT_USER
    except (ValueError, OSError) as e:  # user-caused: one line, exit 2, no traceback
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"ttcompile: error: {message}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("ttcompile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
