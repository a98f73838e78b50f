"""Wormhole's matrix unit as the emulator models it (runtime/emulator/fidelity.py): math
fidelity phases, TF32 unpacking, bfloat16 vs float32 Dst, the packer's rounding, and
results that do not depend on the CPU, its thread count or how the work is split.

Expected values come from the bit definitions (tt-isa-documentation MatrixUnit.md's
SrcAFidelityBits / SrcBFidelityBits; tt-llk's FP_FIDELITY_ITER_MASK): the activation sits
in SrcB, whose multiplier takes the implicit one and 6 mantissa bits in its first pass and
the next 4 in its second; the weight sits in SrcA: implicit one + 4 bits, then the next 5.
"""
from __future__ import annotations

import math
import struct
import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.emulator import fidelity

ROOT = Path(__file__).resolve().parents[1]


def config(fidelity_name: str, fp32_dest: bool = True) -> dict:
    return {"math_fidelity": fidelity_name, "fp32_dest_acc_en": fp32_dest, "packer_l1_acc": True}


def emulate(x, w, fidelity_name="HiFi4", fp32_dest=True, dtype=None) -> torch.Tensor:
    """ttnn.linear(x, w.T) as the emulator computes it; x [M, K], w [N, K] (lists or tensors)."""
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, len(x[0]) if isinstance(x, list) else x.shape[-1])
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1, x.shape[-1])
    return fidelity.linear(x, w, dtype=dtype, compute_kernel_config=config(fidelity_name, fp32_dest))


# ---------------------------------------------------------------- an independent reference
def _significand_bits(value: float, keep: int, skip: int = 0) -> float:
    """The float32 `value` with only significand bits [skip, skip + keep) kept, counting
    from the implicit one (bit 0) through the 23 stored bits (as the masks select them)."""
    if value == 0.0:
        return 0.0
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    significand = (bits & 0x7FFFFF) | 0x800000  # 24 bits, implicit one at bit 23
    window = ((1 << keep) - 1) << (24 - skip - keep)
    exponent = ((bits >> 23) & 0xFF) - 127 - 23
    return math.copysign(math.ldexp(significand & window, exponent), value)


# Per phase, (SrcA bits kept, SrcA bits skipped), (SrcB bits kept, SrcB bits skipped):
# tt-llk FP_FIDELITY_ITER_MASK on the 11-bit TF32 significand (Wormhole).
PHASE_BITS = {0: ((5, 0), (7, 0)), 1: ((5, 5), (7, 0)), 2: ((5, 0), (4, 7)), 3: ((5, 5), (4, 7))}
PHASE_COUNT = {"LoFi": 1, "HiFi2": 2, "HiFi3": 3, "HiFi4": 4}


def reference(x: list[list[float]], w: list[list[float]], fidelity_name: str) -> np.ndarray:
    """Exact sum (fractions) over phases and K of the masked products, rounded once to
    float32. Operands must already be TF32 values (bfloat16 values are)."""
    out = np.zeros((len(x), len(w)), dtype=np.float32)
    for m, row in enumerate(x):
        for n, col in enumerate(w):
            total = Fraction(0)
            for phase in range(PHASE_COUNT[fidelity_name]):
                (a_keep, a_skip), (b_keep, b_skip) = PHASE_BITS[phase]
                for xv, wv in zip(row, col):
                    total += (Fraction(_significand_bits(xv, b_keep, b_skip))
                              * Fraction(_significand_bits(wv, a_keep, a_skip)))
            out[m, n] = np.float32(float(total))  # exact in float64 for these operands
    return out


# ---------------------------------------------------------------- crafted fidelity values
# x (SrcB) = 1 + 2^-7: its last bfloat16 bit is beyond SrcB's first pass (implicit + 6 bits).
# w (SrcA) = 1 + 2^-5 + 2^-7: both set bits are beyond SrcA's first pass (implicit + 4).
X, W = 1 + 2 ** -7, 1 + 2 ** -5 + 2 ** -7
PHASE_PRODUCTS = [1.0,                        # phase 0: 1 x 1
                  2 ** -5 + 2 ** -7,          # phase 1: SrcB high (1) x SrcA low (2^-5 + 2^-7)
                  2 ** -7,                    # phase 2: SrcB low (2^-7) x SrcA high (1)
                  2 ** -12 + 2 ** -14]        # phase 3: SrcB low x SrcA low


