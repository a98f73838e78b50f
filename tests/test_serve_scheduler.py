"""Continuous batching (runtime/serve/scheduler.py), driven step by step on a tiny random
Llama with SmolLM2's tokenizer (4 decode slots, a 256-token context, a pool of 20 blocks,
prompts over 128 tokens prefilled in chunks of 128): greedy outputs do not depend on who
else runs or when a request joins; running users wait at most one prefill chunk; a full
pool makes requests wait; cancelled and failed requests return their pages; a failing
request never disturbs the others."""
from __future__ import annotations

import queue

import numpy as np
import pytest

import runtime
from runtime.engine import Sampler
from runtime.serve.scheduler import Event, NeverFits, QueueFull, Request, Scheduler
from serve_helpers import TINY_PROGRAM, tiny_chat_model


@pytest.fixture(scope="module")
def program(tiny_model, smollm2_dir, compile_artifact):
    return compile_artifact(tiny_chat_model(tiny_model, smollm2_dir), **TINY_PROGRAM)


@pytest.fixture(scope="module")
def session(program):
    return runtime.load(program)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 40000, size=n).tolist() for n in lengths]


def drive(scheduler, requests, limit=2000):
    for _ in range(limit):
        if all(r.finish_reason is not None for r in requests):
            return
        scheduler.step()
    raise AssertionError("requests did not finish")


def alone(session, prompt, max_tokens):
    scheduler = Scheduler(session)
    request = Request(prompt, max_tokens)
    scheduler.submit(request)
    drive(scheduler, [request])
    return request.generated


def test_batch_equals_alone_equals_static_batch(session, program):
    """Four users of different lengths (one prefilled in two chunks) at once give each
    user's tokens alone, and what Session.generate's static batch gives."""
    users = prompts([5, 150, 40, 90])
    refs = [alone(session, p, 12) for p in users]
    scheduler = Scheduler(session)
    requests = [Request(p, 12) for p in users]
    for r in requests:
        scheduler.submit(r)
    drive(scheduler, requests)
    assert [r.generated for r in requests] == refs
    static = runtime.load(program).generate(users, max_generated_tokens=12)
    eos = session.tokenizer.eos_token_ids
    assert static == [g[:-1] if g[-1] in eos else g for g in refs]
    assert scheduler.blocks_used == 0


def test_joining_mid_flight_gives_the_same_tokens(session):
    x, *others = prompts([30, 7, 200, 64], seed=1)
    ref = alone(session, x, 10)
    others_ref = [alone(session, p, 16) for p in others]
    scheduler = Scheduler(session)
    running = [Request(p, 16) for p in others]
    for r in running:
        scheduler.submit(r)
    for _ in range(6):
        scheduler.step()
    assert all(r.generated for r in running)  # they are decoding
    late = Request(x, 10)
    scheduler.submit(late)
    drive(scheduler, running + [late])
    assert late.generated == ref and [r.generated for r in running] == others_ref


def test_running_users_wait_at_most_one_chunk(session, monkeypatch):
    """A long prompt joining decoding users is prefilled one chunk per decode step, and
    starts generating before the others finish."""
    scheduler = Scheduler(session)
    calls = []
    engine = scheduler.engine
    for name in ("prefill_chunk", "decode"):
        original = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    first, second = prompts([20, 20], seed=2)
    runners = [Request(first, 40), Request(second, 40)]
    for r in runners:
        scheduler.submit(r)
    scheduler.step()
    scheduler.step()
    long_prompt = Request(prompts([250], seed=3)[0], 5)  # 256 rows: two chunks of 128
    scheduler.submit(long_prompt)
    calls.clear()
    drive(scheduler, runners + [long_prompt])
    decodes = [i for i, c in enumerate(calls) if c == "decode"]
    between = [calls[a + 1:b].count("prefill_chunk") for a, b in zip(decodes, decodes[1:])]
    assert calls.count("prefill_chunk") == 2 and max(between) == 1
    assert long_prompt.first_token_at < min(r.finished_at for r in runners)


