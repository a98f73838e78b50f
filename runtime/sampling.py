"""Token sampling: the host's (greedy, or temperature with nucleus filtering over the whole
vocabulary) and the device's rule (lowering/sampling.py: the reference's, over the 32 most
likely tokens), which the emulator's ttnn.sampling and the first token after prefill use.
"""
from __future__ import annotations

import numpy as np

TOP_K = 32  # the device's candidates per user (ttnn.sampling's limit)


def device_params(temperature: float, top_p: float, users: int) -> dict[str, np.ndarray]:
    """The per-user inputs of the device's sampling: k (1 is greedy), p, temp (= 1/T)."""
    greedy = temperature <= 0
    return {"sample_k": np.full(users, 1 if greedy else TOP_K, dtype=np.int64),
            "sample_p": np.full(users, 1.0 if greedy else top_p, dtype=np.float32),
            "sample_temp": np.full(users, 1.0 if greedy else 1.0 / temperature, dtype=np.float32)}


def device_distribution(values: np.ndarray, k: int, p: float, temp: float) -> np.ndarray:
    """The probability of each of the sorted candidates `values` (descending) under the
    device's rule: the first k, times temp, softmax, then the smallest prefix whose mass
    exceeds p (at least one), renormalised."""
    v = np.asarray(values, dtype=np.float64)[:k] * temp
    probs = np.exp(v - v.max())
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), p, side="right")) + 1  # through the first cum > p
    out = np.zeros(len(values))
    out[:min(keep, k)] = probs[:min(keep, k)] / probs[:min(keep, k)].sum()
    return out


def sample_like_device(logits: np.ndarray, temperature: float, top_p: float,
                       rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] -> token ids [B] by the device's rule (for the first token, which the
    prefill's logits give, in programs that sample on the device)."""
    params = device_params(temperature, top_p, len(logits))
    out = np.empty(len(logits), dtype=np.int64)
    for b, row in enumerate(logits):
        order = np.argsort(-row, kind="stable")[:TOP_K]
        probs = device_distribution(row[order], int(params["sample_k"][b]), float(params["sample_p"][b]),
                                    float(params["sample_temp"][b]))
        out[b] = order[rng.choice(len(order), p=probs)]
    return out


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
