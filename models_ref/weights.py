"""Lazy, validated weight readers for HF (safetensors) and Meta (consolidated.*.pth) dirs.

Both present the same view: canonical Meta names (`layers.0.attention.wq.weight`), Meta's
interleaved q/k row order, tensors read one at a time on request. The HF <-> Meta q/k
row permutation lives here and nowhere else.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig, from_meta_params, load_config
from . import vision_names
from .names import Role, canonical_name, hf_to_canonical, meta_shard_dim, rope_rows


class WeightError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe or does not match the config."""


# ---------------------------------------------------------------- names and shapes
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor the model needs, with its shape (names from models_ref.names)."""
    d, hd = cfg.dim, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    shapes = {Role.EMBEDDING: (cfg.vocab_size, d), Role.FINAL_NORM: (d,)}
    if not cfg.tie_word_embeddings:
        shapes[Role.LM_HEAD] = (cfg.vocab_size, d)
    out = {canonical_name(role): shape for role, shape in shapes.items()}
    per_layer = {Role.ATTENTION_NORM: (d,), Role.FFN_NORM: (d,), Role.WQ: (q, d), Role.WK: (kv, d),
                 Role.WV: (kv, d), Role.WO: (d, q), Role.W1: (cfg.ffn_dim, d),
                 Role.W3: (cfg.ffn_dim, d), Role.W2: (d, cfg.ffn_dim)}
    if cfg.qkv_bias:
        per_layer.update({Role.BQ: (q,), Role.BK: (kv,), Role.BV: (kv,)})
    if cfg.qk_norm:
        per_layer.update({Role.Q_NORM: (hd,), Role.K_NORM: (hd,)})
    for i in range(cfg.n_layers):
        out.update({canonical_name(role, i): shape for role, shape in per_layer.items()})
    if cfg.vision is not None:  # Llama 3.2 Vision: tower, projector, cross-attention layers
        out.update(vision_names.canonical_shapes(cfg.vision, d, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim,
                                                 len(cfg.cross_attention_layers)))
    return out


def hf_cross_layer_indices(cfg: ModelConfig) -> list[int]:
    """HF decoder indices of the cross-attention layers (HF numbers them among the
    self-attention layers; ModelConfig numbers the self-attention layer each precedes)."""
    return [i + rank for rank, i in enumerate(sorted(cfg.cross_attention_layers))]


def hf_to_meta_name(name: str) -> str | None:
    return hf_to_canonical(name)


# Llama 3.2 Vision (mllama) checkpoints keep the text decoder under a prefix and number
# its cross-attention layers among the self-attention ones (HF: 40 layers, cross-attention
# at 3, 8, ..., 38). The text program reads the self-attention layers, renumbered 0..31.
_MLLAMA_PREFIXES = [("model.language_model.", "model."), ("language_model.model.", "model."),
                    ("language_model.lm_head.", "lm_head.")]
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")


def hf_text_layer_map(cfg: ModelConfig) -> dict[int, int] | None:
    """HF layer index -> self-attention layer index for configs with cross-attention layers
    (which map to nothing); None for plain decoders."""
    if not cfg.cross_attention_layers:
        return None
    cross = {i + rank for rank, i in enumerate(sorted(cfg.cross_attention_layers))}
    hf_layers = [h for h in range(cfg.n_layers + len(cross)) if h not in cross]
    return {h: i for i, h in enumerate(hf_layers)}


def hf_text_decoder_name(key: str, layer_map: dict[int, int] | None) -> str | None:
    """The canonical (Meta) name of an HF tensor of the text decoder, or None."""
    if layer_map is not None:
        for old, new in _MLLAMA_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        m = _HF_LAYER.fullmatch(key)
        if m:
            layer = layer_map.get(int(m.group(1)))
            if layer is None:
                return None  # a cross-attention layer: not in the text program
            key = f"model.layers.{layer}.{m.group(2)}"
    return hf_to_meta_name(key)


def hf_to_meta_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's half-split RoPE rows -> Meta's interleaved rows, per head (weights or biases).

    Per head, HF stores [x0 x2 x4 ... | x1 x3 x5 ...]; Meta stores x0 x1 x2 x3 ...
    """
    rows = t.shape[0]
    tail = t.shape[1:]
    return t.reshape(n_heads, 2, rows // n_heads // 2, *tail).transpose(1, 2).reshape(rows, *tail)


def meta_to_hf_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of hf_to_meta_rows (used by tests and by exporters)."""
    rows = t.shape[0]
    tail = t.shape[1:]
    return t.reshape(n_heads, rows // n_heads // 2, 2, *tail).transpose(1, 2).reshape(rows, *tail)


def hf_to_meta_layout(t: torch.Tensor, name: str, cfg: ModelConfig) -> torch.Tensor:
    """An HF tensor in the canonical (Meta) row layout its table row asks for: q/k rows
    per head, q/k norm weights within one head; everything else unchanged."""
    kind = rope_rows(name)
    if kind is None:
        return t
    return hf_to_meta_rows(t, {"q": cfg.n_heads, "k": cfg.n_kv_heads, "head": 1}[kind])


def meta_to_hf_layout(t: torch.Tensor, name: str, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of hf_to_meta_layout (tests and exporters)."""
    kind = rope_rows(name)
    if kind is None:
        return t
    return meta_to_hf_rows(t, {"q": cfg.n_heads, "k": cfg.n_kv_heads, "head": 1}[kind])


# ---------------------------------------------------------------- fingerprints
def file_digest(path: Path, memo: Path | None = None) -> str:
    """blake2b of every byte of a file, remembered in `memo` by (path, size, mtime, inode)
    so that a 140 GB checkpoint is hashed once, not on every compile."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    known = {}
    if memo is not None and memo.exists():
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
    if key in known:
        return known[key]
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "blake2b").hexdigest()[:32]
    if memo is not None:
        known[key] = digest
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    return digest


def fingerprint_files(paths: list[Path], extra: str = "", memo: Path | None = None) -> str:
    """Content fingerprint of a checkpoint: every byte of every file (names excluded, so a
    copied or renamed model directory is recognised)."""
    h = hashlib.sha256(extra.encode())
    for path in sorted(paths, key=lambda p: p.name):
        h.update(file_digest(path, memo).encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------- readers
class CheckpointReader:
    """Common interface: canonical names, shapes, one tensor at a time."""

    cfg: ModelConfig
    files: list[Path]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self, memo: Path | None = None) -> str:
        arch = {k: v for k, v in self.cfg.to_json().items() if k != "name"}
        return fingerprint_files(self.files, extra=json.dumps(arch, sort_keys=True), memo=memo)

    def validate(self) -> None:
        """Every expected tensor is present with the expected shape."""
        have = self.shapes()
        for name, shape in expected_shapes(self.cfg).items():
            if name not in have:
                raise WeightError(f"{self.where(name)}: missing tensor '{name}'")
            if tuple(have[name]) != shape:
                raise WeightError(
                    f"{self.where(name)}: tensor '{name}' has shape {list(have[name])}, "
                    f"config implies {list(shape)}"
                )

    def where(self, name: str) -> str:
        """The file to blame for a tensor that is not where it should be."""
        return str(self.files[0] if len(self.files) == 1 else self.files[0].parent)


class SafetensorsReader(CheckpointReader):
    def __init__(self, model_dir: Path, cfg: ModelConfig):
        from safetensors import safe_open

        self.cfg = cfg
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({model_dir / f for f in weight_map.values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise WeightError(f"{index}: malformed safetensors index") from None
            for f in files:
                if not f.exists():
                    raise WeightError(f"{index}: names shard '{f.name}', which does not exist")
        else:
            files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise WeightError(f"{model_dir}: no *.safetensors weights found")
        self.files = files
        layer_map = hf_text_layer_map(cfg)
        self._index = index if index.exists() else None
        self._where: dict[str, tuple[Path, str]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt")
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises its own error types
                raise WeightError(f"{f}: not a valid safetensors file ({_first_line(e)})") from None
            self._handles[f] = handle
            for key in keys:
                meta = hf_text_decoder_name(key, layer_map)
                if meta is None:
                    continue
                self._where[meta] = (f, key)
                self._shapes[meta] = tuple(handle.get_slice(key).get_shape())
        self._extra_rows = 0
        rows = self._shapes.get("tok_embeddings.weight", (0,))[0]
        if layer_map is not None and rows > cfg.vocab_size:
            # mllama's embedding has rows for image tokens after the vocabulary (8 more in
            # Llama 3.2 Vision): tok_embeddings is the vocabulary, learnable_embedding the rest.
            self._extra_rows = rows - cfg.vocab_size
            self._shapes["tok_embeddings.weight"] = (cfg.vocab_size,) + self._shapes["tok_embeddings.weight"][1:]
        # Llama 3.2 Vision's image side: the vision tower, the projector, the cross-attention
        # layers and the image-token rows (names.IMAGE_NAMES, both HF layouts).
        self._image: dict[str, tuple[Path, str, vision_names.NameRow]] = {}
        if cfg.vision is not None:
            rows_by_key = vision_names.hf_name_map(cfg.vision, hf_cross_layer_indices(cfg))
            for f, handle in self._handles.items():
                for key in handle.keys():
                    row = rows_by_key.get(key)
                    if row is not None:
                        self._image[row.canonical] = (f, key, row)
                        self._shapes[row.canonical] = vision_names.canonical_shape(
                            row, handle.get_slice(key).get_shape(), "hf", cfg.vision, cfg.vocab_size)

    def shapes(self):
        return dict(self._shapes)

    def where(self, name):
        if name in self._where:
            return str(self._where[name][0])
        return str(self._index) if self._index else super().where(name)

    def _read(self, path: Path, key: str) -> torch.Tensor:
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:
            raise WeightError(f"{path}: cannot read tensor '{key}' ({_first_line(e)})") from None

    def get(self, name: str) -> torch.Tensor:
        if name in self._image:
            path, key, row = self._image[name]
            return vision_names.to_canonical(row, self._read(path, key), "hf", self.cfg.vision, self.cfg.vocab_size)
        path, key = self._where[name]
        t = self._read(path, key)
        if name == "tok_embeddings.weight" and self._extra_rows:
            t = t[: self.cfg.vocab_size]
        return hf_to_meta_layout(t, name, self.cfg)
        return t


def _meta_shard_dim(name: str) -> int | None:
    """How Meta's model-parallel shards split a tensor (None: replicated in every shard)."""
    return meta_shard_dim(name)


def _load_pth(path: Path) -> dict:
    if not zipfile.is_zipfile(path):
        raise WeightError(f"{path}: not a torch.save zip checkpoint (truncated, corrupt or a "
                          "legacy/raw pickle, which is never loaded)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and containers
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds objects other than tensors"
        raise WeightError(f"{path}: refused: {what}; only plain tensor checkpoints are loaded, "
                          "pickled code is never run") from None
    except Exception as e:  # RuntimeError and others for corrupt zips
        raise WeightError(f"{path}: unreadable checkpoint ({_first_line(e)})") from None


class _MappedPages:
    """Drops a memory-mapped checkpoint tensor's pages from this process once it has been
    copied out, so reading a 140 GB checkpoint does not leave 140 GB of file pages mapped
    (resident) in the process: peak memory stays near one layer's tensors. Only ranges
    inside this process's mappings of the checkpoint files are touched (from
    /proc/self/maps; elsewhere, or off Linux, nothing is dropped): the pages are clean
    file pages, which MADV_DONTNEED lets the kernel read back from the file if needed."""

    MADV_DONTNEED = 4

    def __init__(self, files: list[Path]):
        self.ranges: list[tuple[int, int]] = []
        self._madvise = None
        try:
            import ctypes
            import mmap

            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise, self._page = libc.madvise, mmap.PAGESIZE
            paths = {str(f.resolve()) for f in files}
            for line in Path("/proc/self/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5] in paths:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    self.ranges.append((start, end))
        except (OSError, AttributeError, ValueError):
            self.ranges = []

    def release(self, t: torch.Tensor) -> None:
        if not self.ranges or self._madvise is None:
            return
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        start -= start % self._page
        end += -end % self._page
        if any(lo <= start and end <= hi for lo, hi in self.ranges):
            self._madvise(start, end - start, self.MADV_DONTNEED)


class MetaReader(CheckpointReader):
    """consolidated.00.pth ... consolidated.NN.pth, memory-mapped, concatenated per tensor.

    No repack step and no whole-model copy: `get` copies one tensor out of the mapped
    shards (concatenated along Meta's model-parallel dim) and drops the pages it read."""

    def __init__(self, model_dir: Path, cfg: ModelConfig):
        self.files = sorted(model_dir.glob("consolidated.*.pth"))
        if not self.files:
            raise WeightError(f"{model_dir}: no consolidated.*.pth weights found")
        self._shards = [_load_pth(f) for f in self.files]
        self._pages = _MappedPages(self.files)
        for f, shard in zip(self.files, self._shards):
            if not isinstance(shard, dict):
                raise WeightError(f"{f}: expected a state dict")
            bad = next((k for k, v in shard.items() if not isinstance(v, torch.Tensor)), None)
            if bad is not None:
                raise WeightError(f"{f}: entry '{bad}' is not a tensor")
        # Llama 3.2 Vision's Meta checkpoints keep the text decoder under "text_model."
        # and the image side under vision_model.* (rows of names.IMAGE_NAMES).
        self._prefix = "text_model." if any(k.startswith("text_model.") for k in self._shards[0]) else ""
        tied = self._prefix + "output.weight" not in self._shards[0]
        self.cfg = cfg.replace(tie_word_embeddings=tied)
        self._image: dict[str, vision_names.NameRow] = {}
        if cfg.vision is not None:
            if len(self._shards) > 1:
                raise WeightError(f"{model_dir}: Llama 3.2 Vision Meta checkpoints in {len(self._shards)} "
                                  "model-parallel shards are not supported (one consolidated.00.pth is)")
            rows = vision_names.expand(cfg.vision, list(range(len(cfg.cross_attention_layers))))
            self._image = {row.canonical: row for row in rows if row.meta in self._shards[0]}

    def shapes(self):
        out = {name: vision_names.canonical_shape(row, self._shards[0][row.meta].shape, "meta", self.cfg.vision)
               for name, row in self._image.items()}
        image_keys = {row.meta for row in self._image.values()}
        for key, t in self._shards[0].items():
            if not key.startswith(self._prefix) or key in image_keys:
                continue
            name = key[len(self._prefix):]
            dim = _meta_shard_dim(name)
            shape = list(t.shape)
            if dim is not None and len(self._shards) > 1:
                shape[dim] = sum(s[key].shape[dim] for s in self._shards if key in s)
            out[name] = tuple(shape)
        return out

    def get(self, name: str) -> torch.Tensor:
        if name in self._image:
            row = self._image[name]
            t = self._shards[0][row.meta]
            out = vision_names.to_canonical(row, t, "meta", self.cfg.vision).clone()
            self._pages.release(t)
            return out
        dim, key = _meta_shard_dim(name), self._prefix + name
        if dim is None or len(self._shards) == 1:
            parts = [self._shards[0][key]]
            out = parts[0].clone()
        else:
            parts = [s[key] for s in self._shards]
            out = torch.cat(parts, dim=dim)
        for part in parts:
            self._pages.release(part)
        return out


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def open_checkpoint(model_dir: str | Path) -> CheckpointReader:
    """Config + reader for a model directory (HF or Meta), validated against each other."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    if cfg.source_format == "meta":
        reader: CheckpointReader = MetaReader(model_dir, cfg)
    else:
        reader = SafetensorsReader(model_dir, cfg)
    reader.validate()
    return reader


__all__ = [
    "CheckpointReader", "ConfigError", "WeightError", "expected_shapes", "open_checkpoint",
    "hf_to_meta_rows", "meta_to_hf_rows", "from_meta_params",
]
