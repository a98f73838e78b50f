"""Emulator ops where ttnn's semantics are not torch's: layouts of head splits, the rotary
transformation matrix, per-user decode attention, cache writes and their block-float
repacking, and a multiply with a fused activation rounded once.

Ops are called directly (runtime.emulator.ops.IMPLS) and, where the executor's rounding
or state handling matters, through EmulatorBackend on a one-op Program.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compiler import dialect
from lowering.program import Function, Op, Program, TensorSpec
from models_ref import ops as ref
from models_ref.rope import cos_sin_tables, transformation_matrix
from runtime import blockfloat
from runtime.emulator import exact_gemm
from runtime.emulator.backend import EmulatorBackend
from runtime.emulator.ops import IMPLS

from graph_builder import TINY

H, HKV, HD = 8, 2, 64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=_gen(seed))


def run_ops(ops: list[Op], tensors: dict, values: dict, state: dict | None = None, scalars=None,
            outputs: list[str] | None = None) -> list[torch.Tensor]:
    """Execute `ops` as one Program function on EmulatorBackend; returns its outputs.

    `tensors`: activation name -> (shape, dtype); `values`: device tensors given as
    weights, name -> (tensor, dtype); `state`: name -> (shape, dtype), zero at start.
    Each state tensor is read back at the end by a whole-tensor ttnn.slice (as bfloat16,
    which holds block floats exactly) and returned after `outputs`."""
    ops, tensors, outputs = list(ops), dict(tensors), list(outputs or [])
    for name, (shape, _) in (state or {}).items():
        ops.append(Op("ttnn.slice", ["%" + name, [0] * len(shape), list(shape)], {}, [name + "_out"]))
        tensors[name + "_out"] = (shape, "bfloat16")
        outputs.append(name + "_out")
    weights = {n: {"shape": list(t.shape), "dtype": d, "layout": "TILE", "recipe": ["test"], "layer": None}
               for n, (t, d) in values.items()}
    state_specs = {n: TensorSpec(list(shape), d, kind="state") for n, (shape, d) in (state or {}).items()}
    fn = Function("f", inputs=[], scalars=list(scalars or {}), outputs=outputs, ops=ops,
                  tensors={n: TensorSpec(list(shape), d) for n, (shape, d) in tensors.items()})
    program = Program("N150", [1, 1], {"name": "test"}, {"optimizations": "test"}, weights, state_specs,
                      {"f": fn})
    backend = EmulatorBackend(program, None, weights={n: t for n, (t, _) in values.items()})
    return [torch.from_numpy(o) for o in backend.run("f", {}, scalars or {})]


# ============================================================================ rotary
def _rotate_pairs(x, cos, sin):
    """(x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin), written out."""
    out = torch.empty_like(x)
    even, odd = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = even * cos[..., 0::2] - odd * sin[..., 0::2]
    out[..., 1::2] = odd * cos[..., 1::2] + even * sin[..., 1::2]
    return out


def test_transformation_matrix_rotates_pairs():
    t = transformation_matrix()
    x = _randn(3, 32)
    expected = torch.stack((-x[:, 1::2], x[:, 0::2]), dim=-1).flatten(-2)
    torch.testing.assert_close(x @ t, expected, atol=0, rtol=0)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_rotary_embedding_llama_rotates_interleaved_pairs(head_dim, decode):
    rows = 4 if decode else 40
    cos_table, sin_table = cos_sin_tables(TINY.replace(head_dim=head_dim), 64)
    positions = torch.tensor([3, 17, 0, 63]) if decode else torch.arange(rows) + 5
    cos, sin = ref.rope_rows(cos_table, positions, decode), ref.rope_rows(sin_table, positions, decode)
    x = _randn(1, rows, H, head_dim) if decode else _randn(1, H, rows, head_dim)

    got = IMPLS["ttnn.experimental.rotary_embedding_llama"](
        x, cos, sin, transformation_matrix().reshape(1, 1, 32, 32), is_decode_mode=decode)

    want = _rotate_pairs(x, cos.expand_as(x), sin.expand_as(x))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got, ref.rotary(x, cos, sin), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 48, 80, 100])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_rotary_on_heads_padded_to_whole_tiles_keeps_real_dims_and_zero_padding(head_dim, decode):
    """passes/pad_heads.py: heads zero-padded to whole tiles with cos = 1, sin = 0 on the
    padded dims. The tile-wise transformation matrix rotates pairs inside 32-wide tiles;
    no pair straddles the real/padded boundary (head_dim is even), so the real dims equal
    the unpadded rotation and the padded dims stay zero."""
    padded = -(-head_dim // 32) * 32
    rows = 4 if decode else 40
    cos_table, sin_table = cos_sin_tables(TINY.replace(head_dim=head_dim), 64)
    positions = torch.tensor([3, 17, 0, 63]) if decode else torch.arange(rows) + 5
    cos, sin = ref.rope_rows(cos_table, positions, decode), ref.rope_rows(sin_table, positions, decode)
    x = _randn(1, rows, H, head_dim) if decode else _randn(1, H, rows, head_dim)
    pad = padded - head_dim

    got = IMPLS["ttnn.experimental.rotary_embedding_llama"](
        F.pad(x, (0, pad)), F.pad(cos, (0, pad), value=1.0), F.pad(sin, (0, pad)),
        transformation_matrix().reshape(1, 1, 32, 32), is_decode_mode=decode)

    torch.testing.assert_close(got[..., :head_dim], ref.rotary(x, cos, sin), atol=1e-6, rtol=1e-5)
    assert got.shape[-1] == padded and not got[..., head_dim:].any()


# ============================================================================ heads
def _fused_qkv(rows, seed=0):
    return _randn(1, 1, rows, (H + 2 * HKV) * HD, seed=seed)


@pytest.mark.parametrize("transpose_k", [False, True])
def test_nlp_create_qkv_heads(transpose_k):
    rows = 40
    x = _fused_qkv(rows)
    q, k, v = IMPLS["ttnn.experimental.nlp_create_qkv_heads"](
        x, num_heads=H, num_kv_heads=HKV, transpose_k_heads=transpose_k)
    assert q.shape == (1, H, rows, HD) and v.shape == (1, HKV, rows, HD)
    assert k.shape == ((1, HKV, HD, rows) if transpose_k else (1, HKV, rows, HD))
    k = k.transpose(2, 3) if transpose_k else k
    for h in range(H):
        torch.testing.assert_close(q[0, h], x[0, 0, :, h * HD:(h + 1) * HD], atol=0, rtol=0)
    for h in range(HKV):
        k_at, v_at = (H + h) * HD, (H + HKV + h) * HD
        torch.testing.assert_close(k[0, h], x[0, 0, :, k_at:k_at + HD], atol=0, rtol=0)
        torch.testing.assert_close(v[0, h], x[0, 0, :, v_at:v_at + HD], atol=0, rtol=0)
    for got, want in zip((q, k, v), dialect.qkv_heads(x, H, HKV, HD, False)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_nlp_create_qkv_heads_decode():
    batch = 5
    x = _fused_qkv(batch)
    q, k, v = IMPLS["ttnn.experimental.nlp_create_qkv_heads_decode"](x, num_heads=H, num_kv_heads=HKV)
    assert q.shape == (1, batch, H, HD) and k.shape == v.shape == (1, batch, HKV, HD)
    for b in range(batch):
        torch.testing.assert_close(q[0, b].reshape(-1), x[0, 0, b, :H * HD], atol=0, rtol=0)
        torch.testing.assert_close(k[0, b].reshape(-1), x[0, 0, b, H * HD:(H + HKV) * HD], atol=0, rtol=0)
        torch.testing.assert_close(v[0, b].reshape(-1), x[0, 0, b, (H + HKV) * HD:], atol=0, rtol=0)
    for got, want in zip((q, k, v), dialect.qkv_heads(x, H, HKV, HD, True)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_nlp_concat_heads_inverts_create():
    x = _fused_qkv(40)
    q, _, _ = IMPLS["ttnn.experimental.nlp_create_qkv_heads"](x, num_heads=H, num_kv_heads=HKV,
                                                             transpose_k_heads=False)
    merged = IMPLS["ttnn.experimental.nlp_concat_heads"](q)
    assert merged.shape == (1, 1, 40, H * HD)
    torch.testing.assert_close(merged, x[..., :H * HD], atol=0, rtol=0)
    torch.testing.assert_close(merged, ref.merge_heads(q, False), atol=0, rtol=0)


def test_nlp_concat_heads_decode_inverts_create_and_drops_head_padding():
    batch = 3
    x = _fused_qkv(batch)
    q, _, _ = IMPLS["ttnn.experimental.nlp_create_qkv_heads_decode"](x, num_heads=H, num_kv_heads=HKV)
    concat = IMPLS["ttnn.experimental.nlp_concat_heads_decode"]
    merged = concat(q, num_heads=H)
    assert merged.shape == (1, 1, batch, H * HD)
    torch.testing.assert_close(merged, x[..., :H * HD], atol=0, rtol=0)
    # On device the decode heads are padded to a tile (32); only num_heads are real.
    padded = torch.cat([q, torch.full((1, batch, 32 - H, HD), 7.0)], dim=2)
    torch.testing.assert_close(concat(padded, num_heads=H), x[..., :H * HD], atol=0, rtol=0)


# ============================================================================ attention
def _dense_decode_attention(q, k_cache, v_cache, cur_pos, scale):
    """Loop over users and heads: softmax over positions 0..cur_pos[b] of its cache row."""
    batch, n_heads = q.shape[1], q.shape[2]
    groups = n_heads // k_cache.shape[1]
    out = torch.zeros(1, batch, n_heads, q.shape[-1], dtype=torch.float64)
    for b in range(batch):
        p = int(cur_pos[b])
        for h in range(n_heads):
            k = k_cache[b, h // groups, : p + 1].double()
            v = v_cache[b, h // groups, : p + 1].double()
            weights = torch.softmax((k @ q[0, b, h].double()) * scale, dim=0)
            out[0, b, h] = weights @ v
    return out.float()


def test_sdpa_decode_attends_to_each_users_positions_only():
    batch, max_batch, length = 4, 6, 96
    q = _randn(1, batch, H, HD, seed=1)
    k_cache, v_cache = _randn(max_batch, HKV, length, HD, seed=2), _randn(max_batch, HKV, length, HD, seed=3)
    cur_pos = torch.tensor([0, 5, 33, 70])
    sdpa = IMPLS["ttnn.transformer.scaled_dot_product_attention_decode"]
    scale = HD ** -0.5

    got = sdpa(q, k_cache, v_cache, cur_pos_tensor=cur_pos, scale=scale)

    assert got.shape == (1, batch, H, HD)
    want = _dense_decode_attention(q, k_cache, v_cache, cur_pos, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, ref.decode_attention(q, k_cache, v_cache, cur_pos, scale),
                               atol=1e-5, rtol=1e-5)
    # Whatever lies past a user's position (other users' rows too) changes nothing.
    k2, v2 = k_cache.clone(), v_cache.clone()
    for b, p in enumerate(cur_pos.tolist()):
        k2[b, :, p + 1:], v2[b, :, p + 1:] = 1e4, -1e4
    k2[batch:], v2[batch:] = 1e4, 1e4
    torch.testing.assert_close(sdpa(q, k2, v2, cur_pos_tensor=cur_pos, scale=scale), got, atol=0, rtol=0)


def test_sdpa_decode_user_at_position_zero_sees_one_row():
    q = _randn(1, 1, H, HD)
    k_cache, v_cache = _randn(1, HKV, 64, HD, seed=1), _randn(1, HKV, 64, HD, seed=2)
    got = IMPLS["ttnn.transformer.scaled_dot_product_attention_decode"](
        q, k_cache, v_cache, cur_pos_tensor=torch.tensor([0]), scale=0.125)
    want = v_cache[0, :, 0].repeat_interleave(H // HKV, dim=0)[None, None]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_sdpa_prefill_is_causal_with_gqa():
    q, k, v = _randn(1, H, 40, HD), _randn(1, HKV, 40, HD, seed=1), _randn(1, HKV, 40, HD, seed=2)
    got = IMPLS["ttnn.transformer.scaled_dot_product_attention"](q, k, v, is_causal=True, scale=0.125)
    torch.testing.assert_close(got, ref.causal_attention(q, k, v, 0.125), atol=1e-5, rtol=1e-5)
    # Row 0 sees only position 0.
    torch.testing.assert_close(got[0, :, 0], v[0, :, 0].repeat_interleave(H // HKV, dim=0), atol=1e-6, rtol=0)


# ============================================================================ caches
def test_paged_update_cache_writes_each_users_row():
    batch, length = 3, 64
    cache = _randn(batch, HKV, length, HD).to(torch.bfloat16)
    before = cache.clone()
    x = _randn(1, batch, HKV, HD, seed=1)
    idx = torch.tensor([5, 0, 63])

    IMPLS["ttnn.experimental.paged_update_cache"](cache, x, update_idxs_tensor=idx)

    expected = before.clone()
    for b, p in enumerate(idx.tolist()):
        expected[b, :, p] = x[0, b].to(torch.bfloat16)
    torch.testing.assert_close(cache, expected, atol=0, rtol=0)


def test_paged_update_cache_quantises_to_bfloat8_b():
    batch, length = 4, 64
    cache = torch.zeros(batch, HKV, length, HD, dtype=torch.bfloat16)
    x = (_randn(1, batch, HKV, HD, seed=4) * torch.logspace(-3, 1, HD)).to(torch.bfloat16)
    idx = torch.tensor([1, 2, 30, 63])

    IMPLS["ttnn.experimental.paged_update_cache"](cache, x, update_idxs_tensor=idx, cache_dtype="bfloat8_b")

    q = torch.from_numpy(blockfloat.quantize(x[0].float().numpy(), "bfloat8_b"))
    for b, p in enumerate(idx.tolist()):
        torch.testing.assert_close(cache[b, :, p].float(), q[b], atol=0, rtol=0)
    assert not torch.equal(q, x[0].float()), "the test data must be changed by bfloat8_b"
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[torch.arange(batch), :, idx] = True
    assert not cache[~written].any()


def test_paged_update_cache_through_the_executor_uses_the_state_dtype():
    """The backend passes the cache's program dtype to the op (bfloat8_b state)."""
    batch, length = 2, 32
    x = (_randn(1, batch, HKV, HD, seed=5) * torch.logspace(-2, 1, HD)).to(torch.bfloat16)
    op = Op("ttnn.experimental.paged_update_cache", ["%cache", "%x"], {"update_idxs_tensor": "%pos"}, [])
    (cache,) = run_ops([op], {}, {"x": (x, "bfloat16"), "pos": (torch.tensor([3, 9]), "int32")},
                       state={"cache": ((batch, HKV, length, HD), "bfloat8_b")})
    q = torch.from_numpy(blockfloat.quantize(x[0].float().numpy(), "bfloat8_b"))
    assert not torch.equal(q, x[0].float()), "the test data must be changed by bfloat8_b"
    torch.testing.assert_close(cache[0, :, 3].float(), q[0], atol=0, rtol=0)
    torch.testing.assert_close(cache[1, :, 9].float(), q[1], atol=0, rtol=0)
    cache[0, :, 3], cache[1, :, 9] = 0, 0
    assert not cache.any()


