"""The seed's largest prefill chunk per model and device, in tokens (its
MAX_PREFILL_CHUNK_SIZES_DIV1024 table), used when neither --max-prefill-chunk nor
MAX_PREFILL_CHUNK_SIZE is given. Rows are (model-name pattern, {target: thousands}).
Unknown models get 4K, as in the seed. The memory planner may lower these further."""
from __future__ import annotations

import re

K = 1024
UNKNOWN_MODEL_CHUNK = 4 * K

SEED_CHUNKS: list[tuple[str, dict[str, int]]] = [
    (r"llama-?3\.2-1b", {"N150": 128, "N300": 128, "T3K": 128, "TG": 128}),
    (r"llama-?3\.2-3b", {"N150": 8, "N300": 128, "T3K": 128, "TG": 128}),
    (r"llama-?3\.(1-8b|2-11b)", {"N150": 4, "N300": 64, "T3K": 128, "TG": 128}),
    (r"(llama-?3\.[13]-70b|llama-?3\.2-90b|r1-distill-llama-70b)", {"T3K": 32, "TG": 128}),
    (r"qwen2\.5-7b", {"N150": 4, "N300": 32}),
    (r"qwen2\.5-72b", {"T3K": 16}),
    (r"(qwq|qwen3)-32b", {"T3K": 64}),
]


def default_max_prefill_chunk(model_name: str, target: str) -> int:
    for pattern, by_target in SEED_CHUNKS:
        if re.search(pattern, model_name, re.IGNORECASE) and target in by_target:
            return by_target[target] * K
    return UNKNOWN_MODEL_CHUNK
