"""Hand-computed cases for runtime/blockfloat.py.

Reminder of the rule being checked: per 16 consecutive values of the last dim, E is the
largest float32 exponent field; bfloat8_b stores q (7 bits) with value q * 2**(E - 133),
bfloat4_b q (3 bits) with q * 2**(E - 129). For a group whose max is in [1, 2), E = 127
and the steps are 2**-6 (bf8) and 2**-2 (bf4). Bit-exactness against ttnn itself is
checked separately by tests/ttnn_side/check_blockfloat.py.
"""

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from runtime.blockfloat import FORMATS, bytes_for, quantize, round_bfloat16

BF8, BF4 = "bfloat8_b", "bfloat4_b"


def group(*values):
    """One 16-value group: the given values, then zeros (zeros never change E)."""
    return np.array(list(values) + [0.0] * (16 - len(values)), np.float32)


def q(values, fmt):
    return quantize(group(*values), fmt)[: len(values)]


def test_formats_table():
    assert FORMATS[BF8].mantissa_bits == 7 and FORMATS[BF8].exponent_bias_offset == 133
    assert FORMATS[BF4].mantissa_bits == 3 and FORMATS[BF4].exponent_bias_offset == 129
    assert FORMATS[BF8].tile_bytes == 1088 and FORMATS[BF4].tile_bytes == 576
    with pytest.raises(AttributeError):
        FORMATS[BF8].mantissa_bits = 8


def test_max_one_small_values_lose_bits():
    """Max 1.0 -> E = 127, bf8 step 2**-6. 0.3 * 64 = 19.2 -> 19/64. (1 + 2**-6) is exact
    at 1.0 but at 2**-2 it needs bit 2**-8: 16.25 -> 16 -> 0.25. 1.5 * 2**-7 is 0.75
    steps -> 1 step; 2**-7 is exactly half a step -> 0 (even)."""
    x = [1.0, 0.3, 1 + 2**-6, (1 + 2**-6) * 2**-2, 1.5 * 2**-7, 2**-7]
    np.testing.assert_array_equal(q(x, BF8), [1.0, 19 / 64, 1 + 2**-6, 0.25, 2**-6, 0.0])
    # bf4, step 0.25: 0.3 -> 1.2 steps -> 0.25; 1.015625 -> 4.06 -> 1.0; the rest -> 0.
    np.testing.assert_array_equal(q(x, BF4), [1.0, 0.25, 1.0, 0.25, 0.0, 0.0])


def test_outlier_group():
    """100 = 1.5625 * 2**6 -> E = 133: bf8 step is 1, bf4 step is 16, so the small values
    of the group round to whole steps (0.5 and 2.5 are ties to even; 8 is half of 16)."""
    x = [100.0, 1.0, 0.7, -1.3, 0.5, 1.5, 2.5, 24.0, 8.0]
    np.testing.assert_array_equal(q(x, BF8), [100, 1, 1, -1, 0, 2, 2, 24, 8])
    np.testing.assert_array_equal(q(x, BF4), [96, 0, 0, 0, 0, 0, 0, 32, 0])


def test_all_zero_group_stores_zero():
    x = np.zeros((2, 32), np.float32)
    x[0, 16:] = 1.0  # a neighbouring group with a real exponent
    for fmt in (BF8, BF4):
        out = quantize(x, fmt)
        np.testing.assert_array_equal(out[:, :16], 0.0)
        np.testing.assert_array_equal(out[0, 16:], 1.0)
        assert not np.signbit(out).any()


def test_ties_to_even_both_directions():
    """bf8, E = 127: 1 + 2**-7 is 64.5 steps -> 64; 1 + 3 * 2**-7 is 65.5 -> 66.
    bf4: 1.125 is 4.5 steps -> 4; 1.375 is 5.5 -> 6."""
    np.testing.assert_array_equal(q([1 + 2**-7, 1 + 3 * 2**-7], BF8), [1.0, 1 + 2**-5])
    np.testing.assert_array_equal(q([1.125, 1.375], BF4), [1.0, 1.5])


def test_one_ulp_around_halfway():
    """A tie nudged by one float32 ulp rounds away from the tie's even choice or to it."""
    up, down = np.float32(np.inf), np.float32(0)
    t8 = np.float32(1 + 2**-7)  # rounds down to 1.0 when exact
    t8b = np.float32(1 + 3 * 2**-7)  # rounds up to 66/64 when exact
    x = [np.nextafter(t8, up), np.nextafter(t8, down), np.nextafter(t8b, down),
         np.nextafter(t8b, up)]
    np.testing.assert_array_equal(q(x, BF8), [1 + 2**-6, 1.0, 1 + 2**-6, 1 + 2**-5])
    t4 = np.float32(1.125)
    np.testing.assert_array_equal(q([np.nextafter(t4, up), np.nextafter(t4, down)], BF4),
                                  [1.25, 1.0])


def test_saturation_keeps_exponent():
    """1.999 rounds to 128/64 or 8/4, which needs E + 1: instead the top code is kept."""
    np.testing.assert_array_equal(q([1.999, -1.999], BF8), [1.984375, -1.984375])
    np.testing.assert_array_equal(q([1.999, -1.999], BF4), [1.75, -1.75])


def test_negatives_round_symmetrically():
    x = np.array([1 + 2**-7, 1 + 3 * 2**-7, 0.3, 1.999], np.float32)
    for fmt in (BF8, BF4):
        np.testing.assert_array_equal(q(-x, fmt), -q(x, fmt))
    np.testing.assert_array_equal(q(-x, BF8), [-1.0, -(1 + 2**-5), -19 / 64, -1.984375])


