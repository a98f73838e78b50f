"""The compile driver: model directory -> Program (+ converted weights in the cache)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lowering.lower import device_weights, lower
from lowering.program import Program, TensorSpec
from models_ref.config import ModelConfig, load_config
from models_ref.weights import CheckpointReader, open_checkpoint

from .options import DEFAULT_MAX_SEQ_LEN, CompileOptions
from .pipeline import Observer, run_pipeline
from .targets import Target, get_target
from .trace import trace

MODES = ("prefill", "decode")


class CompileError(ValueError):
    """The model cannot be compiled for this target with these options."""


@dataclass
class CompileResult:
    program: Program
    cfg: ModelConfig
    target: Target
    reader: CheckpointReader | None
    printed: list[str] = field(default_factory=list)
    counters: dict = field(default_factory=dict)


def resolve_max_seq_len(cfg: ModelConfig, options: CompileOptions) -> int:
    limit = cfg.max_position_embeddings
    if options.max_seq_len is None:
        return min(limit, DEFAULT_MAX_SEQ_LEN)
    if options.max_seq_len > limit:
        raise CompileError(
            f"--max-seq-len {options.max_seq_len} exceeds the model's max_position_embeddings ({limit})")
    return options.max_seq_len


def compile_model(model_dir: str | Path, options: CompileOptions,
                  observer: Observer | None = None) -> CompileResult:
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
    functions, weights, state, counters = {}, {}, {}, {}
    for mode in MODES:
        gm, ctx = trace(cfg, mode, target, options, max_seq_len)
        gm = run_pipeline(gm, ctx, observer)
        functions[mode] = lower(gm, ctx)
        weights.update(device_weights(ctx.facts))
        for name, spec in ctx.facts.state.items():
            state[name] = TensorSpec(list(spec.shape), spec.dtype, "TILE", "DRAM", "state", spec.layer,
                                     spec.placement.to_json())
        counters.update({f"{mode}.{k}": v for k, v in ctx.counters.items()})
    program = Program(
        target=target.name, mesh_shape=list(target.mesh_shape), model=cfg.to_json(),
        options={**options.to_json(), "max_seq_len": max_seq_len}, weights=weights,
        state=state, functions=functions)
    return CompileResult(program, cfg, target, reader, observer.printed, counters)
