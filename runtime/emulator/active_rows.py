"""Rows computed only where they matter: a decode step's active users, a prefill's prompt.

A decode program is compiled for its batch (say 32 users) and the device computes every
row of it each step, active or not. A serving batch is rarely full, and on the emulator
each row costs float64 matmuls, so a step with 2 active users of 32 would do 16x the work
it needs. Each row of a paged decode step is one user's, and nothing in the step mixes
rows: matmuls, norms, rotary and residual adds are row-wise (a float64 dot product is
exact, so it does not depend on how many rows the GEMM has), attention reads each user's
KV blocks through that user's page-table row, and a paged cache write goes where the
user's table row and position say. So the emulator runs the step on the active users'
rows only and puts zeros in the inactive rows of its outputs (which the host ignores:
an inactive user's token and logits are never read). Outputs of active users are
bit-identical to a full step (tests/test_active_rows.py).

A function qualifies when every op is in ROW_WISE_OPS and every input comes from a
per-user host array (ROW_SOURCES) with the batch as one of its dimensions; anything else
(contiguous caches indexed by row, cross-attention caches, literal reshapes) runs whole.

Prefill the same way: a prompt is padded to at least 128 rows (the reference's shapes)
and its last chunk is mostly padding. A paged prefill's ops are row-wise or causal
(attention in 32-row query blocks that never look past their last row), so the rows
after the KV block holding the prompt's last token change nothing a later step reads:
the logits come from the last token's tile, and decode writes each later position before
it attends to it. The emulator leaves those rows out (prefill_rows); the KV slots of the
blocks of padding alone keep what they held (on a device: the padding rows' keys and
values), which no step reads before overwriting.
"""
from __future__ import annotations

import numpy as np

from lowering.optable import OPS
from lowering.program import Function

from .ops import TILE

# Host arrays with one entry (or row) per user.
ROW_SOURCES = frozenset({"tokens", "positions", "page_table", "sample_k", "sample_p", "sample_temp"})

# Ops whose result row u comes from input row u only (lowering/optable.py's `rows`): per-user
# caches are reached through the page table, collectives combine chips, never rows.
ROW_WISE_OPS = frozenset(name for name, op in OPS.items() if op.rows == "own")


def batch_of(fn: Function) -> int | None:
    """The users of a decode function: the length of its positions input (None when it
    has none or its length is symbolic, as a prefill's is)."""
    for spec in fn.inputs:
        if spec.source == "positions":
            if not all(isinstance(d, int) for d in spec.shape):
                return None
            return int(np.prod(spec.shape))
    return None


def row_dims(fn: Function) -> dict[str, int] | None:
    """{input name: its user dimension} when `fn` can run on a subset of its users, else
    None. The user dimension is the first of the batch's size (tokens [1, B], cur_pos [B],
    page_table [B, blocks])."""
    batch = batch_of(fn)
    if batch is None or batch <= 1 or any(op.op not in ROW_WISE_OPS for op in fn.ops):
        return None
    dims = {}
    for spec in fn.inputs:
        if spec.source not in ROW_SOURCES or batch not in spec.shape:
            return None
        dims[spec.name] = spec.shape.index(batch)
    for name in fn.outputs:
        shape = fn.tensors[name].shape
        if batch not in shape or not all(isinstance(d, int) for d in shape):
            return None
    return dims


def active_users(fn: Function, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """Indices of the users at a position >= 0, or None when all are active."""
    positions = np.asarray(inputs["positions"]).reshape(-1)
    rows = np.flatnonzero(positions >= 0)
    return None if len(rows) == positions.size else rows


def select(host: dict[str, np.ndarray], dims: dict[str, int], rows: np.ndarray) -> dict:
    """{input name: its array (in its spec's shape) at the users in `rows`}."""
    return {name: np.take(array, rows, axis=dims[name]) for name, array in host.items()}


def scatter(fn: Function, outputs: list[np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
    """Outputs of the users in `rows` placed at their rows of full-batch outputs (zeros
    elsewhere). `outputs` may be None for an empty `rows` (nothing computed)."""
    batch = batch_of(fn)
    full = []
    for i, name in enumerate(fn.outputs):
        shape = list(fn.tensors[name].shape)
        whole = np.zeros(shape, dtype=np.float32)
        if len(rows):
            dim = shape.index(batch)
            index = [slice(None)] * len(shape)
            index[dim] = rows
            whole[tuple(index)] = outputs[i].reshape([len(rows) if d == dim else n for d, n in enumerate(shape)])
        full.append(whole)
    return full


# Ops of a paged prefill whose rows depend only on the rows before them; and ttnn.slice,
# which reads the last prompt tile (prefill_rows keeps the rows through it).
CAUSAL_OPS = frozenset(name for name, op in OPS.items() if op.rows in ("own", "causal")) | {"ttnn.slice"}
PREFILL_SOURCES = frozenset({"tokens", "positions", "page_table", "chunk_page_table"})


def prefill_trimmable(fn: Function) -> bool:
    """A paged prefill of causal ops whose per-row inputs are tokens and positions and
    whose outputs do not grow with its rows (the last tile's logits)."""
    sources = {spec.source for spec in fn.inputs}
    return ("chunk_page_table" in sources and sources <= PREFILL_SOURCES
            and all(op.op in CAUSAL_OPS for op in fn.ops)
            and all(isinstance(d, int) for name in fn.outputs for d in fn.tensors[name].shape))


def prefill_rows(host: dict[str, np.ndarray], scalars: dict, block_size: int) -> int:
    """The rows of a prefill call that reach what the host sees: through the tile its
    logits are read from (last_tile_start: the prompt's last token, in the call that
    holds it), in whole KV blocks; never more than the call has."""
    rows = host["tokens"].shape[-1]
    read = int(scalars.get("last_tile_start", rows - TILE)) + TILE
    step = int(np.lcm(block_size, TILE))
    return min(rows, -(-read // step) * step)


def trim_prefill(host: dict[str, np.ndarray], rows: int, block_size: int) -> dict[str, np.ndarray]:
    """A prefill call's inputs cut to its first `rows` rows (and the blocks they fill)."""
    cut = {"tokens": rows, "positions": rows, "chunk_page_table": rows // block_size}
    return {name: array[..., :cut[name]] if name in cut else array for name, array in host.items()}


class UserGenerators:
    """The per-user sampling generators as a step's rows see them: row i is user rows[i]
    (all users in order when the step computes every row)."""

    def __init__(self, generators: list):
        self.generators = generators
        self.rows: np.ndarray | None = None

    def __getitem__(self, row: int):
        return self.generators[row if self.rows is None else int(self.rows[row])]
