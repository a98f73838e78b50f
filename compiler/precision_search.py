"""`--precision auto`: choose each decoder layer's weight dtypes by measured sensitivity.

Expects: a model config and its checkpoint reader, CompileOptions (min_top1, calibration).
Guarantees: a PrecisionPlan whose weights take the fewest bytes the greedy search finds
while the teacher-forced top-1 agreement on the calibration text, against the same model
in float32, stays at or above min_top1 + MARGIN; and a summary (what was chosen, the bytes
saved, the figures measured, the time taken) that the CLI prints and precision.json keeps.

How (cheap enough to run at every compile, no Hugging Face): the reference module
(models_ref) runs in float32 on the CPU over the calibration tokens, once with exact weights
(the reference logits) and once with the starting assignment (the accuracy policy's
dtypes), keeping each layer's input; weights are rounded exactly as ttnn stores them
(runtime/emulator's block-float rounding) and the residual stream to the program's
activation dtype. A candidate lowers one (layer, tensor group) one step (wqkv, wo:
bfloat16 -> bfloat8_b; w1/w3: bfloat8_b -> bfloat4_b with LoFi; w2: bfloat8_b ->
bfloat4_b), or the LM head bfloat8_b -> bfloat4_b. Its sensitivity is the relative mean
squared change of its layer's output (one layer run per candidate, on the first SENSITIVITY_TOKENS; the LM head: of
the logits). Candidates are taken greedily by bytes saved per sensitivity, and a binary search
over how many to take checks the full-vocabulary teacher-forced top-1 of each cumulative
assignment through the whole model. What this does not see: the device's matmul fidelity
and the bfloat16 rounding inside a layer (MARGIN would cover them; measured on SmolLM2 the
simulation's top-1 tracks the emulator's closely, so it is 0), how a layer's error grows
through the layers after it (the top-1 checks catch it), and the KV cache, which keeps the
accuracy policy's dtype.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from passes.precision import PrecisionPlan, choose_policy, plan_precision

from .errors import CompileError

CALIBRATION = Path(__file__).resolve().parent.parent / "runtime" / "presets" / "calibration.txt"
CALIBRATION_TOKENS = 256  # top-1 checks; sensitivities use the first SENSITIVITY_TOKENS
SENSITIVITY_TOKENS = 128
ROUNDS = 3
MARGIN = 0.0  # calibration top-1 kept above the bound (measured: the simulation tracks the emulator, see README)
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


def _round(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """An nn.Linear weight [N, K] as the device stores it ([K, N] tiles), back in float32."""
    from runtime.emulator.ops import quantize_like
    return quantize_like(w.t().contiguous(), dtype).float().t().contiguous()


def _bytes(w: torch.Tensor, dtype: str) -> int:
    from runtime.blockfloat import bytes_for
    return bytes_for(list(w.t().shape), dtype)


class Model:
    """The reference decoder on the CPU with the checkpoint's weights; runs all rows of a
    prompt (prefill without the last-tile cut) under a per-group dtype assignment."""

    def __init__(self, cfg, reader, rows: int):
        from compiler.convert import RecipeEvaluator
        from models_ref.modules import Transformer
        from models_ref.rope import cos_sin_tables

        with torch.device("meta"):
            module = Transformer(cfg, "prefill", 1, rows)
        module = module.to_empty(device="cpu")
        if cfg.tie_word_embeddings:  # to_empty makes two tensors of the tied one
            module.output.weight = module.tok_embeddings.weight
        evaluate = RecipeEvaluator(reader, cfg)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(evaluate(["source", name]).float())
            cos, sin = cos_sin_tables(cfg, rows)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
        self.module, self.cfg = module.eval(), cfg
        self.params = dict(module.named_parameters())
        self.exact = {n: p.detach().clone() for n, p in self.params.items()}
        self.rounded: dict[tuple[str, str], torch.Tensor] = {}

    def weight(self, name: str, dtype: str) -> torch.Tensor:
        if (name, dtype) not in self.rounded:
            self.rounded[(name, dtype)] = _round(self.exact[name], dtype)
        return self.rounded[(name, dtype)]

    def group_weights(self, layer: int, group: str) -> list[str]:
        return [f"layers.{layer}.{m}.weight" for m in GROUPS[group][0]]

    def assign(self, dtypes: dict[str, str | None]) -> None:
        """Set every named weight to its rounded values (None: exact)."""
        with torch.no_grad():
            for name, dtype in dtypes.items():
                self.params[name].copy_(self.exact[name] if dtype is None else self.weight(name, dtype))

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, start: int = 0, x=None, residual: str | None = None,
               keep: list | None = None) -> torch.Tensor:
        """Run layers start.. on x (None: embed `tokens`); returns the final normed rows.
        `keep`: filled with each layer's input; `residual`: the dtype layer outputs round to."""
        from models_ref import ops
        m = self.module
        positions = torch.arange(tokens.shape[-1])
        if x is None:
            x = ops.embed(tokens, m.tok_embeddings.weight)
        cos, sin = ops.rope_rows(m.rope_cos, positions, False), ops.rope_rows(m.rope_sin, positions, False)
        for i in range(start, len(m.layers)):
            if keep is not None:
                keep.append(x)
            x = m.layers[i](x, cos, sin, positions, 0)
            if residual == "bfloat16":
                x = x.bfloat16().float()
        return m.norm(x)[0, 0]


