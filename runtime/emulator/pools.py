"""KV page pools whose blocks get memory when first written.

A paged cache is `[num_blocks, Hkv, block_size, head_dim]` per chip, but a run touches
only the blocks its users' page tables name. A pool keeps a slot map (block -> row of a
growing storage tensor; slot 0 is a block of zeros that stands for every block never
written), so memory follows the blocks written, not the pool's size.

PagePool is one chip's cache and answers the indexing the emulator's paged ops use
(`cache[blocks]`, `cache[block, :, offset] = rows`, `cache.shape`, `cache.dtype`), with
the same results a dense zero-initialised tensor would give. MeshPagePool holds the same
cache for a stack of chips (leading dimensions, runtime/emulator/mesh.py); every chip
writes the same blocks (page tables are replicated), so one slot map serves them all.
"""
from __future__ import annotations

import torch

FIRST_SLOTS = 8  # storage rows allocated up front (slot 0: the zero block)


class _Slots:
    """Block -> storage slot, growing the storage (dimension `axis`) when blocks are new."""

    def __init__(self, num_blocks: int):
        self.slot_of = torch.zeros(num_blocks, dtype=torch.int64)
        self.used = 1

    def lookup(self, blocks):
        """Slots of `blocks` (int, tensor or slice); unwritten blocks read slot 0 (zeros)."""
        if isinstance(blocks, int):
            return int(self.slot_of[blocks])
        return self.slot_of[blocks]

    def claim(self, blocks, storage: torch.Tensor, axis: int):
        """Slots for writing `blocks`, new ones allocated; returns (slots, storage)."""
        if isinstance(blocks, int) and int(self.slot_of[blocks]):  # decode: a block already written
            return int(self.slot_of[blocks]), storage
        if isinstance(blocks, torch.Tensor) and blocks.numel() == 1 and int(self.slot_of[blocks.reshape(-1)[0]]):
            return self.slot_of[blocks], storage
        if isinstance(blocks, int):
            blocks = torch.tensor([blocks])
            single = True
        else:
            whole = torch.arange(self.slot_of.shape[0])
            blocks = whole[blocks] if isinstance(blocks, slice) else torch.as_tensor(blocks, dtype=torch.int64)
            single = False
        new = torch.unique(blocks[self.slot_of[blocks] == 0])
        if new.numel():
            self.slot_of[new] = torch.arange(self.used, self.used + new.numel())
            self.used += new.numel()
            if self.used > storage.shape[axis]:
                grow = list(storage.shape)
                grow[axis] = max(self.used, 2 * storage.shape[axis]) - storage.shape[axis]
                storage = torch.cat([storage, storage.new_zeros(grow)], dim=axis)
        slots = self.slot_of[blocks]
        return (int(slots[0]) if single else slots), storage


class PagePool:
    """One chip's paged cache, allocated block by block as it is written."""

    def __init__(self, shape, dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.slots = _Slots(self.shape[0])
        self.storage = torch.zeros((FIRST_SLOTS, *self.shape[1:]), dtype=dtype)

    def _split(self, index):
        return (index[0], index[1:]) if isinstance(index, tuple) else (index, ())

    def __getitem__(self, index):
        blocks, rest = self._split(index)
        return self.storage[(self.slots.lookup(blocks),) + rest]

    def __setitem__(self, index, value):
        blocks, rest = self._split(index)
        slots, self.storage = self.slots.claim(blocks, self.storage, 0)
        self.storage[(slots,) + rest] = value

    def storage_blocks(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(storage [S, Hkv, bs, hd], the slots of `blocks` in it): reading through the
        slots gives cache[blocks] without gathering it."""
        return self.storage, self.slots.lookup(blocks)

    def dense(self) -> torch.Tensor:
        """The whole cache as a tensor (tests, debugging)."""
        return self.storage[self.slots.slot_of]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()


class MeshPagePool:
    """A paged cache on a stack of chips: storage `[*lead, slots, Hkv, bs, hd]`."""

    def __init__(self, lead, shape, dtype: torch.dtype):
        self.lead = tuple(lead)
        self.shape = torch.Size(shape)  # one chip's cache
        self.dtype = dtype
        self.slots = _Slots(self.shape[0])
        self.storage = torch.zeros((*self.lead, FIRST_SLOTS, *self.shape[1:]), dtype=dtype)

    @property
    def block_size(self) -> int:
        return self.shape[2]

    def write_rows(self, blocks: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor) -> None:
        """rows [*lead, n, Hkv, hd] into (block, offset) pairs."""
        slots, self.storage = self.slots.claim(blocks, self.storage, len(self.lead))
        flat = self.storage.flatten(0, len(self.lead) - 1)
        flat[:, slots, :, offsets] = rows.flatten(0, len(self.lead) - 1).transpose(0, 1).to(self.dtype)

    def write_blocks(self, blocks: torch.Tensor, data: torch.Tensor) -> None:
        """data [*lead, n, Hkv, bs, hd] into whole blocks."""
        slots, self.storage = self.slots.claim(blocks, self.storage, len(self.lead))
        self.storage.flatten(0, len(self.lead) - 1)[:, slots] = data.flatten(0, len(self.lead) - 1)

    def chip(self, index: tuple) -> torch.Tensor:
        """One chip's whole cache as a dense tensor (tests, debugging)."""
        lead = tuple(i if n > 1 else 0 for i, n in zip(index, self.lead))
        return self.storage[lead][self.slots.slot_of]

    def zero_rows(self, row: int) -> None:
        raise NotImplementedError("a paged cache has no per-user rows")

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
