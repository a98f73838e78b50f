"""The ttnn backend: a Program's ops issued one by one through real ttnn, numpy in and out.

On a machine with a Tenstorrent card it computes. Without one it switches to ttnn's mock
cluster of the program's target (mock.py) and says so on stderr: every op then passes
ttnn's own argument, shape, memory-config and allocator checks (and "runs" on zeros).
The first op ttnn rejects stops the replay with a TtnnOpError naming the function, the op,
its graph node, its source layer and ttnn's message.

Nothing here imports torch: program, weights and inputs reach ttnn as numpy arrays
(float32 host arrays that ttnn rounds to bfloat16 or packs to block floats itself).
Weights are placed on the mesh once, at load: the first load of a program on a system
converts them on the host and writes ttnn's own tensor files of them, later loads read
those (weight_files.py). Each function is prepared once into steps with resolved argument
getters and the memory each output should be written to; `warm_up()` (validate.py) runs
each once so that kernel compilation is not part of the first request.

Decode runs a whole tile of users per chip (32): ttnn's decode ops work on tile rows of
users (nlp_concat_heads_decode returns all 32), so the backend pads the per-call inputs
(token 0, position 0, and -1 in the position tensors the cache and attention ops read:
ttnn's mark for an inactive user), gives non-paged caches a slot per device user, and
returns the program's users only.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowering.optable import OPS
from lowering.program import (SEQ, Function, Op, Program, concrete_dim, is_ref_list, is_tensor_ref,
                              op_tensor_refs, resolve_scalar, tensor_name)

from runtime.replicas import USER_DIM

from . import mock
from . import placement as placement_
from .errors import TtnnBackendError, TtnnOpError, ttnn_message  # noqa: F401 (re-exported)
from .ops import (PRODUCES_SHARDED, TTNN_OPS, WANTS, WEIGHT_PLACEMENTS, OpCall, convert_kwargs, describe_memory,
                  dtype_of, layout_of, pad_tile)
from .validate import Validation
from .weight_placement import WeightPlacement

TILE = 32
INACTIVE = -1  # position of a padded (inactive) decode user in cur_pos / update_idxs tensors
POSITION_KWARGS = ("cur_pos_tensor", "update_idxs_tensor")
# USER_DIM: per-call input source -> its users dim (decode pads it to a tile of users)
USER_PAD = {"sample_k": 1, "sample_p": 1.0, "sample_temp": 1.0}  # a padded user samples greedily (k = 0 is invalid)


class TtnnUnsupportedProgram(ValueError):
    """A program the ttnn backend does not take (raised before ttnn is imported)."""


def check_supported(program: Program) -> None:
    """Refuse float32 programs: they are the emulator's exact reference, and ttnn 0.81.1
    has no float32 path for them (checked on the mock: ttnn.embedding takes bfloat16
    tables only, rotary_embedding_llama bfloat16 inputs only). Making them run would mean
    typecasts to bfloat16 around those ops, i.e. no longer the float32 program."""
    if program.options.get("optimizations") == "float32":
        raise TtnnUnsupportedProgram(
            "float32 is the emulator's exact reference mode; ttnn takes bfloat16 where this program keeps "
            "float32 (ttnn.embedding needs bfloat16 tables, rotary_embedding_llama bfloat16 inputs). Run it "
            "with backend='emulator', or compile with --optimizations performance or accuracy for ttnn.")


def open_mesh(ttnn, mode: mock.DeviceMode, mesh_shape):
    """Open a mesh of `mesh_shape` (rows, cols) on the card or the mock (`mode`)."""
    rows, cols = mesh_shape
    options = {}
    if rows * cols > 1:  # collectives run over the fabric, configured before opening
        ttnn.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)
    if mode.mock:
        # With the default (ethernet) dispatch, ttnn 0.81.1's mock mesh of a multi-chip
        # cluster reports an 8x8 worker grid for chips with two harvested rows, while its
        # program validation allows 8x7, so every op that takes the mesh's grid is
        # rejected. Dispatching on worker cores makes both say 8x7.
        options["dispatch_core_config"] = ttnn.DispatchCoreConfig(ttnn.DispatchCoreType.WORKER)
    return ttnn.open_mesh_device(ttnn.MeshShape(rows, cols), **options)


def _arg(value):
    if is_tensor_ref(value):
        return ("t", tensor_name(value))
    if is_ref_list(value):
        return ("l", [tensor_name(v) for v in value])
    if isinstance(value, (str, list)) and "$" in json.dumps(value):
        return ("s", value)
    return ("v", value)


@dataclass
class _Step:
    index: int
    op: Op
    impl: object
    args: list  # ("t", name) | ("l", [names]) | ("s", template with $scalars) | ("v", literal)
    kwargs: dict
    out: list[str]
    out_memory: list = field(default_factory=list)  # memory kind consumers want, per output
    drop: list = field(default_factory=list)  # activations last read by this op


class TtnnBackend(Validation, WeightPlacement):
    name = "ttnn"

    def __init__(self, program: Program, weights_dir: Path | None, weights: dict | None = None,
                 quiet: bool = False, weight_files: bool = True, mesh=None):
        """`weight_files`: read the weights from ttnn's tensor files of this program and
        system when they exist, else convert on the host and write them (weight_files.py).
        `mesh`: an open (sub-)mesh of the program's shape to run on (a data-parallel
        replica's, replicas.py), which close() leaves open; by default the backend opens
        and closes its own."""
        check_supported(program)
        self.program = program
        self.mode = mock.configure(program.target, quiet=quiet)
        try:
            import ttnn  # after mock.configure: ttnn reads the environment when a device opens
        except ModuleNotFoundError as e:
            if e.name != "ttnn":
                raise
            raise mock.TtnnNotInstalled() from None

        self.ttnn = ttnn
        self.mesh = None
        self._owns_mesh = mesh is None
        self.mesh = open_mesh(ttnn, self.mode, program.mesh_shape) if mesh is None else mesh
        self.env: dict = {}
        self.ops_executed: Counter = Counter()
        self.invocations: Counter = Counter()
        self.moves: Counter = Counter()  # memory moves ops needed that the program lacks
        self.footprints: dict | None = None  # per-op L1 use, measured while validate() runs
        self._zero_rows: dict = {}  # (shape, dtype, layout) -> a zero row for zero_state_rows
        self._slotted = self._user_slotted_state()
        self.weight_source = "device" if weights_dir is None and weights is None else "host"
        self.weight_variants = self._weight_variants()
        self.weight_load: dict = {}  # where the weights came from, what it took (_load_weights)
        self._load_weights(weights_dir, weights, weight_files)
        self.reset()
        self.steps = {name: self._prepare(fn) for name, fn in program.functions.items()}

    @classmethod
    def from_program(cls, program: Program, weights: dict | None = None, quiet: bool = False):
        """A backend for a program without a weight cache: `weights` (name -> numpy array), or
        None to allocate every weight directly on the device (shapes and dtypes only)."""
        return cls(program, None, weights=weights, quiet=quiet)

    # ------------------------------------------------------------------ device
    def close(self) -> None:
        if getattr(self, "mesh", None) is not None:
            self.env.clear()
            self._zero_rows.clear()
            if self._owns_mesh:
                self.ttnn.close_mesh_device(self.mesh)
            self.mesh = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    @property
    def decode_users(self) -> int:
        """Users per chip in a decode step: the program's batch, padded to a tile."""
        return pad_tile(int(self.program.options.get("batch_size", 1)))

    def local_shape(self, shape, placement: dict | None = None) -> list[int]:
        """One chip's part of a tensor of global `shape` under `placement`."""
        return placement_.local_shape(shape, placement, self.program.mesh_shape)

    def to_device(self, array: np.ndarray, dtype: str, layout: str, memory_config=None, placement=None):
        """A host array placed on the mesh. Converted (tilized, block-float packed, split
        over the chips) on the host, then copied: given a device, ttnn 0.81.1 tilizes
        bfloat16 on the device with a grid taken from the mesh (8x8), which fails on chips
        with two harvested rows (8x7, as in the N300/T3K descriptors), and it cannot build
        a sharded tensor from a host array in one step ("ndarray_import failed")."""
        ttnn = self.ttnn
        host = placement_.host_tensor(ttnn, array, dtype, layout, placement, self.program.mesh_shape)
        tensor = ttnn.to_device(host, self.mesh, ttnn.DRAM_MEMORY_CONFIG)
        if memory_config is not None and memory_config != ttnn.DRAM_MEMORY_CONFIG:
            tensor = ttnn.to_memory_config(tensor, memory_config)
        return tensor

    def allocate(self, shape, dtype: str, layout: str, memory_config=None, zero: bool = True):
        """A device tensor of `shape` on every chip; zeroed on the device (ttnn.zeros would
        build and pack the zeros on the host: seconds for a block-float KV cache)."""
        ttnn = self.ttnn
        tensor = ttnn.allocate_tensor_on_device(ttnn.Shape(list(shape)), dtype_of(ttnn, dtype),
                                                layout_of(ttnn, layout), self.mesh,
                                                memory_config or ttnn.DRAM_MEMORY_CONFIG)
        if zero and dtype != "bfloat4_b":  # ttnn.fill has no bfloat4_b
            tensor = ttnn.fill(tensor, 0, output_tensor=tensor)
        elif zero:
            tensor = ttnn.zeros(list(shape), dtype=dtype_of(ttnn, dtype), layout=layout_of(ttnn, layout),
                                device=self.mesh, memory_config=memory_config or ttnn.DRAM_MEMORY_CONFIG)
        return tensor

    def to_host(self, tensor, spec, seq: int | None = None) -> np.ndarray:
        """A program output as float32 numpy at its logical (global) shape, joined from the
        chips' parts as its placement says."""
        ttnn = self.ttnn

        def numpy_of(host):
            if host.dtype != ttnn.float32:
                host = ttnn.to_dtype(host, ttnn.float32)
            return np.asarray(host.to_numpy(), dtype=np.float32)

        chips = [numpy_of(t) for t in ttnn.get_device_tensors(ttnn.from_device(tensor))]
        array = placement_.join(chips, spec.placement, self.program.mesh_shape)
        return array[tuple(slice(0, d) for d in spec.concrete(seq))]

    def _call(self, op: Op, out_memory=()) -> OpCall:
        return OpCall(self.ttnn, self.mesh, op, self.decode_users, list(out_memory))

    # ------------------------------------------------------------------ state
    def _user_slotted_state(self) -> set[str]:
        """Non-paged caches: state that decode's cache update indexes by user (dim 0), or
        that decode attention reads per user (Llama 3.2 Vision's cross-attention caches:
        ttnn checks their batch equals the decode users')."""
        out = set()
        for fn in self.program.functions.values():
            for op in fn.ops:
                if op.op == "ttnn.experimental.paged_update_cache" and "page_table" not in op.kwargs:
                    out.add(tensor_name(op.args[0]))
                elif op.op == "ttnn.transformer.scaled_dot_product_attention_decode":
                    out |= {tensor_name(a) for a in op.args[1:3] if tensor_name(a) in self.program.state}
        return out

    def state_shape(self, name: str) -> list[int]:
        """The device shape of a state tensor. A non-paged cache has one slot per decode user,
        and decode runs a whole tile of users: ttnn checks the cache has as many."""
        spec = self.program.state[name]
        shape = self.local_shape(spec.shape, getattr(spec, "placement", None))
        if name in self._slotted:
            shape[0] = pad_tile(shape[0])
        return shape

    def seed_sampling(self, seeds) -> None:
        """Seed the sampling generator of each decode user's core (ttnn.manual_seed), once per
        batch of requests, as the reference does (a seed passed to ttnn.sampling itself would
        re-seed every step)."""
        ttnn = self.ttnn
        users = self.decode_users
        seeds = [int(s) for s in seeds][:users] + [0] * max(0, users - len(seeds))
        ttnn.manual_seed(self.to_device(np.array(seeds, dtype=np.uint32), "uint32", "ROW_MAJOR"),
                         user_ids=self.to_device(np.arange(users, dtype=np.uint32), "uint32", "ROW_MAJOR"))

    def zero_state_rows(self, names, row: int) -> None:
        """Zero row `row` (a user) of the named state tensors on every chip (Llama 3.2
        Vision: the cross-attention caches of a user without an image). One fill_cache per
        tensor from a zero row of its dtype and shape, allocated once and kept (ttnn.fill
        would zero every user's row)."""
        ttnn = self.ttnn
        for name in names:
            shape, spec = self.state_shape(name), self.program.state[name]
            if not 0 <= row < shape[0]:
                raise TtnnBackendError(f"state '{name}' has {shape[0]} rows on the device, not row {row}")
            key = (tuple([1, *shape[1:]]), spec.dtype, spec.layout)
            if key not in self._zero_rows:
                self._zero_rows[key] = self.allocate(list(key[0]), spec.dtype, spec.layout)
            try:
                ttnn.fill_cache(self.env[name], self._zero_rows[key], row)
            except Exception as e:  # noqa: BLE001 (ttnn's errors are RuntimeErrors)
                raise TtnnBackendError(f"zeroing row {row} of state '{name}' ({shape} {spec.dtype}) on the "
                                       f"{self.mode.describe()} failed:\n  {ttnn_message(e)}") from None

    def reset(self) -> None:
        """Zero all device state (KV caches)."""
        for name, spec in self.program.state.items():
            self.env.pop(name, None)  # free the old cache before allocating the new one
            try:
                self.env[name] = self.allocate(self.state_shape(name), spec.dtype, spec.layout)
            except Exception as e:  # noqa: BLE001 (ttnn's allocator raises RuntimeError)
                raise TtnnBackendError(
                    f"allocating state '{name}' ({self.state_shape(name)} {spec.dtype}, program shape "
                    f"{list(spec.shape)}) on the {self.mode.describe()} failed:\n  {ttnn_message(e)}") from None

    # ------------------------------------------------------------------ preparation
    def _prepare(self, fn: Function) -> list[_Step]:
        known = set(self.program.weights) | set(self.program.state) | set(fn.tensors)
        producer: dict[str, tuple[int, int]] = {}  # activation -> (step, output index)
        steps: list[_Step] = []
        last_read: dict[str, int] = {}
        for index, op in enumerate(fn.ops):
            impl = TTNN_OPS.get(op.op)
            if impl is None or op.op not in OPS:
                raise TtnnBackendError(f"op {op.op} (node {op.node}) has no ttnn implementation")
            args, kwargs = [_arg(a) for a in op.args], {k: _arg(v) for k, v in op.kwargs.items()}
            variants = WEIGHT_PLACEMENTS.get(op.op, lambda _: {})(op)
            wants = WANTS.get(op.op, lambda _: {})(op)
            params = OPS[op.op].params
            for i, a in enumerate(op.args):  # weights this op reads as placed variants
                if is_tensor_ref(a) and variants.get(params[i]):
                    args[i] = ("t", self._variant_of(op, params[i], tensor_name(a)))
            for k, v in op.kwargs.items():
                if is_tensor_ref(v) and variants.get(k):
                    kwargs[k] = ("t", self._variant_of(op, k, tensor_name(v)))
            for param, name in op_tensor_refs(op):
                if name not in known:
                    raise TtnnBackendError(f"{fn.name} op {index} ({op.op}, node {op.node}) reads "
                                           f"unknown tensor '{name}'")
                last_read[name] = index
                if param in wants and name in producer:  # ask the producer to write it there
                    step, out = producer[name]
                    if steps[step].op.op in PRODUCES_SHARDED and steps[step].out_memory[out] is None:
                        steps[step].out_memory[out] = wants[param]
            # Outputs the program places in L1 go there; DRAM is ttnn's default (and some
            # ops pick their own memory, e.g. the decode head ops' height-sharded outputs).
            placed = [fn.tensors[o].memory if o in fn.tensors and fn.tensors[o].memory != "DRAM" else None
                      for o in op.out]
            steps.append(_Step(index, op, impl, args, kwargs, list(op.out), placed))
            for out, name in enumerate(op.out):
                producer[name] = (index, out)
        for name, index in last_read.items():  # free activations after their last reader
            if name in fn.tensors and name not in fn.outputs and fn.tensors[name].kind == "activation":
                steps[index].drop.append(name)
        return steps

    # ------------------------------------------------------------------ execution
    def _inputs(self, fn: Function, inputs: dict[str, np.ndarray], env: dict, seq: int | None) -> None:
        position_tensors = {tensor_name(v) for op in fn.ops for k, v in op.kwargs.items()
                            if k in POSITION_KWARGS and is_tensor_ref(v)}
        for spec in fn.inputs:
            shape = [concrete_dim(d, seq) for d in spec.shape]
            array = np.asarray(inputs[spec.source]).reshape(shape)
            user_dim = USER_DIM.get(spec.source)
            if seq is None and user_dim is not None and shape[user_dim] < self.decode_users:
                pad = [(0, 0)] * len(shape)  # decode: a whole tile of users
                pad[user_dim] = (0, self.decode_users - shape[user_dim])
                array = np.pad(array, pad, constant_values=INACTIVE if spec.name in position_tensors
                               else USER_PAD.get(spec.source, 0))
            env[spec.name] = self.to_device(array, spec.dtype, spec.layout)

    @staticmethod
    def _seq_of(fn: Function, inputs: dict[str, np.ndarray]) -> int | None:
        for spec in fn.inputs:
            if SEQ in spec.shape:
                fixed = int(np.prod([d for d in spec.shape if d != SEQ]))
                return int(np.asarray(inputs[spec.source]).size // fixed)
        return None

    @staticmethod
    def _describe(name: str, env: dict) -> str:
        t = env.get(name)
        if t is None:
            return f"%{name}"
        try:
            return (f"%{name}: shape {list(t.shape)} (padded {list(t.padded_shape)}) "
                    f"{str(t.dtype).split('.')[-1]} {str(t.layout).split('.')[-1]} "
                    f"{describe_memory(t.memory_config())}")
        except Exception:  # noqa: BLE001 (a description must never hide the real error)
            return f"%{name}"

    def run(self, fn_name: str, inputs: dict[str, np.ndarray], scalars: dict[str, int] | None = None
            ) -> list[np.ndarray]:
        fn = self.program.functions[fn_name]
        scalars = scalars or {}
        seq = self._seq_of(fn, inputs)
        env = dict(self.env)
        self._inputs(fn, inputs, env, seq)
        ttnn = self.ttnn

        def value(kind, v):
            if kind == "t":
                return env[v]
            if kind == "l":
                return [env[n] for n in v]
            return resolve_scalar(v, scalars) if kind == "s" else v

        for step in self.steps[fn_name]:
            op = step.op
            call = self._call(op, step.out_memory)
            try:
                args = [value(*a) for a in step.args]
                kwargs = convert_kwargs(ttnn, {k: value(*a) for k, a in step.kwargs.items()})
                if self.footprints is not None:
                    self._measure(fn_name, step, args, kwargs)
                result = step.impl(call, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 (ttnn raises RuntimeError, TypeError, ...)
                described = [self._describe(name, env) for _, name in op_tensor_refs(op)]
                raise TtnnOpError(fn_name, step.index, op, ttnn_message(e), described) from None
            self.ops_executed[fn_name] += 1
            for what, src, dst in call.moves:
                self.moves[(fn_name, op.op, what, src, dst)] += 1
            if step.out:
                results = result if isinstance(result, (list, tuple)) else [result]
                if len(results) != len(step.out):
                    raise TtnnBackendError(f"{op.op} returned {len(results)} tensors, the program "
                                           f"names {len(step.out)} ({op.node})")
                env.update(zip(step.out, results))
            for name in step.drop:
                env.pop(name, None)  # the device buffer is freed with its last reference
        self.invocations[fn_name] += 1
        return [self.to_host(env[o], fn.tensors[o], seq) for o in fn.outputs]
