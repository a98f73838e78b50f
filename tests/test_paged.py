"""Paged KV cache, chunked prefill and the batched runtime (issue 4)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import runtime
from fixtures import hf_logits, hf_reference, pcc
from runtime.pages import PageAllocator, PagePoolExhausted

LONG_PROMPT = [int(x) for x in np.random.default_rng(3).integers(3, 1000, 400)]  # 4 chunks of 128


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama_plain")


def _compile(compile_artifact, model, **options):
    return compile_artifact(model, max_seq_len=512, **options)


# ------------------------------------------------------------------ allocator
def test_allocator_scrambles_reserves_all_or_nothing_and_releases():
    pool = PageAllocator(num_blocks=16, block_size=32, blocks_per_user=8, seed=0)
    a = pool.reserve(0, 100)  # 4 blocks
    assert len(a) == 4 and a != sorted(a)  # scrambled physical order
    pool.reserve(1, 8 * 32)
    assert pool.free_blocks == 4
    with pytest.raises(PagePoolExhausted, match="exhausted"):
        pool.reserve(2, 5 * 32)
    assert pool.free_blocks == 4 and 2 not in pool._owned or not pool._owned.get(2)
    assert list(pool.row(0)[:4]) == a and pool.row(0)[4:].sum() == 0
    pool.release(1)
    assert pool.free_blocks == 12
    with pytest.raises(PagePoolExhausted, match="max-seq-len"):
        pool.reserve(3, 9 * 32)


# ------------------------------------------------------------------ chunked prefill
@pytest.mark.parametrize("target", ["N150", "T3K"])
def test_chunked_prefill_equals_one_shot(model, compile_artifact, target):
    chunked = runtime.load(_compile(compile_artifact, model, target=target, max_prefill_chunk=128))
    one_shot = runtime.load(_compile(compile_artifact, model, target=target, max_prefill_chunk=512))
    assert chunked.max_prefill_chunk == 128 and one_shot.max_prefill_chunk == 512
    sequence = LONG_PROMPT + list(range(10, 30))
    got = chunked.teacher_forced_logits(sequence, len(LONG_PROMPT))
    want = one_shot.teacher_forced_logits(sequence, len(LONG_PROMPT))
    assert chunked.backend.invocations["prefill"] == 4 and one_shot.backend.invocations["prefill"] == 1
    value = pcc(got, want)
    print(f"{target}: chunked vs one-shot prefill PCC {value:.7f}")
    assert value >= 0.9999


def test_chunked_prefill_matches_hf_in_float32(model, compile_artifact):
    session = runtime.load(_compile(compile_artifact, model, optimizations="float32", max_prefill_chunk=128),
                           matmul="exact")
    got = session.teacher_forced_logits(LONG_PROMPT, 300)
    want = hf_logits(hf_reference(model), LONG_PROMPT)[299:len(LONG_PROMPT) - 1]
    assert pcc(got, want) > 0.999999


def test_each_chunk_reads_earlier_chunks_through_the_page_table(model, compile_artifact):
    """Chunk 2 with a page-table row whose first block points elsewhere gives other logits:
    earlier positions reach it only through the table."""
    session = runtime.load(_compile(compile_artifact, model, optimizations="float32", max_prefill_chunk=128))
    session.reset()
    prompt = LONG_PROMPT[:256]
    session.pages.reserve(0, 256)
    row = session.pages.row(0)
    tokens = np.array([prompt])

    def chunk(start, table_row):
        return session._prefill_call(tokens[:, start:start + 128], start, 255, {"chunk_start": start},
                                     {"page_table": table_row[None],
                                      "chunk_page_table": row[None, start // 32:(start + 128) // 32]})
    chunk(0, row)
    honest = chunk(128, row)
    moved = row.copy()
    moved[0] = next(b for b in range(session.pages.num_blocks) if b not in row)  # an untouched block
    assert not np.allclose(chunk(128, moved), honest)
    assert np.array_equal(chunk(128, row), honest)


# ------------------------------------------------------------------ paged vs contiguous
def test_paged_equals_contiguous_with_scrambled_blocks(model, compile_artifact):
    paged = runtime.load(_compile(compile_artifact, model, optimizations="float32"))
    contiguous = runtime.load(_compile(compile_artifact, model, optimizations="float32", no_paged_attention=True))
    assert paged.paged and not contiguous.paged
    sequence = LONG_PROMPT[:150] + list(range(40, 80))
    got = paged.teacher_forced_logits(sequence, 150)
    blocks = [int(b) for b in paged.pages.row(0)[: paged.pages.blocks_for(len(sequence))]]
    assert blocks != sorted(blocks) and blocks != list(range(blocks[0], blocks[0] + len(blocks)))
    want = contiguous.teacher_forced_logits(sequence, 150)
    assert np.abs(got - want).max() < 1e-4


# ------------------------------------------------------------------ batching
@pytest.mark.slow
def test_batch_of_32_equals_each_user_alone(model, compile_artifact):
    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(3, 1000, n)] for n in rng.integers(3, 90, 32)]
    batch = runtime.load(_compile(compile_artifact, model, batch_size=32, max_num_blocks=512))
    alone = runtime.load(_compile(compile_artifact, model, batch_size=1))
    together = batch.generate(prompts, max_generated_tokens=8, stop_at_eos=False)
    steps = batch.stats.decode_steps
    assert batch.backend.invocations["decode"] == steps == 7  # one invocation per step for all
    for prompt, output in zip(prompts, together):
        assert alone.generate([prompt], max_generated_tokens=8, stop_at_eos=False)[0] == output


def test_users_that_do_not_fit_wait_for_a_later_batch(model, compile_artifact):
    """A pool of 9 blocks holds two 4-block users at once: four users run as two batches,
    each user's output as if alone."""
    small = runtime.load(compile_artifact(model, max_seq_len=256, batch_size=4, max_num_blocks=9))
    assert small.pages.num_blocks == 9
    prompts = [LONG_PROMPT[i:i + 100] for i in (0, 100, 200, 300)]
    outputs = small.generate(prompts, max_generated_tokens=10, stop_at_eos=False)
    assert small.backend.invocations["prefill"] == 4
    alone = runtime.load(_compile(compile_artifact, model, batch_size=1))
    for prompt, output in zip(prompts, outputs):
        assert alone.generate([prompt], max_generated_tokens=10, stop_at_eos=False)[0] == output


