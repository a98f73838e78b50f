"""Program placements on a ttnn mesh, on the host: which part of a tensor each chip holds.

A placement is the program's {"dim", "axes", "partial"}: tensor dim `dim` split evenly
over the chips of mesh `axes`, flattened row-major in the order given; replicated over
the other axes (and everywhere when dim is None). Chips are numbered row-major over the
mesh, as ttnn's MeshDevice and the emulator number them.
"""
from __future__ import annotations

import numpy as np

from .ops import dtype_of, layout_of


def parts(placement: dict | None, mesh_shape) -> int:
    dim, axes = (placement or {}).get("dim"), (placement or {}).get("axes") or ()
    return 1 if dim is None else int(np.prod([mesh_shape[a] for a in axes]))


def chip_parts(mesh_shape, axes) -> list[int]:
    """For each chip, the index of the part it holds of a dim split over mesh `axes`."""
    rows, cols = mesh_shape
    out = []
    for chip in range(rows * cols):
        coord = divmod(chip, cols)
        index = 0
        for axis in axes:
            index = index * mesh_shape[axis] + coord[axis]
        out.append(index)
    return out


def local_shape(shape, placement: dict | None, mesh_shape) -> list[int]:
    """One chip's part of a tensor of global `shape`."""
    shape = list(shape)
    dim = (placement or {}).get("dim")
    if dim is not None:
        shape[dim] //= parts(placement, mesh_shape)
    return shape


def host_array(array: np.ndarray, dtype: str) -> np.ndarray:
    """The numpy array ttnn converts from: float32 for float dtypes (bfloat16 values are
    exact in it; ttnn rounds to bfloat16 and packs block floats itself, as its host
    conversion does for hardware), writable and contiguous (ttnn needs both)."""
    if dtype in ("bfloat16", "bfloat8_b", "bfloat4_b", "float32"):
        array = np.asarray(array, dtype=np.float32)
    elif dtype in ("uint32", "int32"):
        array = np.asarray(array, dtype=np.uint32 if dtype == "uint32" else np.int32)
    return np.require(array, requirements=["C", "W"])


def host_tensor(ttnn, array: np.ndarray, dtype: str, layout: str, placement: dict | None, mesh_shape):
    """A multi-chip host tensor holding each chip's part (tilized, packed), no device needed."""
    array = host_array(array, dtype)
    dim, axes = (placement or {}).get("dim"), list((placement or {}).get("axes") or ())
    if dim is not None and len(axes) > 1:
        # One dim over several mesh axes: ttnn's mappers shard a dim along one axis only,
        # so the chips' parts are cut here.
        chunks = np.split(array, parts(placement, mesh_shape), axis=dim)
        shards = [ttnn.Tensor(np.ascontiguousarray(chunks[p]), dtype_of(ttnn, dtype), None, layout_of(ttnn, layout))
                  for p in chip_parts(mesh_shape, axes)]
        return ttnn.from_host_shards(shards, ttnn.MeshShape(*mesh_shape))
    mapping = [ttnn.PlacementShard(int(dim)) if dim is not None and axis in axes else ttnn.PlacementReplicate()
               for axis in range(len(mesh_shape))]
    mapper = ttnn.create_mesh_mapper(ttnn.MeshShape(*mesh_shape), ttnn.MeshMapperConfig(mapping))
    return ttnn.Tensor(array, dtype_of(ttnn, dtype), None, layout_of(ttnn, layout), mesh_mapper=mapper)


def join(chip_arrays: list[np.ndarray], placement: dict | None, mesh_shape) -> np.ndarray:
    """The global tensor from every chip's part: chip 0's when replicated, the parts
    concatenated along dim when split, summed over `axes` when partial."""
    placement = placement or {}
    dim, axes = placement.get("dim"), list(placement.get("axes") or ())
    cols = mesh_shape[1]
    if placement.get("partial") and axes:
        home = divmod(0, cols)
        group = [c for c in range(len(chip_arrays))
                 if all(divmod(c, cols)[a] == home[a] for a in range(2) if a not in axes)]
        return sum(chip_arrays[c] for c in group)
    if dim is None or not axes:
        return chip_arrays[0]
    first: dict[int, int] = {}
    for chip, part in enumerate(chip_parts(mesh_shape, axes)):
        first.setdefault(part, chip)
    return np.concatenate([chip_arrays[first[p]] for p in sorted(first)], axis=dim)
