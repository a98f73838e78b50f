"""Emulator implementations of the TTNN op table, with ttnn's semantics, in torch.

Tensor arguments arrive as torch tensors at their logical (unpadded) shapes; zero tile
padding cannot change any of these results, so it is accounted for in the program's
specs rather than materialised. Results are cast to the op's output dtype by the
executor (bfloat16 rounding, or block-float quantisation for bfloat8_b/bfloat4_b).
Reductions, norms, rotary and attention compute in float32, as the device's fp32
accumulation does; matmuls (ttnn.linear) form their products and round as Wormhole's
matrix unit does, per the op's math fidelity (fidelity.py).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import blockfloat
from . import decode_attention, exact_gemm, fidelity, row_kernels
from .blockfloat_torch import quantize as quantize_blockfloat

TILE = 32
IMPLS = {}


def impl(name):
    def register(fn):
        IMPLS[name] = fn
        return fn
    return register


def quantize_like(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round `values` to a device dtype; block floats are held in bfloat16 (exactly)."""
    if dtype in blockfloat.FORMATS:
        fmt = blockfloat.FORMATS[dtype]
        done = exact_gemm.blockfloat(values, fmt.mantissa_bits, fmt.exponent_bias_offset)
        if done is not None:
            return done
        if values.numel() <= SMALL:  # a KV row per step: numpy's fixed cost is lower
            q = blockfloat.quantize(values.detach().float().numpy(), dtype)
            return torch.from_numpy(q).to(torch.bfloat16)
        return quantize_blockfloat(values, dtype).to(torch.bfloat16)
    return values.to(TORCH_DTYPES[dtype])


SMALL = 4096  # elements: below this the numpy quantiser (same bits) is faster than torch's


TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "bfloat8_b": torch.bfloat16,
                "bfloat4_b": torch.bfloat16, "uint32": torch.int64, "int32": torch.int64}


@impl("ttnn.embedding")
def embedding(ids, weight, layout="TILE", dtype=None, memory_config=None):
    return F.embedding(ids.long(), weight)


@impl("ttnn.unsqueeze_to_4D")
def unsqueeze_to_4d(t):
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


@impl("ttnn.transpose")
def transpose(t, dim1, dim2, memory_config=None):
    return t.transpose(dim1, dim2)


@impl("ttnn.reshape")
def reshape(t, shape, memory_config=None):
    return t.reshape(shape)


@impl("ttnn.slice")
def slice_(t, slice_start, slice_end, memory_config=None):
    return t[tuple(slice(s, e) for s, e in zip(slice_start, slice_end))]


@impl("ttnn.typecast")
def typecast(t, dtype, memory_config=None):
    return t  # the executor rounds to the output spec's dtype


@impl("ttnn.to_memory_config")
def to_memory_config(t, memory_config, dtype=None):
    return t  # placement in device memory does not change values


@impl("ttnn.rms_norm")
def rms_norm(x, epsilon=1e-12, weight=None, memory_config=None, compute_kernel_config=None):
    return row_kernels.rms_norm(x, weight, epsilon)  # one fused float32 kernel


@impl("ttnn.linear")
def linear(a, b_t, bias=None, dtype=None, memory_config=None, compute_kernel_config=None, activation=None):
    # b_t: the [N, K] copy the executor keeps of a [K, N] weight, or that weight as the
    # matrix unit sees it (fidelity.PreparedWeight). Products, accumulation and the packer's
    # rounding follow the compute kernel config (math fidelity, fp32 Dst): fidelity.py.
    return fidelity.linear(a, b_t, bias, dtype, compute_kernel_config)


@impl("ttnn.add")
def add(a, b, dtype=None, memory_config=None):
    return a.float() + b.float() if a.dtype != b.dtype else a + b


@impl("ttnn.mul")
def mul(a, b, input_tensor_a_activations=None, dtype=None, memory_config=None):
    if input_tensor_a_activations:
        assert list(input_tensor_a_activations) == ["silu"], input_tensor_a_activations
        return F.silu(a.float()) * b.float()
    return a * b


@impl("ttnn.silu")
def silu(x, memory_config=None):
    return F.silu(x.float())


