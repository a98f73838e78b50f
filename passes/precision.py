"""precision: device dtypes for weights, KV cache and activations, and the kernel settings
of every op, by optimization mode and, per decoder layer, from a precision file.

Expects: a fused graph (wqkv, gated_mlp), weights with roles, ctx.options.optimizations,
and (set by the driver) ctx.precision_plan, the precision of every decoder layer, and
ctx.layer_plan, which decoder layer each traced layer stands for (lowering/stamp.py).
Guarantees: every WeightSpec and StateSpec has its device dtype, every call_function node
has a PRECISION fact (output dtype, math fidelity, accumulation), and ctx.facts.precision
records the policy chosen, the rules that shaped it and, with a precision file, every
layer's settings (program.json and --report show them).

Policies are data: a default row per mode, then rules that change it for models with
given facts (family, parameter count), as the reference's per-model settings do. The
rules read ModelConfig facts only, never the model's name or folder: the same checkpoint
under any name compiles to the same program. A precision file (compiler/precision_file.py,
tt_transformers' decoder-config shape) then changes single layers' tensor groups and op
groups, merged onto the mode's row: the per-layer policy is data too.

    layers.0.feed_forward.w1.weight  bfloat16 ==> bfloat4_b   (role W1, performance)
    %m = gated_mlp(...)                        ==> meta[PRECISION] = Precision(bfloat16, LoFi)
    layers.7.feed_forward.w1.weight  bfloat16 ==> bfloat8_b   (file: decoders.7 FF1_FF3 BFP8)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx

from compiler import dialect
from compiler.facts import LAYER, PLACEMENT, PRECISION, REPLICATED, Precision
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


# ---------------------------------------------------------------- kernel settings
# A kernel setting by name -> (math fidelity, fp32 accumulation in Dst, packer L1
# accumulation). The mode policies name plain fidelities (fp32 Dst and packer L1
# accumulation on, as always here); precision files use tt_transformers' MathFidelitySetting
# names, which stand for its compute-kernel configs (model_config.py: compute_kernel_config_lofi,
# _hifi2, _hifi2_fp16, _hifi2_na, _hifi4, _hifi4_fp32).
KERNELS: dict[str, tuple[str, bool, bool]] = {
    "LoFi": ("LoFi", True, True), "HiFi2": ("HiFi2", True, True),
    "HiFi3": ("HiFi3", True, True), "HiFi4": ("HiFi4", True, True),
    "LOFI": ("LoFi", False, True), "HIFI2": ("HiFi2", True, True), "HIFI2_FP16": ("HiFi2", False, True),
    "HIFI2_NA": ("HiFi2", False, False), "HIFI4": ("HiFi4", True, True), "HIFI4_FP32": ("HiFi4", True, True),
}


def kernel_precision(dtype: str, kernel: str) -> Precision:
    fidelity, fp32_acc, packer_l1_acc = KERNELS[kernel]
    return Precision(dtype, fidelity, fp32_acc, packer_l1_acc)


# ---------------------------------------------------------------- per-layer precision
@dataclass(frozen=True)
class LayerPrecision:
    """One decoder layer: dtypes by tensor group and kernel settings by op group, named as
    tt_transformers' TensorGroup and OpGroup (lower case; its ACTIVATION is `activations`).
    Layers with equal LayerPrecision are one class: compiled once, stamped for the rest."""

    wqkv: str
    wo: str
    ff1_ff3: str
    ff2: str
    kv_cache: str
    activations: str
    li_qkv_prefill: str
    li_qkv_decode: str
    li_o_prefill: str
    li_o_decode: str
    li_ff1_ff3: str
    li_ff2: str
    sdpa_prefill: str
    sdpa_decode: str

    @classmethod
    def of_policy(cls, p: Policy) -> "LayerPrecision":
        """A mode's policy as one layer's settings (the program that policy alone gives)."""
        return cls(wqkv=p.attention, wo=p.attention, ff1_ff3=p.ff1_ff3, ff2=p.ff2, kv_cache=p.kv_cache,
                   activations=p.activations, li_qkv_prefill=p.default_fidelity, li_qkv_decode=p.default_fidelity,
                   li_o_prefill=p.default_fidelity, li_o_decode=p.default_fidelity, li_ff1_ff3=p.ff1_ff3_fidelity,
                   li_ff2=p.default_fidelity, sdpa_prefill=p.attention_fidelity, sdpa_decode=p.attention_fidelity)


TENSOR_GROUPS = ("wqkv", "wo", "ff1_ff3", "ff2", "kv_cache", "activations")
OP_GROUPS = tuple(f.name for f in dataclasses.fields(LayerPrecision) if f.name not in TENSOR_GROUPS)


@dataclass(frozen=True)
class PrecisionPlan:
    """The whole model's precision: the mode's policy (and the rules that shaped it), each
    decoder layer's settings and the LM head's. `source`: the precision file, "auto" (the
    sensitivity search's choice, compiler/precision_search.py), or None (the mode alone)."""

    policy: Policy
    rules: tuple[str, ...]
    layers: tuple[LayerPrecision, ...]
    lm_head: str
    li_lm_head: str
    source: str | None = None

    def to_json(self) -> dict:
        data = {"mode": None, "policy": dataclasses.asdict(self.policy), "rules": list(self.rules)}
        if self.source is not None:
            data.update(source=self.source, lm_head={"dtype": self.lm_head, "kernel": self.li_lm_head},
                        layers=[dataclasses.asdict(layer) for layer in self.layers])
        return data


def plan_precision(cfg: ModelConfig, mode: str, layers: dict[int, dict[str, str]] | None = None,
                   lm_head: dict[str, str] | None = None, source: str | None = None) -> PrecisionPlan:
    """Every decoder layer's precision: the mode's policy, with `layers` (layer -> {field of
    LayerPrecision: dtype or kernel setting}) and `lm_head` ({"lm_head": dtype,
    "li_lm_head": kernel}) merged on top (compiler/precision_file.py reads them)."""
    policy, reasons = choose_policy(cfg, mode)
    base = LayerPrecision.of_policy(policy)
    layers = layers or {}
    per_layer = tuple(dataclasses.replace(base, **layers.get(i, {})) for i in range(cfg.n_layers))
    head = {"lm_head": policy.lm_head, "li_lm_head": policy.default_fidelity, **(lm_head or {})}
    return PrecisionPlan(policy, tuple(reasons), per_layer, head["lm_head"], head["li_lm_head"], source)


# ---------------------------------------------------------------- dtypes by role
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

# Inside a decoder layer: which LayerPrecision field gives a weight role its dtype (other
# roles, norms and biases, take the layer's activation dtype) ...
LAYER_FIELDS: dict[Role, str] = {
    Role.WQ: "wqkv", Role.WK: "wqkv", Role.WV: "wqkv", Role.WQKV: "wqkv", Role.WO: "wo",
    Role.W1: "ff1_ff3", Role.W3: "ff1_ff3", Role.W2: "ff2",
}
# ... and which op group a matmul reading a weight of that role belongs to.
MATMUL_GROUPS: dict[Role, str] = {
    Role.WQ: "li_qkv", Role.WK: "li_qkv", Role.WV: "li_qkv", Role.WQKV: "li_qkv", Role.WO: "li_o",
    Role.W1: "li_ff1_ff3", Role.W3: "li_ff1_ff3", Role.W2: "li_ff2",
}


def weight_dtype(role: Role | None, policy: Policy) -> str:
    return getattr(policy, ROLE_FIELDS.get(role, "activations"))


_ATTENTION = {dialect.DIALECT[name] for name in (
    "causal_attention", "decode_attention", "chunked_attention", "paged_decode_attention")}


def _weight_role(node: torch.fx.Node, ctx) -> Role | None:
    """The role of the weight a linear multiplies by (None for other nodes)."""
    weight = node.args[1] if node.target is dialect.linear and len(node.args) > 1 else None
    spec = ctx.facts.weights.get(weight.target) if isinstance(weight, torch.fx.Node) else None
    return spec.role if spec is not None else None


def _op_group(node: torch.fx.Node, ctx) -> str | None:
    """The op group (a LayerPrecision field) of a decoder layer's node; None for ops
    outside the groups (norms, rotary, elementwise)."""
    if node.target is dialect.gated_mlp:
        return "li_ff1_ff3"
    if node.target in _ATTENTION:
        return f"sdpa_{ctx.mode}"
    group = MATMUL_GROUPS.get(_weight_role(node, ctx))
    return None if group is None else group if group in OP_GROUPS else f"{group}_{ctx.mode}"


def _kernel(node: torch.fx.Node, layer: LayerPrecision | None, plan: PrecisionPlan, ctx) -> str:
    """A node's kernel setting: its layer's op group, the LM head's, else the policy's."""
    group = _op_group(node, ctx) if layer is not None else None
    if group is not None:
        return getattr(layer, group)
    if _weight_role(node, ctx) is Role.LM_HEAD:
        return plan.li_lm_head
    if node.target is dialect.gated_mlp:
        return plan.policy.ff1_ff3_fidelity
    if node.target in _ATTENTION:
        return plan.policy.attention_fidelity
    return plan.policy.default_fidelity


# ---------------------------------------------------------------- the pass
def _traced_layers(ctx, plan: PrecisionPlan) -> dict[int, LayerPrecision]:
    """Traced layer -> the settings of the decoder layer it stands for (ctx.layer_plan; the
    same index when the graph holds every layer). The vision function has none."""
    if ctx.mode == "vision":
        return {}
    stands_for = getattr(ctx, "layer_plan", None)
    traced = stands_for.traced if stands_for is not None else len(plan.layers)
    return {j: plan.layers[stands_for.stands_for(j) if stands_for is not None else j] for j in range(traced)}


def run(gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    plan = getattr(ctx, "precision_plan", None) or plan_precision(ctx.cfg, ctx.options.optimizations)
    layers, policy = _traced_layers(ctx, plan), plan.policy
    for spec in ctx.facts.weights.values():
        layer = layers.get(spec.layer)
        if spec.role is Role.LM_HEAD:
            spec.dtype = plan.lm_head
        elif layer is not None:
            spec.dtype = getattr(layer, LAYER_FIELDS.get(spec.role, "activations"))
        else:
            spec.dtype = weight_dtype(spec.role, policy)
    for spec in ctx.facts.state.values():
        layer = layers.get(spec.layer)
        spec.dtype = layer.kv_cache if layer is not None else policy.kv_cache
    for node in gm.graph.nodes:
        if node.op == "call_function":
            layer = layers.get(node.meta.get(LAYER))
            partial = node.meta.get(PLACEMENT, REPLICATED).partial
            dtype = policy.partial_sums if partial else layer.activations if layer is not None else policy.activations
            node.meta[PRECISION] = kernel_precision(dtype, _kernel(node, layer, plan, ctx))
    ctx.facts.precision = {**plan.to_json(), "mode": ctx.options.optimizations}
    ctx.counters["precision.weights"] = len(ctx.facts.weights)
    return gm