def test_paged_update_cache_follows_the_page_table():
    """User b's row goes to cache[page_table[b, pos // block], :, pos % block], nowhere else
    (a float32 cache, as float32 programs hold, so values compare exactly)."""
    num_blocks, block, batch = 8, 32, 2
    cache = torch.zeros(num_blocks, HKV, block, HD)
    x = _randn(1, batch, HKV, HD)
    page_table = torch.tensor([[5, 2], [7, 0]])  # user 0: blocks 5, 2; user 1: blocks 7, 0
    idx = torch.tensor([40, 3])  # user 0 -> block 2 row 8; user 1 -> block 7 row 3
    IMPLS["ttnn.experimental.paged_update_cache"](cache, x, update_idxs_tensor=idx, page_table=page_table,
                                                  cache_dtype="float32")
    torch.testing.assert_close(cache[2, :, 8], x[0, 0], atol=0, rtol=0)
    torch.testing.assert_close(cache[7, :, 3], x[0, 1], atol=0, rtol=0)
    cache[2, :, 8], cache[7, :, 3] = 0, 0
    assert not cache.any()


def test_fill_cache_writes_at_batch_idx():
    max_batch, length, rows = 4, 64, 40
    cache = torch.zeros(max_batch, HKV, length, HD)
    x = _randn(1, HKV, rows, HD)
    fill = IMPLS["ttnn.fill_cache"]

    fill(cache, x, 2)

    torch.testing.assert_close(cache[2, :, :rows], x[0], atol=0, rtol=0)
    assert not cache[2, :, rows:].any() and not cache[[0, 1, 3]].any()
    x0 = _randn(1, HKV, 8, HD, seed=1)
    fill(cache, x0, 0)
    torch.testing.assert_close(cache[0, :, :8], x0[0], atol=0, rtol=0)
    torch.testing.assert_close(cache[2, :, :rows], x[0], atol=0, rtol=0)  # user 2 untouched


