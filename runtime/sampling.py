"""Token sampling on the host: greedy, or temperature with nucleus (top-p) filtering."""
from __future__ import annotations

import numpy as np


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(-1, keepdims=True)
    out = np.empty(len(probs), dtype=np.int64)
    for b, p in enumerate(probs):
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = cumulative - p[order] < top_p  # smallest prefix whose mass reaches top_p
        keep[0] = True
        kept = order[keep]
        out[b] = rng.choice(kept, p=p[kept] / p[kept].sum())
    return out
