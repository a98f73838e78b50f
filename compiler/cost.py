"""Device time of a compiled program, op by op: an estimate from arithmetic on the program
(lowering.program) and its target row (compiler.targets, where the hardware constants and
their sources are). Torch-free; it reads no model names.

Every chip runs the same op on its own shard, so an op's cost is one chip's:

    work = max(DRAM bytes / DRAM bandwidth,                       weights, KV, activations
               all bytes / (cores x NoC bytes a cycle x clock),   an op on few cores
               FLOPs / (cores x 4096 / fidelity passes x clock x MATMUL_EFFICIENCY),
               the shortest kernel)
    collective = start-up + per chip x (chips - 1)  [ring: x chips / 2]
                 + bytes through the busiest link / (links x link bandwidth x LINK_EFFICIENCY)
    traced op   = work + the target's op gap under trace
    untraced op = max(work + gap, the host's time to dispatch an op)   (the host runs ahead)

Bytes: weights at their per-chip shape and dtype (bfloat8_b 1088 B a tile, ...), read once
per op; the KV a paged attention reads up to the context; activations read and written,
tile-padded (a decode row is a 32-row tile). FLOPs: 2 x M x K x N on tile-padded dims (the
matrix engine works on whole 8x16 / 16x16 blocks); attention's QK and PV products; rotary's
per-tile matmul. Cores: the ones ttnn's default (interleaved) program spreads the op over:
output tiles for matmuls and element-wise ops, tile rows for norms (an interleaved norm is
parallel over rows only), users x KV heads x context chunks for decode attention.

Not modelled: DRAM bank and NoC contention between ops, L1 capacity (ops that would spill),
matmul program configs beyond the default, host I/O (token ids in, logits or ids out) and
sampling on the host. Decode is estimated traced (as the reference runs it) and untraced
(as this project's ttnn backend runs it); prefill untraced, as the reference runs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from compiler.facts import Placement
from compiler.memory import device_bytes
from lowering.optable import OPS
from lowering.program import Function, Program, concrete_dim, is_tensor_ref, resolve_scalar, tensor_name

TILE = 32
CLASSES = ("matmul", "attention", "norms/eltwise", "collectives", "dispatch")

# ---------------------------------------------------------------- judgements, in one place
# Fraction of the matrix engine's peak a default-config matmul reaches when it is compute
# bound: GEMM_FLOPS.md's out-of-box N150 table shows 57-72% device utilisation for 2k-4k
# matrices (less for small ones, where DRAM or the op's fixed cost bounds instead).
MATMUL_EFFICIENCY = 0.6
# Fraction of an ethernet link's line rate a collective reaches once start-up is paid:
# CCL_bandwidth.md, Wormhole lines flatten at 84-94% of line rate, rings at 66-83%.
LINK_EFFICIENCY = {"line": 0.87, "ring": 0.75}
# Decode attention splits each user's context over cores in chunks of this many positions
# (flash-decode); with users x KV heads it sets how many cores read the cache.
DECODE_K_CHUNK = 128
# Prefill attention's q chunk: 256 rows from 2048 rows up, else 64 (the reference's SDPA
# program config, taken for ttnn's); each (query head, q chunk) reads the K/V it sees.
Q_CHUNK_SHORT, Q_CHUNK_LONG, Q_CHUNK_LONG_FROM = 64, 256, 2048
FIDELITY_PASSES = {"LoFi": 1, "HiFi2": 2, "HiFi3": 3, "HiFi4": 4}  # matrix_engine.md

# ---------------------------------------------------------------- op classes
MATMULS = {"ttnn.linear"}
ATTENTION = {
    "ttnn.transformer.paged_scaled_dot_product_attention_decode",
    "ttnn.transformer.scaled_dot_product_attention_decode",
    "ttnn.transformer.chunked_scaled_dot_product_attention",
    "ttnn.transformer.scaled_dot_product_attention",
    "ttnn.experimental.paged_update_cache", "ttnn.experimental.paged_fill_cache", "ttnn.fill_cache",
    "ttnn.experimental.rotary_embedding_llama",
    "ttnn.experimental.nlp_create_qkv_heads", "ttnn.experimental.nlp_create_qkv_heads_decode",
    "ttnn.experimental.nlp_concat_heads", "ttnn.experimental.nlp_concat_heads_decode",
}
ROW_PARALLEL = {"ttnn.rms_norm", "ttnn.layer_norm"}  # interleaved norms split tile rows over cores
HOST_VIEWS = {"ttnn.unsqueeze_to_4D"}  # metadata only: no device op


def op_class(name: str) -> str:
    if name in MATMULS:
        return "matmul"
    if name in ATTENTION:
        return "attention"
    if OPS.get(name) is not None and OPS[name].collective:
        return "collectives"
    return "norms/eltwise"


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class OpCost:
    """One op on one chip: what it moves and computes, and the device time that takes
    (dispatch not included)."""

    index: int
    op: str
    cls: str
    layer: int | None
    dram_bytes: int = 0
    other_bytes: int = 0  # L1 (and the L1 side of DRAM traffic: every byte crosses the NoC)
    flops: int = 0
    fidelity: str = "HiFi4"
    cores: int = 1
    link_bytes: int = 0  # collectives: bytes through the busiest link
    seconds: float = 0.0  # work, without dispatch
    bound: str = ""  # dram | noc | compute | floor | link | none (a view: no kernel)


@dataclass
class Estimate:
    """Seconds of one call of a function (or of a whole prefill), by op class."""

    function: str
    target: str
    traced: bool
    seconds: float = 0.0
    by_class: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0.0))
    ops: int = 0  # device ops dispatched
    dram_bytes: int = 0
    flops: int = 0
    link_bytes: int = 0
    context: int = 0  # decode: KV positions read; prefill: prompt tokens
    costs: list[OpCost] = field(default_factory=list)

    @property
    def tokens_per_s_per_user(self) -> float:
        return 1.0 / self.seconds if self.seconds else 0.0

    def add(self, other: "Estimate") -> None:
        self.seconds += other.seconds
        for k, v in other.by_class.items():
            self.by_class[k] += v
        self.ops += other.ops
        self.dram_bytes += other.dram_bytes
        self.flops += other.flops
        self.link_bytes += other.link_bytes
        self.costs += other.costs

    def to_json(self) -> dict:
        return {"function": self.function, "traced": self.traced, "context": self.context,
                "seconds": self.seconds, "by_class": dict(self.by_class), "ops": self.ops,
                "dram_bytes": self.dram_bytes, "flops": self.flops, "link_bytes": self.link_bytes}


# ---------------------------------------------------------------- tensors of a call
@dataclass(frozen=True)
class _T:
    shape: tuple[int, ...]
    dtype: str
    kind: str  # input | weight | state | activation
    memory: str = "DRAM"
    layout: str = "TILE"

    @property
    def bytes(self) -> int:
        if not self.shape:
            return 0
        return device_bytes(self.shape, self.dtype, self.layout)


def _tiles(shape) -> int:
    if not shape:
        return 0
    dims = [1, 1] + list(shape)
    return math.prod(dims[:-2]) * -(-dims[-2] // TILE) * -(-dims[-1] // TILE)


def _pad(n: int) -> int:
    return -(-n // TILE) * TILE


class _Call:
    """What one call of a function sees: per-chip tensors at a row count, scalars."""

    def __init__(self, program: Program, fn: Function, target, seq: int | None, scalars: dict[str, int],
                 context: int, sharded_matmuls: bool):
        self.program, self.fn, self.target = program, fn, target
        self.seq, self.scalars, self.context = seq, scalars, context
        self.sharded_matmuls = sharded_matmuls
        self.mesh = tuple(program.mesh_shape)
        self.grid = target.core_grid[0] * target.core_grid[1]

    def tensor(self, name: str) -> _T:
        spec = self.fn.tensors.get(name)
        if spec is not None:
            return _T(tuple(concrete_dim(d, self.seq) for d in spec.shape), spec.dtype, spec.kind, spec.memory,
                      spec.layout)
        if name in self.program.state:
            spec = self.program.state[name]
            return _T(self._local(spec.shape, spec.placement), spec.dtype, "state", spec.memory, spec.layout)
        if name in self.program.weights:
            w = self.program.weights[name]
            return _T(self._local(w["shape"], w.get("placement")), w["dtype"], "weight", "DRAM",
                      w.get("layout", "TILE"))
        for i in self.fn.inputs:
            if i.name == name:
                return _T(tuple(concrete_dim(d, self.seq) for d in i.shape), i.dtype, "input", "DRAM", i.layout)
        raise KeyError(f"{self.fn.name}: no tensor {name}")

    def _local(self, shape, placement: dict | None) -> tuple[int, ...]:
        if not placement or placement.get("dim") is None:
            return tuple(shape)
        return Placement(placement["dim"], tuple(placement["axes"]), placement.get("partial", False)).local_shape(
            shape, self.mesh)

    def arg(self, op, i: int) -> _T | None:
        a = op.args[i] if i < len(op.args) else None
        return self.tensor(tensor_name(a)) if is_tensor_ref(a) else None

    def kwarg(self, op, key: str) -> _T | None:
        a = op.kwargs.get(key)
        return self.tensor(tensor_name(a)) if is_tensor_ref(a) else None

    def inputs(self, op) -> list[_T]:
        refs = [a for a in op.args if is_tensor_ref(a)] + [v for v in op.kwargs.values() if is_tensor_ref(v)]
        return [self.tensor(tensor_name(a)) for a in refs]

    def outputs(self, op) -> list[_T]:
        return [self.tensor(n) for n in op.out if n in self.fn.tensors]

    # ------------------------------------------------------------ rates
    def noc_bps(self, cores: int) -> float:
        return cores * self.target.noc_bytes_per_cycle * self.target.clock_ghz * 1e9

    def flops_per_s(self, cores: int, fidelity: str) -> float:
        t = self.target
        per_core = t.matmul_flops_per_cycle / FIDELITY_PASSES.get(fidelity, 4) * t.clock_ghz * 1e9
        return cores * per_core * MATMUL_EFFICIENCY


def _fidelity(op) -> str:
    return (op.kwargs.get("compute_kernel_config") or {}).get("math_fidelity", "HiFi4")


def _work(call: _Call, index: int, op, dram: int, other: int, flops: int, cores: int,
          dram_bps: float | None = None) -> OpCost:
    cores = max(1, min(cores, call.grid))
    fidelity = _fidelity(op)
    dram_bps = dram_bps or call.target.dram_interleaved_gbs * 1e9
    times = {"dram": dram / dram_bps, "noc": (dram + other) / call.noc_bps(cores),
             "compute": flops / call.flops_per_s(cores, fidelity) if flops else 0.0}
    times["floor"] = call.target.op_kernel_min_us * 1e-6
    bound = max(times, key=times.get)
    return OpCost(index, op.op, op_class(op.op), op.layer, dram, other, flops, fidelity, cores, 0, times[bound],
                  bound)


def _split(ts: list[_T]) -> tuple[int, int]:
    """(DRAM bytes, L1 bytes) of tensors read or written once."""
    dram = sum(t.bytes for t in ts if t.memory == "DRAM")
    return dram, sum(t.bytes for t in ts) - dram


# ---------------------------------------------------------------- op rules
def _linear(call, i, op):
    a, w = call.arg(op, 0), call.arg(op, 1)
    bias = call.kwarg(op, "bias")
    outs = call.outputs(op)
    m, k, n = a.shape[-2], a.shape[-1], w.shape[-1]
    batch = math.prod(a.shape[:-2]) if len(a.shape) > 2 else 1
    flops = 2 * batch * _pad(m) * _pad(k) * _pad(n)
    dram, l1 = _split([a, *outs])
    weights = w.bytes + (bias.bytes if bias else 0)
    cores = batch * -(-m // TILE) * -(-n // TILE)
    # what-if: decode matmuls (one tile row) reading DRAM-sharded weights, at that rate
    sharded = call.sharded_matmuls and batch * _pad(m) <= TILE
    rate = call.target.dram_sharded_gbs * 1e9 if sharded else None
    return _work(call, i, op, dram + weights, l1, flops, cores, dram_bps=rate)


def _decode_attention(call, i, op):
    """Flash-decode: each user's query heads (a KV group's heads fill one 32-row tile)
    against its cache up to the position (`context`); the cross-attention of Llama 3.2
    Vision (no cur_pos) reads its whole cache."""
    q, k, v = call.arg(op, 0), call.arg(op, 1), call.arg(op, 2)
    users = q.shape[1] if len(q.shape) == 4 else 1
    kv_heads, head_dim = k.shape[1], k.shape[-1]
    positions = call.context if "cur_pos_tensor" in op.kwargs else k.shape[2]
    positions = min(positions, k.shape[0] * k.shape[2]) if "page_table_tensor" in op.kwargs else positions
    kv = sum(users * device_bytes((kv_heads, _pad(positions), head_dim), t.dtype) for t in (k, v))
    rest = [t for t in call.inputs(op) if t.kind != "state"] + call.outputs(op)
    dram, l1 = _split(rest)
    flops = 2 * 2 * users * kv_heads * TILE * _pad(positions) * _pad(head_dim)
    cores = users * kv_heads * -(-positions // DECODE_K_CHUNK)
    return _work(call, i, op, dram + kv, l1, flops, cores)


def _prefill_attention(call, i, op):
    """Flash attention of S query rows against the K/V they see: each (query head, q
    chunk) reads its visible K/V. Causal rows at chunk_start see chunk_start + S/2 keys
    on average (masked blocks are skipped); a masked (cross-attention) or non-causal call
    sees all of K."""
    q, k = call.arg(op, 0), call.arg(op, 1)
    heads, rows, head_dim = q.shape[1], q.shape[2], q.shape[-1]
    chunked = op.op.endswith("chunked_scaled_dot_product_attention")
    start = int(resolve_scalar(op.args[4], call.scalars) or 0) if chunked else 0
    causal = chunked or (op.kwargs.get("is_causal", True) and "attn_mask" not in op.kwargs)
    seen = start + rows / 2 if causal else k.shape[2]
    q_chunk = Q_CHUNK_LONG if rows >= Q_CHUNK_LONG_FROM else Q_CHUNK_SHORT
    kv = 2 * heads * -(-rows // q_chunk) * device_bytes((_pad(math.ceil(seen)), head_dim), k.dtype)
    rest = [call.tensor(tensor_name(a)) for j, a in enumerate(op.args) if is_tensor_ref(a) and j not in (1, 2)]
    rest += [call.tensor(tensor_name(v)) for v in op.kwargs.values() if is_tensor_ref(v)]
    dram, l1 = _split(rest + call.outputs(op))
    flops = int(2 * 2 * heads * _pad(rows) * seen * _pad(head_dim))
    cores = heads * -(-rows // q_chunk)
    return _work(call, i, op, dram + kv, l1, flops, cores)


def _update_cache(call, i, op):
    """A decode row into each user's KV block: the 32-position tile is read and written."""
    cache, x = call.arg(op, 0), call.arg(op, 1)
    users = x.shape[1] if len(x.shape) == 4 else 1
    kv_heads, head_dim = cache.shape[1], cache.shape[-1]
    tiles = 2 * users * device_bytes((kv_heads, TILE, head_dim), cache.dtype)
    dram, l1 = _split([x])
    return _work(call, i, op, dram + tiles, l1, 0, users * kv_heads)


