"""precision: device dtypes for weights, KV cache and activations, by optimization mode.

Expects: a fused graph (wqkv, gated_mlp) and ctx.options.optimizations.
Guarantees: every WeightSpec and StateSpec has its device dtype and every call_function
node has a PRECISION fact (output dtype, math fidelity). Policies are data: a default
row per mode, overridden per model family; families are recognised from the model name
(as the reference keys its precision settings), anything unrecognised gets the default.

    layers.0.feed_forward.w1.weight  bfloat16 ==> bfloat4_b   (performance)
    %m = gated_mlp(...)                        ==> meta[PRECISION] = Precision(bfloat16, LoFi)
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch.fx

from compiler import dialect
from compiler.facts import PLACEMENT, PRECISION, REPLICATED, Precision

NAME = "precision"


@dataclass(frozen=True)
class Policy:
    attention: str  # wqkv, wo
    ff1_ff3: str  # w1, w3
    ff2: str  # w2
    kv_cache: str
    lm_head: str
    activations: str = "bfloat16"
    embeddings: str = "bfloat16"
    # Row-parallel matmul outputs that an all_reduce will sum (multi-chip only). Keeping
    # them in float32 makes a sharded program round once, where one chip rounds once.
    partial_sums: str = "bfloat16"
    ff1_ff3_fidelity: str = "HiFi2"
    default_fidelity: str = "HiFi2"
    attention_fidelity: str = "HiFi4"


POLICIES: dict[str, Policy] = {
    "performance": Policy(attention="bfloat8_b", ff1_ff3="bfloat4_b", ff2="bfloat8_b",
                          kv_cache="bfloat8_b", lm_head="bfloat8_b", ff1_ff3_fidelity="LoFi"),
    "accuracy": Policy(attention="bfloat16", ff1_ff3="bfloat8_b", ff2="bfloat8_b",
                       kv_cache="bfloat16", lm_head="bfloat8_b", partial_sums="float32"),
    "float32": Policy(attention="float32", ff1_ff3="float32", ff2="float32", kv_cache="float32",
                      lm_head="float32", activations="float32", embeddings="float32",
                      partial_sums="float32",
                      ff1_ff3_fidelity="HiFi4", default_fidelity="HiFi4"),
}

# (family name pattern, mode) -> changes to the mode's default policy. From the reference's
# per-model settings: Llama keeps bfloat8_b attention in accuracy mode; Qwen2.5-7B keeps
# bfloat16 attention and KV even in performance mode; 70B-class models keep bfloat4_b MLP.
FAMILY_OVERRIDES: list[tuple[str, str, dict]] = [
    (r"llama-?3", "accuracy", {"attention": "bfloat8_b", "kv_cache": "bfloat8_b"}),
    (r"qwen2\.5-7b", "performance", {"attention": "bfloat16", "kv_cache": "bfloat16"}),
    (r"(70b|72b)", "accuracy", {"ff1_ff3": "bfloat4_b", "ff1_ff3_fidelity": "LoFi"}),
]


def policy_for(model_name: str, mode: str) -> Policy:
    policy = POLICIES[mode]
    for pattern, override_mode, changes in FAMILY_OVERRIDES:
        if override_mode == mode and re.search(pattern, model_name, re.IGNORECASE):
            policy = dataclasses.replace(policy, **changes)
    return policy


# Weight name suffix -> Policy field.
_WEIGHT_ROLES = [
    (r"attention\.wqkv\.weight$|attention\.w[qkvo]\.weight$", "attention"),
    (r"feed_forward\.w[13]\.weight$", "ff1_ff3"),
    (r"feed_forward\.w2\.weight$", "ff2"),
    (r"^output\.weight$", "lm_head"),
    (r"^tok_embeddings\.weight$", "embeddings"),
]


def weight_dtype(name: str, policy: Policy) -> str:
    for pattern, role in _WEIGHT_ROLES:
        if re.search(pattern, name):
            return getattr(policy, role)
    return policy.activations  # norms, biases, rope tables: activation precision


_ATTENTION = {dialect.DIALECT[name] for name in (
    "causal_attention", "decode_attention", "chunked_attention", "paged_decode_attention")}


def _fidelity(node: torch.fx.Node, policy: Policy) -> str:
    if node.target is dialect.gated_mlp:
        return policy.ff1_ff3_fidelity
    if node.target in _ATTENTION:
        return policy.attention_fidelity
    return policy.default_fidelity


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    policy = policy_for(ctx.cfg.name, ctx.options.optimizations)
    for spec in ctx.facts.weights.values():
        spec.dtype = weight_dtype(spec.name, policy)
    for spec in ctx.facts.state.values():
        spec.dtype = policy.kv_cache
    for node in gm.graph.nodes:
        if node.op == "call_function":
            partial = node.meta.get(PLACEMENT, REPLICATED).partial
            dtype = policy.partial_sums if partial else policy.activations
            node.meta[PRECISION] = Precision(dtype, _fidelity(node, policy))
    ctx.counters["precision.weights"] = len(ctx.facts.weights)
    return gm
