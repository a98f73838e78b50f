"""Converted weights as numpy arrays, read without torch (bfloat16 via ml_dtypes).

The weight cache is safetensors (`index.json` maps names to shard files). The format is an
8-byte little-endian header length, a JSON header (dtype, shape, data_offsets per tensor)
and raw little-endian data, so it is read here directly: safetensors' own numpy API has no
bfloat16.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
    "U32": np.uint32, "BOOL": np.bool_,
}


class WeightFileError(ValueError):
    pass


def read_safetensors(path: Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file (all, or those in `names`) as numpy arrays."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    (length,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8: 8 + length]))
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or (names is not None and name not in names):
            continue
        if info["dtype"] not in _DTYPES:
            raise WeightFileError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[base + start: base + end], dtype=_DTYPES[info["dtype"]])
        out[name] = array.reshape(info["shape"])
    return out


def read_weights(weights_dir: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The named tensors of a converted-weight cache entry (memory-mapped, shard by shard)."""
    weights_dir = Path(weights_dir)
    index = json.loads((weights_dir / "index.json").read_text())["weights"]
    missing = sorted(names - set(index))
    if missing:
        raise WeightFileError(f"weights {missing[:3]} are missing from {weights_dir}")
    out = {}
    for shard in sorted({index[n] for n in names}):
        out.update(read_safetensors(weights_dir / shard, {n for n in names if index[n] == shard}))
    return out