@pytest.mark.parametrize("name", ["LoFi", "HiFi2", "HiFi3", "HiFi4"])
def test_each_fidelity_adds_its_phases_products(name):
    want = sum(PHASE_PRODUCTS[:PHASE_COUNT[name]])
    got = emulate([[X]], [[W]], name)
    assert got.dtype == torch.float32
    assert got.item() == want, f"{name}: {got.item()!r} != {want!r}"
    assert got.item() == reference([[X]], [[W]], name)[0, 0]


def test_the_four_fidelities_give_four_results_and_hifi4_is_exact():
    results = [emulate([[X]], [[W]], name).item() for name in PHASE_COUNT]
    assert len(set(results)) == 4
    assert results[-1] == X * W  # exact in float32: 8 x 8 significant bits
    assert results == sorted(results)  # positive operands: every phase adds


def test_the_activation_is_srcb_and_the_weight_srca():
    """Swapping the operands changes LoFi's result: SrcB keeps 6 mantissa bits, SrcA 4."""
    x, w = 1 + 2 ** -6, 1.0  # 2^-6 is SrcB's 6th mantissa bit, SrcA's 6th (dropped in LoFi)
    assert emulate([[x]], [[w]], "LoFi").item() == 1 + 2 ** -6
    assert emulate([[w]], [[x]], "LoFi").item() == 1.0


def test_random_bfloat16_operands_match_the_bit_definitions():
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 20, generator=gen)).to(torch.bfloat16).float()
    w = (torch.randn(5, 20, generator=gen)).to(torch.bfloat16).float()
    for name in PHASE_COUNT:
        got = fidelity.linear(x, w, compute_kernel_config=config(name)).numpy()
        np.testing.assert_array_equal(got, reference(x.tolist(), w.tolist(), name), err_msg=name)


