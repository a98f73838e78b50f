"""Compare runtime/blockfloat.py with ttnn's own host conversion, bit for bit.

Needs a python with ttnn (0.81.1) and numpy; no Tenstorrent card: a mock cluster
descriptor is enough for host-side conversion. blockfloat.py is loaded by file path so
the rest of the `runtime` package (and whatever it imports) stays out of this process.

    /tmp/venv-ttnn/bin/python tests/ttnn_side/check_blockfloat.py

Also checks round_bfloat16 against ttnn's bfloat16 conversion. Prints mismatches per
case and exits 1 if any value differs (NaN payloads included).
"""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault(  # the project's own copy of the public N150 descriptor
    "TT_METAL_MOCK_CLUSTER_DESC_PATH",
    str(Path(__file__).resolve().parents[2] / "runtime" / "ttnn_backend" / "clusters" / "n150_cluster_desc.yaml"),
)
import ttnn  # noqa: E402  (reads the mock variable at import)

import ml_dtypes  # noqa: E402


def _load_blockfloat():
    path = Path(__file__).resolve().parents[2] / "runtime" / "blockfloat.py"
    spec = importlib.util.spec_from_file_location("blockfloat", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["blockfloat"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


bf = _load_blockfloat()
TT_DTYPES = {"bfloat8_b": ttnn.bfloat8_b, "bfloat4_b": ttnn.bfloat4_b, "bfloat16": ttnn.bfloat16}


def ours(x, fmt):
    return bf.round_bfloat16(x) if fmt == "bfloat16" else bf.quantize(x, fmt)


def ttnn_quantize(x, fmt):
    """ttnn's round trip; bfloat16 input goes through a bfloat16 ttnn tensor first."""
    if x.dtype == ml_dtypes.bfloat16:
        t = ttnn.Tensor(x.astype(np.float32), data_type=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT)
        t = ttnn.to_dtype(t, TT_DTYPES[fmt])
    else:
        t = ttnn.Tensor(x, data_type=TT_DTYPES[fmt], layout=ttnn.TILE_LAYOUT)
    if fmt == "bfloat16":  # numpy 1.x cannot take a bfloat16 array from ttnn directly
        t = ttnn.to_dtype(t, ttnn.float32)
    return np.asarray(t.to_numpy(), dtype=np.float32)


def random_bits(rng, shape):
    """Finite float32 values with uniformly random bit patterns (subnormals included)."""
    bits = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    bits[(bits >> 23) & 0xFF == 0xFF] &= ~np.uint32(1 << 30)  # make inf/nan finite
    return bits.view(np.float32)


def halfway(rng, shape, mantissa_bits):
    """Rows led by 1.0 whose other values sit exactly on a rounding tie (or 1 ulp off)."""
    lsb = 2.0 ** (1 - mantissa_bits)  # weight of the last kept bit when E = 127
    k = rng.integers(0, 2 ** (mantissa_bits - 1), size=shape)
    k >>= rng.integers(0, mantissa_bits, size=shape)  # ties at several magnitudes
    x = ((k + 0.5) * lsb).astype(np.float32)  # odd and even k: ties both ways
    x *= rng.choice(np.float32([-1, 1]), size=shape)
    nudge = rng.integers(-1, 2, size=shape)  # -1 ulp, tie, +1 ulp
    x = np.where(nudge < 0, np.nextafter(x, np.float32(0)), x)
    x = np.where(nudge > 0, np.nextafter(x, np.float32(np.inf)), x)
    x[..., ::16] = 1.0
    return x.astype(np.float32)


def cases(rng):
    odd = [(1, 1), (3, 17), (33, 33), (31, 15), (50, 70), (100, 130), (7, 200), (2, 3, 40, 50)]
    for shape in odd:
        yield f"normal {shape}", rng.standard_normal(shape, dtype=np.float32)
    for i in range(20):
        yield f"normal 64x96 #{i}", rng.standard_normal((64, 96), dtype=np.float32)
    x = rng.standard_normal((64, 96), dtype=np.float32)
    x[np.arange(64), rng.integers(0, 96, 64)] *= 100
    yield "row outliers x100", x
    yield "zeros", np.zeros((32, 64), np.float32)
    x = rng.standard_normal((32, 64), dtype=np.float32)
    x[:, 16:32] = 0
    x[:, 40] = -0.0
    yield "zero groups and -0", x
    yield "negatives", -np.abs(rng.standard_normal((40, 48), dtype=np.float32))
    for n in (7, 3):
        for i in range(3):
            yield f"halfway {n}-bit #{i}", halfway(rng, (64, 64), n)
    for i in range(5):
        yield f"random bits #{i}", random_bits(rng, (96, 128))
    x = rng.standard_normal((64, 64), dtype=np.float32)
    yield "2^+-40 range", x * np.exp2(rng.uniform(-40, 40, (64, 64))).astype(np.float32)
    yield "near subnormal", x * np.float32(2.0**-122)
    tiny = rng.random((64, 64)) < 0.5
    yield "subnormals mixed", x * np.where(tiny, np.float32(2.0**-130), np.float32(2.0**-118))
    yield "near float max", np.clip(x, -3, 3) * np.float32(2.0**126)
    x = random_bits(rng, (64, 64))
    x.view(np.uint32)[:, ::5] |= np.uint32(0x7F800000)  # exponent 255: inf and nan
    x[7, 20], x[9, 3] = np.inf, -np.inf
    yield "inf and nan", x
    signs = rng.choice(np.float32([-1, 1]), (32, 32))
    yield "saturation", np.full((32, 32), 1.999, np.float32) * signs
    for shape in [(3, 17), (64, 96), (33, 70)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        yield f"bf16 {shape}", x.astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((64, 96), dtype=np.float32)
    x[:, ::7] *= 100
    yield "bf16 outliers", x.astype(ml_dtypes.bfloat16)


def main():
    rng = np.random.default_rng(20240601)
    tensors = values = bad_total = 0
    for name, x in cases(rng):
        for fmt in TT_DTYPES:
            got = ours(x, fmt)
            want = ttnn_quantize(x, fmt)
            assert got.shape == want.shape, (name, got.shape, want.shape)
            bad = int(np.count_nonzero(got.view(np.uint32) != want.view(np.uint32)))
            tensors, values, bad_total = tensors + 1, values + x.size, bad_total + bad
            print(f"{name:24s} {fmt:10s} {x.size:7d} values  {bad} mismatches")
            if bad:
                i = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))[:5]
                xs = np.asarray(x, np.float32).ravel()[i]
                print("   x", xs, "\n   ours", got.ravel()[i], "\n   ttnn", want.ravel()[i])
    print(f"TOTAL {tensors} conversions ({tensors // len(TT_DTYPES)} inputs x "
          f"{len(TT_DTYPES)} formats), {values} values, {bad_total} mismatches")
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
