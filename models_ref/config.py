"""One normalised model config for Llama-3 and Qwen2.5, read from HF or Meta directories.

Everything downstream (reference modules, passes, memory planning) reads `ModelConfig`;
nothing else parses config.json or params.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A model directory or config the user gave us is not something we can compile."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is one of ROPE_KINDS; the rest are its parameters."""

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None


ROPE_KINDS = ("llama3", "linear", "yarn")

# HF architecture name -> family. Families differ only in data (QKV bias), not in code.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # "llama" | "qwen2"
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None
    source_format: str = "hf"  # "hf" | "meta"

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _need(data: dict, key: str, path: Path, kind=int):
    if key not in data or data[key] is None:
        raise ConfigError(f"{path}: missing field '{key}'")
    value = data[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"{path}: field '{key}' must be a positive integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{path}: field '{key}' must be a number, got {value!r}")
    return value


def _optional(data: dict, key: str, path: Path, default, kind=int):
    """A field that may be absent (default) but, when given, must be well-formed."""
    if data.get(key) is None:
        return default
    return _need(data, key, path, kind)


def _rope_scaling(raw: dict | None, path: Path) -> RopeScaling | None:
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: rope_scaling must be an object, got {raw!r}")
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_KINDS:
        raise ConfigError(
            f"{path}: unsupported rope_scaling type '{kind}' (supported: none, {', '.join(ROPE_KINDS)})"
        )
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"kind"}
    params = {k: raw[k] for k in fields if raw.get(k) is not None}
    return RopeScaling(kind=kind, **params)


def _validate(cfg: ModelConfig, path: Path) -> ModelConfig:
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(
            f"{path}: num_attention_heads ({cfg.n_heads}) is not a multiple of "
            f"num_key_value_heads ({cfg.n_kv_heads})"
        )
    if cfg.head_dim % 2:
        raise ConfigError(f"{path}: head_dim {cfg.head_dim} must be even for RoPE")
    return cfg


def from_hf_config(path: Path, name: str | None = None) -> ModelConfig:
    """Normalise a Hugging Face config.json (Llama / Qwen2 causal LMs)."""
    data = _read_json(path)
    if "text_config" in data and "num_hidden_layers" not in data:
        # Vision-language configs (Llama 3.2 Vision) keep the decoder in text_config.
        data = {**data["text_config"], "architectures": data.get("architectures")}
    archs = data.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = data.get("model_type")
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None and model_type in ARCHITECTURES.values():
        family = model_type
    if family is None:
        found = ", ".join(map(str, archs)) or model_type or "none given"
        raise ConfigError(
            f"{path}: unknown architecture ({found}); supported: {', '.join(ARCHITECTURES)}"
        )
    dim = _need(data, "hidden_size", path)
    n_heads = _need(data, "num_attention_heads", path)
    n_kv = _optional(data, "num_key_value_heads", path, n_heads)
    head_dim = _optional(data, "head_dim", path, None)
    if head_dim is None:
        if dim % n_heads:
            raise ConfigError(
                f"{path}: hidden_size {dim} is not divisible by num_attention_heads {n_heads}"
                " and no head_dim is given"
            )
        head_dim = dim // n_heads
    elif head_dim * n_heads != dim and family == "qwen2":
        raise ConfigError(f"{path}: head_dim {head_dim} x {n_heads} heads != hidden_size {dim}")
    # transformers 5 writes rope_parameters (theta and scaling together); 4.x wrote
    # rope_theta and rope_scaling. Accept both.
    rope_params = data.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise ConfigError(f"{path}: rope_parameters must be an object, got {rope_params!r}")
    rope_theta = _optional(data, "rope_theta", path, None, float)
    if rope_theta is None:
        rope_theta = _optional(rope_params, "rope_theta", path, 10000.0, float)
    rope_scaling = data.get("rope_scaling") or rope_params
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act '{data['hidden_act']}' is not supported (silu only)")
    cfg = ModelConfig(
        name=name or path.parent.name,
        family=family,
        dim=dim,
        n_layers=_need(data, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=_need(data, "intermediate_size", path),
        vocab_size=_need(data, "vocab_size", path),
        norm_eps=float(_optional(data, "rms_norm_eps", path, 1e-6, float)),
        rope_theta=float(rope_theta),
        max_position_embeddings=_optional(data, "max_position_embeddings", path, 4096),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(data.get("attention_bias", False)),
        rope_scaling=_rope_scaling(rope_scaling, path),
        source_format="hf",
    )
    return _validate(cfg, path)


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN sizing rule (reproduces HF intermediate_size for every Llama-3)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


# Meta params.json says only use_scaled_rope; the scaling parameters are the Llama 3.1
# ones unless the file carries `rope_scaling_factor` (Llama 3.2 1B/3B use 32).
META_LLAMA3_ROPE = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=8192)


def from_meta_params(path: Path, name: str | None = None,
                     tie_word_embeddings: bool | None = None) -> ModelConfig:
    """Normalise a Meta params.json. Meta checkpoints are Llama-3 text decoders."""
    data = _read_json(path)
    dim = _need(data, "dim", path)
    n_heads = _need(data, "n_heads", path)
    if dim % n_heads:
        raise ConfigError(f"{path}: dim {dim} is not divisible by n_heads {n_heads}")
    rope = None
    if data.get("use_scaled_rope"):
        rope = dataclasses.replace(
            META_LLAMA3_ROPE, factor=float(data.get("rope_scaling_factor", META_LLAMA3_ROPE.factor))
        )
    cfg = ModelConfig(
        name=name or path.parent.name,
        family="llama",
        dim=dim,
        n_layers=_need(data, "n_layers", path),
        n_heads=n_heads,
        n_kv_heads=_optional(data, "n_kv_heads", path, n_heads),
        head_dim=dim // n_heads,
        ffn_dim=meta_ffn_dim(dim, _need(data, "multiple_of", path), data.get("ffn_dim_multiplier")),
        vocab_size=_need(data, "vocab_size", path),
        norm_eps=float(_optional(data, "norm_eps", path, 1e-5, float)),
        rope_theta=float(_optional(data, "rope_theta", path, 500000.0, float)),
        max_position_embeddings=_optional(data, "max_seq_len", path, 131072),
        tie_word_embeddings=bool(tie_word_embeddings),
        qkv_bias=False,
        rope_scaling=rope,
        source_format="meta",
    )
    return _validate(cfg, path)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read the config of an HF (config.json) or Meta (params.json) model directory."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ConfigError(f"{model_dir}: no such model directory")
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a directory (give the model's folder)")
    if (model_dir / "config.json").exists():
        return from_hf_config(model_dir / "config.json", name=model_dir.resolve().name)
    if (model_dir / "params.json").exists():
        return from_meta_params(model_dir / "params.json", name=model_dir.resolve().name)
    raise ConfigError(
        f"{model_dir}: not a model directory (no config.json or params.json)"
    )
