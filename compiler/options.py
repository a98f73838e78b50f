"""Compile options: one frozen object. Environment overrides are mapped on at the edge."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

OPTIMIZATIONS = ("performance", "accuracy", "float32")
SAMPLING = ("device", "host")
BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class CompileOptions:
    target: str = "N150"
    optimizations: str = "performance"
    batch_size: int = 1
    max_seq_len: int | None = None  # None: the model's max, capped by the memory planner to what fits
    max_prefill_chunk: int | None = None
    paged_attention: bool = True
    block_size: int = 32
    max_num_blocks: int | None = None  # None: 1024, or more when one user's table needs it
    no_weights: bool = False
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "ttcompile")
    pad_mlp_cores: int | None = None
    sampling: str = "device"  # decode ends in sampling on the device (token ids leave it), or logits go to the host
    # Replicas of the program on equal sub-meshes of the target (compiler/data_parallel.py);
    # batch_size counts the users of all of them, batch_size / data_parallel each.
    data_parallel: int = 1
    # Per-layer precision (passes/precision.py): None (the mode's policy), a tt_transformers
    # decoder-config JSON file (compiler/precision_file.py), or "auto": the sensitivity
    # search (compiler/precision_search.py) keeping calibration top-1 >= min_top1.
    precision: str | None = None
    min_top1: float = 0.90
    calibration: str | None = None  # a text file (None: the one shipped, compiler/data/)

    def __post_init__(self):
        if self.optimizations not in OPTIMIZATIONS:
            raise ValueError(
                f"unknown optimizations '{self.optimizations}' (choose {', '.join(OPTIMIZATIONS)})"
            )
        if self.data_parallel < 1:
            raise ValueError(f"--data-parallel {self.data_parallel} must be at least 1")
        if self.data_parallel == 1 and self.batch_size not in BATCH_SIZES:  # else data_parallel.replica_layout
            raise ValueError(
                f"batch size {self.batch_size} is not supported (choose one of {BATCH_SIZES})"
            )
        if self.max_seq_len is not None and self.max_seq_len < 128:
            raise ValueError(f"max-seq-len {self.max_seq_len} is too small (at least 128)")
        if self.block_size < 32 or self.block_size % 32:
            raise ValueError(f"block size {self.block_size} must be a positive multiple of 32 (the tile height)")
        if self.max_num_blocks is not None and self.max_num_blocks < 1:
            raise ValueError(f"max-num-blocks {self.max_num_blocks} must be at least 1")
        if self.sampling not in SAMPLING:
            raise ValueError(f"unknown sampling '{self.sampling}' (choose {', '.join(SAMPLING)})")
        if not 0.0 < self.min_top1 <= 1.0:
            raise ValueError(f"--min-top1 {self.min_top1} must be in (0, 1]")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError(f"max-prefill-chunk {self.max_prefill_chunk} must be a positive number of tokens")

    def replace(self, **changes) -> "CompileOptions":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["cache_dir"] = str(self.cache_dir)
        return data


# The seed's environment variables, and how each maps onto CompileOptions.
ENV_OVERRIDES = {
    "TT_CACHE_PATH": ("cache_dir", Path),
    "MAX_PREFILL_CHUNK_SIZE": ("max_prefill_chunk", lambda v: int(v) * 1024),  # thousands
    "PAD_MLP_CORES": ("pad_mlp_cores", int),
    "FAKE_DEVICE": ("target", str),
}


def apply_env(options: CompileOptions, environ=None, explicit: set[str] = frozenset()) -> CompileOptions:
    """Apply documented environment overrides, except for fields set explicitly on the CLI."""
    environ = os.environ if environ is None else environ
    changes = {}
    for var, (name, parse) in ENV_OVERRIDES.items():
        if var in environ and environ[var] != "" and name not in explicit:
            try:
                changes[name] = parse(environ[var])
            except ValueError:
                raise ValueError(f"environment variable {var}={environ[var]!r} is not valid") from None
    return options.replace(**changes) if changes else options