def _relative(changed: torch.Tensor, base: torch.Tensor) -> float:
    return float((changed - base).pow(2).mean() / base.pow(2).mean())


def ops_rope(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    from models_ref import ops
    return ops.rope_rows(table, positions, False)


def _top1(h: torch.Tensor, head: torch.Tensor, ref_argmax: torch.Tensor) -> float:
    return float(((h @ head.t()).argmax(-1) == ref_argmax).float().mean())


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
    ranked = sorted(candidates, key=lambda c: (-c.saving / max(c.error, 1e-12), c.layer or -1, c.group, c.level))
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


class Search:
    def __init__(self, cfg, reader, options, model_dir: Path):
        self.cfg, self.options = cfg, options
        self.base, _ = choose_policy(cfg, "accuracy")  # where every group starts
        tokens = calibration_tokens(model_dir, options.calibration, CALIBRATION_TOKENS)
        self.tokens = torch.tensor([tokens])
        self.model = Model(cfg, reader, -(-len(tokens) // 32) * 32)
        self.residual = self.base.activations
        self.start = self._start_assignment()
        self.model.assign(self.start)
        self.head_name = "output.weight" if not cfg.tie_word_embeddings else "tok_embeddings.weight"
        exact = self.model.hidden(self.tokens)  # the float32 reference (exact weights, float32 stream)
        self.ref_argmax = (exact @ self.model.exact[self.head_name].t()).argmax(-1)

    def _start_assignment(self) -> dict[str, str]:
        dtypes = {}
        for layer in range(self.cfg.n_layers):
            for group, (_, (high, *_), _) in GROUPS.items():
                for name in self.model.group_weights(layer, group):
                    dtypes[name] = high
        return dtypes

    def head(self, dtype: str) -> torch.Tensor:
        return self.model.weight(self.head_name, dtype)

    def sensitivities(self) -> list[Candidate]:
        """Each candidate alone on top of the start assignment: the mean squared change it
        makes to its layer's output (the residual stream after the layer), relative to that
        output's mean square, with the layer's input as the start assignment gives it (the
        LM head: to the logits). One forward, then one layer per candidate."""
        m = self.model
        keep: list = []
        tokens = self.tokens[:, :SENSITIVITY_TOKENS]
        m.assign(self.start)
        h = m.hidden(tokens, residual=self.residual, keep=keep)
        positions = torch.arange(tokens.shape[-1])
        cos = ops_rope(m.module.rope_cos, positions)
        sin = ops_rope(m.module.rope_sin, positions)
        head = m.exact[self.head_name]
        logits = h @ self.head(LM_HEAD_STEP[0]).t()
        out = [Candidate(None, "lm_head", _bytes(head, LM_HEAD_STEP[0]) - _bytes(head, LM_HEAD_STEP[1]),
                         error=_relative(h @ self.head(LM_HEAD_STEP[1]).t(), logits))]
        for layer in range(self.cfg.n_layers):
            block = m.module.layers[layer]
            with torch.no_grad():
                base = block(keep[layer], cos, sin, positions, 0)
            for group, (_, levels, _) in GROUPS.items():
                names, error = m.group_weights(layer, group), 0.0
                for level in range(1, len(levels)):
                    m.assign({n: levels[level] for n in names})
                    with torch.no_grad():
                        changed = block(keep[layer], cos, sin, positions, 0)
                    # a further step: what it adds to the error of the steps before
                    step = max(_relative(changed, base) - error, 1e-12)
                    error += step
                    saving = sum(_bytes(m.exact[n], levels[level - 1]) - _bytes(m.exact[n], levels[level])
                                 for n in names)
                    out.append(Candidate(layer, group, saving, level=level, error=step))
                m.assign({n: levels[0] for n in names})
        return out

    def top1(self, chosen: list[Candidate]) -> float:
        """Full-vocabulary top-1 against the reference with `chosen` applied."""
        m, lowest = self.model, _lowest(chosen)
        dtypes = dict(self.start)
        for c in chosen:
            if c.layer is not None:
                dtypes.update({n: GROUPS[c.group][1][lowest[(c.layer, c.group)]]
                               for n in m.group_weights(c.layer, c.group)})
        m.assign(dtypes)
        head = self.head(LM_HEAD_STEP[1] if any(c.layer is None for c in chosen) else LM_HEAD_STEP[0])
        return _top1(m.hidden(self.tokens, residual=self.residual), head, self.ref_argmax)

    def choose(self, ranked: list[Candidate], bound: float) -> tuple[list[Candidate], float, int]:
        """Candidates taken in rank order while top-1 stays >= bound: the longest prefix that
        keeps it (binary search; top-1 falls, not strictly, as more are taken), then, past
        the candidate that broke it, the same on the rest (ROUNDS times in all).
        Returns (taken, their top-1, evaluations)."""
        taken, rest = [], list(ranked)
        best, evaluations = self.top1([]), 1
        if best < bound:
            return [], best, evaluations
        for _ in range(ROUNDS):
            lo, hi = 0, len(rest)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                value = self.top1(taken + rest[:mid])
                evaluations += 1
                if value >= bound:
                    lo, best = mid, value
                else:
                    hi = mid - 1
            taken += rest[:lo]
            rest = rest[lo + 1:]  # skip the one that broke the bound
            if not rest:
                break
        return taken, best, evaluations

    def plan(self, chosen: list[Candidate]) -> PrecisionPlan:
        layers: dict[int, dict] = {}
        for layer in range(self.cfg.n_layers):
            layers[layer] = {"kv_cache": self.base.kv_cache, "activations": self.base.activations,
                             **{group: levels[0] for group, (_, levels, _) in GROUPS.items()}}
        head, lowest = {"lm_head": LM_HEAD_STEP[0]}, _lowest(chosen)
        for c in chosen:
            if c.layer is None:
                head["lm_head"] = LM_HEAD_STEP[1]
            else:
                levels = GROUPS[c.group][1]
                layers[c.layer][c.group] = levels[lowest[(c.layer, c.group)]]
                if lowest[(c.layer, c.group)] == len(levels) - 1:
                    layers[c.layer].update(GROUPS[c.group][2])
        return plan_precision(self.cfg, self.options.optimizations, layers, head, source="auto")


def weight_bytes(plan: PrecisionPlan | None, model: Model, head_name: str) -> int:
    """Device bytes of the searched weights (decoder matmul weights and the LM head) under a
    plan (None: all bfloat16)."""
    total = _bytes(model.exact[head_name], plan.lm_head if plan else "bfloat16")
    for layer in range(model.cfg.n_layers):
        for group in GROUPS:
            dtype = getattr(plan.layers[layer], group) if plan else "bfloat16"
            total += sum(_bytes(model.exact[n], dtype) for n in model.group_weights(layer, group))
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
    m, head = search.model, search.head_name
    sizes = {"bfloat16": weight_bytes(None, m, head),
             "performance": weight_bytes(plan_precision(cfg, "performance"), m, head),
             "auto": weight_bytes(plan, m, head)}
    saved, perf_saved = sizes["bfloat16"] - sizes["auto"], sizes["bfloat16"] - sizes["performance"]
    seconds = time.perf_counter() - start
    lowered = {}
    for (layer, group), level in sorted(_lowest(taken).items(), key=lambda kv: (kv[0][1], kv[0][0] or -1)):
        dtype = LM_HEAD_STEP[1] if layer is None else GROUPS[group][1][level]
        lowered.setdefault(f"{group} {dtype}", []).append(layer)
    summary = (f"precision auto: calibration top-1 {top1:.3f} (bound {options.min_top1:.2f} + margin {MARGIN}) "
               f"over {search.tokens.shape[-1]} tokens vs float32; lowered "
               + ("; ".join(f"{g} in layers {_spans(v)}" if not g.startswith("lm_head") else g
                            for g, v in lowered.items()) or "nothing")
               + f"; searched weights {sizes['auto'] / 2**20:.1f} MiB (bfloat16 {sizes['bfloat16'] / 2**20:.1f}, "
               f"performance {sizes['performance'] / 2**20:.1f}): saves {saved / 2**20:.1f} MiB over bfloat16, "
               f"{100 * saved / max(perf_saved, 1):.0f}% of performance mode's saving; "
               f"{len(candidates)} sensitivities + {evaluations} checks in {seconds:.1f} s")
    chosen = {"summary": summary, "calibration_top1": top1, "bound": options.min_top1, "margin": MARGIN,
              "tokens": int(search.tokens.shape[-1]), "weight_bytes": sizes, "seconds": round(seconds, 2),
              "lowered": [dataclasses.asdict(c) for c in taken]}
    return plan, chosen

