"""The mesh emulator with the chips as leading dimensions: one torch op per program op.

Every value is one tensor `[rows, cols, *shape]` over the mesh (rows x cols chips, row
major), where a leading dimension of size 1 means every chip along that mesh axis holds
the same tensor: a replicated weight is `[1, 1, ...]`, a tensor split over both axes
`[rows, cols, ...]`, the result of an all_reduce over axis 0 `[1, cols, ...]`. Ops whose
inputs are all replicated run once, as on one chip; others run batched over the chips
(BATCHED: adapters of ops.py's implementations to the leading dimensions); any other op
runs chip by chip and its results are stacked (correct for every op, only slower).
Collectives are reductions and concatenations over the leading dimensions, summing in
the order the per-chip emulator does, so results are bit for bit the same.

Paged KV caches are MeshPagePool (pools.py): memory for the blocks written only; their
adapters are mesh_paged.py. Matmul operands whose chips hold equal pieces hold each once
(shared_pieces.py).

Spread over processes (ranks.py), a process's mesh values hold only its block of the
leading dimensions; `run`'s `full_along` gives a collective's input the whole stack
along the collective's axis, so the collectives here run unchanged.
"""
from __future__ import annotations

import torch

from lowering.program import resolve_scalar

from . import exact_gemm, fidelity
from .fidelity import PreparedWeight
from .pools import MeshPagePool
from .shared_pieces import SharedPieces, share_equal_pieces

LEAD = 2  # leading dimensions: mesh rows, mesh columns
BATCHED = {}
MESH_COLLECTIVES = {}


def batched(*names):
    def register(fn):
        for name in names:
            BATCHED[name] = fn
        return fn
    return register


def _d(dim: int) -> int:
    """A per-chip dimension index on a stacked tensor."""
    return dim + LEAD if dim >= 0 else dim


