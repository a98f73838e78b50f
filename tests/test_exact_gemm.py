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
    assert exact_gemm.available(), exact_gemm._state["why"]


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