def _fill_cache(call, i, op):
    cache, x = call.arg(op, 0), call.arg(op, 1)
    written = device_bytes(x.shape, cache.dtype)
    dram, l1 = _split([x])
    return _work(call, i, op, dram + written, l1, 0, _tiles(x.shape))


def _rotary(call, i, op):
    x = call.arg(op, 0)
    ins = [x, call.arg(op, 1), call.arg(op, 2), *call.outputs(op)]
    dram, l1 = _split([t for t in ins if t is not None])
    flops = _tiles(x.shape) * 2 * TILE ** 3  # x tile @ the 32x32 transformation matrix
    return _work(call, i, op, dram, l1, flops, _tiles(x.shape))


def _embedding(call, i, op):
    """Only the looked-up rows are read (the table stays in DRAM)."""
    outs = call.outputs(op)
    rows = sum(t.bytes for t in outs)
    return _work(call, i, op, 2 * rows, 0, 0, _tiles(outs[0].shape) if outs else 1)


def _collective(call, i, op):
    t = call.target
    x = call.arg(op, 0)
    axis = op.kwargs.get("cluster_axis")
    chips = call.mesh[axis] if axis is not None else math.prod(call.mesh)
    links = op.kwargs.get("num_links") or t.links
    topology = "ring" if t.ccl_ring and chips == math.prod(call.mesh) and chips > 2 else "line"
    if op.op == "ttnn.all_reduce":
        base, per_chip = t.ccl_all_reduce_us
        link = 2 * (chips - 1) * x.bytes // chips
    else:  # all_gather
        base, per_chip = t.ccl_all_gather_us
        link = (chips - 1) * x.bytes
    hops = chips / 2 if topology == "ring" else chips - 1
    directions = 2 if topology == "ring" else 1
    rate = directions * links * t.eth_link_gbs * 1e9 * LINK_EFFICIENCY[topology]
    seconds = (base + per_chip * hops) * 1e-6 + link / rate if chips > 1 else 0.0
    dram, l1 = _split([x, *call.outputs(op)])
    return OpCost(i, op.op, "collectives", op.layer, dram, l1, 0, "", 1, link if chips > 1 else 0, seconds, "link")


