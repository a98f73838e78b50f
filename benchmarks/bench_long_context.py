"""Long context on the emulator: a tiny random Llama, one user, a 64k-token prompt
prefilled chunk by chunk through the paged cache, then a few decode steps.

    .venv/bin/python benchmarks/bench_long_context.py [--tokens 65536] [--chunk 4096]

Prints prefill and decode time, the page pool's size and peak RSS: memory is bounded by
the pool (fixed at compile time) and one chunk's activations, not by the prompt.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--decode", type=int, default=8)
    args = p.parse_args()
    from fixtures import make_hf_model

    import runtime
    from compiler import cli

    tmp = Path(tempfile.mkdtemp(prefix="long-context-"))
    model = make_hf_model(tmp / "tiny", max_position_embeddings=131072)
    max_seq = args.tokens + 1024
    out = tmp / "program"
    cli.main([str(model), "--max-seq-len", str(max_seq), "--block-size", "64", "--max-num-blocks",
              str(max_seq // 64), "--max-prefill-chunk", str(args.chunk), "--optimizations", "performance",
              "--cache", str(tmp / "cache"), "-o", str(out), "-q"])
    session = runtime.load(out)
    pool_bytes = sum(np.prod(s.shape) * 2 for s in session.program.state.values())
    before = peak_rss_mb()
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 1000, args.tokens)]
    start = time.perf_counter()
    session.generate([prompt], max_generated_tokens=args.decode, stop_at_eos=False)
    total = time.perf_counter() - start
    stats = session.stats
    print(f"prompt {args.tokens} tokens in chunks of {args.chunk}: prefill {stats.prefill_s:.1f} s "
          f"({session.backend.invocations['prefill']} chunk calls), {args.decode} decode tokens at "
          f"{stats.tokens_per_s_per_user:.1f} tokens/s, total {total:.1f} s")
    print(f"KV page pool {pool_bytes / 2**20:.0f} MiB (bfloat8_b held as bfloat16 in the emulator); "
          f"peak RSS {before:.0f} MiB after load, {peak_rss_mb():.0f} MiB after the run")


if __name__ == "__main__":
    main()
