"""precision: device dtypes for weights, KV cache and activations, by optimization mode.

Expects: a fused graph (wqkv, gated_mlp), weights with roles, ctx.options.optimizations.
Guarantees: every WeightSpec and StateSpec has its device dtype, every call_function node
has a PRECISION fact (output dtype, math fidelity), and ctx.facts.precision records the
policy chosen and the rules that shaped it (program.json and --report show both).

Policies are data: a default row per mode, then rules that change it for models with
given facts (family, parameter count), as the reference's per-model settings do. The
rules read ModelConfig facts only, never the model's name or folder: the same checkpoint
under any name compiles to the same program.

    layers.0.feed_forward.w1.weight  bfloat16 ==> bfloat4_b   (role W1, performance)
    %m = gated_mlp(...)                        ==> meta[PRECISION] = Precision(bfloat16, LoFi)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx

from compiler import dialect
from compiler.facts import PLACEMENT, PRECISION, REPLICATED, Precision
from models_ref.config import ModelConfig
from models_ref.names import Role

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
    vision: str = "bfloat16"  # Llama 3.2 Vision's encoder and projector matmul weights


POLICIES: dict[str, Policy] = {
    "performance": Policy(attention="bfloat8_b", ff1_ff3="bfloat4_b", ff2="bfloat8_b",
                          kv_cache="bfloat8_b", lm_head="bfloat8_b", ff1_ff3_fidelity="LoFi",
                          vision="bfloat8_b"),
    "accuracy": Policy(attention="bfloat16", ff1_ff3="bfloat8_b", ff2="bfloat8_b",
                       kv_cache="bfloat16", lm_head="bfloat8_b", partial_sums="float32"),
    "float32": Policy(attention="float32", ff1_ff3="float32", ff2="float32", kv_cache="float32",
                      lm_head="float32", activations="float32", embeddings="float32",
                      partial_sums="float32",
                      ff1_ff3_fidelity="HiFi4", default_fidelity="HiFi4", vision="float32"),
}

B = 10 ** 9


@dataclass(frozen=True)
class Rule:
    """Changes to a mode's policy for models whose facts match (None: any)."""

    why: str
    mode: str
    changes: dict
    families: tuple[str, ...] | None = None
    min_params: int | None = None
    max_params: int | None = None

    def applies(self, cfg: ModelConfig, mode: str) -> bool:
        return (mode == self.mode and (self.families is None or cfg.family in self.families)
                and (self.min_params is None or cfg.n_params >= self.min_params)
                and (self.max_params is None or cfg.n_params < self.max_params))


# From the reference's per-model settings (tt_transformers' ModelOptimizations), as facts.
RULES: tuple[Rule, ...] = (
    Rule("Llama-architecture models of 1B+ parameters keep bfloat8_b attention and KV in accuracy mode "
         "(the reference's Llama/Mistral setting)", "accuracy",
         {"attention": "bfloat8_b", "kv_cache": "bfloat8_b"}, families=("llama", "mistral"), min_params=1 * B),
    Rule("Qwen2 models below 10B parameters keep bfloat16 attention and KV in performance mode "
         "(the reference's Qwen2.5-7B setting)", "performance",
         {"attention": "bfloat16", "kv_cache": "bfloat16"}, families=("qwen2",), max_params=10 * B),
    Rule("models of 60B+ parameters keep a bfloat4_b LoFi MLP in accuracy mode (the reference's 70B setting)",
         "accuracy", {"ff1_ff3": "bfloat4_b", "ff1_ff3_fidelity": "LoFi"}, min_params=60 * B),
)


def choose_policy(cfg: ModelConfig, mode: str) -> tuple[Policy, list[str]]:
    """The mode's policy for this model, and why it differs from the mode's default."""
    policy, reasons = POLICIES[mode], []
    for rule in RULES:
        if rule.applies(cfg, mode):
            policy = dataclasses.replace(policy, **rule.changes)
            reasons.append(rule.why)
    return policy, reasons


# Which policy field gives each weight role its dtype; other roles (norms, biases, rope
# tables) take the activation dtype.
ROLE_FIELDS: dict[Role, str] = {
    Role.WQ: "attention", Role.WK: "attention", Role.WV: "attention", Role.WQKV: "attention",
    Role.WO: "attention", Role.W1: "ff1_ff3", Role.W3: "ff1_ff3", Role.W2: "ff2",
    Role.LM_HEAD: "lm_head", Role.EMBEDDING: "embeddings",
    # Llama 3.2 Vision: cross-attention layers as the decoder's; the tower and projector
    **{r: "attention" for r in (Role.CROSS_WQ, Role.CROSS_WK, Role.CROSS_WV, Role.CROSS_WO)},
    Role.CROSS_W1: "ff1_ff3", Role.CROSS_W3: "ff1_ff3", Role.CROSS_W2: "ff2",
    **{r: "vision" for r in (Role.VISION_WQKV, Role.VISION_WQ, Role.VISION_WK, Role.VISION_WV, Role.VISION_WO,
                             Role.VISION_FC1, Role.VISION_FC2, Role.VISION_PATCH_EMBED, Role.PROJECTOR)},
}


def weight_dtype(role: Role | None, policy: Policy) -> str:
    return getattr(policy, ROLE_FIELDS.get(role, "activations"))


_ATTENTION = {dialect.DIALECT[name] for name in (
    "causal_attention", "decode_attention", "chunked_attention", "paged_decode_attention")}


def _fidelity(node: torch.fx.Node, policy: Policy) -> str:
    if node.target is dialect.gated_mlp:
        return policy.ff1_ff3_fidelity
    if node.target in _ATTENTION:
        return policy.attention_fidelity
    return policy.default_fidelity


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    policy, reasons = choose_policy(ctx.cfg, ctx.options.optimizations)
    for spec in ctx.facts.weights.values():
        spec.dtype = weight_dtype(spec.role, policy)
    for spec in ctx.facts.state.values():
        spec.dtype = policy.kv_cache
    for node in gm.graph.nodes:
        if node.op == "call_function":
            partial = node.meta.get(PLACEMENT, REPLICATED).partial
            dtype = policy.partial_sums if partial else policy.activations
            node.meta[PRECISION] = Precision(dtype, _fidelity(node, policy))
    ctx.facts.precision = {"mode": ctx.options.optimizations, "policy": dataclasses.asdict(policy),
                           "rules": reasons}
    ctx.counters["precision.weights"] = len(ctx.facts.weights)
    return gm