def _split_qkv(x, num_heads, num_kv_heads):
    head_dim = x.shape[-1] // (num_heads + 2 * num_kv_heads)
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    rows = x.shape[2]
    return [x[..., a:b].reshape(1, rows, n, head_dim)
            for a, b, n in ((0, q_end, num_heads), (q_end, k_end, num_kv_heads),
                            (k_end, x.shape[-1], num_kv_heads))]


@impl("ttnn.experimental.nlp_create_qkv_heads")
def nlp_create_qkv_heads(x, num_heads, num_kv_heads, transpose_k_heads=True, memory_config=None):
    q, k, v = (t.transpose(1, 2) for t in _split_qkv(x, num_heads, num_kv_heads))
    return [q, k.transpose(2, 3) if transpose_k_heads else k, v]


@impl("ttnn.experimental.nlp_create_qkv_heads_decode")
def nlp_create_qkv_heads_decode(x, num_heads, num_kv_heads, memory_config=None):
    return _split_qkv(x, num_heads, num_kv_heads)


@impl("ttnn.experimental.rotary_embedding_llama")
def rotary_embedding_llama(x, cos, sin, trans_mat, is_decode_mode=False, memory_config=None,
                           compute_kernel_config=None):
    return row_kernels.rotary(x, cos, sin, trans_mat)


@impl("ttnn.fill_cache")
def fill_cache(cache, x, batch_idx, cache_dtype="bfloat16"):
    cache[batch_idx, :, : x.shape[2]] = x[0].to(cache.dtype)


