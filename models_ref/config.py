"""One normalised model config for Llama-3 and Qwen2.5, read from HF or Meta directories.

Everything downstream (reference modules, passes, memory planning) reads `ModelConfig`;
nothing else parses config.json or params.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from . import vision_config
from .fields import HF_FIELDS, META_FIELDS, FieldRefused, check_fields
from .vision_config import VisionConfig

# Public config.json / params.json files of the seed's models (no weights), shipped for
# weight-free compilation: `ttcompile models_ref/seed_configs/<name> --no-weights`.
SEED_CONFIG_DIR = Path(__file__).with_name("seed_configs")


# The reference implementation's nine models (its README's support list); the folder also
# holds public configs of other families this project adds (Qwen3, Mistral).
SEED_MODELS = ("deepseek-r1-distill-llama-70b", "llama3.1-70b", "llama3.1-8b", "llama3.2-11b-vision",
               "llama3.2-1b", "llama3.2-3b", "qwen2.5-72b", "qwen2.5-7b", "qwq-32b")


def public_config_dirs() -> dict[str, Path]:
    """Every shipped public config: name -> its folder."""
    return {p.name: p for p in sorted(SEED_CONFIG_DIR.iterdir()) if p.is_dir()}


def seed_model_dirs() -> dict[str, Path]:
    """The seed's nine models: name -> config folder."""
    return {name: path for name, path in public_config_dirs().items() if name in SEED_MODELS}


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
    truncate: bool = True  # yarn: round the correction range to whole dims (HF default)


ROPE_KINDS = ("llama3", "linear", "yarn")

# HF architecture name -> family. Families differ in data (the Family row), not in code.
# Llama 3.2 Vision (mllama) is a Llama-3 text decoder with gated cross-attention layers
# interleaved; its text path (no image) is the plain decoder (see ModelConfig).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "MllamaForConditionalGeneration": "llama",
}


MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral",
               "mllama": "llama", "mllama_text_model": "llama"}


@dataclass(frozen=True)
class Family:
    """What a family's architecture fixes (rather than its config fields)."""

    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    head_dim_free: bool = True  # head_dim may differ from hidden_size / heads
    sliding_window_field: str | None = None  # "always" (Mistral) | "qwen" (use_sliding_window)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "qwen2": Family(qkv_bias=True, head_dim_free=False, sliding_window_field="qwen"),
    "qwen3": Family(qk_norm=True, sliding_window_field="qwen"),
    "mistral": Family(sliding_window_field="always"),
}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # a key of FAMILIES
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
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    sliding_window: int | None = None  # each query sees this many latest positions (itself included)
    source_format: str = "hf"  # "hf" | "meta"
    # Llama 3.2 Vision: the self-attention layers (Meta numbering, 0..n_layers-1) that a
    # gated cross-attention layer runs before (Meta's "fusion schedule"). n_layers counts
    # self-attention layers only. `vision` is the image side (vision_config.VisionConfig):
    # with it the program has a vision function and the cross-attention layers.
    cross_attention_layers: tuple[int, ...] = ()
    vision: VisionConfig | None = None

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @property
    def n_params(self) -> int:
        """Parameters of the text decoder (embedding, layers, head; cross-attention layers
        counted as decoder layers): the size facts precision policies key on."""
        hd = self.head_dim
        attention = self.dim * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * self.dim
        layer = attention + 3 * self.dim * self.ffn_dim + 2 * self.dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        layers = self.n_layers + len(self.cross_attention_layers)
        return self.vocab_size * self.dim + layers * layer + self.dim + head

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["cross_attention_layers"] = list(self.cross_attention_layers)  # as JSON reads it back
        data["vision"] = self.vision.to_json() if self.vision else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ModelConfig":
        data = dict(data)
        if data.get("rope_scaling"):
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        data["cross_attention_layers"] = tuple(data.get("cross_attention_layers") or ())
        data["vision"] = VisionConfig.from_json(data["vision"]) if data.get("vision") else None
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


_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim", "attention_factor")


