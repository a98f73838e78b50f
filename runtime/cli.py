"""`ttrun`: run a compiled program.

    ttrun PRESET --program OUT      the seed's demo presets: batch-1, batch-32, long-context,
                                    reasoning-1 (prompts from runtime/presets/*.json)
    ttrun PRESET --model DIR        compile DIR for the preset first (then --target,
                                    --optimizations apply)
    ttrun prompt "text" --program OUT
    ttrun accuracy --program OUT --reference MODEL_DIR [--text FILE] [--tokens N]
                                    teacher-forced top-1/top-5 and logits PCC against HF
                                    (runtime/accuracy.py)
    ttrun ... --ranks N             the emulator's chips as N processes on this machine
                                    (runtime/emulator/ranks.py); under torchrun, every
                                    process it starts is a rank (its RANK, WORLD_SIZE, ...)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from .presets import PRESETS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttrun", description="Generate text with a compiled program.")
    p.add_argument("preset", choices=[*PRESETS, "prompt", "accuracy"], help="a demo preset, 'prompt' or 'accuracy'")
    p.add_argument("prompts", nargs="*", help="with 'prompt': the prompt texts")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="with 'prompt' (Llama 3.2 Vision programs): an image for each prompt text, in order")
    p.add_argument("--program", help="artifact folder written by ttcompile")
    p.add_argument("--model", help="a model directory to compile for the preset instead of --program")
    p.add_argument("--target", default="N150")
    p.add_argument("--optimizations", choices=["performance", "accuracy", "float32"], default="performance")
    p.add_argument("--backend", default="emulator", choices=["emulator", "ttnn"])
    p.add_argument("--matmul", default="device", choices=["device", "exact"],
                   help="emulator matmuls: 'device' at each op's math fidelity as Wormhole's matrix unit "
                        "computes them (default), 'exact' with exact products")
    p.add_argument("--reference", metavar="MODEL_DIR", help="with 'accuracy': the HF model to compare with")
    p.add_argument("--text", metavar="FILE", help="with 'accuracy': the text to teacher-force (default: the shipped one)")
    p.add_argument("--tokens", type=int, default=256, help="with 'accuracy': positions predicted (after 64 of prefill)")
    p.add_argument("--input-prompts", help="a JSON prompt file instead of the preset's")
    p.add_argument("--batch-size", type=int, help="users per batch (compiles with --model)")
    p.add_argument("--repeat-batches", type=int)
    p.add_argument("--max-generated-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-stop-at-eos", action="store_true")
    p.add_argument("--no-instruct", action="store_true", help="do not apply the chat template")
    p.add_argument("--ranks", type=int, metavar="N",
                   help="emulator: run the chips as N processes (torch.distributed ranks) on this machine; "
                        "N must cut the program's mesh into equal blocks (under torchrun: its ranks)")
    return p


def _compile(args, preset) -> str:
    from pathlib import Path

    from compiler import cli as compiler_cli

    batch = args.batch_size or preset.batch_size
    out = Path("build") / f"{Path(args.model).resolve().name}-{args.target}-{args.optimizations}-{preset.name}-b{batch}"
    argv = [args.model, "--target", args.target, "--optimizations", args.optimizations,
            "--batch-size", str(batch), "--max-seq-len", str(preset.max_seq_len),
            "--block-size", str(preset.block_size), "--max-num-blocks", str(preset.max_num_blocks),
            "-o", str(out), "-q"]
    if compiler_cli.main(argv) != 0:
        raise ValueError("compilation failed (see above)")
    return str(out)


def _accuracy(args) -> int:
    import runtime
    from pathlib import Path

    from .accuracy import TEXT, measure, plain_text

    if not (args.program and args.reference):
        raise ValueError("ttrun accuracy needs --program OUT and --reference MODEL_DIR")
    text = Path(args.text or TEXT)
    try:
        content = plain_text(text.read_text())
    except OSError as e:
        raise ValueError(f"--text {text}: cannot read ({e.strerror or e})") from None
    session = runtime.load(args.program, backend=args.backend, matmul=args.matmul, ranks=args.group)
    print(measure(session, Path(args.reference), content, args.tokens).table())
    return 0


def _run(args) -> int:
    import runtime
    if args.preset == "accuracy":
        return _accuracy(args)
    from .presets import Preset, PromptEntry, encode_entry, read_prompts

    preset = PRESETS.get(args.preset) or Preset("prompt", "", 1, 128, 4096)
    if not (args.program or args.model):
        raise ValueError("give --program OUT (or --model DIR to compile first)")
    start = time.perf_counter()
    program = _compile(args, preset) if args.model else args.program
    compile_s = time.perf_counter() - start if args.model else 0.0
    session = runtime.load(program, backend=args.backend, matmul=args.matmul, ranks=args.group)
    if args.group is not None and args.seed is None:  # every rank must draw the same samples
        args.seed = args.group.shared_seed()
    session.stats.compile_s = compile_s  # reported with the load and warm-up
    instruct = not args.no_instruct and session.tokenizer.has_chat_template
    if args.preset == "prompt":
        if not args.prompts:
            raise ValueError("ttrun prompt needs at least one prompt text")
        if len(args.image) > len(args.prompts):
            raise ValueError(f"{len(args.image)} --image for {len(args.prompts)} prompt texts")
        entries = [PromptEntry(p, image=im) for p, im in zip(args.prompts, args.image + [None] * len(args.prompts))]
    else:
        entries = read_prompts(args.input_prompts or preset.prompts)
    image_token = session.images.image_token_id if session.images.enabled else None
    prompts = [encode_entry(e, session.tokenizer, instruct, image_token) for e in entries]
    shown = [e.prompt for e in entries]
    images = [e.image for e in entries]
    repeat = args.repeat_batches or preset.repeat_batches
    prompts, shown, images = prompts * repeat, shown * repeat, images * repeat
    keywords = dict(
        max_generated_tokens=args.max_generated_tokens or preset.max_generated_tokens,
        temperature=preset.temperature if args.temperature is None else args.temperature,
        top_p=preset.top_p if args.top_p is None else args.top_p, seed=args.seed,
        stop_at_eos=preset.stop_at_eos and not args.no_stop_at_eos,
        images=images if any(im is not None for im in images) else None)
    if len(prompts) == 1:
        print(f"> {shown[0][:200]}")
    outputs = _generate_with_progress(session, prompts, keywords)
    if len(prompts) > 1:
        for prompt, ids in zip(shown, outputs):
            print(f"> {prompt[:200]}\n{session.tokenizer.decode(ids)}\n")
    print(session.stats.summary(), file=sys.stderr)
    return 0


def _generate_with_progress(session, prompts, keywords):
    """Per-token streaming for one user; a progress bar over tokens for a batch."""
    if len(prompts) == 1:
        stream = session.tokenizer.stream_decoder()
        outputs = session.generate(prompts, on_token=lambda user, token: print(stream(token), end="", flush=True),
                                   **keywords)
        print(flush=True)
        return outputs
    from tqdm import tqdm
    with tqdm(total=len(prompts) * keywords["max_generated_tokens"], unit="tok", file=sys.stderr,
              desc=f"{len(prompts)} users") as bar:
        return session.generate(prompts, on_token=lambda user, token: bar.update(1), **keywords)


def _launch(args, argv) -> int:
    """`--ranks N` outside torchrun: check the program takes N ranks, then start them."""
    from .emulator.launch import launch
    from .emulator.ranks import RankLayout
    from .session import read_artifact

    if args.backend != "emulator" or not args.program or args.model:
        raise ValueError("--ranks runs the emulator on a compiled program: give --program OUT (not --model)")
    program, _ = read_artifact(args.program)
    if program.replicas:
        raise ValueError("--ranks does not run data-parallel programs (compiled with --data-parallel)")
    RankLayout.of(program.mesh_shape, args.ranks)
    return launch([sys.executable, "-m", "runtime.cli", *argv], args.ranks)


def _as_rank(args, config) -> int:
    """Run as one rank of the group `config` describes; only rank 0 prints."""
    from .emulator.ranks import RankGroup

    if args.ranks not in (None, config.world_size):
        raise ValueError(f"--ranks {args.ranks} but this process is one of {config.world_size} (WORLD_SIZE)")
    args.group = RankGroup(config)
    try:
        if args.group.rank == 0:
            return _run(args)
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return _run(args)
    finally:
        args.group.close()


def main(argv=None) -> int:
    from compiler.errors import EXIT_USER, missing_dependency

    from .emulator.ranks import RankConfig, RankFailure

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)  # prompt texts may follow the options
    args.group = None
    try:
        if args.ranks is not None and args.ranks < 1:
            raise ValueError(f"--ranks {args.ranks}: give a number of processes of at least 1")
        config = RankConfig.from_env(os.environ)  # set by torchrun or by _launch
        if config is not None:
            return _as_rank(args, config)
        if args.ranks and args.ranks > 1:
            return _launch(args, argv)
        return _run(args)
    except RankFailure as e:  # another rank died: say so once (the lowest surviving rank)
        if e.report:
            print(f"ttrun: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # the user's environment, not a crash
        print(f"ttrun: error: {missing_dependency(e, 'ttrun')}", file=sys.stderr)
        return EXIT_USER
    except ValueError as e:
        if args.group is None or args.group.rank == 0:  # every rank meets the same bad input
            print(f"ttrun: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
