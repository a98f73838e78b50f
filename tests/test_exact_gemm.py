"""The emulator's exact matmul kernel (runtime/emulator/exact_gemm.py) against torch's
float64 GEMM: the same bits for every shape the kernel's blocking distinguishes."""
import zlib

import pytest
import torch

from runtime.emulator import exact_gemm
from runtime.emulator import fidelity as fidelity_mod


def _operand(shape, dtype, generator):
    """Values whose products one dot product sums exactly in float64: magnitudes in
    [1, 2) with random signs and 8 significant bits (what keeps exact sums exact)."""
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    values = (1 + torch.rand(shape, generator=generator)) * sign
    return values.to(torch.bfloat16).to(dtype)


def test_the_kernel_is_built_here():
    # The machines this project targets have a C compiler; without one the emulator
    # still works (torch's GEMM), but it should not silently lose the kernel here.
    assert exact_gemm.available(), exact_gemm.status()


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 31, 32, 70])
@pytest.mark.parametrize("n,k", [(1, 7), (7, 16), (10, 33), (64, 576), (130, 70)])
def test_same_bits_as_torch_float64(m, n, k, w_dtype):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x, w = _operand((m, k), torch.float32, g), _operand((n, k), w_dtype, g)
    got = exact_gemm.matmul(x[None], w[None])[0]
    assert got.dtype == torch.float64
    assert torch.equal(got, torch.nn.functional.linear(x.double(), w.double()))


def test_batched_with_broadcast_sides():
    g = torch.Generator().manual_seed(3)
    x, w = _operand((4, 3, 40), torch.float32, g), _operand((4, 9, 40), torch.bfloat16, g)
    want = torch.matmul(x.double(), w.double().transpose(-1, -2))
    assert torch.equal(exact_gemm.matmul(x, w), want)
    assert torch.equal(exact_gemm.matmul(x[:1], w), torch.matmul(x[:1].double(), w.double().transpose(-1, -2)))
    assert torch.equal(exact_gemm.matmul(x, w[:1]), torch.matmul(x.double(), w[:1].double().transpose(-1, -2)))


def test_weights_are_held_at_their_exact_width():
    bf16 = torch.tensor([1.5, -0.25])
    tf32 = torch.tensor([1 + 2 ** -10, 3.0])
    assert exact_gemm.stored(bf16.double()).dtype == torch.bfloat16
    assert exact_gemm.stored(tf32).dtype == torch.float32
    assert exact_gemm.stored(torch.tensor([1 + 2 ** -40], dtype=torch.float64)).dtype == torch.float64


def test_torch_only_takes_the_torch_path():
    g = torch.Generator().manual_seed(5)
    x, w = _operand((2, 16), torch.float32, g), _operand((8, 16), torch.bfloat16, g)
    with exact_gemm.torch_only():
        assert not exact_gemm.available()
        assert torch.equal(exact_gemm.matmul(x[None], w[None]), exact_gemm.matmul(x[None], w.float()[None]))
    assert exact_gemm.available()


@pytest.mark.parametrize("m", [1, 3, 8])
def test_each_entry_takes_the_piece_it_names(m):
    g = torch.Generator().manual_seed(m)
    x, pieces = _operand((6, m, 24), torch.float32, g), _operand((3, 10, 24), torch.bfloat16, g)
    index = torch.tensor([2, 0, 0, 1, 2, 2])
    want = torch.matmul(x.double(), pieces[index].double().transpose(-1, -2))
    assert torch.equal(exact_gemm.matmul(x, pieces, index), want)
    with exact_gemm.torch_only():
        assert torch.equal(exact_gemm.matmul(x, pieces, index), want)


def _scaled(shape, generator, dtype=torch.float32):
    """Full float32 mantissas (what the activation's SrcB masking cuts) over 2^-3..2^3."""
    sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    scale = 2.0 ** torch.randint(-3, 4, shape, generator=generator)
    return ((1 + torch.rand(shape, generator=generator)) * sign * scale).to(dtype)


