"""The engine step: a session's prefill and decode functions over page tables the caller
gives. Both servers of a compiled program drive the device through here and nowhere else:
ttserve's scheduler (runtime/serve/scheduler.py, page tables from its own PageAllocator)
and the vLLM model interface (runtime/vllm_model.py, page tables from vLLM's block
manager). So the two issue the same device calls for the same user, and give the same
tokens.

What it guarantees:
- `prefill_chunk` runs one prefill call: one chunk of one user's padded prompt, written
  to the KV blocks of that user's page-table row. ttnn's paged_fill_cache writes a whole
  chunk and wants a block for every `block_size` rows of it, so the chunk's page table
  covers the chunk: rows past the prompt are padding, and their entries past the blocks
  the caller gave (vLLM gives the prompt's blocks only) are NULL_BLOCK, block 0, which
  no user is ever given (vLLM V1 keeps block 0 as its null block the same way; ttserve's
  allocator starts at block 1). A chunk of padding alone is never run. Earlier chunks of
  the same user must have run (each chunk attends to them through the page table).
- `decode` runs one decode step of every slot; a slot at position < 0 is inactive and
  reads and writes no cache. Slots never see each other's blocks: each reads its own row.
- `next_tokens` is the one place where logits become token ids (`Sampler`, per user).
  Programs compiled to sample on the device keep a "decode_logits" function beside
  "decode"; the engine runs that one, so sampling stays per user on the host. Moving it
  to the device changes `decode_tokens` and nothing that calls it.

Call an Engine from one thread only: backends are not thread-safe. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import schedule
from .sampling import sample

TILE = 32
NULL_BLOCK = 0  # no user's block: the padding rows of a prompt's last chunk land here


class EngineError(ValueError):
    pass


@dataclass
class Sampler:
    """How one user's next token is chosen: greedy (temperature 0) or temperature with
    top-p, from the user's own random generator (seeded by `seed`), so a user's draws do
    not depend on who shares the batch."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    def choose(self, logits: np.ndarray) -> int:
        """logits [V] -> the next token id."""
        return int(sample(logits[None], self.temperature, self.top_p, self.rng)[0])