def test_prepared_weights_give_the_products_unprepared_ones_do():
    """The backend prepares each weight once (fidelity.prepare_weight): same bits."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 64, generator=gen).to(torch.bfloat16).float()
    w = torch.randn(8, 64, generator=gen).to(torch.bfloat16).float()
    for name in PHASE_COUNT:
        multiplier = fidelity.Multiplier.of(config(name))
        prepared = fidelity.prepare_weight(w, multiplier)
        assert torch.equal(fidelity.linear(x, prepared), fidelity.linear(x, w, compute_kernel_config=config(name)))


# ---------------------------------------------------------------- float32 operands: TF32
def test_float32_operands_are_truncated_to_tf32():
    # SrcB keeps TF32's 10 mantissa bits, truncated (not rounded): 2^-11 and 2^-12 go.
    x = 1 + 2 ** -10 + 2 ** -11 + 2 ** -12
    assert emulate([[x]], [[1.0]], "HiFi4").item() == 1 + 2 ** -10
    # SrcA also drops TF32's last bit (2^-10): only 9 mantissa bits reach any phase.
    assert emulate([[1.0]], [[1 + 2 ** -9 + 2 ** -10]], "HiFi4").item() == 1 + 2 ** -9
    # Exact products keep everything (matmul="exact").
    exact = fidelity.linear(torch.tensor([[x]]), torch.tensor([[1.0]]))
    assert exact.item() == np.float32(x)


def test_denormal_operands_are_flushed():
    tiny = 2.0 ** -130  # a float32 denormal
    assert emulate([[tiny, 1.0]], [[2.0 ** 100, 1.0]], "HiFi4").item() == 1.0


# ---------------------------------------------------------------- Dst and the packer
def test_bfloat16_dst_rounds_each_16_product_sum():
    """K = 32, x = 1, w = [1, 2^-9 x 31]. float32 Dst holds 1 + 31 * 2^-9 exactly. A
    bfloat16 Dst (ulp 2^-7 at 1) rounds after each 16-product MVMUL: 1 + 15 * 2^-9 =
    1 + 3.75 * 2^-7 -> 1 + 4 * 2^-7; + 16 * 2^-9 = 1 + 8 * 2^-7 = 1.0625 exactly."""
    x = [[1.0] * 32]
    w = [[1.0] + [2.0 ** -9] * 31]
    assert emulate(x, w, "HiFi4", fp32_dest=True).item() == 1 + 31 * 2 ** -9
    assert emulate(x, w, "HiFi4", fp32_dest=False).item() == 1.0625


def test_bfloat16_dst_and_packer_round_ties_away_from_zero():
    tie = [[1.0, 1.0]], [[1.0, 2.0 ** -8]]  # 1 + 2^-8: halfway between bfloat16 1 and 1 + 2^-7
    for sign in (1.0, -1.0):
        x = [[sign * v for v in tie[0][0]]]
        want = sign * (1 + 2 ** -7)  # away from zero; round-to-even would give +-1
        assert emulate(x, tie[1], "HiFi4", fp32_dest=False).item() == want
        packed = emulate(x, tie[1], "HiFi4", fp32_dest=True, dtype="bfloat16")
        assert packed.dtype == torch.bfloat16 and packed.item() == want
        assert torch.tensor(sign * (1 + 2 ** -8)).to(torch.bfloat16).item() == sign  # torch: to even


def test_round_half_away_on_float32_and_float64():
    values = [1 + 2 ** -8, 1 + 3 * 2 ** -9, -(1 + 2 ** -8), 1 + 2 ** -9]
    want = [1 + 2 ** -7, 1 + 2 ** -7, -(1 + 2 ** -7), 1.0, 0.0]
    for dtype, denormal in ((torch.float32, 2.0 ** -140), (torch.float64, 2.0 ** -1030)):
        got = fidelity.round_half_away(torch.tensor(values + [denormal], dtype=dtype), 7)
        assert got.tolist() == want  # the format's denormals -> 0


def test_hifi4_fp32_dst_on_bfloat16_operands_is_the_exact_product_rounded_once():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 256, generator=gen).to(torch.bfloat16)
    w = torch.randn(16, 256, generator=gen).to(torch.bfloat16)
    want = (x.double() @ w.double().T).float()
    assert torch.equal(fidelity.linear(x, w, compute_kernel_config=config("HiFi4")), want)
    assert torch.equal(fidelity.linear(x, w), want)  # exact products: the same here


# ---------------------------------------------------------------- independent of the CPU
def _bounded(shape, gen, dtype=torch.bfloat16):
    """Values of magnitude in [2^-6, 4): every dot product's products then sum exactly in
    float64 (at most 22 + 8 + 8 significant bits), whatever the order."""
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    magnitude = torch.exp2(torch.rand(shape, generator=gen) * 8 - 6)
    return (sign * magnitude).to(dtype).float()


@pytest.mark.parametrize("name,fp32_dest", [("LoFi", True), ("HiFi2", True), ("HiFi4", True), ("HiFi2", False)])
def test_results_are_bit_identical_across_threads_and_splits(name, fp32_dest):
    gen = torch.Generator().manual_seed(6)
    x = _bounded((32, 256), gen, torch.float32)  # float32 activations: TF32 in Src
    w = _bounded((96, 256), gen)
    cfg = config(name, fp32_dest)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fidelity.linear(x, w, compute_kernel_config=cfg)
        torch.set_num_threads(2)
        two = fidelity.linear(x, w, compute_kernel_config=cfg)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    rows = torch.cat([fidelity.linear(x[i:i + 5], w, compute_kernel_config=cfg) for i in range(0, 32, 5)])
    assert torch.equal(rows, one)  # batch split
    if fp32_dest:  # any order of K (a different GEMM blocking) sums to the same bits
        order = torch.randperm(256, generator=gen)
        assert torch.equal(fidelity.linear(x[:, order], w[:, order], compute_kernel_config=cfg), one)
        columns = torch.cat([fidelity.linear(x, w[i:i + 7], compute_kernel_config=cfg) for i in range(0, 96, 7)], -1)
        assert torch.equal(columns, one)


# ---------------------------------------------------------------- tt-llk's own golden
def _llk_matmul_golden(monkeypatch):
    """tt-llk's MatmulGolden (tests/python_tests/helpers/golden_generators.py), shipped in
    the ttnn 0.81.1 wheel under .venv-ttnn. It needs torch, so it runs here; its package
    imports the ttexalens debugger (a stub is enough) and loguru (from .venv-ttnn). The
    paths and the stub are undone after the test (later tests check that ttnn is absent)."""
    site = next((ROOT / ".venv-ttnn" / "lib").glob("python3*/site-packages"))
    llk = site / "ttnn" / "tt_metal" / "tt-llk" / "tests" / "python_tests"
    assert (llk / "helpers" / "golden_generators.py").exists(), f"no tt-llk goldens under {llk}"
    monkeypatch.setitem(sys.modules, "ttexalens", types.SimpleNamespace(
        Verbosity=types.SimpleNamespace(set=lambda level: None, ERROR=0)))
    monkeypatch.setattr(sys, "path", sys.path + [str(llk), str(site)])
    from helpers.format_config import DataFormat
    from helpers.golden_generators import MatmulGolden
    from helpers.llk_params import MathFidelity
    return MatmulGolden(), DataFormat, MathFidelity


def test_products_match_tt_llk_matmul_golden(monkeypatch):
    """tt-llk's golden masks each operand as the source register it lands in, per phase,
    and sums the phases' float32 matmuls. Operands in [1, 2) with bfloat16 significands
    and K = 16 keep its float32 sums exact, so the two must agree bit for bit."""
    monkeypatch.setenv("CHIP_ARCH", "wormhole")
    golden, data_format, math_fidelity = _llk_matmul_golden(monkeypatch)
    gen = torch.Generator().manual_seed(7)
    x = (1 + torch.rand(4, 16, generator=gen)).to(torch.bfloat16).float()  # lhs: SrcB
    w = (1 + torch.rand(8, 16, generator=gen)).to(torch.bfloat16).float()  # [N, K]: SrcA
    results = []
    for name in PHASE_COUNT:
        want = golden(x.flatten(), w.T.contiguous().flatten(), data_format.Float32, getattr(math_fidelity, name),
                      input_A_dimensions=[4, 16], input_B_dimensions=[16, 8]).view(4, 8)
        got = fidelity.linear(x, w, compute_kernel_config=config(name))
        assert torch.equal(got, want), name
        results.append(got)
    assert all(not torch.equal(a, b) for a, b in zip(results, results[1:]))


# ---------------------------------------------------------------- the user's choice
def test_exact_matmuls_are_a_load_option(tiny_model, compile_artifact):
    import runtime

    out = compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256)  # performance: LoFi / HiFi2
    tokens = list(range(3, 300, 11))[:24]
    device = runtime.load(out).teacher_forced_logits(tokens, 8)
    exact = runtime.load(out, matmul="exact")
    assert exact.backend.emulate_fidelity is False
    assert not np.array_equal(device, exact.teacher_forced_logits(tokens, 8))
    assert np.array_equal(device, runtime.load(out, matmul="device").teacher_forced_logits(tokens, 8))
    with pytest.raises(ValueError, match="unknown matmul 'fast'"):
        runtime.load(out, matmul="fast")
    with pytest.raises(ValueError, match="emulator setting"):
        runtime.load(out, backend="ttnn", matmul="exact")


def test_ttrun_takes_the_matmul_choice(capsys):
    from runtime.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["prompt", "hi", "--program", "p"]).matmul == "device"
    assert parser.parse_args(["prompt", "hi", "--program", "p", "--matmul", "exact"]).matmul == "exact"
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["prompt", "hi", "--program", "p", "--matmul", "fast"])
    assert info.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
