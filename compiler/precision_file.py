"""Precision files: per decoder layer dtypes and kernel settings, in tt_transformers' shape.

tt-metal's models/tt_transformers/tt/model_config.py (`parse_decoder_json`, files such as
model_params/Llama3.1-8B-Instruct/performance_decoder_config.json) reads

    {"decoders": {"31": {"precision_cfg": {"FF1_FF3": "BFP8"},
                         "fidelity_cfg": {"LI_FF1_FF3": "HIFI2_FP16"}}}}

keys by enum *name*: TensorGroup (FF1_FF3, FF2, WQKV, WO, KV_CACHE, ACTIVATION) ->
PrecisionSetting (BFP4, BFP8, BF16); OpGroup (LI_FF1_FF3, LI_FF2, LI_QKV_DECODE,
LI_O_DECODE, SDPA_DECODE, LI_QKV_PREFILL, LI_O_PREFILL, SDPA_PREFILL) -> MathFidelitySetting
(LOFI, HIFI2, HIFI2_NA, HIFI2_FP16, HIFI4). Layers the file leaves out, and groups a layer
leaves out, keep the optimization mode's settings (the settings are merged onto the mode,
as the reference now does). Beyond the reference: ttnn dtype names (bfloat8_b, ...) are
accepted as values, and a top-level "lm_head": {"precision": ..., "fidelity": ...} sets the
LM head. Any error names the file and the entry (compiler.errors.CompileError, exit 2).
"""
from __future__ import annotations

import json
from pathlib import Path

from passes.precision import KERNELS, LayerPrecision, PrecisionPlan, plan_precision

from .errors import CompileError

# TensorGroup name -> LayerPrecision field; OpGroup name -> field.
TENSOR_GROUPS = {"FF1_FF3": "ff1_ff3", "FF2": "ff2", "WQKV": "wqkv", "WO": "wo",
                 "KV_CACHE": "kv_cache", "ACTIVATION": "activations"}
OP_GROUPS = {"LI_FF1_FF3": "li_ff1_ff3", "LI_FF2": "li_ff2", "LI_QKV_DECODE": "li_qkv_decode",
             "LI_O_DECODE": "li_o_decode", "SDPA_DECODE": "sdpa_decode", "LI_QKV_PREFILL": "li_qkv_prefill",
             "LI_O_PREFILL": "li_o_prefill", "SDPA_PREFILL": "sdpa_prefill"}
# PrecisionSetting name (or a ttnn dtype name) -> device dtype.
DTYPES = {"BFP4": "bfloat4_b", "BFP8": "bfloat8_b", "BF16": "bfloat16",
          **{d: d for d in ("bfloat4_b", "bfloat8_b", "bfloat16", "float32")}}
DTYPE_NAMES = {"bfloat4_b": "BFP4", "bfloat8_b": "BFP8", "bfloat16": "BF16"}  # for writing files
FIDELITIES = {name: name for name in KERNELS}  # MathFidelitySetting names, or plain fidelities
FIELD_TENSOR_GROUPS = {v: k for k, v in TENSOR_GROUPS.items()}
FIELD_OP_GROUPS = {v: k for k, v in OP_GROUPS.items()}


def _pick(table: dict, value, what: str, where: str) -> str:
    if not isinstance(value, str) or value not in table:
        raise CompileError(f"{where}: unknown {what} {value!r} (choose {', '.join(table)})")
    return table[value]


def _layer_settings(entry, n_layers: int, key: str, where: str) -> tuple[int, dict]:
    """One "decoders" entry -> (layer index, {LayerPrecision field: dtype or kernel})."""
    if not (isinstance(key, str) and key.isdigit()):
        raise CompileError(f"{where}: decoder key {key!r} is not a layer index")
    layer = int(key)
    if layer >= n_layers:
        raise CompileError(f"{where}: the model has no decoder layer {layer} (it has {n_layers}: 0-{n_layers - 1})")
    if not isinstance(entry, dict) or set(entry) - {"precision_cfg", "fidelity_cfg"}:
        raise CompileError(f"{where}: expected an object with precision_cfg and/or fidelity_cfg")
    settings = {}
    for section, groups, values, what in (("precision_cfg", TENSOR_GROUPS, DTYPES, "dtype"),
                                          ("fidelity_cfg", OP_GROUPS, FIDELITIES, "fidelity")):
        items = entry.get(section, {})
        if not isinstance(items, dict):
            raise CompileError(f"{where}.{section}: expected an object")
        for group, value in items.items():
            field = _pick(groups, group, "group", f"{where}.{section}")
            settings[field] = _pick(values, value, what, f"{where}.{section}.{group}")
    return layer, settings


