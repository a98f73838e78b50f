"""Replay compiled artifacts through real ttnn once each (prefill, then decode); print JSON.

Runs in .venv-ttnn (ttnn, numpy, no torch); tests/test_ttnn_backend.py calls it:

    .venv-ttnn/bin/python tests/ttnn_side/replay.py OUT [OUT ...] [--no-weights] [--prefill-rows N]
                                                    [--chunk-start P] [--zero-state-rows ROW ...]

Artifacts compiled with --no-weights (and all of them with --no-weights) are replayed with
their weights allocated on the device (open_backend: TtnnBackend, or the replicas of a
data-parallel program on sub-meshes); the others are loaded as
the runtime loads them (runtime.load(OUT, backend="ttnn")). Several artifacts share one
process (ttnn builds its mock cluster once per process: give programs of one target, or
smaller ones after the largest), each on its own mesh, opened and closed in turn.

Prints one line per artifact: {"artifact", "summary": TtnnBackend.validate()'s summary,
"program_ops": {function: n}, "torch_imported": bool, and with --zero-state-rows "zeroed":
{"names": the cross-attention caches, "rows": the rows zeroed} after the replay, through
TtnnBackend.zero_state_rows as the runtime clears a text-only user}; or, when ttnn rejects an op,
{"artifact", "error": {function, index, op, node, layer, ttnn_message, report}}; or, for any
other backend error (weights or state that do not fit the device, ...), {"artifact",
"error": {"report"}}; for a program the backend refuses (float32), {"artifact", "error":
{"refused": true, "report"}}. Exits 0 when every artifact replayed, else 3 when ttnn
rejected an op of some artifact, else 4 (backend error) or 5 (refused).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import runtime  # noqa: E402
from lowering.program import Program  # noqa: E402
from runtime.ttnn_backend import (TtnnBackendError, TtnnOpError,  # noqa: E402
                                  TtnnUnsupportedProgram)
from runtime.ttnn_backend.replicas import open_backend  # noqa: E402


def replay_one(out: Path, no_weights: bool, prefill_rows: int, chunk_start: int = 0,
               zero_rows: list[int] | None = None) -> tuple[int, dict]:
    program = Program.loads((out / "program.json").read_text())
    backend = None
    zeroed = None
    try:
        if no_weights or program.options.get("no_weights"):
            backend = open_backend(program, None)  # data parallel: the replicas on sub-meshes
        else:
            backend = runtime.load(out, backend="ttnn", warmup=False).backend  # validate() runs every function
        summary = backend.validate(prefill_rows, chunk_start=chunk_start)
        if zero_rows:  # the caches runtime/image_slots.py clears for a user without an image
            names = [name for name in program.state if name.startswith("cross_attention_layers.")]
            for row in zero_rows:
                backend.zero_state_rows(names, row)
            zeroed = {"names": names, "rows": list(zero_rows)}
    except TtnnOpError as e:
        return 3, {"error": {"function": e.function, "index": e.index, "op": e.op.op, "node": e.node,
                             "layer": e.layer, "ttnn_message": e.ttnn_message, "report": str(e)}}
    except TtnnBackendError as e:  # weights or state that do not fit, and the like
        return 4, {"error": {"function": None, "op": None, "report": str(e)}}
    except TtnnUnsupportedProgram as e:  # refused before ttnn saw it (float32 programs)
        return 5, {"error": {"function": None, "op": None, "refused": True, "report": str(e)}}
    finally:
        if backend is not None:
            backend.close()  # the next artifact opens its own mesh
    result = {"summary": summary, "program_ops": {name: len(fn.ops) for name, fn in program.functions.items()},
              "torch_imported": "torch" in sys.modules}
    if zeroed is not None:
        result["zeroed"] = zeroed
    return 0, result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--no-weights", action="store_true",
                        help="TtnnBackend.from_program for every artifact: weights allocated on the device")
    parser.add_argument("--prefill-rows", type=int, default=128)
    parser.add_argument("--chunk-start", type=int, default=0,
                        help="prefill as a later chunk of a chunked prefill, from this position")
    parser.add_argument("--zero-state-rows", type=int, nargs="+", metavar="ROW",
                        help="after the replay, zero these user rows of the cross-attention caches")
    args = parser.parse_args()
    statuses = []
    for artifact in args.artifacts:
        status, result = replay_one(Path(artifact), args.no_weights, args.prefill_rows, args.chunk_start,
                                    args.zero_state_rows)
        statuses.append(status)
        print(json.dumps({"artifact": artifact, **result}), flush=True)
    return 0 if not any(statuses) else 3 if 3 in statuses else 4 if 4 in statuses else 5


if __name__ == "__main__":
    sys.exit(main())