def _generic(call, i, op):
    """Element-wise, layout, data-movement and reduction ops: read inputs, write outputs,
    spread over the largest tensor's tiles (norms: over tile rows)."""
    ins, outs = call.inputs(op), call.outputs(op)
    if op.op == "ttnn.slice":  # reads what it keeps
        ins = list(outs)
    if op.op == "ttnn.reshape" and ins and outs and ins[0].shape[-2:] == outs[0].shape[-2:]:
        return OpCost(i, op.op, op_class(op.op), op.layer, bound="none")  # a view of whole tiles
    dram, l1 = _split(ins + outs)
    if op.op in ROW_PARALLEL:
        shape = outs[0].shape if outs else ins[0].shape
        cores = _tiles(shape[:-1] + (1,))
    else:  # spread over the largest tensor's tiles (a reduction such as topk over its input's)
        cores = max((_tiles(t.shape) for t in ins + outs), default=1)
    return _work(call, i, op, dram, l1, 0, cores)


_RULES = {
    "ttnn.linear": _linear,
    "ttnn.transformer.paged_scaled_dot_product_attention_decode": _decode_attention,
    "ttnn.transformer.scaled_dot_product_attention_decode": _decode_attention,
    "ttnn.transformer.chunked_scaled_dot_product_attention": _prefill_attention,
    "ttnn.transformer.scaled_dot_product_attention": _prefill_attention,
    "ttnn.experimental.paged_update_cache": _update_cache,
    "ttnn.experimental.paged_fill_cache": _fill_cache,
    "ttnn.fill_cache": _fill_cache,
    "ttnn.experimental.rotary_embedding_llama": _rotary,
    "ttnn.embedding": _embedding,
    "ttnn.all_reduce": _collective,
    "ttnn.all_gather": _collective,
}


