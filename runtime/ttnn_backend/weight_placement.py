"""Placing a program's weights on the mesh, as the ttnn backend does at load.

Each weight becomes one device tensor, plus the copies some op wants placed otherwise
(PER_USER: once per decode user; TILE_ROW: a wide norm gamma as one tile row). The first
load of a program on a system converts them on the host and writes ttnn's own tensor
files of them (weight_files.py); later loads read those files. Weight-free programs
allocate every weight on the device (shapes and dtypes only).

WeightPlacement is a part of TtnnBackend (backend.py), kept apart because it is one
concern: it reads the backend's program, mesh, env, decode_users, local_shape, allocate
and _call, and fills env with the placed weights and weight_load with where they came from.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from lowering.program import Op, op_tensor_refs

from . import placement as placement_
from . import weight_files as weight_files_
from .errors import TtnnBackendError, ttnn_message
from .ops import PER_USER, TILE_ROW, WEIGHT_PLACEMENTS, pad_tile, weight_variant
from .weight_files import EntryError, WeightFiles, converted_identity, entry_key
from .weights import read_weights


class WeightPlacement:
    """The weight half of TtnnBackend (see the module docstring)."""

    def _weight_variants(self) -> dict[tuple[str, str], str]:
        """Weights some op wants placed otherwise than the program places them: (weight,
        kind) -> name of the copy the backend places at load. PER_USER: once per decode
        user (the decode RoPE transformation matrix); TILE_ROW: a wide norm gamma as one
        TILE row. Same values either way; the ops read the copy."""
        out = {}
        for fn in self.program.functions.values():
            for op in fn.ops:
                wanted = WEIGHT_PLACEMENTS.get(op.op, lambda _: {})(op)
                for param, name in op_tensor_refs(op):
                    kind = wanted.get(param)
                    if kind and name in self.program.weights and weight_variant(kind, self.program.weights[name]):
                        out[(name, kind)] = f"{name}@{kind}"
        return out

    def _variant_of(self, op: Op, param: str, name: str) -> str:
        """The tensor `op` reads through `param`: a placed variant of weight `name`, or it."""
        kind = WEIGHT_PLACEMENTS.get(op.op, lambda _: {})(op).get(param)
        return self.weight_variants.get((name, kind), name) if kind else name

    def _per_user_memory(self, shape):
        """Height-sharded over the decode user cores, one copy of `shape`'s rows per user."""
        call = self._call(None)
        return call.height_sharded(call.user_grid(), (pad_tile(shape[-2]), pad_tile(shape[-1])))

    def weight_tensors(self, name: str, spec: dict) -> list[dict]:
        """The device tensors weight `name` is placed as: itself, and the copies some op
        wants placed otherwise (PER_USER: once per decode user, height-sharded in L1;
        TILE_ROW: a wide norm gamma as one TILE row). Each {"name", "kind", "shape" (global,
        before the split over chips), "dtype", "layout", "placement"}."""
        placement = spec.get("placement")
        shape = list(spec["shape"])
        out = [{"name": name, "kind": None, "shape": shape, "dtype": spec["dtype"], "layout": spec["layout"],
                "placement": placement}]
        if (name, PER_USER) in self.weight_variants:
            out.append({"name": self.weight_variants[(name, PER_USER)], "kind": PER_USER,
                        "shape": shape[:-2] + [shape[-2] * self.decode_users, shape[-1]],
                        "dtype": spec["dtype"], "layout": spec["layout"], "placement": placement})
        if (name, TILE_ROW) in self.weight_variants:
            if (placement or {}).get("dim") is not None:
                raise TtnnBackendError(f"weight '{name}': a split norm gamma has no TILE-row placement")
            out.append({"name": self.weight_variants[(name, TILE_ROW)], "kind": TILE_ROW,
                        "shape": [1, 1, 1, int(np.prod(shape))], "dtype": spec["dtype"], "layout": "TILE",
                        "placement": None})
        return out

    def weight_files_entry(self, weights_dir: Path) -> WeightFiles:
        """This program's weight-file entry on this mesh and ttnn, for the converted weights
        in `weights_dir` (weight_files.py: keyed by all that changes the files' bytes)."""
        tensors = [t for name, spec in sorted(self.program.weights.items()) for t in self.weight_tensors(name, spec)]
        key = entry_key(self.program.weights, {"users": self.decode_users, "tensors": tensors},
                        converted_identity(weights_dir), self.program.mesh_shape, weight_files_.ttnn_version())
        return WeightFiles(Path(weights_dir), key)

    def _load_weights(self, weights_dir: Path | None, weights: dict | None, use_files: bool = True) -> None:
        """Place every weight: from the program's ttnn weight files when a complete entry
        exists for this program, checkpoint, mesh and ttnn version; else converted on the
        host from the converted-weight cache, writing the entry on the way."""
        start = time.perf_counter()
        self.weight_load = {"from": "device" if weights is None and weights_dir is None else
                            "arrays" if weights is not None else "converted",
                            "files": None, "conversions": 0, "files_read": 0, "files_written": 0}
        self._reader = self._writer = None
        replace = False
        try:
            if weights is None and weights_dir is not None and use_files:
                files = self.weight_files_entry(Path(weights_dir))
                self.weight_load["files"] = str(files.path)
                if files.complete():
                    try:
                        self._reader = files.reader(self.ttnn)
                        self._place_weights(None)
                        self.weight_load.update({"from": "ttnn files", "files_read": self._reader.files_read})
                        return
                    except EntryError as e:
                        print(f"ttnn backend: not using the ttnn weight files in {files.path}: {e}; "
                              "converting the weights again", file=sys.stderr)
                        for name, spec in self.program.weights.items():
                            for t in self.weight_tensors(name, spec):
                                self.env.pop(t["name"], None)
                        replace = True
                    finally:
                        self._reader = None
                self._writer = files.writer(self.ttnn)
            if weights is None and weights_dir is not None:
                weights = read_weights(Path(weights_dir), set(self.program.weights))
            try:
                self._place_weights(weights)
            except BaseException:
                if self._writer is not None:
                    self._writer.abort()
                raise
            if self._writer is not None:
                try:
                    self._writer.commit(replace)
                    self.weight_load.update({"from": "converted, ttnn files written",
                                             "files_written": self._writer.files_written})
                except OSError as e:
                    self._writer.abort()
                    print(f"ttnn backend: writing the ttnn weight files failed ({e}); the next load converts "
                          "again", file=sys.stderr)
        finally:
            self._writer = None
            self.weight_load["seconds"] = round(time.perf_counter() - start, 3)

    def _place_weights(self, weights: dict | None) -> None:
        """Every weight on the device: from `weights` (name -> host array), from the entry
        being read (self._reader), or allocated (weight-free: neither)."""
        for name, spec in self.program.weights.items():
            host = None
            if self._reader is None and weights is not None:
                if name not in weights:
                    raise TtnnBackendError(f"weight '{name}' is missing from the converted weights")
                host = np.asarray(weights[name])
                if list(host.shape) != list(spec["shape"]):
                    raise TtnnBackendError(f"weight '{name}' has shape {list(host.shape)}, "
                                           f"the program expects {spec['shape']}")
            try:
                self._place_weight(name, spec, host)
            except (EntryError, TtnnBackendError):
                raise
            except Exception as e:  # noqa: BLE001 (ttnn's errors are RuntimeErrors)
                raise TtnnBackendError(
                    f"placing weight '{name}' ({spec['shape']} {spec['dtype']} {spec['layout']}, "
                    f"placement {spec.get('placement')}) on the {self.mode.describe()} failed:\n"
                    f"  {ttnn_message(e)}") from None

    def _place_weight(self, name: str, spec: dict, host: np.ndarray | None) -> None:
        """Weight `name` and its variants on the device: read from the entry being read,
        converted from `host`, or (neither: weight-free) allocated, contents undefined."""
        local = self.local_shape(spec["shape"], spec.get("placement"))
        for t in self.weight_tensors(name, spec):
            shape = self.local_shape(t["shape"], t["placement"])
            memory = self._per_user_memory(local) if t["kind"] == PER_USER else None
            if self._reader is None and host is None:
                self.env[t["name"]] = self.allocate(shape, t["dtype"], t["layout"], memory, zero=False)
            else:
                self.env[t["name"]] = self._weight_tensor(t, host, shape, memory)

    def host_conversion(self, t: dict, host: np.ndarray):
        """Device tensor `t` of a weight (from weight_tensors) converted on the host from the
        weight's array: tiled per user (PER_USER) or reshaped to a tile row (TILE_ROW), then
        tilized, block-float packed and split over the chips by ttnn."""
        array = np.asarray(host, np.float32) if t["kind"] else host
        if t["kind"] == PER_USER:
            array = np.tile(array, [1] * (array.ndim - 2) + [self.decode_users, 1])
        elif t["kind"] == TILE_ROW:
            array = array.reshape(t["shape"])
        return placement_.host_tensor(self.ttnn, array, t["dtype"], t["layout"], t["placement"],
                                      self.program.mesh_shape)

    def _weight_tensor(self, t: dict, host: np.ndarray | None, shape: list[int], memory):
        """One device tensor of a weight (`t`, from weight_tensors; `shape` one chip's):
        read from its ttnn file, or converted on the host (tilized, block-float packed,
        split over the chips) from the weight's `host` array and saved to the entry being
        written. Either way copied to DRAM, then moved to `memory` when given. (Given a
        device, ttnn 0.81.1 tilizes bfloat16 on the device with a grid taken from the mesh
        (8x8), which fails on chips with two harvested rows, and it cannot build a sharded
        tensor from a host array in one step: hence host conversion, then a copy.)"""
        ttnn = self.ttnn
        if self._reader is not None:
            tensor = self._reader.load(t["name"], self.mesh,
                                       {"shape": list(shape), "dtype": t["dtype"], "layout": t["layout"]})
        else:
            converted = self.host_conversion(t, host)
            self.weight_load["conversions"] += 1
            if self._writer is not None:
                try:
                    self._writer.save(t["name"], converted, t["placement"])
                except Exception as e:  # noqa: BLE001 (a full disk: OSError, or ttnn's RuntimeError)
                    self._writer.abort()  # the load goes on converting and writes no entry
                    self._writer = None
                    print(f"ttnn backend: writing the ttnn weight files failed ({ttnn_message(e)}); the weights "
                          "are converted on the host", file=sys.stderr)
            tensor = ttnn.to_device(converted, self.mesh, ttnn.DRAM_MEMORY_CONFIG)
        if memory is not None and memory != ttnn.DRAM_MEMORY_CONFIG:
            tensor = ttnn.to_memory_config(tensor, memory)
        return tensor
