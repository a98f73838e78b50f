"""The CPU emulator backend: holds a Program's weights and state and runs its functions.

Weights are read from the converted-weight cache, split by their placement and rounded
to their device dtype once, at load (block floats through the shared numpy quantiser);
matmul weights are also prepared once as the matrix unit sees them (fidelity.py). Each
function is prepared once into steps (steps.py). A one-chip program runs them in a lean
loop; a mesh runs them batched with the chips as leading dimensions (mesh.py), or chip
by chip (`mesh_batched=False`, the reference the batched path is tested against).

With `ranks` (ranks.py: this process is one rank of a torch.distributed group) the
backend holds only its rank's block of the mesh: those chips' weight shards (read alone
from the cache, shards.py), KV pools and mesh values; collectives gather across ranks.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from compiler.targets import TARGETS
from lowering.optable import OPS
from lowering.program import Function, Program, is_tensor_ref, tensor_name

from . import active_rows, mesh
from .fidelity import Multiplier, PreparedWeight, prepare_weight
from .ops import COLLECTIVE_IMPLS, IMPLS, TORCH_DTYPES
from .pools import MeshPagePool, PagePool
from .ranks import RankLayout
from .shards import WeightSource, chip_pieces
from .steps import (EmulatorError, Step, as_device, attach_releases, run_chip_by_chip, run_one_chip,
                    step_arg)

# Ops that reach a paged KV cache only through page tables: caches read by nothing else
# are page pools (pools.py), with memory for the blocks written.
PAGED_CACHE_ARGS = {"ttnn.experimental.paged_update_cache": (0,), "ttnn.experimental.paged_fill_cache": (0,),
                    "ttnn.transformer.paged_scaled_dot_product_attention_decode": (1, 2),
                    "ttnn.transformer.chunked_scaled_dot_product_attention": (1, 2)}


def matmul_operand(weight_kn: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """A `[K, N]` weight as the `[N, K]` operand F.linear wants, in the dtype its products
    are computed in (values unchanged: bfloat16 values are exact in float32). bfloat16
    by default: decode is bandwidth-bound, and oneDNN's bf16 kernels accumulate in fp32
    as the device does."""
    t = weight_kn.t().contiguous()
    return t if t.dtype == compute or t.dtype == torch.float32 else t.to(compute)


class EmulatorBackend:
    name = "emulator"

    def __init__(self, program: Program, weights_dir: Path | None, weights: dict | None = None,
                 system: str | None = None, emulate_fidelity: bool = True, mesh_batched: bool = True,
                 ranks=None):
        self.program = program
        self.mesh_shape = tuple(program.mesh_shape)
        self.chips = self.mesh_shape[0] * self.mesh_shape[1]
        # ranks.RankGroup: this process holds one block of the mesh (`lead` chips, `held`).
        self.ranks = ranks
        self.layout = RankLayout.of(self.mesh_shape, ranks.world) if ranks else None
        self.lead = self.layout.block if ranks else self.mesh_shape
        self.held = self.layout.chips(ranks.rank) if ranks else list(range(self.chips))
        if ranks and not mesh_batched:
            raise ValueError("ranks run the batched mesh emulator only (mesh_batched=True)")
        # Meshes run with the chips as leading dimensions (mesh.py); False: chip by chip.
        self.mesh_batched = ranks is not None or (mesh_batched and self.chips > 1)
        # Matmuls as Wormhole's FPU computes them (runtime/emulator/fidelity.py); False:
        # exact products, the same deterministic float64 accumulation.
        self.emulate_fidelity = emulate_fidelity
        self.multiplier_weights: dict[str, list] = {}
        self.system = self._open_system(system)
        self.linear_weights = self._linear_weight_names(program)
        self.lookup_tables = self._lookup_tables(program)
        self.page_pools = self._page_pool_names(program)
        self.env: dict[str, list[torch.Tensor]] = {}
        self.sampling_rngs = [np.random.default_rng(u) for u in range(32)]
        self.user_generators = active_rows.UserGenerators(self.sampling_rngs)
        self.row_dims = {name: active_rows.row_dims(fn) for name, fn in program.functions.items()}
        self.prefill_trimmable = {name: active_rows.prefill_trimmable(fn) and bool(self.page_pools)
                                  for name, fn in program.functions.items()}
        self._load_weights(weights_dir, weights)
        self.reset()
        self.steps = {name: self._prepare(fn) for name, fn in program.functions.items()}
        self.mesh_weights = self._stack_weights() if self.mesh_batched else {}
        for name, key in self._multiplied_as_stored().items():  # each weight held once
            self.env[name] = list(self.env[key])
        _return_freed_memory()
        self.ops_executed: Counter = Counter()
        self.collectives_executed: Counter = Counter()
        self.invocations: Counter = Counter()
        if ranks:  # every rank loaded: the first collective waits on nobody's loading
            ranks.barrier("loaded")

    def _open_system(self, system: str | None) -> str:
        """A program for a smaller mesh runs on a sub-mesh of a larger system (FAKE_DEVICE)."""
        if system is None:
            return self.program.target
        if system.upper() not in TARGETS:
            raise ValueError(f"unknown system '{system}' (choose {', '.join(TARGETS)})")
        host, guest = TARGETS[system.upper()], TARGETS[self.program.target]
        if not host.holds(guest):
            raise ValueError(f"a {guest.name} program ({guest.arch}, mesh {list(guest.mesh_shape)}) does "
                             f"not fit a {host.name} system ({host.arch}, mesh {list(host.mesh_shape)})")
        return host.name

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _linear_weight_names(program: Program) -> dict[str, torch.dtype]:
        """Matmul weights, with the dtype their products are computed in (float32 where a
        linear writes float32, e.g. partial sums before an all_reduce)."""
        names = {}
        for fn in program.functions.values():
            for op in fn.ops:
                name = tensor_name(op.args[1]) if op.op == "ttnn.linear" else None
                if name in program.weights:
                    wide = op.kwargs.get("dtype") == "float32"
                    names[name] = torch.float32 if wide else names.get(name, torch.bfloat16)
        return names

    @staticmethod
    def _lookup_tables(program: Program) -> set[str]:
        """Weights only ttnn.embedding reads, as its table: held as stored (a lookup copies
        rows; widening a vocabulary table to float32 would double its bytes)."""
        tables, other = set(), set()
        for fn in program.functions.values():
            for op in fn.ops:
                refs = [(i, a) for i, a in enumerate(op.args)] + [(None, v) for v in op.kwargs.values()]
                for i, a in refs:
                    if is_tensor_ref(a) and tensor_name(a) in program.weights:
                        (tables if op.op == "ttnn.embedding" and i == 1 else other).add(tensor_name(a))
        return tables - other

    @staticmethod
    def _page_pool_names(program: Program) -> set[str]:
        """State tensors only paged ops read, each through a page table."""
        paged, other = set(), set()
        for fn in program.functions.values():
            for op in fn.ops:
                by_table = PAGED_CACHE_ARGS.get(op.op, ())
                if op.op == "ttnn.experimental.paged_update_cache" and op.kwargs.get("page_table") is None:
                    by_table = ()
                for i, a in enumerate(op.args):
                    if is_tensor_ref(a) and tensor_name(a) in program.state:
                        (paged if i in by_table else other).add(tensor_name(a))
                for v in op.kwargs.values():
                    if is_tensor_ref(v) and tensor_name(v) in program.state:
                        other.add(tensor_name(v))
        return paged - other

    def _multiplied_as_stored(self) -> dict[str, str]:
        """Weights no step reads but through one matmul operand holding their very values
        (multiplied as stored) -> that operand's name: the operand alone holds them."""
        read = {name for steps in self.steps.values() for step in steps
                for kind, v in [*step.args, *step.kwargs.values()] if kind in ("t", "tl")
                for name in (v if kind == "tl" else [v])}
        return {key.split("#")[0]: key for key, pieces in self.multiplier_weights.items()
                if key.split("#")[0] not in read and all(p.as_stored for p in pieces)}

    def _stack_weights(self) -> dict:
        """Weights (and their matmul operands) as mesh values; the per-chip lists become
        views of them, so nothing is held twice (a weight multiplied as stored: its
        operand's views, set by the caller)."""
        as_stored = self._multiplied_as_stored()
        stacked = {}
        for name in list(self.multiplier_weights) + [w for w in self.program.weights if w not in as_stored]:
            value = stacked[name] = mesh.stack_weight(self.env[name], self.lead)
            if mesh._is_replicated(value):
                continue
            self.env[name] = mesh.chip_views(value, self.lead)
            if name in self.multiplier_weights:
                self.multiplier_weights[name] = self.env[name]
        return stacked

    def _load_weights(self, weights_dir: Path | None, weights: dict | None) -> None:
        """The held chips' pieces of every weight (only those are read), as the ops read them."""
        with WeightSource(weights_dir, weights) as source:
            for name, spec in self.program.weights.items():
                if name not in source:
                    raise EmulatorError(f"weight '{name}' is missing from the converted weights")
                pieces = chip_pieces(source, name, spec, self.mesh_shape, self.held)
                by_id = {}
                for p in pieces:
                    if id(p) not in by_id:
                        # Matmul operands [N, K]; lookup tables as stored; norm weights, rope
                        # tables, biases widened to the float32 ops read them in (exactly, once).
                        by_id[id(p)] = (matmul_operand(p, self.linear_weights[name]) if name in self.linear_weights
                                        else p if name in self.lookup_tables else p.float())
                self.env[name] = [by_id[id(p)] for p in pieces]

    def another_replica(self) -> "EmulatorBackend":
        """A data-parallel replica of this backend (runtime/replicas.py): the same program
        and weight tensors (shared: ops never write weights), its own state, sampling
        generators and counters."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.env = {name: self.env[name] for name in self.program.weights}
        other.sampling_rngs = [np.random.default_rng(u) for u in range(32)]
        other.user_generators = active_rows.UserGenerators(other.sampling_rngs)
        other.reset()
        other.steps = {name: other._prepare(fn) for name, fn in self.program.functions.items()}
        other.ops_executed, other.collectives_executed, other.invocations = Counter(), Counter(), Counter()
        return other

    def seed_sampling(self, seeds) -> None:
        """Seed each user's sampling generator (ttnn.manual_seed per user on a device)."""
        self.sampling_rngs[:] = [np.random.default_rng(int(s)) for s in seeds]

    def zero_state_rows(self, names, row: int) -> None:
        """Zero row `row` (a user) of the named state tensors on every chip (Llama 3.2
        Vision: the cross-attention caches of a user without an image)."""
        for name in names:
            if self.mesh_batched:
                self.env[name][:, :, row] = 0
                continue
            for piece in {id(p): p for p in self.env[name]}.values():
                piece[row] = 0

    def reset(self) -> None:
        """Zero all device state (KV caches)."""
        for name, spec in self.program.state.items():
            dtype = TORCH_DTYPES[spec.dtype]
            piece = self._chip_shape(spec)
            if name in self.page_pools:
                self.env[name] = (MeshPagePool(self.lead, piece, dtype) if self.mesh_batched
                                  else [PagePool(piece, dtype) for _ in range(self.chips)])
            elif self.mesh_batched:
                self.env[name] = torch.zeros(*self.lead, *piece, dtype=dtype)
            else:
                self.env[name] = [torch.zeros(piece, dtype=dtype) for _ in range(self.chips)]

    @property
    def block_size(self) -> int:
        """Tokens per KV block: a page pool is [blocks, Hkv, block_size, hd]."""
        return int(self.program.state[next(iter(self.page_pools))].shape[2])

    def _chip_shape(self, spec) -> list[int]:
        """One chip's shape of a state tensor (split by its placement, as place() splits)."""
        shape = list(spec.shape)
        placement = spec.placement
        if placement and placement.get("dim") is not None:
            parts = 1
            for axis in placement["axes"]:
                parts *= self.mesh_shape[axis]
            dim = placement["dim"]
            shape[dim] = torch.empty(shape[dim], 0).chunk(parts)[0].shape[0]
        return shape

    # ------------------------------------------------------------------ preparation
    def _prepare(self, fn: Function) -> list[Step]:
        known = set(self.env) | set(fn.tensors)
        steps = []
        for op in fn.ops:
            if op.op not in IMPLS:
                raise EmulatorError(f"op {op.op} has no emulator implementation")
            args = [step_arg(a, known) for a in op.args]
            kwargs = {k: step_arg(v, known) for k, v in op.kwargs.items()}
            if op.op == "ttnn.linear" and tensor_name(op.args[1]) in self.program.weights:
                args[1] = ("t", self._multiplier_weight(op))
            collective = op.op in COLLECTIVE_IMPLS
            if collective:
                kwargs["mesh_shape"] = ("v", self.mesh_shape)
            if OPS[op.op].outputs == 0:
                cache = tensor_name(op.args[0])
                kwargs["cache_dtype"] = ("v", self.program.state[cache].dtype)
            if op.op == "ttnn.sampling":  # the device's per-user random state
                kwargs["rngs"] = ("v", self.user_generators)
            dtypes = [fn.tensors[o].dtype for o in op.out]
            steps.append(Step(op, IMPLS[op.op], collective, args, kwargs, list(op.out), dtypes))
        # Let intermediate values go after their last reader, as the device frees buffers:
        # a function's activations then peak at its live set, not at the sum of all of them.
        attach_releases(steps, set(self.env) | set(fn.outputs))
        return steps

    def _multiplier_weight(self, op) -> str:
        """The env name of a linear's weight as the matrix unit sees it under the op's
        compute-kernel settings (fidelity.prepare_weight), prepared once per weight and
        settings (a replicated piece once for all chips) and shared with replicas. The
        weight's own entry keeps the values the device stores."""
        name = tensor_name(op.args[1])
        multiplier = Multiplier.of(op.kwargs.get("compute_kernel_config"), self.emulate_fidelity)
        if not multiplier.fp32_dest and multiplier.fidelity:
            return name  # a bfloat16 Dst: linear forms each phase from the stored weight
        key = f"{name}#{multiplier.fidelity or 'exact'}"
        if key not in self.multiplier_weights:
            prepared = {}
            for piece in self.env[name]:
                if id(piece) not in prepared:
                    prepared[id(piece)] = prepare_weight(piece, multiplier)
            self.multiplier_weights[key] = [prepared[id(p)] for p in self.env[name]]
        self.env[key] = self.multiplier_weights[key]
        return key

    # ------------------------------------------------------------------ execution
    def run(self, fn_name: str, inputs: dict[str, np.ndarray], scalars: dict[str, int] | None = None
            ) -> list[np.ndarray]:
        fn = self.program.functions[fn_name]
        host = {spec.name: np.asarray(inputs[spec.source]).reshape(
            [d if isinstance(d, int) else -1 for d in spec.shape]) for spec in fn.inputs}
        if self.prefill_trimmable[fn_name]:  # leave out the padding rows nothing reads
            rows = active_rows.prefill_rows(host, scalars or {}, self.block_size)
            host = active_rows.trim_prefill(host, rows, self.block_size)
        dims = self.row_dims[fn_name]
        rows = active_rows.active_users(fn, inputs) if dims else None
        if rows is None:
            return self._run(fn_name, host, scalars)
        # Some users inactive: compute the active ones' rows only (active_rows.py).
        self.user_generators.rows = rows
        try:
            outputs = self._run(fn_name, active_rows.select(host, dims, rows), scalars) if len(rows) else None
        finally:
            self.user_generators.rows = None
        return active_rows.scatter(fn, outputs, rows)

    def _run(self, fn_name: str, host_inputs: dict[str, np.ndarray], scalars: dict[str, int] | None
             ) -> list[np.ndarray]:
        fn = self.program.functions[fn_name]
        env = {**self.env, **self.mesh_weights}
        for spec in fn.inputs:
            if spec.dtype in ("uint32", "int32"):
                host = np.ascontiguousarray(host_inputs[spec.name], dtype=np.int64)
                if spec.dtype == "uint32":  # e.g. rope rows of an inactive user (position -1)
                    host = np.maximum(host, 0)
                host = torch.from_numpy(host)
            else:  # pixels and masks, rounded to their device dtype as the host upload would
                host = torch.from_numpy(np.ascontiguousarray(host_inputs[spec.name], dtype=np.float32))
                host = as_device(host, spec.dtype)
            env[spec.name] = host[None, None] if self.mesh_batched else [host] * self.chips
        scalars = scalars or {}
        collectives = 0
        with torch.inference_mode():
            if self.chips == 1:
                run_one_chip(self.steps[fn_name], env, scalars)
            elif self.mesh_batched:
                full_along = (lambda x, axis: self.ranks.full_along(x, axis, self.layout)) if self.ranks else None
                collectives = mesh.run(self.steps[fn_name], env, scalars, as_device, full_along)
            else:
                # Per-chip ops are small: thread hand-offs would cost more than the maths.
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    collectives = run_chip_by_chip(self.steps[fn_name], env, scalars, self.chips)
                finally:
                    torch.set_num_threads(threads)
        self.ops_executed[fn_name] += len(self.steps[fn_name])
        self.collectives_executed[fn_name] += collectives
        self.invocations[fn_name] += 1
        if self.ranks:  # every rank reads what chip 0 holds
            return [self.ranks.host_value(env[o], self.layout).float().numpy() for o in fn.outputs]
        if self.mesh_batched:
            return [env[o][0, 0].float().numpy() for o in fn.outputs]
        return [env[o][0].float().numpy() for o in fn.outputs]

    def chip_tensor(self, name: str, chip: int) -> torch.Tensor:
        """What chip `chip` (global number) holds for a weight or state tensor (for tests
        and debugging); with ranks, a chip of this rank."""
        if chip not in self.held:
            raise ValueError(f"chip {chip} is held by rank {self.layout.owner(chip)}, not this one")
        held, local = self.env[name], self.held.index(chip)
        if isinstance(held, MeshPagePool):
            return held.chip(divmod(local, self.lead[1]))
        if isinstance(held, torch.Tensor):  # a mesh value (mesh_batched)
            return mesh.chip_views(held, self.lead)[local]
        return held[chip].dense() if isinstance(held[chip], (PagePool, PreparedWeight)) else held[chip]

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of weights this process holds (matmul operands included), split into
        weights placed over the mesh ("sharded") and weights every chip holds whole."""
        held, seen = {"sharded": 0, "replicated": 0}, set()
        for name in list(self.program.weights) + list(self.multiplier_weights):
            base = name.split("#")[0]
            placement = self.program.weights[base].get("placement") or {}
            kind = "replicated" if placement.get("dim") is None else "sharded"
            for piece in self.env[name]:
                t = piece.values if isinstance(piece, PreparedWeight) else piece
                key = (t.untyped_storage().data_ptr(), t.storage_offset())
                if key not in seen:
                    seen.add(key)
                    held[kind] += t.numel() * t.element_size()
        return held


def _return_freed_memory() -> None:
    """Hand the heap that loading freed (per-chip pieces, conversions) back to the OS
    (glibc keeps it otherwise: ~0.4 GB of RSS for a TG SmolLM2). No-op without glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


