"""Record each test's measured time in tests/durations.json, from pytest's `--durations=0`.

    .venv/bin/python -m pytest --durations=0 -p no:randomly > run.log   # any selection
    .venv/bin/python scripts/update_durations.py run.log

Setup, call and teardown of a test are added up. Tests of the log replace their entries;
others keep theirs. tests/conftest.py marks a test slow when its recorded time reaches
SLOW_SECONDS (the fast subset, `-m "not slow"`, leaves it out) and hands test files to the
xdist workers longest first.
"""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

DURATIONS = Path(__file__).resolve().parents[1] / "tests" / "durations.json"
LINE = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(\S+)")


def parse(log: str) -> Counter:
    seconds: Counter = Counter()
    for line in log.splitlines():
        match = LINE.match(line)
        if match:
            seconds[match.group(3)] += float(match.group(1))
    return seconds


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    measured = parse(Path(argv[0]).read_text())
    if not measured:
        print(f"{argv[0]}: no durations (run pytest with --durations=0)", file=sys.stderr)
        return 2
    recorded = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    recorded.update({k: round(v, 2) for k, v in measured.items()})
    DURATIONS.write_text(json.dumps(dict(sorted(recorded.items())), indent=0) + "\n")
    print(f"{DURATIONS}: {len(measured)} tests measured, {len(recorded)} recorded")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