def _rope_scaling(raw: dict | None, path: Path, max_position_embeddings: int) -> RopeScaling | None:
    """HF rope_scaling / rope_parameters -> RopeScaling (None: plain RoPE).

    Missing parameters take Hugging Face's defaults; in particular a llama3 or yarn
    scaling without `original_max_position_embeddings` uses `max_position_embeddings`
    (transformers' standardize_rope_params)."""
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
    if raw.get("factor") is None:
        raise ConfigError(f"{path}: rope_scaling of type '{kind}' needs a 'factor'")
    params = {}
    for key in _ROPE_NUMBERS:
        if raw.get(key) is None:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: rope_scaling '{key}' must be a number, got {value!r}")
        params[key] = float(value)
    if params["factor"] <= 0:
        raise ConfigError(f"{path}: rope_scaling 'factor' must be positive, got {raw['factor']!r}")
    original = raw.get("original_max_position_embeddings")
    if original is None:
        original = max_position_embeddings
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ConfigError(f"{path}: rope_scaling 'original_max_position_embeddings' must be a positive "
                          f"integer, got {original!r}")
    if "truncate" in raw and not isinstance(raw["truncate"], bool):
        raise ConfigError(f"{path}: rope_scaling 'truncate' must be true or false, got {raw['truncate']!r}")
    return RopeScaling(kind=kind, original_max_position_embeddings=original,
                       truncate=raw.get("truncate", True), **params)


def _context_length(declared: int, rope: RopeScaling | None) -> int:
    """Positions the model is meant to reach. YaRN configs (Qwen2.5's recipe for 128k)
    keep max_position_embeddings at the pretraining length and say factor x original."""
    if rope is not None and rope.kind == "yarn":
        return max(declared, int(rope.factor * rope.original_max_position_embeddings))
    return declared


def _validate(cfg: ModelConfig, path: Path) -> ModelConfig:
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(
            f"{path}: num_attention_heads ({cfg.n_heads}) is not a multiple of "
            f"num_key_value_heads ({cfg.n_kv_heads})"
        )
    if cfg.head_dim % 2:
        raise ConfigError(f"{path}: head_dim {cfg.head_dim} must be even for RoPE")
    bad = [i for i in cfg.cross_attention_layers if not 0 <= i <= cfg.n_layers]
    if bad or len(set(cfg.cross_attention_layers)) != len(cfg.cross_attention_layers):
        raise ConfigError(f"{path}: cross-attention layer positions {list(cfg.cross_attention_layers)} "
                          f"do not fit {cfg.n_layers} self-attention layers")
    return cfg


