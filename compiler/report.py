"""`ttcompile --report`: the memory plan of a compiled program as a table, then its device
time.

Bytes are per chip, in GB of 2**30 bytes (as compiler.targets states DRAM sizes). Speeds
are estimates from arithmetic on the program (compiler/cost.py: every op's bytes, FLOPs,
collectives and dispatch at the target's rates), not measurements; beside them, the old
bound from DRAM bandwidth alone (every weight and the KV read once per step at peak).
"""
from __future__ import annotations

from compiler import cost
from compiler.memory import GB, SHORT_CONTEXT, MemoryPlan, device_bytes

PROMPT_TOKENS = 128  # the prompt of the TTFT estimate (the reference's published TTFTs)


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
    return lines + format_layer_precision(precision)


LAYER_COLUMNS = ("wqkv", "wo", "ff1_ff3", "ff2", "kv_cache", "activations", "li_ff1_ff3")


def format_layer_precision(precision: dict) -> list[str]:
    """With --precision: every decoder layer's dtypes (and MLP kernel), runs of equal
    layers on one line, and the LM head's."""
    layers = precision.get("layers")
    if not layers:
        return []
    head = precision.get("lm_head", {})
    lines = [f"  per layer (--precision {precision.get('source')}): {' / '.join(LAYER_COLUMNS)}; "
             f"LM head {head.get('dtype')} {head.get('kernel')}"]
    start = 0
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            lines.append(f"    layers {span:<7} " + " / ".join(str(layers[start][c]) for c in LAYER_COLUMNS))
            start = i
    return lines


def format_device_time(program, plan: MemoryPlan) -> list[str]:
    """Decode tokens/s/user and prefill TTFT, and where each one's time goes by op class."""
    short = min(SHORT_CONTEXT, plan.context)
    decode = cost.decode_estimate(program, context=short)
    untraced = cost.decode_estimate(program, context=short, traced=False)
    full = cost.decode_estimate(program, context=plan.context)
    prefill = cost.prefill_estimate(program, prompt_tokens=min(PROMPT_TOKENS, plan.context))
    lines = ["device time (estimate: compiler/cost.py; rates and their sources: compiler/targets.py)",
             _row("decode tokens/s/user (estimate)", f"{decode.tokens_per_s_per_user:.1f}",
                  f"at {short} tokens, traced; {untraced.tokens_per_s_per_user:.1f} untraced (op by op, as "
                  f"the ttnn backend runs); {full.tokens_per_s_per_user:.1f} traced at {plan.context}"),
             _row("prefill TTFT (estimate)", f"{prefill.seconds * 1e3:.1f} ms",
                  f"a {prefill.context}-token prompt, untraced"),
             _row("where the time goes", "", f"{'decode, traced':>18}   {'prefill, untraced':>18}")]
    for cls in cost.CLASSES:
        cells = [f"{est.by_class[cls] * 1e3:9.2f} ms {100 * est.by_class[cls] / est.seconds:3.0f}%"
                 for est in (decode, prefill)]
        lines.append(_row(f"  {cls}", "", "   ".join(cells)))
    lines.append(_row("  total", "", "   ".join(f"{e.seconds * 1e3:9.2f} ms {e.ops:>4}" for e in (decode, prefill))
                      + "  (ops)"))
    lines.append(_row("decode bound (peak DRAM)", f"{plan.decode_tokens_per_s_per_user(short):.1f}",
                      f"at {short} tokens: weights + KV read once per step at {plan.dram_bandwidth_gbs:.0f} GB/s "
                      "per chip and nothing else (an upper bound)"))
    lines.append(format_decode_output(program))
    return lines


def format_decode_output(program) -> str:
    """What leaves the device per decode step and user: a token id when decode samples on
    the device, a (tile-padded) row of logits when the host samples."""
    fn = program.functions["decode"]
    out = fn.tensors[fn.outputs[0]]
    users = out.shape[-1] if "decode_logits" in program.functions else out.shape[-2]
    per_user = device_bytes(out.shape, out.dtype, "ROW_MAJOR") / users  # the values, not tile padding
    what = "token id, sampled on the device" if "decode_logits" in program.functions else \
        f"logits {out.shape[-1]} x {out.dtype}, sampled on the host (--sampling device: 4 B)"
    return _row("decode output to host", f"{per_user:,.0f} B", f"per user per step ({what})")


def format_replicas(plan: MemoryPlan) -> str:
    """The header's data-parallel part: the plan (and every estimate) is one replica's."""
    if plan.replicas <= 1:
        return ""
    return (f" x {plan.replicas} replicas on {plan.system} ({plan.replicas * plan.batch} users; the plan and the "
            f"estimates below are per replica, total tokens/s x {plan.replicas})")


def format_report(plan: MemoryPlan, model: str, optimizations: str, precision: dict | None = None,
                  program=None) -> str:
    cats = plan.by_category()
    lines = [f"memory plan: {model} on {plan.target} ({plan.chips} chip{'s' if plan.chips > 1 else ''}, "
             f"{plan.dram_bytes / GB:.0f} GB DRAM per chip), {optimizations}, batch {plan.batch}"
             + format_replicas(plan),
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
    lines += [f"  note: {n}" for n in plan.notes]
    if precision:
        lines += format_precision(precision)
    if program is not None:
        lines += format_device_time(program, plan)
    else:
        short = min(SHORT_CONTEXT, plan.context)
        lines.append(_row("decode bound (peak DRAM)", f"{plan.decode_tokens_per_s_per_user(short):.1f}",
                          f"tokens/s/user at {short} tokens: weights + KV at {plan.dram_bandwidth_gbs:.0f} GB/s "
                          "(an upper bound)"))
    return "\n".join(lines)
