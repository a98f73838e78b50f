"""Text <-> token ids for the runtime, without torch or transformers.

The runtime runs where torch is not installed, so this module reads the tokenizer files
of a model directory directly:

- ``tokenizer.json`` (Hugging Face; Qwen2.5, Llama-3 HF exports) through ``tokenizers``;
- ``tokenizer.model`` in tiktoken's text format (Meta's original Llama-3 release) through
  ``tiktoken.Encoding``, built from the file: ``tiktoken.get_encoding`` would download.

Chat templates are rendered with jinja2 the way transformers does (sandboxed, trim_blocks,
lstrip_blocks, the same template variables), so a prompt tokenizes to the same ids.
"""

from __future__ import annotations

import base64
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

# Meta's Llama-3 pre-tokenizer split pattern (llama/tokenizer.py), not stored in tokenizer.model.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
# The named Llama-3.1 special tokens, in id order right after the BPE ranks; the rest of the
# 256 are <|reserved_special_token_N|>, numbered on from 2.
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)
LLAMA3_EOS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")


def copy_tokenizer_files(model_dir, out_dir) -> list[str]:
    """Copy the tokenizer files a model directory has into a compiled artifact's folder,
    so the runtime needs nothing but that folder. Returns the names copied."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
            copied.append(name)
    return copied


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_str(value) -> str | None:
    """tokenizer_config stores special tokens as a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _find_chat_template(path: Path, config: dict) -> str | None:
    """Where transformers looks, in its order: chat_template.jinja, chat_template.json,
    then tokenizer_config.json (a string, or a list of named templates: take "default")."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def _compile_template(source: str):
    """A sandboxed environment with the options and helpers transformers gives templates."""
    from jinja2 import ext
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse tiktoken's text format, one `base64(token bytes) rank` per line. Parsed here
    because tiktoken.load caches files under a temp folder as a side effect."""
    ranks = {}
    try:
        for line in path.read_bytes().splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except ValueError as e:
        raise ValueError(f"{path}: not a tiktoken BPE file (SentencePiece tokenizer.model "
                         f"is not supported): {e}") from None
    return ranks


