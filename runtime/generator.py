"""Batched generation: prefill each user, then one decode invocation per step for all."""
from __future__ import annotations

import time

import numpy as np

from .sampling import sample


def _encode(session, prompts, instruct):
    """Strings -> token id lists (chat template when the model has one and instruct allows)."""
    if all(isinstance(p, (list, tuple)) for p in prompts):
        return [list(map(int, p)) for p in prompts], False
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must all be strings or all be lists of token ids")
    tok = session.tokenizer
    use_chat = tok.has_chat_template if instruct is None else instruct
    if use_chat and not tok.has_chat_template:
        raise ValueError("instruct=True but the model has no chat template")
    return [tok.apply_chat_template(p) if use_chat else tok.encode(p) for p in prompts], True


def generate(session, prompts, max_generated_tokens, temperature, top_p, seed, stop_at_eos,
             instruct, on_token=None) -> list:
    from .session import Stats

    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        return []
    if max_generated_tokens < 1:
        raise ValueError("max_generated_tokens must be at least 1")
    encoded, as_text = _encode(session, prompts, instruct)
    for ids in encoded:
        session._check_length(len(ids))
    eos = session.tokenizer.eos_token_ids if (stop_at_eos and as_text) else frozenset()
    if stop_at_eos and not as_text:
        eos = _eos_without_text(session)
    rng = np.random.default_rng(seed)
    stats = Stats(users=len(encoded))
    start = time.perf_counter()
    outputs: list[list[int]] = []
    batch = session.batch_size
    for first in range(0, len(encoded), batch):  # repeat batches
        group = encoded[first:first + batch]
        outputs += _run_batch(session, group, max_generated_tokens, temperature, top_p, rng, eos,
                              stats, start, on_token, first)
    session.stats = stats
    if as_text:
        return [session.tokenizer.decode(ids) for ids in outputs]
    return outputs


def _eos_without_text(session):
    try:
        return session.tokenizer.eos_token_ids
    except ValueError:
        return frozenset()


def _run_batch(session, group, max_new, temperature, top_p, rng, eos, stats, start, on_token, offset):
    batch = session.batch_size
    session.backend.reset()
    t0 = time.perf_counter()
    last_logits = np.stack([session.prefill(ids, user_id=u) for u, ids in enumerate(group)])
    stats.prefill_s += time.perf_counter() - t0
    next_tokens = sample(last_logits, temperature, top_p, rng)
    if stats.time_to_first_token_s == 0.0:
        stats.time_to_first_token_s = time.perf_counter() - start
    lengths = np.array([len(ids) for ids in group])
    generated = [[int(t)] for t in next_tokens]
    done = np.array([int(t) in eos for t in next_tokens])
    limits = np.minimum(max_new, session.max_seq_len - lengths)
    done |= np.array([len(g) >= lim for g, lim in zip(generated, limits)])
    _notify(on_token, offset, generated, range(len(group)))
    tokens = np.zeros(batch, dtype=np.int64)
    positions = np.zeros(batch, dtype=np.int64)
    t0 = time.perf_counter()
    while not done.all():
        for u, g in enumerate(generated):
            tokens[u], positions[u] = g[-1], lengths[u] + len(g) - 1
        logits = session.decode(tokens, positions)[: len(group)]
        stats.decode_steps += 1
        chosen = sample(logits, temperature, top_p, rng)
        active = [u for u in range(len(group)) if not done[u]]
        for u in active:
            generated[u].append(int(chosen[u]))
            if int(chosen[u]) in eos or len(generated[u]) >= limits[u]:
                done[u] = True
        _notify(on_token, offset, generated, active)
    stats.decode_s += time.perf_counter() - t0
    stats.generated_tokens += sum(len(g) for g in generated)
    # Drop a trailing EOS from what we return, as chat front-ends do.
    return [g[:-1] if g and g[-1] in eos else g for g in generated]


def _notify(on_token, offset, generated, users):
    if on_token is not None:
        for u in users:
            on_token(offset + u, generated[u][-1])
