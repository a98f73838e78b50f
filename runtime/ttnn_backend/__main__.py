"""`python -m runtime.ttnn_backend OUT`: validate a compiled artifact on ttnn."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .backend import TtnnBackendError, TtnnUnsupportedProgram
from .replicas import open_backend
from .validate import VALIDATE_PREFILL_ROWS


def main(argv: list[str] | None = None) -> int:
    """Validate a compiled artifact on ttnn (a card, or the mock cluster of its target)."""
    import argparse

    from runtime.session import read_artifact

    parser = argparse.ArgumentParser(prog="python -m runtime.ttnn_backend", description=main.__doc__)
    parser.add_argument("artifact")
    parser.add_argument("--no-weights", action="store_true", help="allocate weights on the device")
    parser.add_argument("--prefill-rows", type=int, default=VALIDATE_PREFILL_ROWS)
    parser.add_argument("--functions", nargs="+", help="replay only these (default: all)")
    parser.add_argument("--chunk-start", type=int, default=0,
                        help="prefill as a later chunk, from this position (paged programs)")
    args = parser.parse_args(argv)
    program, manifest = read_artifact(args.artifact)
    weights_dir = None if args.no_weights else manifest.get("weights")
    try:
        backend = open_backend(program, Path(weights_dir) if weights_dir else None)
        summary = backend.validate(args.prefill_rows, functions=args.functions, chunk_start=args.chunk_start)
    except (TtnnBackendError, TtnnUnsupportedProgram) as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0



if __name__ == "__main__":
    sys.exit(main())