def _is_replicated(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.shape[0] == 1 and value.shape[1] == 1
    if isinstance(value, list):
        return all(_is_replicated(v) for v in value)
    if isinstance(value, SharedPieces):
        return False
    if isinstance(value, PreparedWeight):
        return _is_replicated(value.values)
    return not isinstance(value, MeshPagePool)


def _one(value):
    """A replicated mesh value as one chip's value."""
    if isinstance(value, torch.Tensor):
        return value[0, 0]
    if isinstance(value, list):
        return [_one(v) for v in value]
    if isinstance(value, PreparedWeight):
        return value.with_values(value.values[0, 0])
    return value


def _pick(value, i: int, j: int):
    """Chip (i, j)'s value of a mesh value (a view: in-place writes reach the stack)."""
    if isinstance(value, torch.Tensor):
        return value[i if value.shape[0] > 1 else 0, j if value.shape[1] > 1 else 0]
    if isinstance(value, list):
        return [_pick(v, i, j) for v in value]
    if isinstance(value, SharedPieces):
        return value.with_values(value.piece(i, j))
    if isinstance(value, PreparedWeight):
        return value.with_values(_pick(value.values, i, j))
    if isinstance(value, MeshPagePool):
        raise TypeError("a paged cache reached an op without a batched implementation")
    return value


def _lead_of(values) -> tuple[int, int]:
    rows = cols = 1
    for v in values:
        if isinstance(v, list):
            r, c = _lead_of(v)
        elif isinstance(v, SharedPieces):
            r, c = v.lead
        elif isinstance(v, PreparedWeight):
            r, c = v.values.shape[:LEAD]
        elif isinstance(v, (torch.Tensor, MeshPagePool)):
            r, c = (v.lead if isinstance(v, MeshPagePool) else v.shape[:LEAD])
        else:
            continue
        rows, cols = max(rows, r), max(cols, c)
    return rows, cols


def stack(result, lead):
    """Per-chip results (row-major list over `lead`) as one mesh value."""
    first = result[0]
    if first is None:
        return None
    if isinstance(first, (list, tuple)):
        return [stack([r[k] for r in result], lead) for k in range(len(first))]
    return torch.stack(result).reshape(*lead, *first.shape)


def per_chip(impl, args, kwargs):
    """The op on every chip in turn, results stacked."""
    lead = _lead_of(list(args) + list(kwargs.values()))
    results = [impl(*[_pick(a, i, j) for a in args], **{k: _pick(v, i, j) for k, v in kwargs.items()})
               for i in range(lead[0]) for j in range(lead[1])]
    return stack(results, lead)


def run(steps, env: dict, scalars: dict, round_to, full_along=None) -> int:
    """Run prepared steps (steps.Step) on mesh values in `env`; `round_to(value, dtype)`
    rounds results to their device dtype; `full_along(value, axis)` (ranks: a block of
    the mesh per process) the whole stack along a collective's axis. Returns the number
    of collectives run."""
    collectives = 0
    for step in steps:
        bound = step.bound
        args = list(bound.args)
        for i, name in bound.tensor_args:
            args[i] = [env[n] for n in name] if isinstance(name, list) else env[name]
        for i, template in bound.scalar_args:
            args[i] = resolve_scalar(template, scalars)
        kwargs = dict(bound.kwargs)
        for key, name in bound.tensor_kwargs:
            kwargs[key] = env[name]
        for key, template in bound.scalar_kwargs:
            kwargs[key] = resolve_scalar(template, scalars)
        name = step.op.op
        if step.collective:
            if full_along is not None:
                args[0] = full_along(args[0], kwargs.get("cluster_axis", 0))
            result = MESH_COLLECTIVES[name](*args, **kwargs)
            collectives += 1
        elif all(_is_replicated(args[i]) for i, _ in bound.tensor_args) and \
                all(_is_replicated(kwargs[k]) for k, _ in bound.tensor_kwargs):
            result = step.impl(*[_one(a) for a in args], **{k: _one(v) for k, v in kwargs.items()})
            result = _as_mesh(result)
        else:
            adapter = BATCHED.get(name)
            result = adapter(step.impl, *args, **kwargs) if adapter else per_chip(step.impl, args, kwargs)
        if step.out:
            results = result if len(step.out) > 1 else [result]
            for out, dtype, r in zip(step.out, step.out_dtypes, results):
                env[out] = round_to(r, dtype)
        for out in step.release:
            del env[out]
    return collectives


def _as_mesh(result):
    if result is None:
        return None
    if isinstance(result, (list, tuple)):
        return [r[None, None] for r in result]
    return result[None, None]


# ---------------------------------------------------------------- batched adapters
# Each takes the per-chip implementation first (for a fallback), then the op's arguments
# as mesh values, and returns mesh values.
@batched("ttnn.typecast", "ttnn.to_memory_config", "ttnn.to_layout", "ttnn.add", "ttnn.mul", "ttnn.silu",
         "ttnn.gelu")
def _elementwise(impl, *args, **kwargs):
    """Ops that read only trailing dimensions (elementwise, last-dim maths): unchanged."""
    return impl(*args, **kwargs)


@batched("ttnn.experimental.rotary_embedding_llama")
def _rotary(impl, x, cos, sin, trans_mat, **kwargs):
    if not _is_replicated(trans_mat):
        return per_chip(impl, (x, cos, sin, trans_mat), kwargs)
    return impl(x, cos, sin, trans_mat[0, 0], **kwargs)


@batched("ttnn.rms_norm")
def _rms_norm(impl, x, *args, weight=None, **kwargs):
    if weight is not None and not _is_replicated(weight):
        return per_chip(impl, (x, *args), dict(kwargs, weight=weight))
    return impl(x, *args, weight=None if weight is None else weight[0, 0], **kwargs)


@batched("ttnn.unsqueeze_to_4D")
def _unsqueeze(impl, t):
    return t.reshape(*t.shape[:LEAD], *(1,) * (4 + LEAD - t.dim()), *t.shape[LEAD:])


@batched("ttnn.transpose")
def _transpose(impl, t, dim1, dim2, memory_config=None):
    return t.transpose(_d(dim1), _d(dim2))


@batched("ttnn.reshape")
def _reshape(impl, t, shape, memory_config=None):
    return t.reshape(*t.shape[:LEAD], *shape)


@batched("ttnn.slice")
def _slice(impl, t, slice_start, slice_end, memory_config=None):
    return t[(slice(None),) * LEAD + tuple(slice(s, e) for s, e in zip(slice_start, slice_end))]


def _split_qkv(x, num_heads, num_kv_heads):
    head_dim = x.shape[-1] // (num_heads + 2 * num_kv_heads)
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    lead, rows = x.shape[:LEAD], x.shape[-2]
    return [x[..., a:b].reshape(*lead, 1, rows, n, head_dim)
            for a, b, n in ((0, q_end, num_heads), (q_end, k_end, num_kv_heads),
                            (k_end, x.shape[-1], num_kv_heads))]


@batched("ttnn.experimental.nlp_create_qkv_heads_decode")
def _qkv_heads_decode(impl, x, num_heads, num_kv_heads, memory_config=None):
    return _split_qkv(x, num_heads, num_kv_heads)


@batched("ttnn.experimental.nlp_create_qkv_heads")
def _qkv_heads(impl, x, num_heads, num_kv_heads, transpose_k_heads=True, memory_config=None):
    q, k, v = (t.transpose(-3, -2) for t in _split_qkv(x, num_heads, num_kv_heads))
    return [q, k.transpose(-2, -1) if transpose_k_heads else k, v]


@batched("ttnn.experimental.nlp_concat_heads_decode")
def _concat_heads_decode(impl, x, num_heads=None, memory_config=None):
    batch, head_dim = x.shape[-3], x.shape[-1]
    return x[..., :num_heads, :].reshape(*x.shape[:LEAD], 1, 1, batch, num_heads * head_dim)


@batched("ttnn.experimental.nlp_concat_heads")
def _concat_heads(impl, x, memory_config=None):
    heads, rows, head_dim = x.shape[-3:]
    return x.transpose(-3, -2).reshape(*x.shape[:LEAD], 1, 1, rows, heads * head_dim)


@batched("ttnn.linear")
def _linear(impl, a, weight, bias=None, dtype=None, memory_config=None, compute_kernel_config=None,
            activation=None):
    """fidelity.linear with each chip's prepared weight, every chip in one batched product:
    the same float64 products and sums (exact, so independent of how the GEMM is batched)
    and the same rounding. A replicated activation meets each distinct piece once."""
    kw = dict(bias=bias, dtype=dtype, compute_kernel_config=compute_kernel_config)
    if isinstance(weight, PreparedWeight) and _is_replicated(weight) and (bias is None or _is_replicated(bias)):
        return impl(a, _one(weight), bias=None if bias is None else bias[0, 0], dtype=dtype,
                    compute_kernel_config=compute_kernel_config)
    if not isinstance(weight, PreparedWeight) or (bias is not None and not _is_replicated(bias)):
        return per_chip(impl, (a, weight), kw)
    bias = None if bias is None else bias[0, 0]
    pieces, chip_piece, lead = _pieces(weight, a.shape[:LEAD])
    k = a.shape[-1]
    zero = weight.zero_pieces()  # padding pieces: no reads, +0 results
    if _is_replicated(a):
        out = fidelity.prepared_product(a[0, 0].reshape(1, -1, k), pieces, weight, bias, dtype, zero=zero)
        out = out[chip_piece]
    else:
        rows = a.expand(*lead, *a.shape[LEAD:]).reshape(lead[0] * lead[1], -1, k)
        out = fidelity.prepared_product(rows, pieces, weight, bias, dtype, chip_piece, zero)
    return out.reshape(*lead, *a.shape[LEAD:-1], out.shape[-1])


def _pieces(weight: PreparedWeight, act_lead) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """A mesh operand met by an activation of leading dims `act_lead`, as (its distinct
    pieces [U, N, K], the piece index of each entry of the product's leading dims, those
    dims)."""
    if isinstance(weight, SharedPieces):
        return weight.values, weight.chip_piece, weight.lead
    values = weight.values
    held = tuple(values.shape[:LEAD])
    lead = tuple(max(h, a) for h, a in zip(held, act_lead))
    return values.flatten(0, LEAD - 1), held_entry(held, lead), lead


_HELD_ENTRIES: dict[tuple, torch.Tensor] = {}


def held_entry(held: tuple, lead: tuple) -> torch.Tensor:
    """[rows * cols] of `lead`'s chips (row-major): the entry of a value held as `held`
    leading dims, flattened, that each chip reads (a size-1 axis: every chip the same)."""
    if (held, lead) not in _HELD_ENTRIES:
        rows = torch.arange(lead[0]) * (held[0] > 1)
        cols = torch.arange(lead[1]) * (held[1] > 1)
        _HELD_ENTRIES[held, lead] = (rows[:, None] * held[1] + cols[None, :]).flatten()
    return _HELD_ENTRIES[held, lead]


# ---------------------------------------------------------------- collectives
def _parts(x: torch.Tensor, axis: int, size: int) -> list[torch.Tensor]:
    """The group members along mesh `axis`, in order (a replicated axis: the same tensor)."""
    if x.shape[axis] == 1:
        return [x] * size
    return [x.narrow(axis, i, 1) for i in range(size)]


def _collective(name):
    def register(fn):
        MESH_COLLECTIVES[name] = fn
        return fn
    return register


@_collective("ttnn.all_reduce")
def _all_reduce(x, *, mesh_shape, cluster_axis=0, num_links=1, memory_config=None, topology=None):
    return sum(p.float() for p in _parts(x, cluster_axis, mesh_shape[cluster_axis]))  # ops.all_reduce's order


@_collective("ttnn.all_gather")
def _all_gather(x, dim, *, mesh_shape, cluster_axis=0, num_links=1, memory_config=None, topology=None):
    return torch.cat(_parts(x, cluster_axis, mesh_shape[cluster_axis]), dim=_d(dim))


# ---------------------------------------------------------------- building mesh values
def stack_pieces(pieces: list, mesh_shape) -> torch.Tensor:
    """A per-chip list (row-major) as one mesh value, keeping a leading dimension of 1
    along each mesh axis whose chips hold the very same object (no copy when all do)."""
    rows, cols = mesh_shape
    if all(p is pieces[0] for p in pieces):
        return pieces[0][None, None]
    if all(pieces[r * cols + c] is pieces[c] for r in range(rows) for c in range(cols)):
        return torch.stack(pieces[:cols])[None]
    if all(pieces[r * cols + c] is pieces[r * cols] for r in range(rows) for c in range(cols)):
        return torch.stack([pieces[r * cols] for r in range(rows)])[:, None]
    return torch.stack(pieces).reshape(rows, cols, *pieces[0].shape)


def stack_weight(pieces: list, mesh_shape):
    """stack_pieces for tensors or fidelity.PreparedWeight pieces."""
    if isinstance(pieces[0], PreparedWeight):
        distinct = list({id(p): p for p in pieces}.values())
        by_id = {id(p): v for p, v in zip(distinct, exact_gemm.same_form([p.values for p in distinct]))}
        stacked = PreparedWeight(stack_pieces([by_id[id(p)] for p in pieces], mesh_shape), pieces[0].parts,
                                 pieces[0].multiplier, all(p.as_stored for p in distinct))
        return share_equal_pieces(stacked)
    return stack_pieces(pieces, mesh_shape)


def chip_views(value, mesh_shape) -> list:
    """A mesh value as the per-chip list (views into it)."""
    rows, cols = mesh_shape
    return [_pick(value, r, c) for r in range(rows) for c in range(cols)]


from . import mesh_paged  # noqa: E402,F401  (registers the paged-cache adapters)
