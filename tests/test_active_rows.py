"""Rows computed only where they matter (runtime/emulator/active_rows.py). A decode step
computed for the active users only gives those users bit for bit what the whole step
gives them: logits, tokens sampled on the device, and the KV blocks written; the inactive
rows come back as zeros. A prefill without its padding rows gives the same logits and
the same KV blocks through the prompt's last one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from lowering.program import Function, InputSpec, Op, TensorSpec
from runtime.emulator import active_rows

ACTIVE = [1, 4, 6]
BATCH = 8


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama_plain")


def _steps(session, rows_computed: bool):
    """Prefill three users, then four decode steps of logits and of device sampling;
    returns (logits per step, tokens per step, every KV pool's blocks) with row skipping
    on or off."""
    backend = session.backend
    backend.reset()
    backend.seed_sampling(range(32))
    if not rows_computed:
        backend.row_dims = {name: None for name in backend.row_dims}
    for user in ACTIVE:
        session.prefill([int(t) for t in np.random.default_rng(user).integers(3, 200, 20 + 9 * user)], user)
    tokens = np.zeros(BATCH, dtype=np.int64)
    positions = np.full(BATCH, -1, dtype=np.int64)
    positions[ACTIVE] = [20 + 9 * u for u in ACTIVE]
    tokens[ACTIVE] = [7, 11, 13]
    logits, sampled = [], []
    for _ in range(4):
        logits.append(session.decode(tokens, positions))
        sampled.append(session.decode_sample(tokens, positions, temperature=0.9, top_p=0.8))
        tokens[ACTIVE] = sampled[-1][ACTIVE]
        positions[ACTIVE] += 1
    caches = {name: [backend.chip_tensor(name, chip).clone() for chip in range(backend.chips)]
              for name in backend.page_pools}
    return logits, sampled, caches


@pytest.mark.parametrize("target", ["N150", "N300", "T3K", "TG"])
def test_active_users_only_equals_the_whole_step(model, compile_artifact, target):
    session = runtime.load(compile_artifact(model, target=target, batch_size=BATCH, max_seq_len=256))
    assert session.backend.row_dims["decode"] is not None  # the paged decode step qualifies
    whole = _steps(session, rows_computed=False)
    skipped = _steps(runtime.load(compile_artifact(model, target=target, batch_size=BATCH, max_seq_len=256)),
                     rows_computed=True)
    for got, want in zip(skipped[0], whole[0]):
        assert np.array_equal(got[ACTIVE], want[ACTIVE])
        assert not np.any(got[[0, 2, 3, 5, 7]])  # inactive rows: zeros
        assert np.any(want[[0, 2, 3, 5, 7]])  # ... where the whole step computed something
    for got, want in zip(skipped[1], whole[1]):
        assert np.array_equal(got[ACTIVE], want[ACTIVE])
    assert skipped[2].keys() == whole[2].keys() and skipped[2]
    for name in whole[2]:
        for got, want in zip(skipped[2][name], whole[2][name]):
            assert torch.equal(got, want), name


def _prefills(session, trimmed: bool, rows_run: list):
    backend = session.backend
    backend.reset()
    backend.prefill_trimmable = {name: trimmed and ok for name, ok in backend.prefill_trimmable.items()}
    run = backend._run

    def counting(fn_name, host, scalars):
        rows_run.append(host["tokens"].shape[-1]) if fn_name == "prefill" else None
        return run(fn_name, host, scalars)
    backend._run = counting
    lengths = (5, 40, 100, 150)
    logits = [session.prefill([int(t) for t in np.random.default_rng(n).integers(3, 200, n)], user)
              for user, n in enumerate(lengths)]
    block = backend.block_size
    prompt_blocks = [b for user, n in enumerate(lengths) for b in session.pages.row(user)[:-(-n // block)]]
    caches = {name: [backend.chip_tensor(name, chip)[prompt_blocks].clone() for chip in range(backend.chips)]
              for name in backend.page_pools}
    return logits, caches


@pytest.mark.parametrize("target", ["N150", "TG"])
def test_prefill_without_its_padding_equals_with_it(model, compile_artifact, target):
    """Prompts of 5, 40, 100 and 150 tokens, padded to 128, 128, 128 and 256 rows,
    prefilled in chunks of 128."""
    artifact = compile_artifact(model, target=target, batch_size=4, max_seq_len=256, max_prefill_chunk=128)
    whole_rows, trimmed_rows = [], []
    whole = _prefills(runtime.load(artifact), False, whole_rows)
    trimmed = _prefills(runtime.load(artifact), True, trimmed_rows)
    assert whole_rows == [128, 128, 128, 128, 128]
    assert trimmed_rows == [32, 64, 128, 128, 32]  # whole blocks through the last prompt row
    for got, want in zip(trimmed[0], whole[0]):
        assert np.array_equal(got, want)
    for name in whole[1]:
        for got, want in zip(trimmed[1][name], whole[1][name]):
            assert torch.equal(got, want), name


def test_no_active_user_runs_nothing(model, compile_artifact):
    session = runtime.load(compile_artifact(model, batch_size=BATCH, max_seq_len=256))
    before = session.backend.invocations["decode_logits"] + session.backend.invocations["decode"]
    logits = session.decode(np.zeros(BATCH, dtype=np.int64), np.full(BATCH, -1, dtype=np.int64))
    assert logits.shape[0] == BATCH and not logits.any()
    assert session.backend.invocations["decode_logits"] + session.backend.invocations["decode"] == before


def _function(ops, inputs):
    return Function("decode", inputs, [], ["out"], [Op(op, [], {}, ["out"], "n", None) for op in ops],
                    {"out": TensorSpec([1, 1, BATCH, 64], "bfloat16")})


def test_only_row_wise_paged_functions_qualify():
    per_user = [InputSpec("tokens", "tokens", [1, BATCH], "uint32"),
                InputSpec("cur_pos", "positions", [BATCH], "int32"),
                InputSpec("page_table", "page_table", [BATCH, 4], "int32")]
    assert active_rows.row_dims(_function(["ttnn.linear"], per_user)) == \
        {"tokens": 1, "cur_pos": 0, "page_table": 0}
    # A contiguous cache is indexed by row: a user's row must stay its row.
    assert active_rows.row_dims(_function(["ttnn.transformer.scaled_dot_product_attention_decode"], per_user)) is None
    # An input that is not per user (an image's cross-attention mask, say).
    assert active_rows.row_dims(_function(["ttnn.linear"], per_user + [InputSpec("mask", "mask", [1, 4], "bfloat16")])) is None
    # One user: nothing to skip. No positions: a prefill.
    one = [InputSpec("cur_pos", "positions", [1], "int32")]
    assert active_rows.row_dims(_function(["ttnn.linear"], one)) is None
    assert active_rows.row_dims(_function(["ttnn.linear"], per_user[:1])) is None
