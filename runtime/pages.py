"""The KV page allocator: hands cache blocks to users and takes them back.

Blocks are handed out in a scrambled order (as the seed's demo does) so that nothing can
work only because a user's pages happen to be contiguous. Reservations are all or
nothing: a user either gets every block it asked for or none, so a request that does not
fit never disturbs another user's pages.
"""
from __future__ import annotations

import numpy as np

from . import schedule


class PagePoolExhausted(ValueError):
    pass


class PageAllocator:
    def __init__(self, num_blocks: int, block_size: int, blocks_per_user: int, seed: int = 0,
                 first_block: int = 0):
        """Hands out blocks first_block..num_blocks-1 (`num_blocks` afterwards counts those:
        the serving engine keeps block 0 out of every user's hands, runtime/engine.py)."""
        self.num_blocks, self.block_size, self.blocks_per_user = num_blocks - first_block, block_size, blocks_per_user
        order = np.random.default_rng(seed).permutation(self.num_blocks) + first_block
        self._order = order.tolist()
        self.reset()

    def reset(self) -> None:
        self._free = list(self._order)
        self._owned: dict[int, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return schedule.blocks_for(tokens, self.block_size)

    def fits(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= min(self.free_blocks, self.blocks_per_user)

    def reserve(self, user: int, tokens: int) -> list[int]:
        """Make sure `user` owns blocks for its first `tokens` positions."""
        owned = self._owned.setdefault(user, [])
        need = self.blocks_for(tokens) - len(owned)
        if self.blocks_for(tokens) > self.blocks_per_user:
            raise PagePoolExhausted(
                f"user {user} needs {tokens} positions, more than max-seq-len "
                f"({self.blocks_per_user * self.block_size})")
        if need > len(self._free):
            raise PagePoolExhausted(
                f"the KV page pool is exhausted: user {user} needs {need} more blocks of "
                f"{self.block_size} tokens, {len(self._free)} of {self.num_blocks} are free "
                "(recompile with a larger --max-num-blocks, or run fewer users at once)")
        if need > 0:
            owned += self._free[:need]
            del self._free[:need]
        return owned

    def release(self, user: int) -> None:
        self._free += self._owned.pop(user, [])

    def row(self, user: int) -> np.ndarray:
        """The user's page-table row [blocks_per_user]; unowned entries point at block 0
        and are never read (attention stops at the user's position)."""
        row = np.zeros(self.blocks_per_user, dtype=np.int64)
        owned = self._owned.get(user, [])
        row[: len(owned)] = owned
        return row

    def table(self, users: int) -> np.ndarray:
        return np.stack([self.row(u) for u in range(users)])
