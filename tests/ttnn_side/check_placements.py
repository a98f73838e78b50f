"""Mesh placements and TILE padding as ttnn does them, against the program's semantics.

Needs .venv-ttnn (ttnn 0.81.1, numpy; no card, no device opened: a mock cluster
descriptor is enough for host-side conversion). For meshes 1x2, 1x8, 2x4 and 8x4 and
placements replicated / split over one axis / over both axes, each chip's part of the
multi-chip host tensor the ttnn backend builds (runtime/ttnn_backend/placement.py, the
code path weights take) is compared with the part the emulator gives that chip
(`shard_index` in runtime/emulator/backend.py: the placement's axes flattened row-major,
chips numbered row-major), and `join` must give the tensor back. TILE layout must pad
to 32 x 32 and read back the logical values. Prints mismatches; exits 1 on any.

    .venv-ttnn/bin/python tests/ttnn_side/check_placements.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from runtime.ttnn_backend import mock  # noqa: E402

mock.configure("N150", quiet=True)  # ttnn's host conversion needs a cluster descriptor
import ttnn  # noqa: E402

from runtime.ttnn_backend import placement  # noqa: E402


def emulator_part(array, place, mesh_shape, chip):
    """The emulator's rule, restated: torch.chunk(parts)[shard_index(chip)]."""
    if not place or place.get("dim") is None:
        return array
    rows, cols = mesh_shape
    coords = divmod(chip, cols)
    index, count = 0, 1
    for axis in place["axes"]:
        index = index * mesh_shape[axis] + coords[axis]
        count *= mesh_shape[axis]
    return np.split(array, count, axis=place["dim"])[index]


def chip_arrays(host):
    return [np.asarray(ttnn.to_dtype(t, ttnn.float32).to_numpy() if t.dtype != ttnn.float32 else t.to_numpy(),
                       dtype=np.float32) for t in ttnn.get_device_tensors(host)]


def main() -> int:
    rng = np.random.default_rng(0)
    failures = 0
    cases = 0
    for mesh_shape in [(1, 2), (1, 8), (2, 4), (8, 4)]:
        placements = [None, {"dim": 1, "axes": [1], "partial": False}, {"dim": 0, "axes": [0], "partial": False},
                      {"dim": 1, "axes": [0, 1], "partial": False}, {"dim": 0, "axes": [1, 0], "partial": False}]
        for place in placements:
            for dtype, layout in [("bfloat16", "TILE"), ("bfloat16", "ROW_MAJOR"), ("float32", "TILE")]:
                array = rng.standard_normal((64 * mesh_shape[0] * mesh_shape[1], 32 * 8)).astype(np.float32)
                if dtype == "bfloat16":  # values bfloat16 holds exactly
                    array = array.astype(ml_dtypes.bfloat16).astype(np.float32)
                host = placement.host_tensor(ttnn, array, dtype, layout, place, mesh_shape)
                got = chip_arrays(host)
                cases += 1
                for chip, part in enumerate(got):
                    want = emulator_part(array, place, mesh_shape, chip)
                    if part.shape != want.shape or not np.array_equal(part, want):
                        failures += 1
                        print(f"mesh {mesh_shape} {place} {dtype} {layout}: chip {chip} holds the wrong part")
                        break
                joined = placement.join(got, place, mesh_shape)
                if not np.array_equal(joined, array):
                    failures += 1
                    print(f"mesh {mesh_shape} {place} {dtype} {layout}: join does not give the tensor back")
    # TILE padding: logical shape kept, padded to whole 32 x 32 tiles, values read back.
    for shape in [(1, 1, 5, 40), (3, 33), (1, 2, 31, 64)]:
        array = rng.standard_normal(shape).astype(np.float32)
        t = ttnn.Tensor(array, ttnn.float32, None, ttnn.TILE_LAYOUT)
        padded = list(shape[:-2]) + [-(-shape[-2] // 32) * 32, -(-shape[-1] // 32) * 32]
        cases += 1
        if list(t.shape) != list(shape) or list(t.padded_shape) != padded:
            failures += 1
            print(f"TILE {shape}: shape {list(t.shape)}, padded {list(t.padded_shape)} (want {padded})")
        if not np.array_equal(np.asarray(t.to_numpy()), array):
            failures += 1
            print(f"TILE {shape}: values changed")
    print(f"{cases} cases, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
