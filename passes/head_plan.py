"""Which attention heads each chip computes, with padding and KV replication.

Pure arithmetic shared by the shard pass and its tests. Heads are assigned so that every
chip holds whole GQA groups (or whole slices of one group): q head h reads KV head
h // group on the reference, and every chip's local grouping reproduces that.

- KV heads >= chips: KV heads are padded to a multiple of the chip count (a padded KV
  head comes with a group of padded q heads) and each chip takes a contiguous block.
- KV heads < chips: each chip takes one KV head (replicated where several chips share
  it) and an even slice of that head's q group, padded so all chips hold the same count.

Padded heads have zero weights in wqkv and zero rows in wo: they attend uniformly, but
what they produce is multiplied by zeros, so they contribute nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PAD = -1  # a padded head: zero weights


@dataclass(frozen=True)
class HeadPlan:
    chips: int
    q_heads: tuple[tuple[int, ...], ...]  # per chip, original q head or PAD
    kv_heads: tuple[tuple[int, ...], ...]  # per chip, original KV head or PAD

    @property
    def local_q(self) -> int:
        return len(self.q_heads[0])

    @property
    def local_kv(self) -> int:
        return len(self.kv_heads[0])

    @property
    def padded_q(self) -> int:
        return sum(h == PAD for chip in self.q_heads for h in chip)


def plan_heads(n_heads: int, n_kv_heads: int, chips: int) -> HeadPlan:
    group = n_heads // n_kv_heads
    if n_kv_heads >= chips:
        kv_padded = math.ceil(n_kv_heads / chips) * chips
        per_chip = kv_padded // chips
        q_heads, kv_heads = [], []
        for c in range(chips):
            kvs = tuple(k if k < n_kv_heads else PAD for k in range(c * per_chip, (c + 1) * per_chip))
            kv_heads.append(kvs)
            q_heads.append(tuple(k * group + g if k != PAD else PAD for k in kvs for g in range(group)))
        return HeadPlan(chips, tuple(q_heads), tuple(kv_heads))
    owner = [c * n_kv_heads // chips for c in range(chips)]  # contiguous blocks of chips per KV head
    sharers = [owner.count(k) for k in range(n_kv_heads)]
    local_q = max(math.ceil(group / s) for s in sharers)
    q_heads, kv_heads = [], []
    for c, k in enumerate(owner):
        rank = c - owner.index(k)
        heads = [k * group + g for g in range(group)][rank * local_q:(rank + 1) * local_q]
        q_heads.append(tuple(heads + [PAD] * (local_q - len(heads))))
        kv_heads.append((k,))
    return HeadPlan(chips, tuple(q_heads), tuple(kv_heads))


def padded_size(size: int, chips: int, multiple: int = 32) -> int:
    """Smallest size >= `size` that splits over `chips` into tile-aligned pieces."""
    step = chips * multiple
    return math.ceil(size / step) * step
