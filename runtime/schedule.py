"""The scheduling rules, once: how a prompt is padded and chunked, how many KV blocks a
user reserves and how large the page pool is. The runtime schedules with them and the
compiler plans memory with them (passes/paged_kv.py, passes/memory_plan.py), so what the
planner promises is what the runtime does. Torch-free.

Prefill shapes follow the reference: at least 128 rows, then powers of two up to 2048,
then multiples of 2048 (ttnn's prefill kernels take these shapes).
"""
from __future__ import annotations

MIN_PREFILL_ROWS = 128  # the smallest prefill the reference pads to
PREFILL_STEP = 2048  # above this, prefill pads to multiples of it
DEFAULT_POOL_BLOCKS = 1024  # the reference's PagedAttentionConfig default


def prefill_rows(length: int) -> int:
    """Rows a prompt of `length` tokens is padded to."""
    if length <= MIN_PREFILL_ROWS:
        return MIN_PREFILL_ROWS
    power = 1 << (length - 1).bit_length()
    return min(power, -(-length // PREFILL_STEP) * PREFILL_STEP)


def round_context(tokens: int) -> int:
    """The largest context <= `tokens` that padded prompts use in full: a multiple of
    PREFILL_STEP above 2 x PREFILL_STEP, else a power of two."""
    if tokens >= 2 * PREFILL_STEP:
        return tokens // PREFILL_STEP * PREFILL_STEP
    return 1 << max(int(tokens).bit_length() - 1, 0) if tokens > 0 else 1


def chunk_candidates(limit: int) -> list[int]:
    """Prefill chunk sizes a program may be compiled for, up to `limit`: powers of two
    from MIN_PREFILL_ROWS (each divides every padded prompt at least its size)."""
    out, chunk = [], MIN_PREFILL_ROWS
    while chunk <= limit:
        out.append(chunk)
        chunk *= 2
    return out


def prefill_chunk(rows: int, max_chunk: int, block_size: int) -> int:
    """The chunk a padded prompt of `rows` is prefilled in: the largest power-of-two
    fraction of `max_chunk` that divides `rows` and is whole KV blocks."""
    chunk = min(max_chunk, rows)
    while rows % chunk or chunk % block_size:
        chunk //= 2
        if chunk < block_size:
            raise ValueError(f"cannot split a {rows}-row prefill into chunks of at most {max_chunk}")
    return chunk


def chunks(length: int, max_chunk: int, block_size: int) -> list[tuple[int, int]]:
    """(start, rows) of each prefill call for a prompt of `length` tokens, in order."""
    rows = prefill_rows(length)
    chunk = prefill_chunk(rows, max_chunk, block_size)
    return [(start, chunk) for start in range(0, rows, chunk)]


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def reservation(prompt_len: int, max_new: int, max_seq_len: int) -> int:
    """KV positions a user holds for its whole life: the padded prompt rows (prefill
    writes them all) or prompt + generation, whichever is more, at most the context."""
    return min(max(prefill_rows(prompt_len), prompt_len + max_new), max_seq_len)


class PoolTooSmall(ValueError):
    pass


def pool_blocks(requested: int | None, max_seq_len: int, block_size: int) -> int:
    """Blocks of the KV page pool. ttnn's paged ops need more blocks than one page-table
    row (max_num_blocks_per_seq < max_num_blocks): by default the pool is
    max(DEFAULT_POOL_BLOCKS, one full-length user + 1); a requested size that cannot
    hold one user is refused."""
    per_user = blocks_for(max_seq_len, block_size)
    if requested is None:
        return max(DEFAULT_POOL_BLOCKS, per_user + 1)
    if requested <= per_user:
        raise PoolTooSmall(
            f"--max-num-blocks {requested} cannot hold one user: max-seq-len {max_seq_len} needs "
            f"{per_user} blocks of {block_size} tokens and ttnn needs a larger pool than a page-table "
            f"row; use --max-num-blocks {per_user + 1} or more, or a smaller --max-seq-len")
    return requested