def test_full_pool_makes_requests_wait_and_cancel_returns_pages(session):
    scheduler = Scheduler(session)  # 20 blocks; each of these reserves 8 (240 positions)
    big = [Request(p, 230) for p in prompts([10, 10, 10], seed=4)]
    for r in big:
        scheduler.submit(r)
    scheduler.step()
    assert (scheduler.running, scheduler.waiting_count, scheduler.blocks_used) == (2, 1, 16)
    scheduler.step()
    assert big[2].slot is None and not big[2].generated  # slots are free, pages are not
    scheduler.cancel(big[0].id)
    scheduler.step()
    assert big[0].finish_reason == "cancelled" and big[2].slot is not None
    for r in big[1:]:
        scheduler.cancel(r.id)
    scheduler.step()
    assert scheduler.blocks_used == 0 and scheduler.running == 0


def test_refusals(session):
    scheduler = Scheduler(session, max_waiting=2)
    for prompt_len, max_tokens, param in ((0, 5, "prompt"), (256, 1, "prompt"), (200, 57, "max_tokens"),
                                          (10, 0, "max_tokens")):
        with pytest.raises(NeverFits) as info:
            scheduler.submit(Request([7] * prompt_len, max_tokens))
        assert info.value.param == param
    scheduler.submit(Request([7] * 200, 56))  # exactly the context: fits
    scheduler.submit(Request([7] * 3, 4))
    with pytest.raises(QueueFull):
        scheduler.submit(Request([7] * 3, 4))
    scheduler.step()  # both admitted: nothing waits any more
    scheduler.submit(Request([7] * 3, 4))


def test_a_failing_request_does_not_take_others_down(session, monkeypatch):
    users = prompts([12, 33, 70], seed=5)
    refs = [alone(session, p, 8) for p in users]
    scheduler = Scheduler(session)
    original = scheduler.engine.prefill_chunk

    def prefill_chunk(token_ids, *args):
        if token_ids[0] == 1:
            raise RuntimeError("injected device failure")
        return original(token_ids, *args)

    monkeypatch.setattr(scheduler.engine, "prefill_chunk", prefill_chunk)
    events = []
    good = [Request(p, 8) for p in users]
    bad = Request([1] + users[0], 8, sink=events.append)
    for r in [good[0], bad, *good[1:]]:
        scheduler.submit(r)
    drive(scheduler, good + [bad])
    assert bad.finish_reason == "error" and events[-1].kind == "error" and "injected" in events[-1].message
    assert [r.generated for r in good] == refs and scheduler.blocks_used == 0


def test_cancellations_return_every_page(session):
    rng = np.random.default_rng(6)
    users = prompts(rng.integers(3, 180, size=12).tolist(), seed=6)
    scheduler = Scheduler(session)
    requests = [Request(p, int(rng.integers(2, 30))) for p in users]
    for r in requests:
        scheduler.submit(r)
    cancel_at = {3: requests[1], 5: requests[4], 8: requests[9], 12: requests[7]}
    for step in range(400):
        if step in cancel_at:
            scheduler.cancel(cancel_at[step].id)
        if all(r.finish_reason for r in requests):
            break
        scheduler.step()
    reasons = {r.finish_reason for r in requests}
    assert "cancelled" in reasons and reasons <= {"cancelled", "length", "stop"}
    assert scheduler.blocks_used == 0 and scheduler.running == 0 and scheduler.waiting_count == 0
    for r in requests:
        if r.finish_reason != "cancelled":
            assert r.generated == alone(session, r.prompt, r.max_tokens)


def test_engine_thread_and_sampling_seeds(session):
    """Through the engine thread: a seeded sampled request is reproducible whoever runs
    beside it, and events arrive token by token, then done."""
    scheduler = Scheduler(session)
    scheduler.start()
    try:
        def run(requests):
            sinks = [queue.Queue() for _ in requests]
            for r, q in zip(requests, sinks):
                r.sink = q.put
                scheduler.submit(r)
            out = []
            for q in sinks:
                events = []
                while not events or events[-1].kind == "token":
                    events.append(q.get(timeout=60))
                out.append(events)
            return out

        prompt = prompts([25], seed=7)[0]
        (one,) = run([Request(prompt, 10, Sampler(temperature=0.9, top_p=0.9, seed=11))])
        crowd = run([Request(p, 10, Sampler(temperature=0.9, seed=i)) for i, p in enumerate(prompts([9, 60]))]
                    + [Request(prompt, 10, Sampler(temperature=0.9, top_p=0.9, seed=11))])
        tokens = [e.token for e in one if e.kind == "token"]
        assert [e.token for e in crowd[-1] if e.kind == "token"] == tokens
        assert one[-1] == Event("done", finish_reason=one[-1].finish_reason) and len(tokens) >= 1
    finally:
        scheduler.stop()
    assert not scheduler.alive
