"""Replay a compiled artifact through real ttnn once (prefill, then decode) and print JSON.

Runs in .venv-ttnn (ttnn, numpy, no torch); tests/test_ttnn_backend.py calls it:

    .venv-ttnn/bin/python tests/ttnn_side/replay.py OUT [--no-weights] [--prefill-rows N]

Prints {"summary": TtnnBackend.validate()'s summary, "program_ops": {function: n},
"torch_imported": bool} and exits 0; when ttnn rejects an op prints {"error": {function,
index, op, node, layer, ttnn_message, report}} and exits 3; any other backend error
(weights or state that do not fit the device, ...) prints {"error": {"report"}}, exit 4.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import runtime  # noqa: E402
from lowering.program import Program  # noqa: E402
from runtime.ttnn_backend import TtnnBackend, TtnnBackendError, TtnnOpError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--no-weights", action="store_true",
                        help="TtnnBackend.from_program: weights allocated on the device")
    parser.add_argument("--prefill-rows", type=int, default=128)
    args = parser.parse_args()
    out = Path(args.artifact)
    program = Program.loads((out / "program.json").read_text())
    try:
        if args.no_weights:
            backend = TtnnBackend.from_program(program)
        else:
            backend = runtime.load(out, backend="ttnn").backend
        summary = backend.validate(args.prefill_rows)
    except TtnnOpError as e:
        print(json.dumps({"error": {"function": e.function, "index": e.index, "op": e.op.op,
                                    "node": e.node, "layer": e.layer, "ttnn_message": e.ttnn_message,
                                    "report": str(e)}}))
        return 3
    except TtnnBackendError as e:  # weights or state that do not fit, and the like
        print(json.dumps({"error": {"function": None, "op": None, "report": str(e)}}))
        return 4
    print(json.dumps({"summary": summary,
                      "program_ops": {name: len(fn.ops) for name, fn in program.functions.items()},
                      "torch_imported": "torch" in sys.modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
