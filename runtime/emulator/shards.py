"""Each chip's piece of a weight, read from the converted-weight cache piece by piece.

A weight placed over mesh axes is split as `torch.chunk(parts, dim)` and chip c holds
piece `shard_index(c)` (place, the rule the ttnn backend shares). A process that
holds only some chips (ranks.py) reads only their pieces: safetensors slices read those
bytes alone. Every piece is rounded to the weight's device dtype on its own, which gives
the whole tensor's rounding cut into pieces: bfloat16/float32 rounding is per element,
and a block float's exponent groups are 16 consecutive values along the last dimension,
so a cut along it at a multiple of 16 splits no group (any other cut: the whole tensor is
rounded first).
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch

from .. import blockfloat
from .ops import quantize_like


def shard_index(chip: int, mesh_shape, axes) -> int:
    """Which piece of a tensor split over mesh `axes` chip `chip` holds."""
    coords = divmod(chip, mesh_shape[1])
    index = 0
    for axis in axes:
        index = index * mesh_shape[axis] + coords[axis]
    return index


def place(tensor: torch.Tensor, placement: dict | None, mesh_shape) -> list[torch.Tensor]:
    """A global tensor as the per-chip list its placement describes."""
    chips = mesh_shape[0] * mesh_shape[1]
    if not placement or placement.get("dim") is None:
        return [tensor] * chips
    parts = 1
    for axis in placement["axes"]:
        parts *= mesh_shape[axis]
    pieces = tensor.chunk(parts, dim=placement["dim"])
    return [pieces[shard_index(c, mesh_shape, placement["axes"])].contiguous() for c in range(chips)]


class WeightSource:
    """The cache's tensors by name (or an in-memory dict), read whole or as slices."""

    def __init__(self, weights_dir: Path | None, weights: dict | None):
        self.memory = weights
        self._files = ExitStack()
        self._open: dict[str, object] = {}
        if weights is None:
            self.index = json.loads((Path(weights_dir) / "index.json").read_text())["weights"]
            self.dir = Path(weights_dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._files.close()

    def __contains__(self, name: str) -> bool:
        return name in (self.memory if self.memory is not None else self.index)

    def _file(self, name: str):
        from safetensors.torch import safe_open

        shard = self.index[name]
        if shard not in self._open:
            self._open[shard] = self._files.enter_context(safe_open(str(self.dir / shard), framework="pt"))
        return self._open[shard]

    def shape(self, name: str) -> list[int]:
        if self.memory is not None:
            return list(self.memory[name].shape)
        return list(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The tensor, or its [start, end) along `dim`."""
        if self.memory is not None:
            t = self.memory[name]
            return t if dim is None else t.narrow(dim, start, end - start)
        if dim is None:
            return self._file(name).get_tensor(name)
        return self._file(name).get_slice(name)[(slice(None),) * dim + (slice(start, end),)]


def chip_pieces(source: WeightSource, name: str, spec: dict, mesh_shape, chips) -> list[torch.Tensor]:
    """The weight `name` as held by each chip in `chips` (global row-major numbers), rounded
    to its device dtype; chips holding the same piece get the same tensor object."""
    placement, dtype = spec.get("placement"), spec["dtype"]
    if not placement or placement.get("dim") is None:
        whole = quantize_like(source.read(name), dtype)
        return [whole] * len(chips)
    parts = 1
    for axis in placement["axes"]:
        parts *= mesh_shape[axis]
    shape = source.shape(name)
    dim = placement["dim"] % len(shape)
    size = -(-shape[dim] // parts)  # torch.chunk's piece length
    wanted = {c: shard_index(c, mesh_shape, placement["axes"]) for c in chips}
    bounds = {k: (k * size, min(shape[dim], (k + 1) * size)) for k in set(wanted.values())}
    if dtype in blockfloat.FORMATS and dim == len(shape) - 1 and size % blockfloat.GROUP:
        whole = quantize_like(source.read(name), dtype)
        pieces = {k: whole.narrow(dim, a, b - a).contiguous() for k, (a, b) in bounds.items()}
    else:
        pieces = {k: quantize_like(source.read(name, dim, a, b), dtype).contiguous() for k, (a, b) in bounds.items()}
    return [pieces[wanted[c]] for c in chips]
