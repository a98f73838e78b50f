"""The memory plan of a program: bytes per chip by category and the fit decisions, as
data with its arithmetic. passes/memory_plan.py fills it in; the driver, the report and
program.json read it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from models_ref.names import NORMS, Role
from runtime import schedule
from runtime.blockfloat import SCALAR_BYTES, bytes_for

GB = 1 << 30  # as compiler.targets: "12 GB" is 12 x 2**30 bytes
SHORT_CONTEXT = 1024  # context of the "short" decode bandwidth estimate
CROSS_CACHE = "cross_attention_cache"  # Llama 3.2 Vision: a row per user of every cross layer

# Memory category of each weight role (the report's rows).
CATEGORIES: dict[Role, str] = {
    **{r: "attention" for r in (Role.WQ, Role.WK, Role.WV, Role.BQ, Role.BK, Role.BV, Role.WQKV,
                                Role.BQKV, Role.WO)},
    **{r: "mlp" for r in (Role.W1, Role.W2, Role.W3)},
    **{r: "norms" for r in NORMS},
    Role.EMBEDDING: "embedding", Role.LM_HEAD: "lm_head",
    Role.ROPE_COS: "rope_tables", Role.ROPE_SIN: "rope_tables", Role.ROPE_TRANS_MAT: "rope_tables",
    # Llama 3.2 Vision
    **{r: "cross_attention" for r in (Role.CROSS_WQ, Role.CROSS_WK, Role.CROSS_WV, Role.CROSS_WO, Role.CROSS_W1,
                                      Role.CROSS_W2, Role.CROSS_W3, Role.CROSS_Q_NORM, Role.CROSS_K_NORM,
                                      Role.CROSS_ATTENTION_NORM, Role.CROSS_FFN_NORM, Role.CROSS_GATE_ATTN,
                                      Role.CROSS_GATE_FFN)},
    **{r: "vision" for r in Role if r.value.startswith("vision_")},
    Role.PROJECTOR: "vision", Role.PROJECTOR_BIAS: "vision", Role.IMAGE_TOKEN_EMBEDDING: "embedding",
}
# Not read in full by a decode step: embedding rows and rope rows are looked up.
_LOOKUP_CATEGORIES = ("embedding", "rope_tables")


def weight_category(role: Role | None) -> str:
    return CATEGORIES.get(role, "other")


def device_bytes(shape, dtype: str, layout: str = "TILE") -> int:
    """Bytes of one device tensor: TILE layout pads the last two dims to 32 (a 1-D vector
    is stored as the ROW_MAJOR [ceil(n/32), 32] rows the lowering makes of norm weights);
    ROW_MAJOR scalars are not padded."""
    shape = tuple(shape)
    if layout == "ROW_MAJOR" and dtype in SCALAR_BYTES:
        return math.prod(shape) * SCALAR_BYTES[dtype]
    if len(shape) == 1:
        shape = (math.ceil(shape[0] / 32), 32)
    return bytes_for(shape, dtype)


@dataclass
class MemoryPlan:
    """Bytes per chip and the decisions; JSON-able (program.json "memory_plan")."""

    target: str
    chips: int
    dram_bytes: int  # per chip
    l1_bytes: int  # per chip: cores x L1 per core
    batch: int
    model_max_context: int
    weights: dict[str, int] = field(default_factory=dict)  # category -> bytes per chip
    weights_by_dtype: dict[str, int] = field(default_factory=dict)
    kv_bytes_per_token: int = 0  # per chip, all layers, K and V
    kv_pool_tokens: int = 0  # token slots of a page pool of a given size (--max-num-blocks)
    # A pool paged_kv sizes itself (no --max-num-blocks): runtime.schedule.pool_blocks of
    # the context, in blocks of kv_block_size tokens, so it follows the context.
    kv_block_size: int = 0
    rope_bytes_per_position: int = 0
    activation_base: int = 0  # prefill peak = max over program points of base + per_row x S
    activation_points: list = field(default_factory=list)  # [(base, per_row)] upper envelope
    decode_activation_bytes: int = 0
    other_activation_bytes: int = 0  # peak of the program's other functions (Llama 3.2 Vision's vision)
    collectives_per_layer: dict[str, int] = field(default_factory=dict)  # mode -> count
    max_context: int = 0
    max_prefill_chunk: int = 0
    context: int = 0  # the context compiled for
    prefill_chunk: int = 0  # the chunk planned for
    refusal: str | None = None
    notes: list[str] = field(default_factory=list)
    dram_bandwidth_gbs: float = 0.0
    replicas: int = 1  # data parallel: the plan is one replica's, on a sub-mesh of `system`
    system: str = ""

    # ------------------------------------------------------------ arithmetic
    def activation_bytes(self, rows: int) -> int:
        """Peak activations: a prefill chunk of `rows`, or another function's (the vision
        function's one image), whichever is larger (they never run at once)."""
        chunk = max((b + r * rows for b, r in self.activation_points), default=0)
        return max(chunk, self.other_activation_bytes)

    def pool_tokens(self, context: int) -> int:
        """Token slots of the page pool the program allocates for this context (0: none)."""
        if self.kv_block_size:
            return schedule.pool_blocks(None, context, self.kv_block_size) * self.kv_block_size
        return self.kv_pool_tokens

    def kv_tokens(self, context: int) -> int:
        """KV token slots planned: the requested batch at full context, or the pool if larger."""
        return max(self.pool_tokens(context), self.batch * context)

    def fixed_bytes(self) -> int:
        return sum(v for k, v in self.weights.items() if k != "rope_tables")

    def total_bytes(self, context: int, chunk: int) -> int:
        """DRAM per chip. Decode activations are not here: they live in L1."""
        return (self.fixed_bytes() + self.rope_bytes_per_position * context
                + self.kv_bytes_per_token * self.kv_tokens(context) + self.activation_bytes(chunk))

    def fits(self, context: int, chunk: int) -> bool:
        return self.total_bytes(context, chunk) <= self.dram_bytes

    def by_category(self, context: int | None = None, chunk: int | None = None) -> dict[str, int]:
        context = self.context if context is None else context
        chunk = self.prefill_chunk if chunk is None else chunk
        out = {k: v for k, v in self.weights.items() if k != "rope_tables"}
        out["rope_tables"] = self.rope_bytes_per_position * context
        out["kv_cache"] = self.kv_bytes_per_token * self.kv_tokens(context)
        out["activations"] = self.activation_bytes(chunk)
        return out

    def decode_step_bytes(self, context: int) -> int:
        """DRAM bytes one decode step reads per chip: weights (not lookup tables, not the
        vision tower, which runs once per image) + KV (and the cross-attention caches)."""
        weights = sum(v for k, v in self.weights.items() if k not in _LOOKUP_CATEGORIES and k != "vision")
        return weights + self.kv_bytes_per_token * self.batch * context

    def decode_tokens_per_s_per_user(self, context: int) -> float:
        """Upper bound: each step streams decode_step_bytes at peak DRAM bandwidth."""
        return self.dram_bandwidth_gbs * 1e9 / self.decode_step_bytes(context)

    def to_json(self) -> dict:
        data = asdict(self)
        data["activation_points"] = [list(p) for p in self.activation_points]
        data["summary"] = {"bytes_per_chip": self.by_category(),
                           "total_bytes_per_chip": sum(self.by_category().values())}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "MemoryPlan":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # "summary" is derived
        data["activation_points"] = [tuple(p) for p in data.get("activation_points", [])]
        return cls(**data)