def op_costs(program: Program, function: str, target, *, seq: int | None = None, context: int = 0,
             scalars: dict[str, int] | None = None, sharded_matmuls: bool = False) -> list[OpCost]:
    """Work of every device op of one call of `function` (host views excluded)."""
    fn = program.functions[function]
    call = _Call(program, fn, target, seq, dict(scalars or {}), context, sharded_matmuls)
    out = []
    for i, op in enumerate(fn.ops):
        if op.op in HOST_VIEWS:
            continue
        out.append(_RULES.get(op.op, _generic)(call, i, op))
    return out


def function_estimate(program: Program, function: str, target, *, traced: bool, seq: int | None = None,
                      context: int = 0, scalars: dict[str, int] | None = None,
                      sharded_matmuls: bool = False) -> Estimate:
    """One call: each op's work plus its dispatch (see the module docstring)."""
    est = Estimate(function, target.name, traced, context=context)
    gap, host = target.op_gap_traced_us * 1e-6, target.op_dispatch_host_us * 1e-6
    for cost in op_costs(program, function, target, seq=seq, context=context, scalars=scalars,
                         sharded_matmuls=sharded_matmuls):
        if cost.bound == "none":  # a view: no kernel
            continue
        total = cost.seconds + gap if traced else max(cost.seconds + gap, host)
        est.seconds += total
        est.by_class[cost.cls] += cost.seconds
        est.by_class["dispatch"] += total - cost.seconds
        est.ops += 1
        est.dram_bytes += cost.dram_bytes
        est.flops += cost.flops
        est.link_bytes += cost.link_bytes
        est.costs.append(cost)
    return est


