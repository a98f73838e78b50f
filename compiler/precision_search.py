"""`--precision auto`: choose each decoder layer's weight dtypes by measured sensitivity.

Expects: a model config and its checkpoint reader, CompileOptions (min_top1, calibration).
Guarantees: a PrecisionPlan whose weights take the fewest bytes the greedy search finds
while the teacher-forced top-1 agreement on the calibration text, of the model as the
device rounds it against the same model in float32, stays at or above min_top1 + MARGIN;
every layer keeps the accuracy policy's kernels (the mode's --optimizations does not leak
in) except LoFi for a bfloat4_b w1/w3; and a summary (what was chosen, the bytes saved,
the figures measured, the time taken) that the CLI prints and precision.json keeps.

How (cheap enough to run at every compile, no Hugging Face; compiler/precision_sim.py is
the model): the reference module runs in float32 on the CPU over CALIBRATION_TOKENS of the
calibration text with exact weights (the reference predictions). A candidate lowers one
(layer, tensor group) one step (wqkv, wo: bfloat16 -> bfloat8_b -> bfloat4_b; w1/w3:
bfloat8_b -> bfloat4_b with LoFi; w2: bfloat8_b -> bfloat4_b), or the LM head bfloat8_b ->
bfloat4_b, from the accuracy policy's dtypes. Its sensitivity is how far it moves the
output distribution (2 x KL, float32, first SENSITIVITY_TOKENS): its change to its
layer's output weighed by the Fisher information there (gradients of sampled next tokens'
log-probabilities, one batched backward pass), so a change is judged by what the later
layers make of it, not by its size beside the residual stream (which made mid-layer MLPs
look cheap). Candidates are taken greedily by bytes saved per sensitivity, and a binary
search over how many to take checks the full-vocabulary top-1 of each cumulative
assignment with the activations rounded as the device's matmuls see them (bfloat16, the
bit HiFi2/LoFi drop; precision_sim). A check that extends the last accepted assignment
starts at the first layer it changes.

Measured on SmolLM2-135M (--min-top1 0.90; held-out text GPL-3, never seen by the search):
calibration top-1 minus GPL-3 top-1 was 0.00-0.029 along the ranked assignments in this
simulation, and 0.017 and 0.004 on the emulator (device fidelity, against HF float32) for
the plans margins 0.03 and 0.035 chose: MARGIN is the largest gap, rounded up. ROUNDS = 3
(after the candidate that broke the bound, search the rest again) took 21 checks instead
of 8 for 1% more of the saving, so one round. Not searched: the KV cache (no weight
bytes; the accuracy policy's dtype).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from passes.precision import LayerPrecision, PrecisionPlan, choose_policy, plan_precision

from .errors import CompileError
from .precision_sim import Model, weight_bytes as _bytes

CALIBRATION = Path(__file__).resolve().parent.parent / "runtime" / "presets" / "calibration.txt"
CALIBRATION_TOKENS = 1024  # top-1 checks; sensitivities use the first SENSITIVITY_TOKENS
SENSITIVITY_TOKENS = 256
FISHER_SAMPLES = 8  # gradient samples per row weighing each layer's output change
ROUNDS = 1  # binary searches over the ranked candidates (module docstring)
MARGIN = 0.035  # calibration top-1 kept above the bound: the largest gap measured, rounded up (module docstring)
# tensor group -> (the module's weights in it, its dtypes from the start down, the kernel
# change that comes with the lowest); a candidate takes one step down.
GROUPS = {
    "wqkv": (("attention.wq", "attention.wk", "attention.wv"), ("bfloat16", "bfloat8_b", "bfloat4_b"), {}),
    "wo": (("attention.wo",), ("bfloat16", "bfloat8_b", "bfloat4_b"), {}),
    "ff1_ff3": (("feed_forward.w1", "feed_forward.w3"), ("bfloat8_b", "bfloat4_b"), {"li_ff1_ff3": "LoFi"}),
    "ff2": (("feed_forward.w2",), ("bfloat8_b", "bfloat4_b"), {}),
}
LM_HEAD_STEP = ("bfloat8_b", "bfloat4_b")


@dataclass(frozen=True)
class Candidate:
    layer: int | None  # None: the LM head
    group: str
    saving: int  # device bytes
    level: int = 1  # the dtype it lowers to: GROUPS[group][1][level]
    error: float = 0.0


def _kl(logits: torch.Tensor, changed: torch.Tensor) -> float:
    """Mean KL(softmax(logits) || softmax(changed)) over rows."""
    p = torch.log_softmax(logits, -1)
    return float((p.exp() * (p - torch.log_softmax(changed, -1))).sum(-1).mean())


def calibration_tokens(model_dir: Path, path: str | None, n: int) -> list[int]:
    from runtime.tokenizer import Tokenizer
    path = Path(path) if path else CALIBRATION
    try:
        text = path.read_text()
    except OSError as e:
        raise CompileError(f"--calibration {path}: cannot read ({e.strerror or e})") from None
    ids = Tokenizer.from_dir(model_dir).encode(text)
    if len(ids) < 64:
        raise CompileError(f"--calibration {path}: {len(ids)} tokens; at least 64 needed")
    return ids[:n]


def _lowest(chosen: list[Candidate]) -> dict[tuple, int]:
    """(layer, group) -> the lowest level its chosen candidates reach."""
    lowest: dict[tuple, int] = {}
    for c in chosen:
        lowest[(c.layer, c.group)] = max(lowest.get((c.layer, c.group), 0), c.level)
    return lowest


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """By bytes saved per sensitivity, a group's further step never before its first."""
    ranked = sorted(candidates, key=lambda c: (-c.saving / max(c.error, 1e-12), -1 if c.layer is None else c.layer,
                                             c.group, c.level))
    out, placed = [], set()
    waiting: dict[tuple, list[Candidate]] = {}
    for c in ranked:
        key = (c.layer, c.group)
        if c.level > 1 and (key, c.level - 1) not in placed:
            waiting.setdefault(key, []).append(c)
            continue
        out.append(c)
        placed.add((key, c.level))
        for w in sorted(waiting.pop(key, []), key=lambda w: w.level):
            out.append(w)
            placed.add((key, w.level))
    return out