@pytest.mark.parametrize("fidelity", [None, "LoFi", "HiFi2", "HiFi3", "HiFi4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "bfloat8_b"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 5])
def test_one_kernel_call_is_the_python_linear(fidelity, dtype, bias, m):
    """fidelity.linear with the kernel doing SrcB masking, the fidelity split, the bias,
    the float32 Dst and the packer (exact_gemm.device_linear), against the torch path."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((fidelity, dtype, bias, m)).encode()))
    x = _scaled((m, 48), g)
    w = _scaled((20, 48), g, torch.bfloat16)
    b = _scaled((20,), g) if bias else None
    config = {"math_fidelity": fidelity or "HiFi4", "fp32_dest_acc_en": True}
    multiplier = fidelity_mod.Multiplier.of(config, emulate=fidelity is not None)
    prepared = fidelity_mod.prepare_weight(w, multiplier)
    got = fidelity_mod.linear(x, prepared, b, dtype)
    with exact_gemm.torch_only():
        want = fidelity_mod.linear(x, prepared, b, dtype)
    assert got.dtype == want.dtype and torch.equal(got.view(torch.int16 if got.dtype == torch.bfloat16 else torch.int32),
                                                   want.view(torch.int16 if want.dtype == torch.bfloat16 else torch.int32))


def test_packing_ties_and_denormals_match_the_python_rounding():
    """Sums that land on bfloat16 ties and below float32's normal range."""
    w = torch.tensor([[1.0, 2.0 ** -8]], dtype=torch.bfloat16)  # 1 + 2^-8: a bfloat16 tie
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [2.0 ** -70, 2.0 ** -70], [2.0 ** -60, 0.0]])
    w = torch.cat([w, torch.tensor([[2.0 ** -70, 0.0]], dtype=torch.bfloat16)])
    for fidelity in (None, "HiFi4"):
        multiplier = fidelity_mod.Multiplier.of({"math_fidelity": "HiFi4", "fp32_dest_acc_en": True},
                                                emulate=fidelity is not None)
        prepared = fidelity_mod.prepare_weight(w, multiplier)
        got = fidelity_mod.linear(x, prepared, None, "bfloat16")
        with exact_gemm.torch_only():
            want = fidelity_mod.linear(x, prepared, None, "bfloat16")
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), fidelity


# ---------------------------------------------------------------- block mantissas
def _block_float_weight(n, k, dtype, generator):
    """An [N, K] operand quantised as ttnn quantises a linear's [K, N] weight: groups of
    16 output features per input index (one column of 16 rows here)."""
    from runtime.emulator.ops import quantize_like

    w_kn = torch.randn(k, n, generator=generator) * 0.02
    w_kn[0] *= 300  # a column with larger values: its groups take another exponent
    return quantize_like(w_kn, dtype).t().contiguous()


