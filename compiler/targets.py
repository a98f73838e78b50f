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

Speed (compiler/cost.py reads these; tt-metal paths are tenstorrent/tt-metal's tech_reports/):
- Matrix engine: 8x16 x 16x16 per cycle per Tensix core = 4096 FLOPs a cycle at LoFi;
  HiFi2 / HiFi3 / HiFi4 take 2 / 3 / 4 passes. Clock 1 GHz on Wormhole (4 TFLOPS a core),
  1.35 GHz on Blackhole (5.4) (matrix_engine/matrix_engine.md, GEMM_FLOPS/GEMM_FLOPS.md).
  It agrees with the n150 spec page (72 Tensix cores, 1 GHz AI clock): BLOCKFP8 148
  TFLOPS = 72 cores x 4096 / 2 (HiFi2), FP16 74 = 72 x 4096 / 4 (HiFi4), FP8 262 = 64 x
  4096 (LoFi). Ops get the worker grid (`core_grid`), not all 72 cores.
- DRAM as ttnn's ops reach it: Wormhole about 190 GB/s for DRAM-interleaved matmul
  weights and 240 GB/s DRAM-sharded, of 288 peak (LLMs/llms.md §4.6.1; the DRAM-sharded
  matmul reached 239-260 GB/s in Llama3-70B decode, Saturating_DRAM_bandwidth/
  Saturating_DRAM_bandwidth.md). Blackhole: 344 GB/s (67%) for readers not placed next
  to their bank, 500 GB/s (98%) for bank-adjacent ones, of 512 (Saturating_DRAM_bandwidth/
  Saturating_DRAM_bandwidth_Blackhole.md); the same two cases as interleaved / sharded.
- NoC: 32 B a cycle per core on Wormhole, 64 B on Blackhole (the same Blackhole report's
  table): what one core can move, so an op spread over few cores is bounded by it.
- Ethernet: 100 Gb/s = 12.5 GB/s per link per direction on Wormhole; Blackhole's links
  are rated 400 Gb/s and run at half that today, 25 GB/s (CCLs/CCL_bandwidth.md).
  Collective start-up, fitted to back-to-back traced calls at the smallest sizes
  (CCLs/results/SUMMARY_wormhole_b0_bfloat16_6144.md): all_reduce 9.07 us + 5.82 us per
  further chip, all_gather 4.47 + 1.91; Blackhole (SUMMARY_blackhole_bfloat16_8192.md,
  fitted here to its 2- and 4-chip lines at 4-8 KiB): all_reduce 4.1 + 5.0, all_gather
  2.8 + 1.5. A T3000's 8 chips and a 4xP150 close a ring; TG's axes are lines.
- Dispatch: with trace the gap between ops is typically below 6 us (LLMs/llms.md
  §4.5.5). Without trace the host builds and sends every op: a small matmul took 49 us
  untraced and 20 us traced on N150 (GEMM_FLOPS.md, out-of-box table, 512x512x512), so
  about 30 us of host time an op; the host runs ahead, so an op costs the larger of it
  and the device's time. The shortest kernels of the reference's tuned Llama-70B galaxy
  decoder run 2.0-2.7 us (a reshard, a residual add on L1-sharded tensors: perf_targets
  in models/demos/llama3_subdevices/tests/test_decoder_device_perf.py): an op's floor.
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
    # Speed (compiler/cost.py; sources above)
    clock_ghz: float = 1.0  # Tensix AI clock
    matmul_flops_per_cycle: int = 4096  # per core at LoFi; HiFi2/3/4 divide by 2/3/4
    noc_bytes_per_cycle: int = 32  # what one core moves a cycle
    dram_interleaved_gbs: float = 190.0  # per chip, as ttnn's DRAM-interleaved ops reach it
    dram_sharded_gbs: float = 240.0  # per chip, DRAM-sharded matmul weights
    eth_link_gbs: float = 12.5  # per ethernet link per direction
    ccl_ring: bool = False  # the tensor-parallel axis closes a ring
    ccl_all_reduce_us: tuple[float, float] = (9.07, 5.82)  # start-up: base, per further chip
    ccl_all_gather_us: tuple[float, float] = (4.47, 1.91)
    op_gap_traced_us: float = 6.0  # device time between ops under trace
    op_kernel_min_us: float = 2.0  # the shortest an op's kernel runs (read off a tuned decoder)
    op_dispatch_host_us: float = 30.0  # host time to dispatch one op without trace (derived, see above)

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
                  l1_bytes_per_core=1536 * 1024, core_grid=(11, 10),
                  clock_ghz=1.35, noc_bytes_per_cycle=64, dram_interleaved_gbs=344.0, dram_sharded_gbs=500.0,
                  eth_link_gbs=25.0, ccl_all_reduce_us=(4.1, 5.0), ccl_all_gather_us=(2.8, 1.5))

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("N150", (1, 1), "n150_cluster_desc.yaml"),
        Target("N300", (1, 2), "n300_cluster_desc.yaml", core_grid=(8, 7)),
        Target("T3K", (1, 8), "t3k_cluster_desc.yaml", core_grid=(8, 7), ccl_ring=True),
        Target("TG", (8, 4), "6u_cluster_desc.yaml", links=2, core_grid=(8, 9), tp_axes=(0, 1)),
        Target("P150", (1, 1), "p150_cluster_desc.yaml", **_BLACKHOLE),
        Target("P300", (1, 2), "p300_cluster_desc.yaml", links=2, **_BLACKHOLE),
        Target("P150X4", (1, 4), "p150x4_cluster_desc.yaml", links=4, ccl_ring=True, **_BLACKHOLE),
    )
}


def get_target(name: str) -> Target:
    key = name.upper()
    if key not in TARGETS:
        raise ValueError(f"unknown target '{name}' (choose one of {', '.join(TARGETS)})")
    return TARGETS[key]