def group_weights(layer: int, group: str) -> list[str]:
    """The module weights of one (layer, tensor group)."""
    return [f"layers.{layer}.{m}.weight" for m in GROUPS[group][0]]


class Search:
    """The calibration tokens, the float32 reference's predictions on them, and the
    simulated device model (compiler/precision_sim.py) the candidates are measured on."""

    def __init__(self, cfg, reader, options, model_dir: Path):
        self.cfg, self.options = cfg, options
        self.base, _ = choose_policy(cfg, "accuracy")  # where every group starts
        tokens = calibration_tokens(model_dir, options.calibration, CALIBRATION_TOKENS)
        self.tokens = torch.tensor([tokens])
        self.model = Model(cfg, reader, -(-len(tokens) // 32) * 32)
        self.head_name = self.model.head_name
        # The reference: exact weights, float32 throughout.
        exact = self.model.hidden(self.tokens, device=False)
        self.ref_argmax = self.model.logits(exact, self.model.exact[self.head_name], False).argmax(-1)
        self.start = self.dtypes([])
        self.accepted: tuple[list[Candidate], list] | None = None  # the last assignment kept, its layer inputs

    def dtypes(self, chosen: list[Candidate]) -> dict[str, str]:
        """Every searched decoder weight's dtype with `chosen` applied to the start."""
        lowest = _lowest(chosen)
        out = {}
        for layer in range(self.cfg.n_layers):
            for group, (_, levels, _) in GROUPS.items():
                dtype = levels[lowest.get((layer, group), 0)]
                out.update({n: dtype for n in group_weights(layer, group)})
        return out

    def head(self, chosen: list[Candidate]) -> torch.Tensor:
        lowered = any(c.layer is None for c in chosen)
        return self.model.weight(self.head_name, LM_HEAD_STEP[1] if lowered else LM_HEAD_STEP[0])

    def sensitivities(self) -> list[Candidate]:
        """Each candidate alone on top of the start assignment: how far it moves the output
        distribution (twice the KL divergence, float32 on the first SENSITIVITY_TOKENS).
        A decoder candidate's change to its layer's output, d (one layer run), is weighed
        by the Fisher information there, mean((g . d)^2) over FISHER_SAMPLES gradients g
        (precision_sim.Model.fisher_probes): its effect through every later layer at the
        cost of one forward and FISHER_SAMPLES backward passes for all candidates. The LM
        head's KL is computed exactly."""
        m = self.model
        tokens = self.tokens[:, :SENSITIVITY_TOKENS]
        m.assign(self.start)
        head, exact_head = self.head([]), m.exact[self.head_name]
        keep, probes = m.fisher_probes(tokens, head, FISHER_SAMPLES)
        h = m.module.norm(keep[-1])[0, 0]
        lowered = m.weight(self.head_name, LM_HEAD_STEP[1])
        out = [Candidate(None, "lm_head", _bytes(exact_head, LM_HEAD_STEP[0]) - _bytes(exact_head, LM_HEAD_STEP[1]),
                         error=2 * _kl(m.logits(h, head, False), m.logits(h, lowered, False)))]
        rope = m.rope(tokens.shape[-1])
        for layer in range(self.cfg.n_layers):
            base = m.layer(layer, keep[layer], rope, False)
            for group, (_, levels, _) in GROUPS.items():
                names, error = group_weights(layer, group), 0.0
                for level in range(1, len(levels)):
                    m.assign({n: levels[level] for n in names})
                    change = m.layer(layer, keep[layer], rope, False) - base
                    # a further step: what it adds to the error of the steps before
                    step = max(float((probes[layer] * change).sum(-1).pow(2).mean()) - error, 1e-12)
                    error += step
                    saving = sum(_bytes(m.exact[n], levels[level - 1]) - _bytes(m.exact[n], levels[level])
                                 for n in names)
                    out.append(Candidate(layer, group, saving, level=level, error=step))
                m.assign({n: levels[0] for n in names})
        return out

    def top1(self, chosen: list[Candidate]) -> tuple[float, list]:
        """Full-vocabulary top-1 against the reference with `chosen` applied, and each
        layer's input. When `chosen` extends the last accepted assignment, the layers
        before the first one it changes are not run again."""
        m, first, keep = self.model, 0, []
        if self.accepted is not None and _extends(chosen, self.accepted[0]):
            added = [c for c in chosen if c not in self.accepted[0]]
            first = min((c.layer if c.layer is not None else self.cfg.n_layers) for c in added) if added \
                else self.cfg.n_layers
            keep = self.accepted[1][:first]
        m.assign(self.dtypes(chosen))
        x = self.accepted[1][first] if first else None
        h = m.hidden(self.tokens, device=True, start=first, x=x, keep=keep)
        value = float((m.logits(h, self.head(chosen), True).argmax(-1) == self.ref_argmax).float().mean())
        return value, keep

    def accept(self, chosen: list[Candidate], keep: list) -> None:
        self.accepted = (list(chosen), keep)

    def choose(self, ranked: list[Candidate], bound: float) -> tuple[list[Candidate], float, int]:
        """Candidates taken in rank order while top-1 stays >= bound: the longest prefix that
        keeps it (binary search; top-1 falls, not strictly, as more are taken), then, past
        the candidate that broke it, the same on the rest (ROUNDS times in all).
        Returns (taken, their top-1, evaluations)."""
        taken, rest = [], list(ranked)
        best, keep = self.top1([])
        evaluations = 1
        if best < bound:
            return [], best, evaluations
        self.accept([], keep)
        for _ in range(ROUNDS):
            lo, hi = 0, len(rest)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                value, keep = self.top1(taken + rest[:mid])
                evaluations += 1
                if value >= bound:
                    lo, best = mid, value
                    self.accept(taken + rest[:mid], keep)
                else:
                    hi = mid - 1
            taken += rest[:lo]
            rest = rest[lo + 1:]  # skip the one that broke the bound
            if not rest:
                break
        return taken, best, evaluations

    def plan(self, chosen: list[Candidate]) -> PrecisionPlan:
        """Every layer as the search measured it: the start policy's kernels, KV cache and
        activations (whatever --optimizations says), each group at the dtype `chosen`
        lowers it to (the start's otherwise), with the kernel change of a lowest step."""
        start = dataclasses.asdict(LayerPrecision.of_policy(self.base))
        layers = {layer: dict(start) for layer in range(self.cfg.n_layers)}
        lowest = _lowest(chosen)
        for layer, settings in layers.items():
            for group, (_, levels, kernels) in GROUPS.items():
                level = lowest.get((layer, group), 0)
                settings[group] = levels[level]
                if level == len(levels) - 1:
                    settings.update(kernels)
        head = {"lm_head": LM_HEAD_STEP[1] if (None, "lm_head") in lowest else LM_HEAD_STEP[0],
                "li_lm_head": self.base.default_fidelity}
        return plan_precision(self.cfg, self.options.optimizations, layers, head, source="auto")


def _extends(chosen: list[Candidate], accepted: list[Candidate]) -> bool:
    return set(accepted) <= set(chosen)


def weight_bytes(plan: PrecisionPlan | None, model: Model) -> int:
    """Device bytes of the searched weights (decoder matmul weights and the LM head) under a
    plan (None: all bfloat16)."""
    total = _bytes(model.exact[model.head_name], plan.lm_head if plan else "bfloat16")
    for layer in range(model.cfg.n_layers):
        for group in GROUPS:
            dtype = getattr(plan.layers[layer], group) if plan else "bfloat16"
            total += sum(_bytes(model.exact[n], dtype) for n in group_weights(layer, group))
    return total


def _spans(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, layers = [], sorted(layers)
    for i, layer in enumerate(layers):
        if i and layer == layers[i - 1] + 1:
            out[-1] = (out[-1][0], layer)
        else:
            out.append((layer, layer))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def search_precision(cfg, reader, options, model_dir: Path) -> tuple[PrecisionPlan, dict]:
    """The auto plan and a summary of the search (see the module docstring)."""
    if cfg.vision or cfg.cross_attention_layers:
        raise CompileError("--precision auto: models with cross-attention layers are not searched (give a file)")
    start = time.perf_counter()
    search = Search(cfg, reader, options, Path(model_dir))
    candidates = search.sensitivities()
    ranked = rank(candidates)
    bound = min(1.0, options.min_top1 + MARGIN)
    taken, top1, evaluations = search.choose(ranked, bound)
    plan = search.plan(taken)
    m = search.model
    sizes = {"bfloat16": weight_bytes(None, m),
             "performance": weight_bytes(plan_precision(cfg, "performance"), m),
             "auto": weight_bytes(plan, m)}
    saved, perf_saved = sizes["bfloat16"] - sizes["auto"], sizes["bfloat16"] - sizes["performance"]
    seconds = time.perf_counter() - start
    lowered = {}
    for (layer, group), level in sorted(_lowest(taken).items(), key=lambda kv: (kv[0][1], -1 if kv[0][0] is None else kv[0][0])):
        dtype = LM_HEAD_STEP[1] if layer is None else GROUPS[group][1][level]
        lowered.setdefault(f"{group} {dtype}", []).append(layer)
    summary = (f"precision auto: calibration top-1 {top1:.3f} (bound {options.min_top1:.2f} + margin {MARGIN}) "
               f"over {search.tokens.shape[-1]} tokens vs float32; lowered "
               + ("; ".join(f"{g} in layers {_spans(v)}" if not g.startswith("lm_head") else g
                            for g, v in lowered.items()) or "nothing")
               + f"; searched weights {sizes['auto'] / 2**20:.1f} MiB (bfloat16 {sizes['bfloat16'] / 2**20:.1f}, "
               f"performance {sizes['performance'] / 2**20:.1f}): saves {saved / 2**20:.1f} MiB over bfloat16, "
               f"{100 * saved / max(perf_saved, 1):.1f}% of performance mode's saving; "
               f"{len(candidates)} sensitivities + {evaluations} checks in {seconds:.1f} s")
    chosen = {"summary": summary, "calibration_top1": top1, "bound": options.min_top1, "margin": MARGIN,
              "tokens": int(search.tokens.shape[-1]), "weight_bytes": sizes, "seconds": round(seconds, 2),
              "lowered": [dataclasses.asdict(c) for c in taken]}
    return plan, chosen

