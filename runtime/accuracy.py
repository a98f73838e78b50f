"""Teacher-forced token agreement with Hugging Face transformers (`ttrun accuracy`, the tests).

As tt-metal's accuracy tables (models/tt_transformers PERF.md, its test_accuracy and the
reference `.refpt` files): the reference's top-5 next tokens at every position of a text,
and the program run teacher-forced over the same tokens (PREFILL tokens of prefill, then
decode steps feeding the text's tokens); the program's prediction is its argmax;
  top-1 = fraction of positions where the program's argmax == the reference's argmax,
  top-5 = fraction where the program's argmax is among the reference's 5 highest logits.
The logits PCC and the mirror figure (the reference's argmax among the program's top 5)
are reported too. The reference (HF float32 on the same weights) is computed once and
cached beside the artifact as safetensors (logits in float16, the token ids and what they
were computed from in its metadata), never as a pickle.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREFILL = 64
TOKENS = 256  # predictions
TEXT = Path(__file__).resolve().parent / "presets" / "calibration.txt"


def plain_text(text: str) -> str:
    """Hard line wrapping undone, paragraphs kept."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def pcc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def token_agreement(program: np.ndarray, reference: np.ndarray, truth) -> dict:
    """program, reference: logits [positions, vocab]; truth: the text's next tokens."""
    predicted = program.argmax(-1)
    ref_top5 = np.argsort(-reference, axis=-1)[:, :5]
    prog_top5 = np.argsort(-program, axis=-1)[:, :5]
    truth = np.asarray(truth)
    return {
        "top1": float(np.mean(predicted == ref_top5[:, 0])),
        "top5": float(np.mean([p in r for p, r in zip(predicted, ref_top5)])),
        "hf_argmax_in_program_top5": float(np.mean([r in p for r, p in zip(ref_top5[:, 0], prog_top5)])),
        "pcc": pcc(program, reference),
        "program_vs_text": float(np.mean(predicted == truth)),
        "hf_vs_text": float(np.mean(ref_top5[:, 0] == truth)),
        "n": len(predicted),
    }


def hf_logits(model_dir: Path, token_ids: list[int], prefill: int = PREFILL) -> np.ndarray:
    """HF float32 logits aligned with Session.teacher_forced_logits rows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    return logits[prefill - 1: len(token_ids) - 1].numpy()


def _reference_key(model_dir: Path, token_ids: list[int]) -> str:
    """The checkpoint folder (its path, and each file's name, size and mtime) and the tokens."""
    model_dir = Path(model_dir).resolve()
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(model_dir.iterdir()) if f.is_file()]
    return hashlib.sha256(json.dumps([str(model_dir), files, token_ids]).encode()).hexdigest()[:16]


def reference_logits(model_dir: Path, token_ids: list[int], cache_dir: Path | None) -> np.ndarray:
    """HF logits for the text, from `cache_dir/reference-<key>.safetensors` when present
    (the key covers the checkpoint's files and the token ids), else computed and stored."""
    from safetensors.numpy import load_file, save_file

    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"reference-{_reference_key(model_dir, token_ids)}.safetensors"
        if path.exists():
            return load_file(str(path))["logits"].astype(np.float32)
    logits = hf_logits(model_dir, token_ids)
    if path is not None:
        tmp = path.with_suffix(".tmp")
        save_file({"logits": logits.astype(np.float16)}, str(tmp),
                  metadata={"model": str(Path(model_dir).resolve()), "token_ids": json.dumps(token_ids),
                            "prefill": str(PREFILL)})
        tmp.replace(path)
    return logits


@dataclass
class Accuracy:
    figures: dict
    model: str
    target: str
    optimizations: str

    def table(self) -> str:
        """The seed's (tt-metal PERF.md's) table form, with PCC."""
        f = self.figures
        return "\n".join([
            "| Model | Device | Optimizations | Top-1 (%) | Top-5 (%) | PCC | Tokens |",
            "|---|---|---|---|---|---|---|",
            f"| {self.model} | {self.target} | {self.optimizations} | {100 * f['top1']:.1f} | "
            f"{100 * f['top5']:.1f} | {f['pcc']:.5f} | {f['n']} |"])


def measure(session, model_dir: Path, text: str, tokens: int = TOKENS, cache: bool = True) -> Accuracy:
    """Teacher-force `session`'s program over the first PREFILL + tokens of `text`, against
    HF on `model_dir` (cached beside the artifact)."""
    ids = session.tokenizer.encode(text)
    if len(ids) < PREFILL + tokens:
        raise ValueError(f"the text has {len(ids)} tokens; {PREFILL} + {tokens} needed (use a longer --text "
                         "or fewer --tokens)")
    ids = ids[:PREFILL + tokens]
    program = session.teacher_forced_logits(ids, PREFILL)
    reference = reference_logits(model_dir, ids, session.path if cache else None)
    precision = session.program.precision or {}
    mode = precision.get("mode") or session.program.options.get("optimizations")
    source = (session.program.options.get("precision") or "")
    name = Path(session.program.model.get("name") or model_dir).name
    return Accuracy(token_agreement(program, reference, ids[PREFILL:]), name, session.program.target,
                    mode + (f" + --precision {Path(source).name}" if source else ""))
