"""The emulator's C kernels beyond the matmul (decode_attention.py, row_kernels.py)
against their torch paths, and the properties the emulator's bit-for-bit comparisons
between its paths rely on (batch invariance, thread-count independence)."""
import pytest
import torch

from runtime.emulator import decode_attention, native


def _case(users=3, kv_heads=2, group=3, head_dim=64, block_size=16, blocks=12, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, users, kv_heads * group, head_dim, generator=g).to(torch.bfloat16)
    k = torch.randn(blocks, kv_heads, block_size, head_dim, generator=g).to(dtype)
    v = torch.randn(blocks, kv_heads, block_size, head_dim, generator=g).to(dtype)
    slots = torch.stack([torch.randperm(blocks, generator=g)[:4] for _ in range(users)])
    return q, k, v, slots


def test_the_kernel_is_built_here():
    assert native.library("decode_attention", decode_attention.SIGNATURES) is not None, \
        native.why("decode_attention")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_agrees_with_torch(dtype, window):
    q, k, v, slots = _case(dtype=dtype)
    positions = torch.tensor([40, 0, -1])  # a user deep in its blocks, one at 0, an inactive one
    got = decode_attention.attend(q, k, v, slots, positions, 0.125, window)
    with native.torch_only():
        want = decode_attention.attend(q, k, v, slots, positions, 0.125, window)
    assert got.shape == want.shape == (1, 3, 6, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_a_user_sees_only_its_positions():
    q, k, v, slots = _case(users=1)
    out = decode_attention.attend(q, k, v, slots, torch.tensor([20]), 0.125)
    changed = k.clone()
    changed[slots[0, 1], :, 5:] = 7.0  # positions 21.. of the user's second block
    assert torch.equal(decode_attention.attend(q, changed, v, slots, torch.tensor([20]), 0.125), out)
    changed[slots[0, 1], :, 4] = 7.0  # position 20 itself
    assert not torch.equal(decode_attention.attend(q, changed, v, slots, torch.tensor([20]), 0.125), out)


def test_a_user_gets_the_same_bits_alone_in_a_batch_and_on_any_thread_count():
    q, k, v, slots = _case(users=24, kv_heads=2, group=2)
    positions = torch.randint(0, 60, (24,), generator=torch.Generator().manual_seed(1))
    batch = decode_attention.attend(q, k, v, slots, positions, 0.1)
    alone = decode_attention.attend(q[:, 7:8], k, v, slots[7:8], positions[7:8], 0.1)
    assert torch.equal(batch[:, 7:8], alone)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert torch.equal(decode_attention.attend(q, k, v, slots, positions, 0.1), batch)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(1, 1, 1, 576), (1, 1, 70, 576), (2, 3, 5, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_kernel_agrees_with_torch(shape, dtype):
    from runtime.emulator import row_kernels

    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g)
    assert native.library("row_kernels", row_kernels.SIGNATURES) is not None, native.why("row_kernels")
    got = row_kernels.rms_norm(x, w, 1e-5)
    with native.torch_only():
        want = row_kernels.rms_norm(x, w, 1e-5)
    assert got.dtype == want.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=2e-6)
    torch.testing.assert_close(row_kernels.rms_norm(x, None, 1e-5), torch.nn.functional.rms_norm(x.float(), (shape[-1],), None, 1e-5),
                               atol=1e-5, rtol=2e-6)


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_kernel_is_the_torch_path_bit_for_bit(decode, dtype):
    """The rotation matrix as a signed permutation: the same products and sums as torch's
    tile matmul (exact: one +-1 term per column) and addcmul."""
    from models_ref.rope import transformation_matrix
    from runtime.emulator import row_kernels

    g = torch.Generator().manual_seed(int(decode))
    x = torch.randn((1, 4, 9, 64) if decode else (1, 9, 40, 64), generator=g).to(torch.bfloat16)
    rows = (1, 4, 1, 64) if decode else (1, 1, 40, 64)
    cos, sin = torch.rand(rows, generator=g).to(dtype), torch.rand(rows, generator=g).to(dtype)
    t = transformation_matrix().reshape(1, 1, 32, 32)
    assert row_kernels.signed_permutation(t) is not None
    got = row_kernels.rotary(x, cos, sin, t)
    with native.torch_only():
        want = row_kernels.rotary(x, cos, sin, t)
    assert torch.equal(got, want)
    scrambled = t.clone()
    scrambled[0, 0, 0, 0] = 0.5  # not a signed permutation: torch's matmul path
    assert row_kernels.signed_permutation(scrambled) is None
    assert torch.equal(row_kernels.rotary(x, cos, sin, scrambled),
                       torch.addcmul(x.float() * cos.float(), (x.float().unflatten(-1, (-1, 32)) @ scrambled[0, 0]).flatten(-2),
                                     sin.float()))
