"""Validation of a program on ttnn: replay every function once and summarise what ttnn
accepted, the DRAM in use and each op kind's largest per-core L1 footprint. A mixin of
TtnnBackend (backend.py holds loading and execution)."""
from __future__ import annotations

import time
from collections import Counter

import numpy as np

from lowering.program import SEQ, concrete_dim

TILE = 32
VALIDATE_PREFILL_ROWS = 128  # the smallest prefill the runtime issues (prompts pad to 128)
# Llama 3.2 Vision's float host inputs (runtime/image_slots.py, runtime/vision_inputs.py):
# the vision function's pixels [T, 3, tile, tile] and encoder mask [1, 1, T*Np, T*Np]; the
# text functions' cross-attention rows [1, 1, R, L] and row mask [1, 1, R, 1]. Zeros: an
# all-black image, masks that hide nothing (every position is a real number either way).
FLOAT_INPUTS = ("pixels", "encoder_mask", "xattn_mask", "row_mask")
# Host scalars other than 0: aspect ratio 1 (the first real one; 0 is the table's padding
# row); user 0's slot, which the vision function writes and prefill reads.
SCALARS = {"aspect_ratio_id": 1, "user_id": 0}
# The order functions replay in: the image into user 0's cross-attention caches, then the
# prompt (which reads them), then a decode step.
FUNCTION_ORDER = ("vision", "prefill", "decode")