def test_fill_cache_of_a_bfloat8_b_cache_after_typecast():
    """The lowering casts K/V to the cache dtype first; the cache then holds block floats."""
    rows, length = 40, 64
    x = (_randn(1, HKV, rows, HD, seed=6) * torch.logspace(-3, 1, HD)).to(torch.bfloat16)
    cast = Op("ttnn.typecast", ["%x", "bfloat8_b"], {}, ["x_cast"])
    fill = Op("ttnn.fill_cache", ["%cache", "%x_cast", "$user_id"], {}, [])
    (cache,) = run_ops([cast, fill], {"x_cast": ([1, HKV, rows, HD], "bfloat8_b")}, {"x": (x, "bfloat16")},
                       state={"cache": ((2, HKV, length, HD), "bfloat8_b")}, scalars={"user_id": 1})
    q = torch.from_numpy(blockfloat.quantize(x[0].float().numpy(), "bfloat8_b"))
    torch.testing.assert_close(cache[1, :, :rows], q, atol=0, rtol=0)
    assert not cache[0].any() and not cache[1, :, rows:].any()


# ============================================================================ eltwise
def test_mul_with_silu_activation_rounds_once():
    a = (_randn(1, 1, 32, 256, seed=7) * 3).to(torch.bfloat16)
    b = (_randn(1, 1, 32, 256, seed=8) * 3).to(torch.bfloat16)
    exact = F.silu(a.float()) * b.float()
    once = exact.to(torch.bfloat16)
    twice = (F.silu(a.float()).to(torch.bfloat16).float() * b.float()).to(torch.bfloat16)
    assert not torch.equal(once, twice), "the test data must tell one rounding from two"

    raw = IMPLS["ttnn.mul"](a, b, input_tensor_a_activations=["silu"])
    torch.testing.assert_close(raw.float(), exact, atol=0, rtol=0)

    op = Op("ttnn.mul", ["%a", "%b"], {"input_tensor_a_activations": ["silu"], "dtype": "bfloat16"}, ["y"])
    (y,) = run_ops([op], {"y": ([1, 1, 32, 256], "bfloat16")}, {"a": (a, "bfloat16"), "b": (b, "bfloat16")},
                   outputs=["y"])
    assert torch.equal(y, once.float())