class Tokenizer:
    """One interface over the two backends; build it with ``Tokenizer.from_dir``."""

    def __init__(self, *, hf=None, tiktoken_enc=None, num_ranks: int = 0,
                 bos_token: str | None = None, eos_token: str | None = None,
                 eos_ids: Iterable[int] = (), chat_template: str | None = None,
                 extra_template_vars: dict | None = None):
        self._hf = hf
        self._tt = tiktoken_enc
        self._num_ranks = num_ranks  # tiktoken: ids at or past this are special tokens
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_ids = frozenset(eos_ids)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True) if hf else tiktoken_enc.n_vocab
        self._template_source = chat_template
        self._template = _compile_template(chat_template) if chat_template else None
        self._template_vars = extra_template_vars or {}
        # A Meta directory has no template file but a fixed chat format (see _llama3_chat).
        self.has_chat_template = self._template is not None or self._tt is not None

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """Load from a model (or compiled artifact) folder; tokenizer.json wins over
        tokenizer.model when both are there, as in transformers."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls._from_hf(path)
        if (path / "tokenizer.model").is_file():
            return cls._from_tiktoken(path)
        raise ValueError(f"{path}: no tokenizer (expected tokenizer.json or tokenizer.model)")

    @classmethod
    def _from_hf(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config = {**_read_json(path / "special_tokens_map.json"),
                  **_read_json(path / "tokenizer_config.json")}
        tokens = {k: _token_str(config.get(k)) for k in
                  ("bos_token", "eos_token", "unk_token", "pad_token")}
        eos_ids = set(_generation_eos_ids(path))
        if tokens["eos_token"] and hf.token_to_id(tokens["eos_token"]) is not None:
            eos_ids.add(hf.token_to_id(tokens["eos_token"]))
        # transformers passes every set special token to the template, not only bos/eos.
        extra = {k: v for k, v in tokens.items() if v and k not in ("bos_token", "eos_token")}
        return cls(hf=hf, bos_token=tokens["bos_token"], eos_token=tokens["eos_token"],
                   eos_ids=eos_ids, chat_template=_find_chat_template(path, config),
                   extra_template_vars=extra)

    @classmethod
    def _from_tiktoken(cls, path: Path) -> "Tokenizer":
        import tiktoken

        ranks = _load_tiktoken_ranks(path / "tokenizer.model")
        n = len(ranks)
        names = list(LLAMA3_NAMED_SPECIALS) + [
            f"<|reserved_special_token_{i}|>"
            for i in range(2, 2 + LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED_SPECIALS))]
        specials = {name: n + i for i, name in enumerate(names)}
        enc = tiktoken.Encoding(name=path.name or "llama3", pat_str=LLAMA3_PATTERN,
                                mergeable_ranks=ranks, special_tokens=specials)
        eos_ids = {specials[t] for t in LLAMA3_EOS} | set(_generation_eos_ids(path))
        config = _read_json(path / "tokenizer_config.json")
        return cls(tiktoken_enc=enc, num_ranks=n, bos_token="<|begin_of_text|>",
                   eos_token="<|eot_id|>", eos_ids=eos_ids,
                   chat_template=_find_chat_template(path, config))

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        try:
            return self._tt.encode_single_token(token)
        except KeyError:
            return None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids. Special-token text in `text` is an id for tokenizer.json (as in
        transformers) but plain text for tokenizer.model (as in Meta's tokenizer)."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._tt.encode(text, allowed_special=set(), disallowed_special=())
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if i < self._num_ranks]
        return self._tt.decode_bytes(ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, prompt: str, system: str | None = None, image: bool = False) -> list[int]:
        """Ids of a one-turn chat prompt ending in an open assistant turn. The rendered
        text is tokenized without adding special tokens: the template places BOS itself.
        With `image`, the user turn starts with an image (Llama 3.2 Vision's templates
        render it as <|image|>, where the model was trained to see it)."""
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        content = [{"type": "image"}, {"type": "text", "text": prompt}] if image else prompt
        messages.append({"role": "user", "content": content})
        return self.encode_chat(messages)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation (`messages` as chat templates take them: role and content)
        ending in an open assistant turn: the model's chat template, rendered as
        transformers renders it, or Meta's Llama-3 chat format for a Meta tokenizer."""
        if self._template is None:
            if self._tt is None:
                raise ValueError("this tokenizer has no chat template")
            return self._llama3_chat(messages)
        special = {k: v for k, v in (("bos_token", self.bos_token),
                                     ("eos_token", self.eos_token)) if v}
        text = self._template.render(messages=messages, add_generation_prompt=True,
                                     **self._template_vars, **special)
        if self._hf is not None:
            return self.encode(text, add_special_tokens=False)
        return self._tt.encode(text, allowed_special="all")

    def _llama3_chat(self, messages: list[dict]) -> list[int]:
        """Meta's Llama-3 ChatFormat, built from ids so that user text can never become
        a special token. Content is stripped as Meta's and HF's Llama-3 formats do."""
        sid = self.token_to_id

        def header(role):
            return [sid("<|start_header_id|>"), *self.encode(role, False),
                    sid("<|end_header_id|>"), *self.encode("\n\n", False)]

        ids = [sid("<|begin_of_text|>")]
        for m in messages:
            ids += header(m["role"])
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            for part in parts:  # Meta's format: <|image|> where the image is, then the text
                ids += [sid("<|image|>")] if part["type"] == "image" else self.encode(part["text"].strip(), False)
            ids.append(sid("<|eot_id|>"))
        return ids + header("assistant")

    def stream_decoder(self, skip_special_tokens: bool = True) -> Callable[[int], str]:
        """Return `push(token_id) -> str` giving the new text after each generated token.

        Decoding tokens one at a time breaks multi-byte characters (a token may hold half
        of one) and, for some decoders, spacing. So decode a window from the last emitted
        boundary and hold text back while it ends in U+FFFD (an incomplete character)."""
        ids: list[int] = []
        prefix_offset = read_offset = 0

        def push(token_id: int) -> str:
            nonlocal prefix_offset, read_offset
            ids.append(int(token_id))
            prefix = self.decode(ids[prefix_offset:read_offset], skip_special_tokens)
            text = self.decode(ids[prefix_offset:], skip_special_tokens)
            if len(text) <= len(prefix) or text.endswith("\ufffd"):
                return ""
            prefix_offset, read_offset = read_offset, len(ids)
            return text[len(prefix):]

        return push


def _generation_eos_ids(path: Path) -> list[int]:
    """generation_config.json's eos_token_id: one id or a list (Llama-3.1 instruct lists
    <|end_of_text|>, <|eom_id|> and <|eot_id|>)."""
    eos = _read_json(path / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]
