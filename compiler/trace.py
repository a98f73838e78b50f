"""Trace the reference module into prefill and decode fx graphs, on the meta device."""
from __future__ import annotations

import torch
import torch.fx

from models_ref.config import ModelConfig
from models_ref.modules import Transformer
from models_ref.multimodal import VisionFunction, cross_cache_len, device_vision

from models_ref.names import Role

from .context import PassContext
from .facts import StateSpec, weight_spec
from .options import CompileOptions
from .targets import Target

# Prefill graphs are generic in their row count S. Passes see them propagated at
# SEQ_ROWS; the lowering propagates once more at ALT_SEQ_ROWS, and every dim that differs
# between the two is an S-dim (see lowering.lower). Both fit the smallest max_seq_len.
SEQ_ROWS, ALT_SEQ_ROWS = 128, 64


def _constant_recipe(name: str, max_seq_len: int) -> list:
    return ["rope_table", name.removeprefix("rope_"), max_seq_len]


def _module(cfg: ModelConfig, mode: str, batch: int, max_seq_len: int):
    if mode == "vision":  # Llama 3.2 Vision: one image -> its user's cross-attention caches
        return VisionFunction(cfg, batch)
    return Transformer(cfg, mode, max_batch=batch, max_seq_len=max_seq_len)


def trace(cfg: ModelConfig, mode: str, target: Target, options: CompileOptions,
          max_seq_len: int, layers: int | None = None) -> tuple[torch.fx.GraphModule, PassContext]:
    """The reference module as an fx graph plus its weight/state table; no data is read.

    `mode`: "prefill", "decode", or (models with cfg.vision) "vision".
    `layers`: trace only the first that many decoder layers (the driver stamps the rest,
    lowering/stamp.py); the context keeps the full config."""
    module_cfg = cfg if layers is None else cfg.replace(n_layers=layers)
    with torch.device("meta"):
        model = _module(module_cfg, mode, options.batch_size, max_seq_len)
    gm = torch.fx.symbolic_trace(model)
    seq_rows = SEQ_ROWS
    ctx = PassContext(cfg, target, options, mode, max_seq_len, seq_rows)

    # Every weight and cache gets its role here, once, from the name table.
    param_names = {id(p): name for name, p in model.named_parameters()}
    assembled = getattr(model, "assembled_weights", {})
    for name, p in model.named_parameters(remove_duplicate=False):
        recipe = assembled.get(name, ["source", param_names[id(p)]])
        ctx.facts.weights[name] = weight_spec(name, p.shape, recipe)
    for name, b in model.named_buffers():
        spec = weight_spec(name, b.shape, [])
        if spec.role in (Role.ROPE_COS, Role.ROPE_SIN):
            spec.recipe = _constant_recipe(name, max_seq_len)
            ctx.facts.weights[name] = spec
        else:
            ctx.facts.state[name] = StateSpec(name, spec.shape, layer=spec.layer, role=spec.role)

    _declare_inputs(ctx, cfg, mode, options.batch_size)
    ctx.propagate(gm)
    return gm, ctx


def _declare_inputs(ctx: PassContext, cfg: ModelConfig, mode: str, batch: int) -> None:
    """The tensor inputs of each function, as shapes of the row count."""
    if mode == "vision":
        v = device_vision(cfg.vision)
        tokens = v.max_num_tiles * v.padded_tokens_per_tile
        ctx.add_input("pixels", lambda rows: (v.max_num_tiles, v.num_channels, v.tile_size, v.tile_size),
                      torch.float32)
        ctx.add_input("encoder_mask", lambda rows: (1, 1, tokens, tokens), torch.float32)
        return
    rows_of = (lambda rows: batch) if mode == "decode" else (lambda rows: rows)
    ctx.add_input("tokens", lambda rows: (1, rows_of(rows)))
    ctx.add_input("positions", lambda rows: (rows_of(rows),))
    if cfg.vision is not None:
        length = cross_cache_len(cfg.vision)
        ctx.add_input("xattn_mask", lambda rows: (1, 1, rows_of(rows), length), torch.float32)
        ctx.add_input("row_mask", lambda rows: (1, 1, rows_of(rows), 1), torch.float32)