@impl("ttnn.experimental.paged_update_cache")
def paged_update_cache(cache, x, update_idxs_tensor=None, page_table=None, cache_dtype="bfloat16"):
    """Without a page table the cache is [users, Hkv, L, hd]; with one, a block pool.
    Users at a negative position are inactive and write nothing (ttnn's convention)."""
    positions = update_idxs_tensor.long()
    rows = quantize_like(x[0], cache_dtype)
    if page_table is None:
        active = (positions >= 0).nonzero().flatten()
        cache[active, :, positions[active]] = rows[active]
        return
    bs = cache.shape[2]
    if rows.shape[0] == 1:  # one user: plain integer indexing is the cheapest path
        pos = int(positions[0])
        if pos >= 0:
            cache[int(page_table[0, pos // bs]), :, pos % bs] = rows[0]
        return
    users, blocks, offsets = _paged_users(page_table, positions, bs)
    cache[blocks, :, offsets] = rows[users]


@impl("ttnn.experimental.paged_fill_cache")
def paged_fill_cache(cache, x, page_table, batch_idx=0, cache_dtype="bfloat16"):
    bs = cache.shape[2]
    blocks = page_table[batch_idx].long()
    rows = x[0].reshape(x.shape[1], -1, bs, x.shape[3]).transpose(0, 1)  # [n, Hkv, bs, hd]
    cache[blocks] = rows[: len(blocks)].to(cache.dtype)


def _paged_users(page_table, positions, bs):
    """(user, physical block, offset) for every active user (position >= 0)."""
    active = (positions >= 0).nonzero().flatten()
    pos = positions[active].long()
    return active, page_table[active, pos // bs].long(), pos % bs


def _cache_blocks(cache, page_table: torch.Tensor, length: int):
    """(blocks [S, Hkv, bs, hd], slots [B, n]) holding every user's first `length` positions
    through its table row: a dense pool's own blocks, or a page pool's storage and the
    slots its blocks sit in (read in place, never gathered for decode)."""
    table = page_table[:, : -(-length // cache.shape[2])].long()
    return (cache, table) if isinstance(cache, torch.Tensor) else cache.storage_blocks(table)


def _attend(q, k, v, scale, mask=None, causal=False):
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          is_causal=causal, scale=scale)


@impl("ttnn.transformer.scaled_dot_product_attention")
def sdpa(q, k, v, is_causal=True, scale=None, compute_kernel_config=None, program_config=None,
         memory_config=None, sliding_window_size=None, attn_mask=None):
    if attn_mask is not None:  # non-causal with an additive mask (Llama 3.2 Vision)
        return _attend(q, k, v, scale, mask=_additive(attn_mask))
    if sliding_window_size is None:
        return _attend(q, k, v, scale, causal=is_causal)
    pos = torch.arange(q.shape[2])
    return _attend(q, k, v, scale, mask=decode_attention.window_mask(pos, pos, sliding_window_size))


@impl("ttnn.transformer.scaled_dot_product_attention_decode")
def sdpa_decode(q, k_cache, v_cache, cur_pos_tensor=None, scale=None, compute_kernel_config=None,
                program_config=None, memory_config=None, sliding_window_size=None, attn_mask=None,
                is_causal=True):
    if not is_causal:  # every user against its whole cache row, with its mask [1, B, H, L]
        return _masked_decode(q, k_cache, v_cache, attn_mask, scale)
    batch = q.shape[1]  # a dense cache [B, Hkv, L, hd]: one block of L positions per user
    return decode_attention.attend(q, k_cache, v_cache, torch.arange(batch)[:, None], cur_pos_tensor.long(),
                                   scale, sliding_window_size)


@impl("ttnn.transformer.paged_scaled_dot_product_attention_decode")
def paged_sdpa_decode(q, k_cache, v_cache, page_table_tensor=None, cur_pos_tensor=None, scale=None,
                      compute_kernel_config=None, program_config=None, memory_config=None,
                      sliding_window_size=None):
    pos = cur_pos_tensor.long()
    length = max(int(pos.max()) + 1, 1)
    k_blocks, slots = _cache_blocks(k_cache, page_table_tensor, length)
    v_blocks, _ = _cache_blocks(v_cache, page_table_tensor, length)
    return decode_attention.attend(q, k_blocks, v_blocks, slots, pos, scale, sliding_window_size)


def _additive(mask):
    """An additive mask in float32; the device's most negative bfloat16 stands for -inf."""
    return mask.float()


def _masked_decode(q, k_cache, v_cache, mask, scale):
    """q [1, B, H, hd] against rows b of k/v [B, Hkv, L, hd], additive mask [1, B, H, L]."""
    _, batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    qg = q[0].float().reshape(batch, n_kv, n_heads // n_kv, head_dim)
    scores = torch.matmul(qg, k_cache[:batch].float().transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    scores = scores + _additive(mask)[0].reshape(batch, n_kv, n_heads // n_kv, -1)
    out = torch.matmul(scores.softmax(-1), v_cache[:batch].float())
    return out.reshape(1, batch, n_heads, head_dim)


# Query rows per step: scores stay [H, 32, context], never [H, S, context]; and a query
# block's result does not depend on how many rows follow it, so a prefill's padding rows
# can be left out bit for bit (active_rows.prefill_rows).
Q_BLOCK = TILE


@impl("ttnn.transformer.chunked_scaled_dot_product_attention")
def chunked_sdpa(q, k_cache, v_cache, page_table_tensor, chunk_start_idx, scale=None,
                 compute_kernel_config=None, program_config=None, memory_config=None,
                 sliding_window_size=None):
    rows = q.shape[2]
    length = chunk_start_idx + rows
    k = decode_attention.gather(*_cache_blocks(k_cache, page_table_tensor[:1], length), length)  # [1, Hkv, length, hd]
    v = decode_attention.gather(*_cache_blocks(v_cache, page_table_tensor[:1], length), length)
    out = []
    for first in range(0, rows, Q_BLOCK):  # flash-style: query blocks see keys up to their end
        last = min(first + Q_BLOCK, rows)
        end = chunk_start_idx + last
        mask = decode_attention.window_mask(torch.arange(chunk_start_idx + first, end), torch.arange(end), sliding_window_size)
        out.append(_attend(q[:, :, first:last], k[:, :, :end], v[:, :, :end], scale, mask=mask))
    return torch.cat(out, dim=2)


# ---------------------------------------------------------------- Llama 3.2 Vision
@impl("ttnn.layer_norm")
def layer_norm(x, epsilon=1e-12, weight=None, bias=None, memory_config=None, compute_kernel_config=None):
    xf = x.float()
    return F.layer_norm(xf, (xf.shape[-1],), weight.reshape(-1).float(), bias.reshape(-1).float(), epsilon)


@impl("ttnn.gelu")
def gelu(x, memory_config=None):
    return F.gelu(x.float())


@impl("ttnn.concat")
def concat(tensors, dim, memory_config=None):
    dtype = torch.float32 if any(t.dtype == torch.float32 for t in tensors) else tensors[0].dtype
    return torch.cat([t.to(dtype) for t in tensors], dim=dim)


@impl("ttnn.permute")
def permute(t, dims, memory_config=None):
    return t.permute(*dims)


@impl("ttnn.to_layout")
def to_layout(t, layout, dtype=None, memory_config=None):
    return t  # the layout changes where values sit in memory, not the values


@impl("ttnn.pad")
def pad(t, padding, value, memory_config=None):
    flat = []
    for before, after in reversed(padding):
        flat += [before, after]
    return F.pad(t, flat, value=value)


@impl("ttnn.repeat")
def repeat(t, repetition_vector, memory_config=None):
    return t.repeat(*repetition_vector)


# ---------------------------------------------------------------- sampling on the device
@impl("ttnn.topk")
def topk(t, k, dim=-1, largest=True, sorted=True, memory_config=None):
    """The k largest along dim, in order; ties go to the lower index (a stable sort), as
    the host's argmax breaks them."""
    order = torch.sort(t.float(), dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
    return [torch.gather(t, dim, order), order]


@impl("ttnn.sampling")
def sampling(values, indices, k=None, p=None, temp=None, seed=None, rngs=None):
    """Per user (row): runtime.sampling.device_distribution over its candidates, with the
    softmax in bfloat16 as the device packs it, and a draw on a 16-bit lattice from the
    user's generator (rngs: the backend's per-user generators, seeded by seed_sampling)."""
    from ..sampling import device_distribution

    rows = values.shape[2]
    out = torch.empty(1, 1, 1, rows, dtype=torch.int64)
    for u in range(rows):
        probs = device_distribution(values[0, 0, u].float().numpy(), int(k[u]), float(p[u]), float(temp[u]))
        probs = torch.tensor(probs).to(torch.bfloat16).double().numpy()
        cumulative = np.cumsum(probs / probs.sum())
        threshold = rngs[u].integers(0, 1 << 16) / (1 << 16)
        position = min(int(np.searchsorted(cumulative, threshold, side="right")), len(probs) - 1)
        out[0, 0, 0, u] = int(indices[0, 0, u, position])
    return out


@impl("ttnn.experimental.nlp_concat_heads")
def nlp_concat_heads(x, memory_config=None):
    _, heads, rows, head_dim = x.shape
    return x.transpose(1, 2).reshape(1, 1, rows, heads * head_dim)


@impl("ttnn.experimental.nlp_concat_heads_decode")
def nlp_concat_heads_decode(x, num_heads=None, memory_config=None):
    _, batch, heads, head_dim = x.shape
    return x[:, :, :num_heads].reshape(1, 1, batch, num_heads * head_dim)


# ---------------------------------------------------------------- collectives
# These take every chip's tensor (a list in row-major chip order) and the mesh shape, and
# return every chip's result: exactly what the mesh's chips hold after the op.
COLLECTIVE_IMPLS = {}


def collective(name):
    def register(fn):
        COLLECTIVE_IMPLS[name] = fn
        IMPLS[name] = fn
        return fn
    return register


def _groups(mesh_shape, axis):
    """Chip indices grouped by every coordinate but `axis`, each group ordered along it."""
    rows, cols = mesh_shape
    if axis == 1:
        return [[r * cols + c for c in range(cols)] for r in range(rows)]
    return [[r * cols + c for r in range(rows)] for c in range(cols)]


def _per_group(inputs, mesh_shape, axis, combine):
    """Apply `combine` to each group of chips along `axis`; every member gets the result.
    Groups holding the very same tensors share one result object, which lets the
    executor compute replicated work once instead of once per chip."""
    out, memo = [None] * len(inputs), {}
    for group in _groups(mesh_shape, axis):
        key = tuple(id(inputs[c]) for c in group)
        if key not in memo:
            memo[key] = combine([inputs[c] for c in group])
        for c in group:
            out[c] = memo[key]
    return out


@collective("ttnn.all_reduce")
def all_reduce(inputs, *, mesh_shape, cluster_axis=0, num_links=1, memory_config=None, topology=None):
    return _per_group(inputs, mesh_shape, cluster_axis, lambda parts: sum(p.float() for p in parts))


@collective("ttnn.all_gather")
def all_gather(inputs, dim, *, mesh_shape, cluster_axis=0, num_links=1, memory_config=None, topology=None):
    return _per_group(inputs, mesh_shape, cluster_axis, lambda parts: torch.cat(parts, dim=dim))
