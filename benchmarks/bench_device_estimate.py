"""Predicted device speed against the reference's published figures.

    .venv/bin/python benchmarks/bench_device_estimate.py [--context 1024] [--prompt 128] [--markdown]

Compiles, weight-free, every configuration of the reference's published performance
table (tt-metal models/tt_transformers/PERF.md, performance mode, batch 1; copied in
../shared/notes/anchors.md §1) that this project compiles, and prints compiler/cost.py's
estimate beside the publication:

- t/s/u: one decode step with `--context` positions in the cache, traced (as the
  reference measures it); "untraced" is the same program dispatched op by op, as this
  project's ttnn backend runs it today; "DRAM-sharded" is the traced step with the decode
  matmuls reading DRAM-sharded weights (a what-if: the program does not do it yet);
- TTFT: prefill of a `--prompt`-token prompt, untraced (the reference does not trace
  prefill);
- ratio: predicted / published; "!" marks a difference beyond 30%;
- where a decode step's time goes: ms per op class (traced), and what the publication
  implies about the fixed cost of an op if everything else in the estimate held: the
  gap per op under trace that would make the decode step take the published time, and
  the host time per op that would make the untraced prefill take the published TTFT.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEEDS = ROOT / "models_ref" / "seed_configs"
# (config folder, model as published, {target: (t/s/u, TTFT ms or None)}), PERF.md performance mode
PUBLISHED = [
    ("llama3.2-1b", "Llama-3.2-1B", {"N150": (87.8, 26), "N300": (105.9, 22), "T3K": (119.8, 32), "TG": (51.0, None)}),
    ("llama3.2-3b", "Llama-3.2-3B", {"N150": (54.0, 55), "N300": (68.0, 39), "T3K": (68.5, 52), "TG": (33.5, None)}),
    ("llama3.1-8b", "Llama-3.1-8B", {"N150": (28.3, 104), "N300": (44.2, 67), "T3K": (64.3, 53), "TG": (29.5, None)}),
    ("llama3.2-11b-vision", "Llama-3.2-11B", {"N300": (44.1, 67), "T3K": (62.7, 47)}),
    ("llama3.1-70b", "Llama-3.1-70B", {"T3K": (16.6, 164), "TG": (12.7, None)}),
    ("qwen2.5-7b", "Qwen2.5-7B", {"N300": (24.6, 92)}),
    ("qwen2.5-72b", "Qwen2.5-72B", {"T3K": (15.2, 225)}),
    ("qwen3-32b", "Qwen3-32B", {"T3K": (22.9, 123)}),
    ("qwq-32b", "QwQ-32B", {"T3K": (20.7, 105)}),
]
MARGIN = 0.30


def _solve(total: float, works: list[float], traced: bool, gap: float) -> float | None:
    """The per-op constant (microseconds) that makes sum(op times) equal `total`: the gap
    under trace, or the host's dispatch time (ops cost max(work + gap, host))."""
    def step(x):
        return sum(w + x for w in works) if traced else sum(max(w + gap, x) for w in works)
    if step(0.0) >= total:
        return 0.0
    lo, hi = 0.0, 1e-2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if step(mid) < total else (lo, mid)
    return lo * 1e6


def _ratio(pred: float, pub: float | None) -> str:
    if not pub:
        return "–"
    r = pred / pub
    return f"{r:.2f}{'!' if abs(r - 1) > MARGIN else ''}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="KV positions a decode step reads")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens for TTFT")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (the README's)")
    args = parser.parse_args(argv)

    from compiler import cost
    from compiler.driver import compile_model
    from compiler.options import CompileOptions
    from compiler.targets import get_target

    rows, split = [], []
    t0 = time.perf_counter()
    for folder, label, published in PUBLISHED:
        for target, (pub_tsu, pub_ttft) in published.items():
            options = CompileOptions(target=target, no_weights=True, batch_size=1, optimizations="performance")
            program = compile_model(SEEDS / folder, options).program
            traced = cost.decode_estimate(program, context=args.context)
            untraced = cost.decode_estimate(program, context=args.context, traced=False)
            sharded = cost.decode_estimate(program, context=args.context, sharded_matmuls=True)
            ttft = cost.prefill_estimate(program, prompt_tokens=args.prompt)
            tsu = traced.tokens_per_s_per_user
            rows.append((label, target, f"{tsu:.1f}", f"{pub_tsu:g}", _ratio(tsu, pub_tsu),
                         f"{untraced.tokens_per_s_per_user:.1f}", f"{sharded.tokens_per_s_per_user:.1f}",
                         f"{ttft.seconds * 1e3:.0f}", f"{pub_ttft:g}" if pub_ttft else "–",
                         _ratio(ttft.seconds * 1e3, pub_ttft)))
            gap = get_target(target).op_gap_traced_us * 1e-6
            implied_gap = _solve(1 / pub_tsu, [c.seconds for c in traced.costs], True, gap)
            implied_host = _solve(pub_ttft * 1e-3, [c.seconds for c in ttft.costs], False, gap) if pub_ttft else None
            split.append((label, target, *(f"{traced.by_class[c] * 1e3:.2f}" for c in cost.CLASSES),
                          str(traced.ops), f"{implied_gap:.1f}", f"{implied_host:.0f}" if implied_host is not None else "–"))
    seconds = time.perf_counter() - t0

    head = ("model", "target", "t/s/u", "published", "ratio", "untraced", "DRAM-sharded", "TTFT ms", "published",
            "ratio")
    head2 = ("model", "target", *(f"{c} ms" for c in cost.CLASSES), "ops", "implied gap us", "implied host us")
    for h, body in ((head, rows), (head2, split)):
        if args.markdown:
            print("| " + " | ".join(h) + " |")
            print("|" + "|".join("---" for _ in h) + "|")
            for r in body:
                print("| " + " | ".join(r) + " |")
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(h, *body)]
            for r in (h, *body):  # model and target left-aligned, figures right-aligned
                print("  ".join(x.rjust(w) if i > 1 else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))))
        print()
    print(f"decode at {args.context} positions, batch 1, performance mode; TTFT for {args.prompt} tokens; "
          f"'!' beyond {MARGIN:.0%}; {len(rows)} configurations compiled and estimated in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
