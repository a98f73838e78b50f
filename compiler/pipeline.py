"""The pass pipeline: one explicit list, run in order, observed after every pass."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.fx

from passes import (canonicalize, chunked_prefill, fold_gates, fuse_mlp, fuse_qkv, memory_plan, pad_heads, paged_kv,
                    precision, shard)

from .errors import CompileError, InternalCompilerError, node_in_traceback
from .placement import annotate
from .printer import graph_text
from .verify import verify

PIPELINE = [canonicalize, fold_gates, fuse_qkv, pad_heads, fuse_mlp, shard, paged_kv, chunked_prefill, precision,
            memory_plan]

# Passes that must run before others, checked at import rather than trusted to a comment.
ORDER_CONSTRAINTS = [("canonicalize", "fold_gates"), ("fold_gates", "fuse_mlp"), ("canonicalize", "fuse_qkv"),
                     ("canonicalize", "fuse_mlp"), ("fuse_qkv", "pad_heads"), ("pad_heads", "shard"),
                     ("fuse_qkv", "shard"), ("fuse_mlp", "shard"), ("shard", "precision"),
                     ("shard", "paged_kv"), ("paged_kv", "chunked_prefill")]

PASS_NAMES = [p.NAME for p in PIPELINE]
for _before, _after in ORDER_CONSTRAINTS:
    if PASS_NAMES.index(_before) > PASS_NAMES.index(_after):
        raise ImportError(f"pipeline order: '{_before}' must run before '{_after}'")


@dataclass
class Observer:
    """What to do after each pass: verify, print, dump."""

    verify: bool = False
    print_after: set[str] = field(default_factory=set)  # pass names, or {"all"}
    dump_dir: Path | None = None
    printed: list[str] = field(default_factory=list)

    def after(self, index: int, name: str, gm, ctx) -> None:
        if self.verify:
            verify(gm, ctx, after=name, precise=PASS_NAMES.index(name) >= PASS_NAMES.index("precision"))
        if name in self.print_after or "all" in self.print_after or self.dump_dir:
            text = graph_text(gm, ctx, header=f"IR after {name} ({ctx.mode})")
            if name in self.print_after or "all" in self.print_after:
                self.printed.append(text)
            if self.dump_dir:
                self.dump_dir.mkdir(parents=True, exist_ok=True)
                (self.dump_dir / f"{ctx.mode}_{index:02d}_{name}.txt").write_text(text)


def refresh(gm: torch.fx.GraphModule, ctx) -> None:
    """The analyses every pass may rely on, recomputed after each: per-chip shapes
    (node.meta[VAL]) and mesh placements (node.meta[PLACEMENT])."""
    ctx.propagate(gm)
    annotate(gm, ctx.facts, ctx.decode)


def run_pass(pass_module, gm: torch.fx.GraphModule, ctx) -> torch.fx.GraphModule:
    """One pass, then the analyses. A CompileError is the user's (model, options, target)
    and passes through; anything else is a bug in the pass, reported as one."""
    try:
        gm = pass_module.run(gm, ctx)
        refresh(gm, ctx)
    except (CompileError, InternalCompilerError):
        raise
    except Exception as e:
        raise InternalCompilerError(f"pass '{pass_module.NAME}'", ctx.mode, node_in_traceback(e.__traceback__),
                                    f"{type(e).__name__}: {e}") from e
    return gm


def run_pipeline(gm: torch.fx.GraphModule, ctx, observer: Observer | None = None) -> torch.fx.GraphModule:
    observer = observer or Observer()
    refresh(gm, ctx)
    for index, pass_module in enumerate(PIPELINE, start=1):
        gm = run_pass(pass_module, gm, ctx)
        observer.after(index, pass_module.NAME, gm, ctx)
    return gm