class Engine:
    def __init__(self, session):
        if not session.paged:
            raise EngineError("serving needs a paged program (compile without --no-paged-attention)")
        self.session = session
        options = session.program.options
        self.block_size = int(options["block_size"])
        self.num_blocks = int(options["max_num_blocks"])
        self.max_seq_len = session.max_seq_len
        self.blocks_per_user = self.max_seq_len // self.block_size
        self.batch_size = session.batch_size
        self.vocab_size = session.vocab_size
        functions = session.program.functions
        self._decode_function = "decode_logits" if "decode_logits" in functions else "decode"

    # ------------------------------------------------------------------ prefill
    def chunks(self, prompt_len: int) -> list[tuple[int, int]]:
        """(start, rows) of the prefill calls of a prompt: its padded rows in chunks
        (runtime.schedule's rules), without the chunks that hold only padding."""
        if not 0 < prompt_len < self.max_seq_len:
            raise EngineError(f"a prompt of {prompt_len} tokens does not fit max-seq-len {self.max_seq_len}")
        rows = min(schedule.prefill_rows(prompt_len), self.max_seq_len)
        chunk = schedule.prefill_chunk(rows, self.session.max_prefill_chunk, self.block_size)
        return [(start, chunk) for start in range(0, rows, chunk) if start < prompt_len]

    def table_row(self, blocks) -> np.ndarray:
        """A page-table row of the program's width [blocks_per_user] from a user's blocks
        (entries past them are NULL_BLOCK: only a prompt's padding is written there, and
        nothing reads it)."""
        blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
        if len(blocks) > self.blocks_per_user:
            if np.any(blocks[self.blocks_per_user:]):
                raise EngineError(f"a page-table row of {len(blocks)} blocks exceeds max-seq-len "
                                  f"{self.max_seq_len} ({self.blocks_per_user} blocks of {self.block_size})")
            blocks = blocks[: self.blocks_per_user]
        if len(blocks) and (blocks.min() < 0 or blocks.max() >= self.num_blocks):
            raise EngineError(f"page-table entries must be blocks 0..{self.num_blocks - 1} of the pool")
        row = np.full(self.blocks_per_user, NULL_BLOCK, dtype=np.int64)
        row[: len(blocks)] = blocks
        return row

    def prefill_chunk(self, token_ids, start: int, rows: int, row: np.ndarray, slot: int) -> np.ndarray | None:
        """One prefill call: prompt rows start..start+rows of the user whose page-table row
        is `row` (slot: the user's decode slot, for programs with per-slot state).
        Returns the logits [V] at the last prompt position when this chunk holds it."""
        length = len(token_ids)
        tokens = np.zeros((1, rows), dtype=np.int64)
        real = token_ids[start:start + rows]
        tokens[0, : len(real)] = real
        first, end = start // self.block_size, (start + rows) // self.block_size
        inputs = {"tokens": tokens, "positions": np.arange(start, start + rows)[None],
                  "page_table": row[None], "chunk_page_table": row[None, first:end],
                  **self.session.images.prefill_inputs(slot, start, rows)}
        last = length - 1
        local = min(max(last - start, 0), rows - 1)
        tile = local // TILE * TILE
        (logits,) = self.session.backend.run(
            "prefill", inputs, {"chunk_start": start, "user_id": slot, "last_tile_start": tile})
        if not start <= last < start + rows:
            return None
        return logits.reshape(-1, logits.shape[-1])[local - tile, : self.vocab_size]

    def prefill(self, token_ids, row: np.ndarray, slot: int) -> np.ndarray:
        """Every chunk of one user's prompt; the logits [V] at its last position."""
        result = None
        for start, rows in self.chunks(len(token_ids)):
            logits = self.prefill_chunk(token_ids, start, rows, row, slot)
            result = logits if logits is not None else result
        return result

    # ------------------------------------------------------------------ decode
    def decode(self, tokens: np.ndarray, positions: np.ndarray, table: np.ndarray) -> np.ndarray:
        """One decode step of every slot: tokens/positions [B] (position < 0: inactive),
        page table [B, blocks_per_user] -> logits [B, V]."""
        batch = self.batch_size
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(tokens) != batch or len(positions) != batch or table.shape != (batch, self.blocks_per_user):
            raise EngineError(f"decode takes {batch} slots and a page table [{batch}, {self.blocks_per_user}]; got "
                              f"{len(tokens)} tokens, {len(positions)} positions, table {list(table.shape)}")
        if positions.max() >= self.max_seq_len:
            raise EngineError(f"decode position {int(positions.max())} is past max-seq-len {self.max_seq_len}")
        inputs = {"tokens": tokens[None], "positions": positions[None], "page_table": table,
                  **self.session.images.decode_inputs(positions)}
        (logits,) = self.session.backend.run(self._decode_function, inputs)
        return logits.reshape(-1, logits.shape[-1])[:batch, : self.vocab_size]

    def decode_tokens(self, tokens: np.ndarray, positions: np.ndarray, table: np.ndarray,
                      samplers: list) -> np.ndarray:
        """One decode step -> the next token id of every slot [B] (-1 where the slot's
        sampler is None: inactive)."""
        return next_tokens(self.decode(tokens, positions, table), samplers)


def next_tokens(logits: np.ndarray, samplers: list) -> np.ndarray:
    """Token ids [B] from logits [B, V], each row by its own sampler (None: -1)."""
    out = np.full(len(samplers), -1, dtype=np.int64)
    for slot, sampler in enumerate(samplers):
        if sampler is not None:
            out[slot] = sampler.choose(logits[slot])
    return out
