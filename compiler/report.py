"""`ttcompile --report`: the memory plan of a compiled program as a table.

Bytes are per chip, in GB of 2**30 bytes (as compiler.targets states DRAM sizes). The
decode speed is an estimate: a bound from DRAM bandwidth alone (see
passes/memory_plan.py), not a measurement.
"""
from __future__ import annotations

from compiler.memory import GB, SHORT_CONTEXT, MemoryPlan


def _gb(n: float) -> str:
    return f"{n / GB:8.3f} GB"


def _row(label: str, value: str, note: str = "") -> str:
    return f"  {label:<34} {value:>16}  {note}".rstrip()


def format_precision(precision: dict) -> list[str]:
    """The precision policy chosen, and the rules (model facts) that shaped it."""
    policy = precision.get("policy", {})
    weights = ", ".join(f"{k} {policy[k]}" for k in ("attention", "ff1_ff3", "ff2", "lm_head", "embeddings")
                        if k in policy)
    lines = [f"precision ({precision.get('mode')}): weights {weights}; KV cache {policy.get('kv_cache')}; "
             f"activations {policy.get('activations')}; MLP fidelity {policy.get('ff1_ff3_fidelity')}"]
    lines += [f"  rule: {why}" for why in precision.get("rules", [])]
    return lines


def format_report(plan: MemoryPlan, model: str, optimizations: str, precision: dict | None = None) -> str:
    cats = plan.by_category()
    lines = [f"memory plan: {model} on {plan.target} ({plan.chips} chip{'s' if plan.chips > 1 else ''}, "
             f"{plan.dram_bytes / GB:.0f} GB DRAM per chip), {optimizations}, batch {plan.batch}",
             _row("per chip", "bytes", "")]
    notes = {
        "rope_tables": f"cos + sin rows for {plan.context} positions",
        "kv_cache": f"{plan.kv_tokens(plan.context)} tokens x {plan.kv_bytes_per_token} B"
                    + (f" (page pool {plan.pool_tokens(plan.context)} tokens)" if plan.pool_tokens(plan.context) else ""),
        "activations": f"largest live set of a {plan.prefill_chunk}-row prefill chunk (estimate)",
    }
    for category, size in cats.items():
        lines.append(_row(category, _gb(size), notes.get(category, "")))
    total = sum(cats.values())
    lines.append(_row("total", _gb(total), f"{100 * total / plan.dram_bytes:.0f}% of DRAM"))
    dtypes = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in sorted(plan.weights_by_dtype.items()))
    lines.append(_row("weights by dtype", "", dtypes))
    lines.append(_row("max context", f"{plan.max_context} tok", f"per user (model: {plan.model_max_context})"))
    lines.append(_row("max prefill chunk", f"{plan.max_prefill_chunk} tok",
                      f"beside a {plan.context}-token context"))
    lines.append(_row("compiled for", f"{plan.context} tok", f"context; prefill chunk {plan.prefill_chunk}"))
    collectives = ", ".join(f"{mode} {n}" for mode, n in sorted(plan.collectives_per_layer.items()))
    lines.append(_row("collectives per layer", "", collectives))
    lines.append(_row("decode live set (L1)", f"{plan.decode_activation_bytes / 2**20:.2f} MB",
                      f"of {plan.l1_bytes / 2**20:.0f} MB L1 per chip"))
    short = min(SHORT_CONTEXT, plan.context)
    lines.append(_row("decode tokens/s/user (estimate)",
                      f"{plan.decode_tokens_per_s_per_user(short):.1f}",
                      f"at {short} tokens; {plan.decode_tokens_per_s_per_user(plan.context):.1f} at "
                      f"{plan.context}: bound from {plan.dram_bandwidth_gbs:.0f} GB/s DRAM per chip, "
                      "weights + KV read once per step"))
    lines += [f"  note: {n}" for n in plan.notes]
    if precision:
        lines += format_precision(precision)
    return "\n".join(lines)