def _hf_cross_attention_layers(data: dict, path: Path) -> tuple[int, ...]:
    """HF mllama numbers all layers together ([3, 8, ..., 38] of 40); the normalised
    config numbers the self-attention layer each cross-attention layer precedes."""
    raw = data.get("cross_attention_layers") or []
    if not isinstance(raw, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        raise ConfigError(f"{path}: cross_attention_layers must be a list of layer indices, got {raw!r}")
    return tuple(h - rank for rank, h in enumerate(sorted(raw)))


def _check_fields(data: dict, table, path: Path) -> None:
    try:
        check_fields(data, table, str(path))
    except FieldRefused as e:
        raise ConfigError(str(e)) from None


def _sliding_window(data: dict, family: str, path: Path, n_layers: int, context: int) -> int | None:
    """The attention window every layer uses (None: full causal attention), as HF reads
    the family's fields; configs that mix windowed and full layers are refused."""
    how = FAMILIES[family].sliding_window_field
    window = data.get("sliding_window")
    if how == "qwen" and not data.get("use_sliding_window"):
        window = None
    elif how is None and window is not None:
        raise ConfigError(f"{path}: field 'sliding_window' is not part of the {family} architecture")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ConfigError(f"{path}: field 'sliding_window' must be a positive integer, got {window!r}")
    types = data.get("layer_types")
    if types is None and how == "qwen" and window is not None:
        first = _optional(data, "max_window_layers", path, n_layers)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if types is not None:
        kinds = set(types) if isinstance(types, list) else {None}
        if not kinds <= {"full_attention", "sliding_attention"}:
            raise ConfigError(f"{path}: field 'layer_types' holds unknown layer types {sorted(map(str, kinds))}")
        if len(kinds) > 1:
            raise ConfigError(f"{path}: field 'layer_types' mixes full and sliding-window attention layers "
                              "(one window for all layers is supported)")
        if kinds == {"full_attention"}:
            window = None
        elif window is None:
            raise ConfigError(f"{path}: sliding-window layers without a 'sliding_window' size")
    return window if window is not None and window < context else None


def from_hf_config(path: Path, name: str | None = None) -> ModelConfig:
    """Normalise a Hugging Face config.json (Llama, Qwen2, Qwen3 and Mistral causal LMs,
    Llama 3.2 Vision's text decoder)."""
    data = _read_json(path)
    vision = None
    if "text_config" in data and "num_hidden_layers" not in data:
        # Vision-language configs (Llama 3.2 Vision) keep the decoder in text_config.
        if not isinstance(data["text_config"], dict):
            raise ConfigError(f"{path}: text_config must be an object")
        if isinstance(data.get("vision_config"), dict):
            try:
                vision = vision_config.from_hf_config(data, str(path))
            except (ValueError, TypeError) as e:
                raise ConfigError(str(e).splitlines()[0]) from None
        data = {**data["text_config"], "architectures": data.get("architectures")}
    _check_fields(data, HF_FIELDS, path)
    archs = data.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    model_type = data.get("model_type")
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None:  # configs saved without `architectures` name their model type only
        family = MODEL_TYPES.get(model_type)
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
    elif head_dim * n_heads != dim and not FAMILIES[family].head_dim_free:
        raise ConfigError(f"{path}: head_dim {head_dim} x {n_heads} heads != hidden_size {dim}")
    # transformers 5 writes rope_parameters (theta and scaling together); 4.x wrote
    # rope_theta and rope_scaling. Accept both.
    rope_params = data.get("rope_parameters") or {}
    if not isinstance(rope_params, dict):
        raise ConfigError(f"{path}: rope_parameters must be an object, got {rope_params!r}")
    rope_theta = _optional(data, "rope_theta", path, None, float)
    if rope_theta is None:
        rope_theta = _optional(rope_params, "rope_theta", path, 10000.0, float)
    if data.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: field 'hidden_act' = {data['hidden_act']!r} is not supported (silu only)")
    declared_max = _optional(data, "max_position_embeddings", path, 4096)
    rope_scaling = _rope_scaling(data.get("rope_scaling") or rope_params, path, declared_max)
    cross = _hf_cross_attention_layers(data, path)
    n_layers = _need(data, "num_hidden_layers", path) - len(cross)
    if n_layers <= 0:
        raise ConfigError(f"{path}: num_hidden_layers leaves no self-attention layer "
                          f"beside {len(cross)} cross-attention layers")
    context = _context_length(declared_max, rope_scaling)
    cfg = ModelConfig(
        name=name or path.parent.name,
        family=family,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        ffn_dim=_need(data, "intermediate_size", path),
        vocab_size=_need(data, "vocab_size", path),
        norm_eps=float(_optional(data, "rms_norm_eps", path, 1e-6, float)),
        rope_theta=float(rope_theta),
        max_position_embeddings=context,
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        qkv_bias=FAMILIES[family].qkv_bias,
        rope_scaling=rope_scaling,
        qk_norm=FAMILIES[family].qk_norm,
        sliding_window=_sliding_window(data, family, path, n_layers, context),
        source_format="hf",
        cross_attention_layers=cross,
        vision=vision if cross else None,
    )
    return _validate(cfg, path)


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FFN sizing rule (reproduces HF intermediate_size for every Llama-3)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def meta_fusion_schedule(n_layers: int, n_cross: int) -> tuple[int, ...]:
    """The self-attention layers Llama 3.2 Vision's cross-attention layers precede,
    spread from the top as Meta's CrossAttentionTransformerText._init_fusion_schedule
    does (32 layers, 8 cross-attention layers: 3, 7, ..., 31)."""
    if n_cross <= 0:
        return ()
    step = math.ceil(n_layers / n_cross)
    return tuple(list(range(n_layers))[::-1][::step][:n_cross][::-1])


# Meta's params.json says only `use_scaled_rope`. The llama3 parameters besides the factor
# are the same for every Llama-3 release (low 1, high 4, original 8192). The factor is 8,
# except for the Llama 3.2 text models (1B, 3B), whose published configs say 32 (Meta's
# reference code hard-codes 8, which meta-llama/llama-models#241 reports as wrong for
# them); those are also the releases with tied embeddings. See _meta_release_facts.
META_LLAMA3_ROPE = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA32_TEXT_ROPE_FACTOR = 32.0
_META_RELEASE = re.compile(r"llama[-_ ]?(\d+(?:\.\d+)?)", re.IGNORECASE)


def _meta_release_facts(path: Path, data: dict, cross: tuple[int, ...]) -> tuple[float, bool, str]:
    """(llama3 rope factor, tied embeddings, where they came from) for a Meta params.json.

    In order: the file's own keys (`rope_scaling_factor`, `tie_word_embeddings`); the
    Hugging Face config.json of the same repository (HF repos keep Meta's files in
    `original/`); the release in the folder name as Meta's downloader writes it
    ("Llama3.2-1B-Instruct": a Llama 3.2 text model, factor 32 and tied, the rule
    transformers' convert_llama_weights_to_hf applies from --llama_version); else
    factor 8, untied. With weights, the checkpoint decides tying (MetaReader)."""
    factor, tied = data.get("rope_scaling_factor"), data.get("tie_word_embeddings")
    if factor is not None and not isinstance(factor, (int, float)) or isinstance(factor, bool):
        raise ConfigError(f"{path}: field 'rope_scaling_factor' must be a number, got {factor!r}")
    if factor is not None and tied is not None:
        return float(factor), bool(tied), "params.json"
    for hf_path in (path.parent / "config.json", path.parent.parent / "config.json"):
        if hf_path.exists():
            hf = from_hf_config(hf_path)
            hf_factor = hf.rope_scaling.factor if hf.rope_scaling else META_LLAMA3_ROPE.factor
            return (float(factor) if factor is not None else hf_factor,
                    bool(tied) if tied is not None else hf.tie_word_embeddings, str(hf_path))
    folder = path.parent.name if path.parent.name != "original" else path.parent.parent.name
    release = _META_RELEASE.search(folder)
    llama32_text = bool(release) and release.group(1) == "3.2" and not cross
    return (float(factor) if factor is not None else
            (LLAMA32_TEXT_ROPE_FACTOR if llama32_text else META_LLAMA3_ROPE.factor),
            bool(tied) if tied is not None else llama32_text,
            f"folder name {folder!r}" if release else "default")


def from_meta_params(path: Path, name: str | None = None,
                     tie_word_embeddings: bool | None = None) -> ModelConfig:
    """Normalise a Meta params.json. Meta checkpoints are Llama-3 text decoders (for
    Llama 3.2 Vision: its text decoder, cross-attention positions included)."""
    data = _read_json(path)
    _check_fields(data, META_FIELDS, path)
    dim = _need(data, "dim", path)
    n_heads = _need(data, "n_heads", path)
    if dim % n_heads:
        raise ConfigError(f"{path}: dim {dim} is not divisible by n_heads {n_heads}")
    head_dim = dim // n_heads
    if data.get("head_dim") is not None and data["head_dim"] != head_dim:
        raise ConfigError(f"{path}: head_dim {data['head_dim']!r} is inconsistent with "
                          f"dim {dim} / n_heads {n_heads} = {head_dim}")
    n_layers = _need(data, "n_layers", path)
    n_cross = _optional(data, "vision_num_cross_attention_layers", path, 0) \
        if data.get("vision_num_cross_attention_layers", -1) != -1 else 0
    cross = meta_fusion_schedule(n_layers, n_cross)
    factor, tied, _ = _meta_release_facts(path, data, cross)
    rope = dataclasses.replace(META_LLAMA3_ROPE, factor=factor) if data.get("use_scaled_rope") else None
    cfg = ModelConfig(
        name=name or path.parent.name,
        family="llama",
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=_optional(data, "n_kv_heads", path, n_heads),
        head_dim=head_dim,
        ffn_dim=meta_ffn_dim(dim, _need(data, "multiple_of", path), data.get("ffn_dim_multiplier")),
        vocab_size=_need(data, "vocab_size", path),
        norm_eps=float(_optional(data, "norm_eps", path, 1e-5, float)),
        rope_theta=float(_optional(data, "rope_theta", path, 500000.0, float)),
        max_position_embeddings=_optional(data, "max_seq_len", path, 131072),
        tie_word_embeddings=tied if tie_word_embeddings is None else bool(tie_word_embeddings),
        qkv_bias=False,
        rope_scaling=rope,
        source_format="meta",
        cross_attention_layers=cross,
        vision=vision_config.from_meta_params(data, str(path)) if cross else None,
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
