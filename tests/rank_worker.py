"""One rank of the multi-process emulator runs in tests/test_emulator_ranks.py.

    python tests/rank_worker.py DEST PROGRAM...

Joins the group from torchrun's variables (set by runtime.emulator.launch), then for each
program writes DEST/<program folder>.rank<R>.npz: `measure`'s teacher-forced logits and
sampled tokens, and the bytes of weights this rank holds. The tests call `measure` on a
single-process session for the reference.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

PROMPT = list(range(5, 200, 7))[:16]
SEQUENCE = PROMPT + list(range(300, 308))


def measure(session) -> dict[str, np.ndarray]:
    """Teacher-forced logits over SEQUENCE, 6 tokens sampled on the device (temperature
    0.8, seed 3) and the weight bytes held: (sharded, replicated)."""
    logits = session.teacher_forced_logits(SEQUENCE, len(PROMPT))
    tokens = session.generate([PROMPT], max_generated_tokens=6, temperature=0.8, seed=3)[0]
    held = session.backend.weight_bytes()
    return {"logits": logits, "tokens": np.array(tokens), "weights": np.array([held["sharded"], held["replicated"]])}


def main(dest: str, programs: list[str]) -> int:
    import runtime
    from runtime.emulator.ranks import RankConfig, RankGroup

    group = RankGroup(RankConfig.from_env(os.environ))
    try:
        for program in programs:
            result = measure(runtime.load(program, ranks=group))
            np.savez(Path(dest) / f"{Path(program).name}.rank{group.rank}.npz", **result)
    finally:
        group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
