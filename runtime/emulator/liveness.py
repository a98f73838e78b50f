"""When a function's intermediate values can be let go.

A program function holds every value its ops produce in one environment; without this,
all of them live until the function returns, which for Llama 3.2 Vision's encoder (545
ops on [6528, 1280..5120] activations) is more memory than the weights. The device frees
a buffer after its last reader; the emulator does the same: after step i, the values
whose last reader is step i (or that no step reads) are dropped, unless the caller keeps
them (function outputs, weights, persistent state such as KV caches).
"""
from __future__ import annotations


def releases(reads: list[set[str]], writes: list[list[str]], keep: set[str]) -> list[list[str]]:
    """For steps that read `reads[i]` and write `writes[i]`, the names to drop after each
    step: those read for the last time there, and those written there and never read
    later. Names in `keep` are never dropped; a name written again after its last read
    is dropped after its last read of each life (in-place writes keep their name)."""
    last: dict[str, int] = {}
    for i, names in enumerate(reads):
        for name in names:
            last[name] = i
    out: list[list[str]] = [[] for _ in reads]
    for name, i in last.items():
        if name not in keep:
            out[i].append(name)
    for i, names in enumerate(writes):
        for name in names:
            if name not in keep and last.get(name, -1) < i:
                out[i].append(name)
    return [sorted(set(names)) for names in out]