def test_negative_zero_and_underflow_give_positive_zero():
    out = q([-0.0, 1.0, -(2**-8)], BF8)
    np.testing.assert_array_equal(out, [0.0, 1.0, 0.0])
    assert not np.signbit(out).any()
    assert not np.signbit(quantize(np.full((3, 5), -0.0, np.float32), BF4)).any()


def test_subnormals_flushed():
    """2**-126 is the smallest normal (kept); 1e-39 is subnormal and flushed even though
    it shares E = 1 with it, where unflushed it would be about 45 steps."""
    x = [2.0**-126, 1e-39, -1e-40]
    np.testing.assert_array_equal(q(x, BF8), [2.0**-126, 0.0, 0.0])
    np.testing.assert_array_equal(q([1e-40, 1e-45], BF4), [0.0, 0.0])


def test_values_far_below_max_become_zero():
    """24 or more binades under E, or any shift (100 here) past the word size."""
    np.testing.assert_array_equal(q([1.0, 2**-24, -(2**-30), 2**-100], BF8), [1, 0, 0, 0])
    np.testing.assert_array_equal(q([2.0**100, 1.0, 3.0], BF8), [2.0**100, 0, 0])


def test_inf_and_nan_not_special_cased():
    """Exponent 255 just becomes E: inf (q = 64) stays inf, a NaN whose payload rounds
    away (q = 64) reads back as inf, a large payload stays NaN; the rest of the group
    keeps steps of 2**122 (3e38 is 56.4 of them), 1.0 is 128 binades down and vanishes."""
    nan_small, nan_big = np.uint32([0x7F800001, 0xFFC00000]).view(np.float32)
    out = q([np.inf, -np.inf, nan_small, nan_big, 1.0, 3e38], BF8)
    assert out[0] == np.inf and out[1] == -np.inf and out[2] == np.inf
    assert np.isnan(out[3])
    np.testing.assert_array_equal(out[4:], [0.0, 56 * 2.0**122])


def test_grouping_follows_last_dim():
    """One 100 among 1.3s: its row group gets E = 133 (1.3 -> 1.0), every other group
    keeps E = 127 (1.3 -> 83/64). Transposing moves the affected group to the column."""
    x = np.full((16, 16), 1.3, np.float32)
    x[0, 0] = 100.0
    rows, cols = quantize(x, BF8), quantize(x.T, BF8).T
    assert rows[0, 1] == 1.0 and rows[1, 0] == 83 / 64
    assert cols[0, 1] == 83 / 64 and cols[1, 0] == 1.0
    assert rows[0, 0] == cols[0, 0] == 100.0


def test_groups_start_at_multiples_of_16():
    x = np.full(32, 1.3, np.float32)
    x[15] = 100.0
    out = quantize(x, BF8)
    np.testing.assert_array_equal(out[:15], 1.0)
    np.testing.assert_array_equal(out[16:], 83 / 64)


def test_last_dim_not_multiple_of_16():
    x = np.full((2, 20), 1.3, np.float32)
    x[0, 17] = 100.0  # in the partial group 16..19 (padded with zeros to 16)
    out = quantize(x, BF8)
    assert out.shape == (2, 20) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, :16], 83 / 64)
    np.testing.assert_array_equal(out[0, 16:], [1.0, 100.0, 1.0, 1.0])
    np.testing.assert_array_equal(out[1], 83 / 64)
    # Alone (padding is zeros) 0.3 sets E = 125 itself: step 2**-8, 76.8 -> 77 steps.
    np.testing.assert_array_equal(quantize(np.float32([[0.3, 0.3, 0.3]]), BF8), [[77 / 256] * 3])


def test_bfloat16_input_rounds_twice():
    """1 + 2**-7 + 2**-10 is 64.5625 bf8 steps -> 65. As bf16 (7 fraction bits) it is
    first rounded down to 1 + 2**-7, an exact tie that then goes to even: 64."""
    x = group(1 + 2**-7 + 2**-10)
    assert quantize(x, BF8)[0] == 1 + 2**-6
    assert quantize(x.astype(ml_dtypes.bfloat16), BF8)[0] == 1.0
    assert quantize(round_bfloat16(x), BF8)[0] == 1.0


def test_input_dtypes_and_shapes():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 40))
    out = quantize(x, BF4)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, quantize(x.astype(np.float32), BF4))
    assert quantize(np.float32(1.3), BF8) == 83 / 64


def test_round_bfloat16():
    """bf16 keeps 7 fraction bits: 1 + 2**-8 and 1 + 3 * 2**-8 are ties (down, up)."""
    out = round_bfloat16([1 + 2**-8, 1 + 3 * 2**-8, 0.3])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 1 + 2**-6, 0.30078125])
    nans = round_bfloat16(np.uint32([0xFF812345, 0x7FC00001]).view(np.float32))
    np.testing.assert_array_equal(nans.view(np.uint32), [0x7FC00000] * 2)  # as ttnn


def test_bytes_for():
    assert bytes_for([576, 1536], BF8) == 18 * 48 * 1088
    assert bytes_for([576, 1536], BF4) == 18 * 48 * 576
    assert bytes_for([1, 5], "bfloat16") == 32 * 32 * 2
    assert bytes_for([3, 33, 33], "float32") == 3 * 64 * 64 * 4
    assert bytes_for([4096], "bfloat16") == 32 * 4096 * 2
    assert bytes_for([2, 8, 32, 64], "int32") == bytes_for([16, 32, 64], "uint32") == 16 * 2048 * 4


def test_module_never_imports_torch():
    path = Path(__file__).resolve().parents[1] / "runtime" / "blockfloat.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('bf', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['bf'] = m\n"
        "spec.loader.exec_module(m); m.quantize(m.np.ones(16), 'bfloat8_b')\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
