"""Sampling on the device (lowering/sampling.py): decode ends in ttnn.topk + ttnn.sampling,
so one token id per user leaves the device instead of a row of logits.

Checked here: the emulator's ttnn.sampling draws from the distribution the rule defines
(chi-square against runtime.sampling.device_distribution), greedy on the device is the
host's argmax token for token, every sampled token lies in the nucleus of the logits the
same step computes, draws are reproducible from the seed, and the program still holds the
logits function that teacher forcing uses.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from runtime.emulator.ops import sampling as emulated_sampling
from runtime.sampling import TOP_K, device_distribution, device_params

PROMPTS = [[5, 17, 99, 3, 41], [8, 8, 200, 7], [1, 2, 3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def artifacts(tiny_model, compile_artifact):
    model = tiny_model("llama")
    return {where: compile_artifact(model, max_seq_len=256, batch_size=4, sampling=where)
            for where in ("device", "host")}


def _chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """P(X >= statistic) for Pearson's statistic with (cells - 1) degrees of freedom."""
    kept = probs > 0
    expected = probs[kept] * counts.sum()
    statistic = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_emulated_sampling_draws_from_the_rule(temperature, top_p):
    """4000 draws per user from the emulator's ttnn.sampling fit device_distribution (the
    reference's rule: top-32, temperature, nucleus); a different rule is rejected."""
    rng = np.random.default_rng(0)
    users, draws = 2, 4000
    values = torch.tensor(np.sort(rng.normal(0, 2, size=(1, 1, users, TOP_K)))[..., ::-1].copy(),
                          dtype=torch.bfloat16)
    indices = torch.tensor(rng.permutation(5000)[: users * TOP_K].reshape(1, 1, users, TOP_K))
    params = device_params(temperature, top_p, users)
    rngs = [np.random.default_rng(100 + u) for u in range(users)]
    counts = np.zeros((users, TOP_K))
    for _ in range(draws):
        ids = emulated_sampling(values, indices, k=params["sample_k"], p=params["sample_p"],
                                temp=params["sample_temp"], rngs=rngs)
        for u in range(users):
            counts[u, list(indices[0, 0, u].numpy()).index(int(ids[0, 0, 0, u]))] += 1
    for u in range(users):
        v = values[0, 0, u].float().numpy()
        expected = device_distribution(v, TOP_K, top_p, 1 / temperature)
        assert counts[u][expected == 0].sum() == 0, "a token outside the nucleus was drawn"
        p_value = _chi_square_p_value(counts[u], expected)
        print(f"T={temperature} p={top_p} user {u}: {int((expected > 0).sum())} candidates, p-value {p_value:.3f}")
        assert p_value > 1e-4
        wrong = device_distribution(v, TOP_K, 1.0, 1 / (temperature * 1.5))  # hotter, no nucleus
        assert _chi_square_p_value(counts[u], wrong) < 1e-6 or (counts[u][wrong == 0].sum() > 0)


def test_greedy_on_device_is_the_host_argmax(artifacts):
    """temperature 0: sample_k = 1 picks the argmax; generations are identical token for token."""
    device = runtime.load(artifacts["device"])
    host = runtime.load(artifacts["host"])
    assert device.samples_on_device and not host.samples_on_device
    on_device = device.generate(PROMPTS, max_generated_tokens=24, temperature=0.0, stop_at_eos=False)
    on_host = host.generate(PROMPTS, max_generated_tokens=24, temperature=0.0, stop_at_eos=False)
    assert on_device == on_host


def test_sampled_tokens_lie_in_the_nucleus(artifacts):
    """Each step: the logits (decode_logits) and the draw (decode) at the same state; every
    drawn token is one of the device rule's candidates for those logits."""
    session = runtime.load(artifacts["device"])
    batch = session.batch_size
    tokens = np.array([p[-1] for p in PROMPTS] + [0] * (batch - len(PROMPTS)))
    lengths = [len(p) for p in PROMPTS]
    for slot, ids in enumerate(PROMPTS):
        session.prefill(ids, user_id=slot)
    session.backend.seed_sampling(range(batch))
    temperature, top_p = 0.8, 0.7
    for step in range(12):
        positions = np.array([n + step - 1 for n in lengths] + [-1] * (batch - len(PROMPTS)))
        logits = session.decode(tokens, positions)  # rewrites the same cache rows as the draw
        drawn = session.decode_sample(tokens, positions, temperature, top_p)
        for u in range(len(PROMPTS)):
            order = np.argsort(-logits[u], kind="stable")[:TOP_K]
            probs = device_distribution(logits[u][order], TOP_K, top_p, 1 / temperature)
            allowed = set(order[probs > 0].tolist())
            assert int(drawn[u]) in allowed, f"step {step} user {u}: {drawn[u]} not in {sorted(allowed)}"
        tokens[: len(PROMPTS)] = drawn[: len(PROMPTS)]


def test_device_draws_follow_the_seed(artifacts):
    session = runtime.load(artifacts["device"])
    run = lambda seed: session.generate(PROMPTS, max_generated_tokens=16, temperature=1.0, top_p=0.95,
                                        seed=seed, stop_at_eos=False)
    first = run(1)
    assert run(1) == first
    assert run(2) != first


def test_program_keeps_the_logits_function(artifacts):
    """The device-sampling program returns token ids from decode and logits from
    decode_logits; the host-sampling program has only decode (logits)."""
    device = runtime.load(artifacts["device"]).program.functions
    host = runtime.load(artifacts["host"]).program.functions
    assert {"decode", "decode_logits"} <= set(device) and "decode_logits" not in host
    assert [op.op for op in device["decode"].ops[-4:]] == ["ttnn.topk", "ttnn.typecast", "ttnn.to_layout",
                                                          "ttnn.sampling"]
    assert device["decode"].ops[:-4] == device["decode_logits"].ops
    assert device["decode"].tensors[device["decode"].outputs[0]].dtype == "uint32"