def test_pool_must_hold_one_full_length_user(model, tmp_path, capsys):
    """ttnn requires more pool blocks than a page-table row: the default pool grows to
    allow it, an explicit smaller one is refused with what would work."""
    from compiler import cli

    out = tmp_path / "big"
    assert cli.main([str(model), "--max-seq-len", "512", "--block-size", "32", "--no-weights", "-o", str(out), "-q"]) == 0
    assert json.loads((out / "program.json").read_text())["options"]["max_num_blocks"] == 1024
    assert cli.main([str(model), "--max-seq-len", "512", "--max-num-blocks", "16", "--no-weights",
                     "-o", str(tmp_path / "small"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "--max-num-blocks 17 or more" in err and not (tmp_path / "small").exists()


def test_too_long_and_empty_prompts(model, compile_artifact):
    session = runtime.load(_compile(compile_artifact, model))
    with pytest.raises(ValueError, match="max-seq-len"):
        session.generate([list(range(3, 600))], max_generated_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        session.generate([[]], max_generated_tokens=4)


def test_sampling_is_reproducible_with_a_seed(model, compile_artifact):
    session = runtime.load(_compile(compile_artifact, model, batch_size=2))
    prompts = [LONG_PROMPT[:20], LONG_PROMPT[20:50]]
    a = session.generate(prompts, max_generated_tokens=12, temperature=0.8, top_p=0.9, seed=5, stop_at_eos=False)
    b = session.generate(prompts, max_generated_tokens=12, temperature=0.8, top_p=0.9, seed=5, stop_at_eos=False)
    c = session.generate(prompts, max_generated_tokens=12, temperature=0.8, top_p=0.9, seed=6, stop_at_eos=False)
    assert a == b and a != c
