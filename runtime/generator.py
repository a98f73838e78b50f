"""Batched generation: prefill each user, then one decode invocation per step for all."""
from __future__ import annotations

import time

import numpy as np

from . import schedule
from .sampling import sample, sample_like_device
from .stats import Stats


def _encode(session, prompts, instruct, images):
    """Strings -> token id lists (chat template when the model has one and instruct allows;
    a prompt with an image gets the model's <|image|> token where its template puts it)."""
    if all(isinstance(p, (list, tuple)) for p in prompts):
        return [list(map(int, p)) for p in prompts], False
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must all be strings or all be lists of token ids")
    tok = session.tokenizer
    use_chat = tok.has_chat_template if instruct is None else instruct
    if use_chat and not tok.has_chat_template:
        raise ValueError("instruct=True but the model has no chat template")
    out = []
    for p, image in zip(prompts, images):
        with_image = image is not None and session.images.enabled
        if use_chat:
            out.append(tok.apply_chat_template(p, image=with_image))
        else:
            out.append(([session.images.image_token_id] if with_image else []) + tok.encode(p))
    return out, True


def generate(session, prompts, max_generated_tokens, temperature, top_p, seed, stop_at_eos,
             instruct, on_token=None, images=None) -> list:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        return []
    if max_generated_tokens < 1:
        raise ValueError("max_generated_tokens must be at least 1")
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts (give a list aligned with the "
                         "prompts, None where a prompt has no image)")
    encoded, as_text = _encode(session, prompts, instruct, images)
    for ids in encoded:
        session._check_length(len(ids))
    processed = []  # every image checked before any work
    for u, (ids, image) in enumerate(zip(encoded, images)):
        try:
            processed.append(session.images.prepare(ids, image))
        except ValueError as e:
            raise ValueError(f"prompt {u}: {e}") from None
    eos = session.tokenizer.eos_token_ids if (stop_at_eos and as_text) else frozenset()
    if stop_at_eos and not as_text:
        eos = _eos_without_text(session)
    rng = np.random.default_rng(seed)
    stats = Stats(users=len(encoded), **session.stats.startup())  # keeps load and warm-up times
    start = time.perf_counter()
    outputs: dict[int, list[int]] = {}
    for group in _batches(session, encoded, max_generated_tokens):  # repeat batches
        results = _run_batch(session, [encoded[u] for u in group], [processed[u] for u in group],
                             max_generated_tokens, temperature, top_p, rng, eos, stats, start, on_token, group)
        outputs.update(zip(group, results))
    outputs = [outputs[u] for u in range(len(encoded))]
    session.stats = stats
    if as_text:
        return [session.tokenizer.decode(ids) for ids in outputs]
    return outputs


def _reservation(session, ids, max_new) -> int:
    return schedule.reservation(len(ids), max_new, session.max_seq_len)


def _batches(session, encoded, max_new):
    """Groups of users that run together: at most batch_size, and (paged programs) only as
    many as the page pool holds at once; the others wait for a later batch."""
    batch = session.batch_size
    if not session.paged:
        return [list(range(u, min(u + batch, len(encoded)))) for u in range(0, len(encoded), batch)]
    pool = session.pages
    need = [pool.blocks_for(_reservation(session, ids, max_new)) for ids in encoded]
    for u, blocks in enumerate(need):
        if blocks > pool.num_blocks:
            from .pages import PagePoolExhausted
            raise PagePoolExhausted(
                f"prompt {u} needs {blocks} KV blocks of {pool.block_size} tokens, the pool has "
                f"{pool.num_blocks} (recompile with a larger --max-num-blocks or generate fewer tokens)")
    groups, pending = [], list(range(len(encoded)))
    while pending:
        group, free = [], pool.num_blocks
        for u in list(pending):
            if len(group) < batch and need[u] <= free:
                group.append(u)
                free -= need[u]
                pending.remove(u)
        groups.append(group)
    return groups


def _eos_without_text(session):
    try:
        return session.tokenizer.eos_token_ids
    except ValueError:
        return frozenset()


def _run_batch(session, group, images, max_new, temperature, top_p, rng, eos, stats, start, on_token, users):
    batch = session.batch_size
    session.reset()
    if session.paged:
        for slot, ids in enumerate(group):
            session.pages.reserve(slot, _reservation(session, ids, max_new))
    for slot, (ids, image) in enumerate(zip(group, images)):
        session.images.load(slot, ids, image)
    device = session.samples_on_device
    if device:  # each user's draws on the device come from its own seeded generator
        session.backend.seed_sampling(rng.integers(0, 2 ** 31, size=batch))
    t0 = time.perf_counter()
    last_logits = np.stack([session.prefill(ids, user_id=slot) for slot, ids in enumerate(group)])
    stats.prefill_s += time.perf_counter() - t0
    next_tokens = (sample_like_device if device else sample)(last_logits, temperature, top_p, rng)
    if stats.time_to_first_token_s == 0.0:
        stats.time_to_first_token_s = time.perf_counter() - start
    lengths = np.array([len(ids) for ids in group])
    generated = [[int(t)] for t in next_tokens]
    limits = np.minimum(max_new, session.max_seq_len - lengths)
    done = np.array([int(t) in eos or len(g) >= lim for t, g, lim in zip(next_tokens, generated, limits)])
    _notify(on_token, users, generated, range(len(group)))
    tokens = np.zeros(batch, dtype=np.int64)
    positions = np.full(batch, -1, dtype=np.int64)  # empty slots and finished users: inactive
    t0 = time.perf_counter()
    while not done.all():
        for slot, g in enumerate(generated):
            tokens[slot] = g[-1]
            positions[slot] = -1 if done[slot] else lengths[slot] + len(g) - 1
        if device:
            chosen = session.decode_sample(tokens, positions, temperature, top_p)[: len(group)]
        else:
            chosen = sample(session.decode(tokens, positions)[: len(group)], temperature, top_p, rng)
        stats.decode_steps += 1
        active = [slot for slot in range(len(group)) if not done[slot]]
        for slot in active:
            generated[slot].append(int(chosen[slot]))
            if int(chosen[slot]) in eos or len(generated[slot]) >= limits[slot]:
                done[slot] = True
        _notify(on_token, users, generated, active)
    stats.decode_s += time.perf_counter() - t0
    stats.generated_tokens += sum(len(g) for g in generated)
    # Drop a trailing EOS from what we return, as chat front-ends do.
    return [g[:-1] if g and g[-1] in eos else g for g in generated]


def _notify(on_token, users, generated, slots):
    if on_token is not None:
        for slot in slots:
            on_token(users[slot], generated[slot][-1])