def test_rms_norm_matches_the_reference():
    x = _randn(1, 1, 40, 256)
    w = 1 + 0.1 * _randn(256, seed=1)
    got = IMPLS["ttnn.rms_norm"](x, epsilon=1e-5, weight=w.reshape(1, 1, 8, 32))
    torch.testing.assert_close(got, ref.rms_norm(x, w, 1e-5), atol=1e-6, rtol=1e-5)


def test_linear_takes_the_executors_transposed_weight():
    x, w = _randn(1, 1, 8, 64), _randn(64, 96, seed=1)  # w is [K, N], as in the program
    bias = _randn(1, 96, seed=2)
    got = IMPLS["ttnn.linear"](x, w.t().contiguous(), bias=bias)
    torch.testing.assert_close(got, dialect.linear(x, w, bias), atol=1e-5, rtol=1e-5)


def test_slice_last_tile():
    x = _randn(1, 1, 70, 16)
    got = IMPLS["ttnn.slice"](x, [0, 0, 64, 0], [1, 1, 96, 16])
    torch.testing.assert_close(got, ref.last_tile(x, 69), atol=0, rtol=0)


def test_torch_blockfloat_matches_numpy_reference():
    """The emulator's torch rounding (hot path) is bit-equal to runtime.blockfloat."""
    from runtime import blockfloat
    from runtime.emulator.blockfloat_torch import quantize as quantize_torch

    rng = np.random.default_rng(7)
    bits = rng.integers(-2**31, 2**31 - 1, size=(40, 70), dtype=np.int64).astype(np.int32).view(np.float32)
    cases = [
        rng.standard_normal((64, 96)).astype(np.float32),
        rng.standard_normal((3, 17)).astype(np.float32) * np.array([1, 100, 1e-6] * 5 + [1, 1], np.float32),
        np.where(np.isfinite(bits), bits, 0).astype(np.float32),
        np.zeros((4, 32), np.float32),
        np.array([[1.0, 2.0 ** -30, -3.5, 1.999, -0.0, 1.0 + 2.0 ** -7] * 6], np.float32),
        rng.standard_normal((2, 3, 8, 64)).astype(np.float32),
    ]
    for x in cases:
        for fmt in ("bfloat8_b", "bfloat4_b"):
            want = blockfloat.quantize(x, fmt).view(np.int32)
            got = quantize_torch(torch.from_numpy(x), fmt).numpy().view(np.int32)
            assert np.array_equal(want, got), (fmt, x.shape, int((want != got).sum()))
            f = blockfloat.FORMATS[fmt]  # the C kernel's (exact_gemm.c), as bfloat16
            kernel = exact_gemm.blockfloat(torch.from_numpy(x), f.mantissa_bits, f.exponent_bias_offset)
            assert kernel.dtype == torch.bfloat16
            got = kernel.float().numpy().view(np.int32)
            assert np.array_equal(want, got), ("kernel", fmt, x.shape, int((want != got).sum()))