class Validation:
    # ------------------------------------------------------------------ L1 footprints
    def l1_bytes_per_core(self) -> int:
        """L1 the allocator manages per core (a chip's L1 minus what firmware reserves)."""
        ttnn = self.ttnn
        return int(ttnn.get_memory_view(self.mesh, ttnn.BufferType.L1).total_bytes_per_bank)

    def _l1_in_use(self) -> int:
        ttnn = self.ttnn
        return int(ttnn.get_memory_view(self.mesh, ttnn.BufferType.L1).total_bytes_allocated_per_bank)

    def _measure(self, fn_name: str, step, args: list, kwargs: dict) -> None:
        """The op's worst per-core L1 use, from ttnn's graph capture of it in NO_DISPATCH mode
        (programs built, nothing allocated or run): circular buffers, L1 outputs and kernel
        buffers, plus the L1 tensors alive when it runs. Recorded per op kind."""
        graph = self.ttnn._ttnn.graph
        live = self._l1_in_use()
        graph.begin_graph_capture(graph.RunMode.NO_DISPATCH)
        try:
            step.impl(self._call(step.op, step.out_memory), *args, **dict(kwargs))
        except Exception:  # noqa: BLE001 (the real call right after reports ttnn's error)
            return
        finally:
            trace = graph.end_graph_capture()
        usage = graph.extract_resource_usage_per_core(trace)
        total = int(usage.peak_total) + live
        key = (fn_name, step.op.op)
        best = self.footprints.get(key)
        if best is None or total > best["bytes_per_core"]:
            self.footprints[key] = {
                "bytes_per_core": total, "circular_buffers": int(usage.peak_cb) + int(usage.peak_dataflow_buffer),
                "op_l1_buffers": int(usage.peak_l1), "live_l1_tensors": live,
                "node": step.op.node, "layer": step.op.layer}

    # ------------------------------------------------------------------ validation
    def validation_inputs(self, fn_name: str, rows: int = VALIDATE_PREFILL_ROWS, chunk_start: int = 0
                          ) -> tuple[dict, dict]:
        """Host inputs for one replay: prefill of `rows` rows for user 0 from position
        `chunk_start` (a later chunk of a chunked prefill, paged programs only); decode of
        the program's batch (every user at position chunk_start + rows, right after);
        Llama 3.2 Vision's image of user 0 (vision: pixels and encoder mask, aspect ratio 1)
        and the masks of the text functions (float32 zeros, FLOAT_INPUTS)."""
        fn = self.program.functions[fn_name]
        if chunk_start:
            block = int(self.program.options.get("block_size") or 0)
            if not self.program.options.get("paged_attention") or chunk_start % block:
                raise ValueError(f"chunk_start {chunk_start}: only paged programs prefill in chunks, "
                                 f"from multiples of the block size ({block or '-'})")
        inputs = {}
        for spec in fn.inputs:
            shape = [concrete_dim(d, rows) for d in spec.shape]
            size = int(np.prod(shape))
            if spec.source in FLOAT_INPUTS:  # pixels and masks: float32 at the program's shape
                inputs[spec.source] = np.zeros(shape, dtype=np.float32)
                continue
            if spec.source == "positions":
                values = chunk_start + np.arange(size) if SEQ in spec.shape else np.full(size, chunk_start + rows)
            elif spec.source == "chunk_page_table":  # the blocks of user 0's row this chunk writes
                values = chunk_start // int(self.program.options["block_size"]) + np.arange(size)
            elif spec.source == "page_table":  # every user its own blocks
                values = np.arange(size) % max(1, int(self.program.options.get("max_num_blocks") or 1))
            else:
                values = np.ones(size)
            inputs[spec.source] = values.astype(np.int64).reshape(1, -1)
        scalars = {name: SCALARS.get(name, 0) for name in fn.scalars}
        if "chunk_start" in scalars:
            scalars["chunk_start"] = chunk_start
        if "last_tile_start" in scalars:
            scalars["last_tile_start"] = rows - TILE
        return inputs, scalars

    def function_order(self, functions=None) -> list[str]:
        """The program's functions (or `functions`) in the order a request runs them."""
        return sorted(functions or self.program.functions,
                      key=lambda n: (FUNCTION_ORDER.index(n) if n in FUNCTION_ORDER else len(FUNCTION_ORDER), n))

    def warm_up(self, prefill_rows: int = VALIDATE_PREFILL_ROWS) -> dict[str, float]:
        """Run every function once (vision, prefill of `prefill_rows` rows, then decode) on
        the validation inputs, then zero the state; returns the seconds each took. The first
        call of an op compiles its kernels and fills ttnn's program cache, and later calls
        with the same shapes reuse them: so the first request is timed like any other (a
        prompt padded to more rows than the warm-up's still compiles its prefill kernels
        on first use)."""
        seconds = {}
        for name in self.function_order():
            inputs, scalars = self.validation_inputs(name, prefill_rows)
            start = time.perf_counter()
            self.run(name, inputs, scalars)
            seconds[name] = time.perf_counter() - start
        self.reset()
        return seconds

    def validate(self, prefill_rows: int = VALIDATE_PREFILL_ROWS, footprints: bool = True,
                 functions: tuple[str, ...] | None = None, chunk_start: int = 0) -> dict:
        """Replay every function once (vision, prefill, then decode) and return a summary: ops issued
        per function (always all of them), target, mock or real device, the memory moves
        ops needed that the program does not contain, DRAM in use per chip (weights and
        state), and with `footprints` the largest per-core L1 use per op kind (flagging any
        over the core's L1). `functions` limits the replay (all by default); `chunk_start`
        makes the prefill a later chunk of a chunked prefill (paged programs). Raises
        TtnnOpError at the first op ttnn rejects."""
        summary = {"target": self.program.target, "mesh_shape": list(self.program.mesh_shape),
                   "device": "mock" if self.mode.mock else "real",
                   "cluster_descriptor": self.mode.cluster_descriptor,
                   "weights": self.weight_source, "weight_load": dict(self.weight_load),
                   "decode_users_per_chip": self.decode_users,
                   "chunk_start": chunk_start, "functions": {}}
        order = self.function_order(functions)
        moves_before = Counter(self.moves)
        self.footprints = {} if footprints else None
        self.reset()
        for name in order:
            fn = self.program.functions[name]
            inputs, scalars = self.validation_inputs(name, prefill_rows, chunk_start)
            before = self.ops_executed[name]
            start = time.perf_counter()
            self.run(name, inputs, scalars)
            summary["functions"][name] = {
                "ops_issued": self.ops_executed[name] - before, "ops_in_program": len(fn.ops),
                "rows": self._seq_of(fn, inputs),
                "op_counts": dict(Counter(op.op for op in fn.ops)),
                "seconds": round(time.perf_counter() - start, 3)}
        self.reset()
        if footprints:
            capacity = self.l1_bytes_per_core()
            summary["l1"] = {
                "bytes_per_core": capacity,
                "largest_per_op": {f"{f}:{o}": entry for (f, o), entry in sorted(self.footprints.items())},
                "over_capacity": sorted(f"{f}:{o}" for (f, o), e in self.footprints.items()
                                        if e["bytes_per_core"] > capacity)}
            self.footprints = None
        dram = self.ttnn.get_memory_view(self.mesh, self.ttnn.BufferType.DRAM)
        summary["dram_bytes_per_chip"] = {"allocated": int(dram.total_bytes_allocated_per_bank) * int(dram.num_banks),
                                          "total": int(dram.total_bytes_per_bank) * int(dram.num_banks)}
        summary["memory_moves"] = [
            {"function": f, "op": o, "operand": w, "from": a, "to": b, "count": n}
            for (f, o, w, a, b), n in sorted((self.moves - moves_before).items())]
        summary["ok"] = (all(f["ops_issued"] == f["ops_in_program"] for f in summary["functions"].values())
                         and not summary.get("l1", {}).get("over_capacity"))
        return summary
