"""Load an artifact on the ttnn backend as the runtime does and describe what was placed.

Runs in .venv-ttnn (ttnn, numpy, no torch); tests/test_ttnn_weights.py calls it:

    .venv-ttnn/bin/python tests/ttnn_side/weight_load.py OUT [--no-warmup] [--check-files]
        [--pretend-ttnn-version V]
        [--kill-after-files N | --interrupt-after-files N | --fail-writes-after-files N]

Prints one JSON line: {"weight_load": TtnnBackend.weight_load (where the weights came
from, conversions, files read and written, seconds), "stats": the load and warm-up figures
of Session.stats, "tensors": every device tensor of the weights (one chip's shape, padded
shape, dtype, layout, memory, mesh topology, chips), "entries": the folders under
<weights dir>/ttnn/, "torch_imported"}. With --check-files, "files_checked": how many
files of the entry were read back on the host and equal (bit for bit, every chip's part)
a fresh host conversion of the converted-weight cache.

Simulated failures after N files of the entry are written: --kill-after-files N sends
SIGKILL to this process (a load killed half way: nothing is printed, exit -9);
--interrupt-after-files N raises KeyboardInterrupt (the load stops: prints {"error",
"entries"}); --fail-writes-after-files N makes every later write fail (a full disk: the
load goes on without writing).
--pretend-ttnn-version V keys the entry as if ttnn were version V.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

import runtime  # noqa: E402
from runtime.session import read_artifact  # noqa: E402
from runtime.ttnn_backend import weight_files  # noqa: E402
from runtime.ttnn_backend.ops import describe_memory  # noqa: E402
from runtime.ttnn_backend.weights import read_weights  # noqa: E402


def describe(ttnn, tensor) -> dict:
    return {"shape": list(tensor.shape), "padded_shape": list(tensor.padded_shape),
            "dtype": str(tensor.dtype), "layout": str(tensor.layout), "storage": str(tensor.storage_type()),
            "memory": describe_memory(tensor.memory_config()), "topology": str(tensor.tensor_topology()),
            "chips": len(ttnn.get_device_tensors(tensor))}


def chip_arrays(ttnn, host_tensor) -> list[np.ndarray]:
    out = []
    for t in ttnn.get_device_tensors(host_tensor):
        if t.dtype not in (ttnn.uint32, ttnn.int32, ttnn.float32):
            t = ttnn.to_dtype(t, ttnn.float32)  # unpacks block floats exactly
        out.append(np.asarray(t.to_numpy()))
    return out


def check_files(backend, weights_dir: Path) -> int:
    """Every file of the entry, read on the host, equals a fresh conversion of its weight."""
    ttnn = backend.ttnn
    entry = backend.weight_files_entry(weights_dir)
    manifest = json.loads((entry.path / weight_files.MANIFEST).read_text())["tensors"]
    weights = read_weights(weights_dir, set(backend.program.weights))
    checked = 0
    for name, spec in backend.program.weights.items():
        for t in backend.weight_tensors(name, spec):
            fresh = backend.host_conversion(t, weights[name])
            stored = ttnn.load_tensor(entry.path / manifest[t["name"]]["file"])
            a, b = chip_arrays(ttnn, fresh), chip_arrays(ttnn, stored)
            if len(a) != len(b) or not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b)):
                raise AssertionError(f"the file of '{t['name']}' differs from a fresh conversion")
            checked += 1
    return checked


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--check-files", action="store_true")
    parser.add_argument("--pretend-ttnn-version")
    failures = parser.add_mutually_exclusive_group()
    failures.add_argument("--kill-after-files", type=int)
    failures.add_argument("--interrupt-after-files", type=int)
    failures.add_argument("--fail-writes-after-files", type=int)
    args = parser.parse_args()
    out = Path(args.artifact)
    weights_dir = Path(read_artifact(out)[1]["weights"])

    if args.pretend_ttnn_version:
        weight_files.ttnn_version = lambda: args.pretend_ttnn_version
    limits = [(n, what) for n, what in ((args.kill_after_files, "kill"), (args.interrupt_after_files, "interrupt"),
                                         (args.fail_writes_after_files, "fail")) if n is not None]
    if limits:
        ((limit, what),) = limits
        save = weight_files.EntryWriter.save

        def failing_save(self, *a, **kw):
            if self.files_written >= limit:
                if what == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if what == "interrupt":
                    raise KeyboardInterrupt(f"simulated interrupt after {limit} files")
                raise OSError(28, f"simulated full disk after {limit} files")
            return save(self, *a, **kw)
        weight_files.EntryWriter.save = failing_save

    root = weights_dir / weight_files.SUBDIR

    def entries() -> list[str]:
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []

    try:
        session = runtime.load(out, backend="ttnn", warmup=not args.no_warmup)
    except KeyboardInterrupt as e:
        if args.interrupt_after_files is None:
            raise
        print(json.dumps({"error": str(e), "entries": entries()}), flush=True)
        return 0
    backend = session.backend
    ttnn = backend.ttnn
    names = [t["name"] for name, spec in backend.program.weights.items() for t in backend.weight_tensors(name, spec)]
    result = {"weight_load": backend.weight_load, "stats": session.stats.startup(),
              "summary": session.stats.startup_summary(),
              "tensors": {n: describe(ttnn, backend.env[n]) for n in names}, "entries": entries()}
    if args.check_files:
        result["files_checked"] = check_files(backend, weights_dir)
    backend.close()
    result["torch_imported"] = "torch" in sys.modules
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
