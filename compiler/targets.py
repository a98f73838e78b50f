"""Tenstorrent systems as data: one row per system. A new mesh or chip is a new row; no
code branches on chip counts or architectures. Passes, the memory planner, the emulator
(mesh shape, which systems a program fits on) and the ttnn backend (the mock cluster
descriptor) all read this table. Torch-free: the ttnn environment imports it too.

Sources (per chip):
- Wormhole n150/n300: 12 GB GDDR6 in 12 banks, 288 GB/s, 1464 KiB L1 per Tensix core
  (docs.tenstorrent.com/aibs/wormhole/specifications; tt-metal's wormhole_b0_80_arch.yaml);
  worker grids as ttnn reports them on the public cluster descriptors (8x8 on N150, 8x7
  on N300/T3K chips, 8x9 on Galaxy).
- Blackhole p150/p300: 32 GB GDDR6 in 8 banks, 512 GB/s (docs.tenstorrent.com/aibs/
  blackhole/specifications; 512 GB/s for p300 is the same chip and memory, inferred),
  1536 KiB L1 per core (ttnn's blackhole_140_arch.yaml worker_l1_size), 11x10 worker
  grid on current firmware (120 Tensix cores, tt-metal's Blackhole bring-up guide);
  2 ethernet links between a p300's chips, 4 between neighbouring p150s of a 4xP150 ring
  (tt-umd's cluster descriptor examples, also checked on ttnn 0.81.1's mock).
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1 << 30


@dataclass(frozen=True)
class Target:
    name: str
    mesh_shape: tuple[int, int]  # (rows, cols) of the device mesh
    cluster_descriptor: str  # public UMD descriptor (runtime/ttnn_backend/clusters/) for ttnn's mock
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

    def holds(self, other: "Target") -> bool:
        """A program for `other` runs on a sub-mesh of this system (the seed's FAKE_DEVICE)."""
        return (self.arch == other.arch and other.mesh_shape[0] <= self.mesh_shape[0]
                and other.mesh_shape[1] <= self.mesh_shape[1])


_BLACKHOLE = dict(arch="blackhole", dram_bytes_per_chip=32 * GB, dram_banks=8, dram_bandwidth_gbs=512.0,
                  l1_bytes_per_core=1536 * 1024, core_grid=(11, 10))

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("N150", (1, 1), "n150_cluster_desc.yaml"),
        Target("N300", (1, 2), "n300_cluster_desc.yaml", core_grid=(8, 7)),
        Target("T3K", (1, 8), "t3k_cluster_desc.yaml", core_grid=(8, 7)),
        Target("TG", (8, 4), "6u_cluster_desc.yaml", links=2, core_grid=(8, 9), tp_axes=(0, 1)),
        Target("P150", (1, 1), "p150_cluster_desc.yaml", **_BLACKHOLE),
        Target("P300", (1, 2), "p300_cluster_desc.yaml", links=2, **_BLACKHOLE),
        Target("P150X4", (1, 4), "p150x4_cluster_desc.yaml", links=4, **_BLACKHOLE),
    )
}


def get_target(name: str) -> Target:
    key = name.upper()
    if key not in TARGETS:
        raise ValueError(f"unknown target '{name}' (choose one of {', '.join(TARGETS)})")
    return TARGETS[key]