@pytest.mark.parametrize("dtype", ["bfloat8_b", "bfloat4_b"])
@pytest.mark.parametrize("n,k", [(1, 7), (5, 3), (16, 8), (17, 9), (33, 40), (130, 70)])
def test_block_floats_pack_to_a_byte_a_weight_and_multiply_the_same(dtype, n, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    w = _block_float_weight(n, k, dtype, g)
    packed = exact_gemm.pack_blocks(w)
    assert packed.dtype == torch.int8 and packed.shape == (n + -(-n // 16), k)
    assert exact_gemm.block_features(packed) == n
    assert torch.equal(exact_gemm.unpack_blocks(packed), w.float())
    for m in (1, 2, 7):  # the decode path (a group of 16 rows at a time) and the panel path
        x = _operand((m, k), torch.float32, g)
        want = torch.nn.functional.linear(x.double(), w.double())
        assert torch.equal(exact_gemm.matmul(x[None], packed[None])[0], want)
        with exact_gemm.torch_only():
            assert torch.equal(exact_gemm.matmul(x[None], packed[None])[0], want)


def test_packed_pieces_are_taken_by_index():
    g = torch.Generator().manual_seed(11)
    pieces = torch.stack([exact_gemm.pack_blocks(_block_float_weight(20, 24, "bfloat8_b", g)) for _ in range(3)])
    x, index = _operand((6, 1, 24), torch.float32, g), torch.tensor([2, 0, 0, 1, 2, 2])
    dense = exact_gemm.unpack_blocks(pieces)
    want = torch.matmul(x.double(), dense[index].double().transpose(-1, -2))
    assert torch.equal(exact_gemm.matmul(x, pieces, index), want)


def test_values_that_do_not_fit_a_group_stay_as_they_are():
    g = torch.Generator().manual_seed(12)
    plain = torch.randn(32, 16, generator=g).to(torch.bfloat16)  # 8 significant bits, spread exponents
    assert exact_gemm.pack_blocks(plain) is None
    assert exact_gemm.stored(plain.float()).dtype == torch.bfloat16
    blocks = _block_float_weight(32, 16, "bfloat8_b", g).float()
    assert exact_gemm.stored(blocks).dtype == torch.int8
    finer = blocks.clone()
    finer[3, 5] += finer[0:16, 5].abs().max() * 2.0 ** -9  # a bit below its group's last
    assert exact_gemm.pack_blocks(finer) is None
    for special in (float("inf"), float("nan")):
        bad = blocks.clone()
        bad[0, 0] = special
        assert exact_gemm.pack_blocks(bad) is None
    mixed = exact_gemm.same_form([exact_gemm.pack_blocks(blocks), plain])
    assert [t.dtype for t in mixed] == [torch.bfloat16] * 2 and torch.equal(mixed[0].float(), blocks)


@pytest.mark.parametrize("fidelity,as_stored", [("LoFi", False), ("HiFi2", True), ("HiFi4", True)])
def test_block_float_operands_are_held_packed(fidelity, as_stored):
    """bfloat8_b weights: every fidelity's operand packs; HiFi2/HiFi4 multiply the weight's
    own values (so the backend holds the weight once, as its operand); LoFi's high bits
    do not."""
    g = torch.Generator().manual_seed(13)
    w = _block_float_weight(48, 64, "bfloat8_b", g)
    multiplier = fidelity_mod.Multiplier.of({"math_fidelity": fidelity, "fp32_dest_acc_en": True})
    prepared = fidelity_mod.prepare_weight(w, multiplier)
    assert prepared.values.dtype == torch.int8 and prepared.as_stored is as_stored
    assert torch.equal(prepared.dense(), prepared.dense().bfloat16().float())
    x = _scaled((3, 64), g)
    got = fidelity_mod.linear(x, prepared, None, "bfloat16")
    plain = fidelity_mod.PreparedWeight(prepared.dense(), prepared.parts, multiplier)
    with exact_gemm.torch_only():
        assert torch.equal(got.view(torch.int16), fidelity_mod.linear(x, plain, None, "bfloat16").view(torch.int16))


def test_zero_groups_and_zero_pieces_are_skipped_with_the_same_bits():
    """Padding: rows of a piece that are all zero (a padded head), whole pieces of zeros
    (flagged by zero_pieces); a group holding only denormals is not packed (its exponent
    byte would read as 'all zeros')."""
    g = torch.Generator().manual_seed(14)
    pieces = torch.stack([_block_float_weight(40, 24, "bfloat8_b", g) for _ in range(3)])
    pieces[0, 16:32] = 0  # a whole group of rows
    pieces[2] = 0  # a whole piece
    packed = exact_gemm.pack_blocks(pieces)
    zero = exact_gemm.zero_pieces(packed)
    assert zero.tolist() == [0, 0, 1]
    x, index = _operand((5, 1, 24), torch.float32, g), torch.tensor([2, 0, 1, 2, 0])
    want = torch.matmul(x.double(), pieces[index].double().transpose(-1, -2))
    for m_rows in (x, x.expand(5, 3, 24).contiguous()):
        want = torch.matmul(m_rows.double(), pieces[index].double().transpose(-1, -2))
        got = exact_gemm.device_linear(m_rows, packed, index, 0, 0, ("src",), None, "float32", zero)
        assert torch.equal(got, want.float()) and not torch.signbit(got[0]).any()
    denormal = torch.zeros(16, 4)
    denormal[3, 1] = 2.0 ** -130
    assert exact_gemm.pack_blocks(denormal) is None
    assert exact_gemm.zero_pieces(exact_gemm.pack_blocks(_block_float_weight(16, 8, "bfloat8_b", g))[None]) is None