def _target(program: Program, target):
    if target is None:
        from compiler.targets import get_target
        return get_target(program.target)
    return target


def decode_estimate(program: Program, target=None, context: int = 1024, traced: bool = True,
                    sharded_matmuls: bool = False) -> Estimate:
    """One decode step with `context` positions in the cache: seconds per token per user."""
    return function_estimate(program, "decode", _target(program, target), traced=traced, context=context,
                             sharded_matmuls=sharded_matmuls)


def prefill_estimate(program: Program, target=None, prompt_tokens: int = 128, traced: bool = False) -> Estimate:
    """Time to first token: every prefill chunk of a `prompt_tokens` prompt (padded and
    chunked as the runtime does, runtime.schedule), the logits of the last tile."""
    from runtime import schedule

    target = _target(program, target)
    options = program.options
    chunk = options.get("prefill_chunk") or options.get("max_seq_len") or prompt_tokens
    total = Estimate("prefill", target.name, traced, context=prompt_tokens)
    calls = schedule.chunks(prompt_tokens, chunk, options.get("block_size", 32))
    for start, rows in calls:
        last = (prompt_tokens - 1 - start) // TILE * TILE if start <= prompt_tokens - 1 < start + rows else 0
        total.add(function_estimate(program, "prefill", target, traced=traced, seq=rows,
                                    scalars={"chunk_start": start, "last_tile_start": last}))
    return total
