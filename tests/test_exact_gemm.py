"""The emulator's exact matmul kernel (runtime/emulator/exact_gemm.py) against torch's
float64 GEMM: the same bits for every shape the kernel's blocking distinguishes."""
import pytest
import torch

from runtime.emulator import exact_gemm


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
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 31, 32])
@pytest.mark.parametrize("n,k", [(1, 7), (7, 16), (10, 33), (64, 576), (130, 70)])
def test_same_bits_as_torch_float64(m, n, k, w_dtype):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x, w = _operand((m, k), torch.float32, g), _operand((n, k), w_dtype, g)
    got = exact_gemm.linear(x, w)
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
        assert torch.equal(exact_gemm.linear(x, w), exact_gemm.linear(x, w.float()))
    assert exact_gemm.available()
