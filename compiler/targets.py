"""Tenstorrent systems as data. A new mesh is a new row; no code branches on chip counts."""
from __future__ import annotations

from dataclasses import dataclass

GB = 1 << 30


@dataclass(frozen=True)
class Target:
    name: str
    mesh_shape: tuple[int, int]  # (rows, cols) of the device mesh
    arch: str = "wormhole_b0"
    dram_bytes_per_chip: int = 12 * GB
    dram_banks: int = 12
    dram_bandwidth_gbs: float = 288.0  # per chip, peak
    l1_bytes_per_core: int = 1464 * 1024
    core_grid: tuple[int, int] = (8, 8)
    links: int = 1  # ethernet links used by collectives between neighbours
    tp_axes: tuple[int, ...] = (1,)  # mesh axes tensor parallelism spans (flattened)
    supported: bool = True  # compiled end to end by this version

    @property
    def num_chips(self) -> int:
        return self.mesh_shape[0] * self.mesh_shape[1]

    @property
    def tp_size(self) -> int:
        """Chips a tensor-parallel weight is split over."""
        size = 1
        for axis in self.tp_axes:
            size *= self.mesh_shape[axis]
        return size


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("N150", (1, 1)),
        # Worker grids as the public cluster descriptors give them (ttnn validates against these).
        Target("N300", (1, 2), core_grid=(8, 7)),
        Target("T3K", (1, 8), core_grid=(8, 7)),
        Target("TG", (8, 4), links=2, core_grid=(8, 9), tp_axes=(0, 1)),
    )
}


def get_target(name: str) -> Target:
    key = name.upper()
    if key not in TARGETS:
        raise ValueError(f"unknown target '{name}' (choose one of {', '.join(TARGETS)})")
    return TARGETS[key]