def _lm_head(entry, where: str) -> dict:
    if not isinstance(entry, dict) or set(entry) - {"precision", "fidelity"}:
        raise CompileError(f"{where}: expected an object with precision and/or fidelity")
    head = {}
    if "precision" in entry:
        head["lm_head"] = _pick(DTYPES, entry["precision"], "dtype", f"{where}.precision")
    if "fidelity" in entry:
        head["li_lm_head"] = _pick(FIDELITIES, entry["fidelity"], "fidelity", f"{where}.fidelity")
    return head


def parse_precision(data, n_layers: int, where: str) -> tuple[dict[int, dict], dict]:
    """A precision file's JSON -> (layer -> settings, LM head settings) for plan_precision."""
    if not isinstance(data, dict) or "decoders" not in data or not isinstance(data["decoders"], dict):
        raise CompileError(f"{where}: expected an object with a \"decoders\" object (tt_transformers' decoder config)")
    unknown = set(data) - {"decoders", "lm_head", "mode", "chosen"}
    if unknown:
        raise CompileError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    layers = dict(_layer_settings(entry, n_layers, key, f"{where}: decoders.{key}")
                  for key, entry in data["decoders"].items())
    return layers, _lm_head(data.get("lm_head", {}), f"{where}: lm_head")


def read_precision_file(path: str | Path, cfg, mode: str) -> PrecisionPlan:
    """The precision plan a file gives `cfg` compiled in `mode`; CompileError on bad input."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CompileError(f"--precision {path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise CompileError(f"--precision {path}: not JSON ({str(e).splitlines()[0]})") from None
    layers, head = parse_precision(data, cfg.n_layers, str(path))
    return plan_precision(cfg, mode, layers, head, source=path.name)


def plan_to_file(plan: PrecisionPlan) -> dict:
    """A plan as a precision file (what differs from the mode's policy, per layer), which
    read_precision_file turns back into the same plan."""
    base = LayerPrecision.of_policy(plan.policy)
    decoders = {}
    for i, layer in enumerate(plan.layers):
        precision = {FIELD_TENSOR_GROUPS[f]: DTYPE_NAMES.get(getattr(layer, f), getattr(layer, f))
                     for f in FIELD_TENSOR_GROUPS if getattr(layer, f) != getattr(base, f)}
        fidelity = {FIELD_OP_GROUPS[f]: getattr(layer, f) for f in FIELD_OP_GROUPS
                    if getattr(layer, f) != getattr(base, f)}
        if precision or fidelity:
            decoders[str(i)] = {"precision_cfg": precision, "fidelity_cfg": fidelity}
    return {"decoders": decoders,
            "lm_head": {"precision": DTYPE_NAMES.get(plan.lm_head, plan.lm_head), "fidelity": plan.li_lm_head}}



def plan_layers(cfg, options, reader=None, model_dir=None) -> tuple[PrecisionPlan, dict | None]:
    """The precision plan options ask for, and (with --precision) the same as a precision
    file, which the artifact keeps as precision.json. "auto" runs the sensitivity search
    (compiler/precision_search.py), which needs the weights."""
    if options.precision is None:
        return plan_precision(cfg, options.optimizations), None
    if options.precision == "auto":
        if reader is None:
            raise CompileError("--precision auto measures the model's weights; it cannot run with --no-weights")
        from .precision_search import search_precision
        plan, chosen = search_precision(cfg, reader, options, model_dir)
        return plan, {**plan_to_file(plan), "mode": options.optimizations, "chosen": chosen}
    plan = read_precision_file(options.precision, cfg, options.optimizations)
    return plan, {**plan_to_file(plan), "mode": options.optimizations}
