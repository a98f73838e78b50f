"""`ttrun`: run a compiled program. `ttrun prompt --program OUT "text"` streams an answer
and prints time to first token and tokens/s. (The seed's demo presets come next.)"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttrun", description="Generate text with a compiled program.")
    sub = p.add_subparsers(dest="command", required=True)
    prompt = sub.add_parser("prompt", help="answer one or more prompts")
    prompt.add_argument("prompts", nargs="+")
    prompt.add_argument("--program", required=True, help="artifact folder written by ttcompile")
    prompt.add_argument("--backend", default="emulator", choices=["emulator", "ttnn"])
    prompt.add_argument("--max-generated-tokens", type=int, default=128)
    prompt.add_argument("--temperature", type=float, default=0.0)
    prompt.add_argument("--top-p", type=float, default=1.0)
    prompt.add_argument("--seed", type=int)
    prompt.add_argument("--no-stop-at-eos", action="store_true")
    prompt.add_argument("--no-instruct", action="store_true", help="do not apply the chat template")
    return p


def _prompt(args) -> int:
    import runtime

    session = runtime.load(args.program, backend=args.backend)
    streamers = {}
    single = len(args.prompts) == 1

    def on_token(user: int, token: int) -> None:
        if single:
            if user not in streamers:
                streamers[user] = session.tokenizer.stream_decoder()
            sys.stdout.write(streamers[user](token))
            sys.stdout.flush()

    if single:
        print(f"> {args.prompts[0]}")
    outputs = session.generate(
        args.prompts, max_generated_tokens=args.max_generated_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, stop_at_eos=not args.no_stop_at_eos,
        instruct=False if args.no_instruct else None, on_token=on_token)
    if single:
        print(flush=True)
    else:
        for prompt, text in zip(args.prompts, outputs):
            print(f"> {prompt}\n{text}\n")
    print(session.stats.summary(), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _prompt(args)
    except ValueError as e:
        print(f"ttrun: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
