"""The compile driver: model directory -> Program (+ converted weights in the cache)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lowering.lower import device_weights, lower
from lowering.sampling import with_device_sampling
from lowering.program import Function, Program, TensorSpec
from lowering.stamp import (LayerPlan, canonical_names, canonical_order, stamp_function, stamp_state,
                            stamp_weights)
from models_ref.config import ModelConfig, load_config
from models_ref.weights import CheckpointReader, open_checkpoint
from compiler.memory import MemoryPlan

from .data_parallel import replica_layout
from .errors import CompileError, InternalCompilerError, node_in_traceback
from .options import CompileOptions
from .precision_file import plan_layers
from .pipeline import Observer, run_pipeline
from .targets import Target, get_target
from .trace import trace

MODES = ("prefill", "decode")


@dataclass
class CompileResult:
    program: Program
    cfg: ModelConfig
    target: Target  # the system (with --data-parallel: the program runs on sub-meshes of it)
    reader: CheckpointReader | None
    printed: list[str] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    plan: MemoryPlan | None = None  # bytes per chip and fit decisions (passes/memory_plan.py)
    precision_file: dict | None = None  # --precision: the per-layer settings, as a precision file


def resolve_max_seq_len(cfg: ModelConfig, options: CompileOptions) -> int:
    """The context compiled for first: --max-seq-len (at most the model's), else the
    model's max_position_embeddings (to a whole KV block), which the memory planner then
    caps to what fits."""
    limit = cfg.max_position_embeddings
    if options.max_seq_len is None:
        return max(limit // options.block_size * options.block_size, min(limit, options.block_size))
    if options.max_seq_len > limit:
        raise CompileError(
            f"--max-seq-len {options.max_seq_len} exceeds the model's max_position_embeddings ({limit})")
    return options.max_seq_len


def _merge_plans(prefill: MemoryPlan, decode: MemoryPlan) -> MemoryPlan:
    """The prefill graph decides DRAM; the decode graph adds its step's L1 live set."""
    prefill.decode_activation_bytes = decode.decode_activation_bytes
    prefill.collectives_per_layer.update(decode.collectives_per_layer)
    prefill.refusal = prefill.refusal or decode.refusal
    return prefill


def _lower_mode(gm, ctx, layers: LayerPlan, stamped: dict) -> tuple[Function, dict, dict]:
    """The mode's program function, weight table and state table, with layers stamped
    from the traced ones when `layers` says so. A failure here is the compiler's (an op
    the table lacks, a rule that crashed): an internal error."""
    try:
        return _lower_and_stamp(gm, ctx, layers, stamped)
    except CompileError:
        raise
    except Exception as e:
        raise InternalCompilerError("lowering", ctx.mode, node_in_traceback(e.__traceback__),
                                    f"{type(e).__name__}: {e}") from e


def _lower_and_stamp(gm, ctx, layers: LayerPlan, stamped: dict) -> tuple[Function, dict, dict]:
    fn = canonical_names(lower(gm, ctx))
    weights = device_weights(ctx.facts, ctx.cfg)
    state = {name: TensorSpec(list(spec.shape), spec.dtype, "TILE", "DRAM", "state", spec.layer,
                              spec.placement.to_json())
             for name, spec in ctx.facts.state.items()}
    if layers.stamped and ctx.mode != "vision":
        fn = stamp_function(fn, layers)
        weights, state = _stamp_weights_once(weights, layers, stamped), stamp_state(state, layers)
    return fn, weights, state


def _stamp_weights_once(weights: dict, layers: LayerPlan, stamped: dict) -> dict:
    """stamp_weights, or the table an earlier mode stamped from the same traced table
    (prefill and decode read the same weights: stamping a 70B model's twice cost 0.1 s).
    `stamped` holds the last (traced, stamped) pair."""
    if stamped.get("traced") == weights:
        return stamped["stamped"]
    stamped.update(traced=weights, stamped=stamp_weights(weights, layers))
    return stamped["stamped"]


def compile_model(model_dir: str | Path, options: CompileOptions,
                  observer: Observer | None = None, full_trace: bool = False) -> CompileResult:
    """Compile a model directory. Decoder layers are traced and compiled once (layers 0
    and 1) and stamped for the rest (lowering/stamp.py); `full_trace` traces every layer
    instead, with the same result (for inspection and for the test that proves it).
    With --data-parallel N the program is one replica's, compiled for the sub-mesh target
    with its share of the users, and records where the N replicas go (compiler/data_parallel.py)."""
    layout = replica_layout(options)
    if layout is None:
        return _compile_program(model_dir, options, observer, full_trace)
    try:
        result = _compile_program(model_dir, layout.replica_options(options), observer, full_trace)
    except CompileError as e:
        raise CompileError(f"{layout.describe()}: {e}") from None
    program = result.program
    program.options = {**program.options, "target": options.target, "batch_size": options.batch_size,
                       "data_parallel": options.data_parallel}
    program.replicas = layout.to_json(options.batch_size // layout.count)
    result.plan.replicas, result.plan.system = layout.count, layout.system.name
    program.memory_plan = result.plan.to_json()
    result.target = layout.system
    return result


def _compile_program(model_dir: str | Path, options: CompileOptions, observer: Observer | None,
                     full_trace: bool) -> CompileResult:
    target = get_target(options.target)
    if not target.supported:
        raise CompileError(f"target {target.name} is not yet supported")
    if options.no_weights:
        reader, cfg = None, load_config(model_dir)
    else:
        reader = open_checkpoint(model_dir)
        cfg = reader.cfg
    max_seq_len = resolve_max_seq_len(cfg, options)
    observer = observer or Observer()
    functions, weights, state, counters, plans = {}, {}, {}, {}, {}
    # Every layer's precision (the mode's, or --precision's per layer); layers are stamped
    # from one traced layer per precision class, unless they differ in structure (Llama 3.2
    # Vision interleaves cross-attention layers): then every layer is traced.
    precision, precision_file = plan_layers(cfg, options, reader, model_dir)
    layers = LayerPlan.of(precision.layers, stamp=not full_trace and not cfg.cross_attention_layers)
    traced_layers = layers.traced if layers.stamped else None
    resident, other_activations = {}, 0  # what functions compiled earlier hold (the vision tower)
    stamped_weights = {}  # the last mode's traced and stamped weight tables

    def compile_mode(mode, context):
        gm, ctx = trace(cfg, mode, target, options, context, layers=traced_layers)
        ctx.precision_plan, ctx.layer_plan = precision, layers
        ctx.resident, ctx.other_activation_bytes = dict(resident), other_activations
        return run_pipeline(gm, ctx, observer), ctx

    for mode in (("vision",) if cfg.vision else ()) + MODES:
        printed = len(observer.printed)
        gm, ctx = compile_mode(mode, max_seq_len)
        plans[mode] = plan = ctx.facts.memory
        if plan.refusal:
            raise CompileError(plan.refusal)
        if mode == "prefill" and plan.context != max_seq_len:
            # The planner capped the default context to what fits: compile for that.
            max_seq_len = plan.context
            del observer.printed[printed:]
            gm, ctx = compile_mode(mode, max_seq_len)
            plans[mode] = ctx.facts.memory
        if mode == "vision":
            resident, other_activations = dict(ctx.facts.weights), plan.other_activation_bytes
        functions[mode], mode_weights, mode_state = _lower_mode(gm, ctx, layers, stamped_weights)
        if mode == "decode" and options.sampling == "device":
            # decode ends in sampling on the device; the logits variant serves teacher forcing
            functions["decode_logits"] = dataclasses.replace(functions["decode"], name="decode_logits")
            functions["decode"] = with_device_sampling(functions["decode_logits"], options.batch_size)
        precision_facts = ctx.facts.precision
        weights = canonical_order({**weights, **mode_weights})
        state = canonical_order({**state, **mode_state})
        counters.update({f"{mode}.{k}": v for k, v in ctx.counters.items()})
    plan = _merge_plans(plans["prefill"], plans["decode"])
    if plan.refusal:
        raise CompileError(plan.refusal)
    program = Program(
        target=target.name, mesh_shape=list(target.mesh_shape), model=cfg.to_json(),
        options={**options.to_json(), "max_seq_len": max_seq_len,
                 # The chunk the runtime prefills in: the option, else the memory planner's.
                 "prefill_chunk": plan.prefill_chunk,
                 # The page pool paged_kv sized (the option, or enough for a full-length user).
                 "max_num_blocks": counters.get("decode.paged_kv.pool_blocks", options.max_num_blocks)},
        weights=weights,
        state=state, functions=functions, memory_plan=plan.to_json(), precision=precision_facts)
    return CompileResult(program, cfg, target, reader, observer.printed, counters, plan, precision_file)
