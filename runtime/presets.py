"""The seed demo's presets as data, and the prompt files they read.

A prompt file is a JSON list of {"prompt": text, "context": file(s) whose text precedes
the prompt (paths relative to the JSON file, or absolute; globs allowed), "max_length":
tokens the context is cut to, "image": an image file for Llama 3.2 Vision programs
(relative to the JSON file, or absolute)}. Bundled files live in runtime/presets/.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class Preset:
    name: str
    prompts: str  # file name in runtime/presets/ (or a path)
    batch_size: int
    max_generated_tokens: int
    max_seq_len: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_at_eos: bool = True
    repeat_batches: int = 1
    block_size: int = 32
    max_num_blocks: int = 1024


PRESETS = {p.name: p for p in (
    Preset("batch-1", "batch-1.json", batch_size=1, max_generated_tokens=200, max_seq_len=1024),
    Preset("batch-32", "batch-32.json", batch_size=32, max_generated_tokens=200, max_seq_len=1024),
    # 64k-token prompts: larger blocks and pool, as the seed's long-context demo uses.
    Preset("long-context", "long-context.json", batch_size=1, max_generated_tokens=200,
           max_seq_len=65536 + 1024, block_size=64, max_num_blocks=2048),
    Preset("reasoning-1", "reasoning-1.json", batch_size=1, max_generated_tokens=15000,
           max_seq_len=16384, temperature=0.6, top_p=0.95),
    # Llama 3.2 Vision: prompts with and without an image (the seed's multimodal demo).
    Preset("vision", "vision.json", batch_size=4, max_generated_tokens=200, max_seq_len=8192),
)}


@dataclass
class PromptEntry:
    prompt: str
    context: str = ""
    max_length: int | None = None
    image: str | None = None  # a path (Llama 3.2 Vision programs)


def _read_context(spec, base: Path) -> str:
    paths = spec if isinstance(spec, list) else [spec]
    texts = []
    for pattern in paths:
        pattern = str(base / pattern) if not Path(pattern).is_absolute() else pattern
        matches = sorted(p for p in glob.glob(pattern) if Path(p).is_file())
        if not matches:
            raise ValueError(f"context file {pattern} not found")
        texts += [Path(p).read_text(errors="replace") for p in matches]
    return "\n\n".join(texts)


def read_prompts(path: str | Path) -> list[PromptEntry]:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = PRESET_DIR / path
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read prompts ({e})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) and "prompt" in d for d in data):
        raise ValueError(f"{path}: expected a JSON list of objects with a 'prompt'")
    return [PromptEntry(d["prompt"], _read_context(d["context"], path.parent) if d.get("context") else "",
                        d.get("max_length"), _image_path(d.get("image"), path.parent)) for d in data]


def _image_path(spec, base: Path) -> str | None:
    if spec is None:
        return None
    image = Path(spec) if Path(spec).is_absolute() else base / spec
    if not image.is_file():
        raise ValueError(f"image file {image} not found")
    return str(image)


def encode_entry(entry: PromptEntry, tokenizer, instruct: bool, image_token_id: int | None = None) -> list[int]:
    """Token ids of the context (cut to max_length tokens) followed by the prompt; an
    entry with an image gets the image token where the chat template puts it."""
    context = ""
    if entry.context:
        ids = tokenizer.encode(entry.context, add_special_tokens=False)
        if entry.max_length:
            ids = ids[: entry.max_length]
        context = tokenizer.decode(ids, skip_special_tokens=False) + "\n\n"
    text = context + entry.prompt
    if instruct:
        return tokenizer.apply_chat_template(text, image=entry.image is not None)
    return ([image_token_id] if entry.image is not None else []) + tokenizer.encode(text)
