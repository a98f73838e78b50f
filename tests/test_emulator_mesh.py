"""The mesh emulator with chips as leading dimensions (runtime/emulator/mesh.py) against
the chip-by-chip loop it replaces, bit for bit; page pools that allocate what is written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import runtime
from runtime.emulator.backend import EmulatorBackend
from runtime.emulator.pools import MeshPagePool, PagePool
from runtime.session import MATMULS

PROMPT = list(range(5, 200, 7))[:20]
SEQUENCE = PROMPT + list(range(300, 320))


def _chip_by_chip(session, matmul):
    """The same session on the per-chip executor (the reference)."""
    weights = Path(json.loads((session.path / "manifest.json").read_text())["weights"])
    session.backend = EmulatorBackend(session.program, weights, emulate_fidelity=MATMULS[matmul],
                                      mesh_batched=False)
    return session


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama_plain")


@pytest.mark.parametrize("target,mode,matmul", [
    ("TG", "performance", "device"), ("T3K", "accuracy", "device"), ("N300", "performance", "exact"),
    ("TG", "float32", "exact")])
def test_batched_mesh_equals_chip_by_chip(model, compile_artifact, target, mode, matmul):
    out = compile_artifact(model, target=target, optimizations=mode, max_seq_len=128)
    batched = runtime.load(out, matmul=matmul)
    assert batched.backend.mesh_batched
    got = batched.teacher_forced_logits(SEQUENCE, len(PROMPT))
    want = _chip_by_chip(runtime.load(out, matmul=matmul), matmul).teacher_forced_logits(SEQUENCE, len(PROMPT))
    assert np.array_equal(got, want)
    # Every chip's KV blocks as the chip-by-chip run wrote them.
    reference = _chip_by_chip(runtime.load(out, matmul=matmul), matmul)
    reference.teacher_forced_logits(SEQUENCE, len(PROMPT))
    for chip in (0, batched.backend.chips - 1):
        name = "layers.1.attention.v_cache"
        assert torch.equal(batched.backend.chip_tensor(name, chip), reference.backend.chip_tensor(name, chip))


def test_decode_batch_of_users_equals_chip_by_chip(model, compile_artifact):
    """Several users at different positions, one inactive (position -1)."""
    out = compile_artifact(model, target="T3K", optimizations="performance", max_seq_len=128, batch_size=4)
    results = []
    for session in (runtime.load(out), _chip_by_chip(runtime.load(out), "device")):
        for user, length in enumerate((9, 17, 4)):
            session.prefill(PROMPT[:length], user)
        tokens = np.array([7, 8, 9, 0])
        positions = np.array([9, 17, 4, -1])
        results.append(np.stack([session.decode(tokens, positions + (positions >= 0) * i) for i in range(3)]))
    assert np.array_equal(results[0], results[1])


def test_page_pools_hold_only_the_blocks_written(model, compile_artifact):
    out = compile_artifact(model, target="TG", optimizations="performance", max_seq_len=128)
    session = runtime.load(out)
    pool = session.backend.env["layers.0.attention.k_cache"]
    assert isinstance(pool, MeshPagePool)
    before = pool.nbytes
    session.prefill(PROMPT, 0)
    block = session.program.state["layers.0.attention.k_cache"].shape[2]
    written = -(-128 // block)  # prefill writes whole chunks: at most max_seq_len's blocks
    assert 1 < pool.slots.used <= 1 + written  # the zero block and the blocks written
    per_block = pool.storage[0, 0, 0].numel() * pool.storage.element_size() * session.backend.chips
    assert pool.nbytes <= max(before, 2 * (1 + written) * per_block)
    full = np.prod(session.program.state["layers.0.attention.k_cache"].shape) * pool.storage.element_size()
    assert pool.nbytes < full / 4


def test_page_pool_reads_like_a_dense_cache():
    dense = torch.zeros(16, 2, 4, 8, dtype=torch.bfloat16)
    pool = PagePool(dense.shape, torch.bfloat16)
    rows = torch.randn(3, 2, 8).to(torch.bfloat16)
    blocks, offsets = torch.tensor([5, 5, 11]), torch.tensor([0, 3, 2])
    for cache in (dense, pool):
        cache[blocks, :, offsets] = rows
        cache[2, :, 1] = rows[0]
        cache[torch.tensor([7, 9])] = torch.ones(2, 2, 4, 8, dtype=torch.bfloat16)
    table = torch.tensor([[5, 11, 0, 7], [9, 2, 3, 15]])
    assert torch.equal(pool[table], dense[table])
    assert torch.equal(pool[:3], dense[:3])
    assert torch.equal(pool.dense(), dense)
    assert pool.slots.used == 1 + 5


# ---------------------------------------------------------------- equal pieces held once
def test_chips_with_equal_matmul_pieces_share_one_copy_and_multiply_the_same():
    """A [2, 4]-chip operand with 3 distinct pieces (as a TG program's padded heads and
    replicated KV heads give) is held as 3 pieces; linear on a replicated and on a per-chip
    activation gives the bits of the whole stack."""
    from runtime.emulator import exact_gemm, fidelity, mesh, ops

    g = torch.Generator().manual_seed(0)
    distinct = [torch.randn(16, 32, generator=g).bfloat16().float() for _ in range(3)]
    distinct[2].zero_()  # a chip whose query head is padding
    owner = [0, 1, 2, 2, 1, 0, 2, 2]
    multiplier = fidelity.Multiplier("HiFi2", True)
    per_chip = [fidelity.prepare_weight(distinct[o], multiplier) for o in owner]
    shared = mesh.stack_weight(per_chip, (2, 4))
    assert isinstance(shared, mesh.SharedPieces) and len(shared.values) == 3
    assert shared.chip_piece.tolist() == [0, 1, 2, 2, 1, 0, 2, 2]
    whole = fidelity.PreparedWeight(torch.stack(exact_gemm.same_form([p.values for p in per_chip])).reshape(2, 4, 16, 32),
                                    per_chip[0].parts, multiplier)
    for x in (torch.randn(1, 1, 1, 1, 5, 32, generator=g).bfloat16(),  # the same on every chip
              torch.randn(2, 4, 1, 1, 5, 32, generator=g).bfloat16()):  # each chip its own
        got = mesh.BATCHED["ttnn.linear"](ops.IMPLS["ttnn.linear"], x, shared, dtype="bfloat16")
        stacked = mesh.BATCHED["ttnn.linear"](ops.IMPLS["ttnn.linear"], x, whole, dtype="bfloat16")
        # the reference: each chip alone, as the single-chip emulator computes it
        want = torch.stack([fidelity.linear(x[min(c // 4, x.shape[0] - 1), min(c % 4, x.shape[1] - 1)],
                                            per_chip[c], dtype="bfloat16") for c in range(8)]).reshape(got.shape)
        assert got.shape == (2, 4, 1, 1, 5, 16)
        for value in (got, stacked):  # bit for bit, signed zeros too
            assert torch.equal(value.view(torch.int16), want.view(torch.int16))
    assert torch.equal(mesh.chip_views(shared, (2, 4))[6].values, distinct[2])
