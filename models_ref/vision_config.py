"""Llama 3.2 Vision's image side as one normalised `VisionConfig`, from HF or Meta files.

The text decoder stays in `config.ModelConfig`; this holds what the vision encoder, the
multi-modal projector and the image preprocessing need. HF keeps it in `config.json`'s
`vision_config`; Meta's `params.json` says only `vision_chunk_size` and
`vision_max_num_chunks`, the rest is hard-coded in Meta's reference (and in transformers'
converter): 32 local + 8 global layers of width 1280, 16 heads, patch 14, taps 3,7,15,23,30.

Numbers for Llama 3.2 11B Vision (tile 560, patch 14, at most 4 tiles): 40 * 40 = 1600
patches + 1 class token = 1601 tokens per tile, padded to 1608 inside the encoder; the
text decoder cross-attends to 4 * 1601 = 6404 vision tokens per image; features are
1280 * (1 + 5 taps) = 7680 wide before the projector.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Where the intermediate features are read (see VisionConfig.intermediate_taps):
#   "layer_input":  the hidden state entering local layer i (Meta's reference, which the
#                   model was trained with, tt-metal, and transformers' original port);
#   "layer_output": the hidden state leaving local layer i (transformers 5.x as installed
#                   here: MllamaVisionEncoder appends each layer's output, an off-by-one
#                   against Meta's reference; tests/test_vision_ref.py pins it).
TAPS = ("layer_input", "layer_output")


def all_aspect_ratios(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(tiles high, tiles wide) arrangements of at most `max_tiles` tiles, in the order
    whose 1-based index is the aspect-ratio id (0 is "no image"): 4 -> (1,1) (1,2) (1,3)
    (1,4) (2,1) (2,2) (3,1) (4,1)."""
    return tuple((h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1)
                 if h * w <= max_tiles)


@dataclass(frozen=True)
class VisionConfig:
    tile_size: int = 560            # HF image_size, Meta vision_chunk_size
    patch_size: int = 14
    num_channels: int = 3
    dim: int = 1280                 # vision width
    n_layers: int = 32              # local (per-tile-mask) transformer
    n_global_layers: int = 8        # gated global transformer
    n_heads: int = 16
    ffn_dim: int = 5120
    norm_eps: float = 1e-5          # encoder layers; ln_pre/ln_post use LayerNorm's 1e-5 too
    max_num_tiles: int = 4
    supported_aspect_ratios: tuple[tuple[int, int], ...] = all_aspect_ratios(4)
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    text_dim: int = 4096            # projector output = the text decoder's width
    intermediate_taps: str = "layer_input"
    # Tokens of each tile are zero-padded to a multiple of `token_multiple` before the
    # transformers (HF and Meta: 8, so 1601 -> 1608). The padding is part of the model's
    # maths: real tokens attend to padding tokens (only padding-to-padding is masked), so
    # a device that pads further (to 32) must mask the extra rows both ways.
    token_multiple: int = 8
    image_token_id: int = 128256  # <|image|>: the first embedding row after the vocabulary

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patches_per_tile(self) -> int:
        return (self.tile_size // self.patch_size) ** 2

    @property
    def tokens_per_tile(self) -> int:
        """Patches plus the class token: 1601 for Llama 3.2 Vision (40*40 + 1)."""
        return self.patches_per_tile + 1

    @property
    def padded_tokens_per_tile(self) -> int:
        """1608 for Llama 3.2 Vision: what the transformers run on, per tile."""
        m = self.token_multiple
        return -(-self.tokens_per_tile // m) * m

    @property
    def vision_tokens(self) -> int:
        """Vision tokens of one image as the text decoder sees them: max_num_tiles *
        tokens_per_tile = 6404 (padding tokens removed, padding tiles kept and masked)."""
        return self.max_num_tiles * self.tokens_per_tile

    @property
    def output_dim(self) -> int:
        """Encoder output features: final + one per tap (7680 = 1280 * 6)."""
        return self.dim * (1 + len(self.intermediate_layers))

    @property
    def n_aspect_ratios(self) -> int:
        return len(self.supported_aspect_ratios)

    def replace(self, **changes) -> "VisionConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["supported_aspect_ratios"] = [list(r) for r in self.supported_aspect_ratios]
        data["intermediate_layers"] = list(self.intermediate_layers)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "VisionConfig":
        data = dict(data)
        data["supported_aspect_ratios"] = tuple(tuple(r) for r in data["supported_aspect_ratios"])
        data["intermediate_layers"] = tuple(data["intermediate_layers"])
        return validate(cls(**data))


def validate(cfg: VisionConfig, where: str = "vision config") -> VisionConfig:
    problems = []
    if cfg.tile_size % cfg.patch_size:
        problems.append(f"tile size {cfg.tile_size} is not a multiple of patch size {cfg.patch_size}")
    if cfg.dim % cfg.n_heads:
        problems.append(f"width {cfg.dim} is not divisible by {cfg.n_heads} heads")
    if any(not 0 <= i < cfg.n_layers for i in cfg.intermediate_layers):
        problems.append(f"intermediate layers {list(cfg.intermediate_layers)} outside 0..{cfg.n_layers - 1}")
    if any(h * w > cfg.max_num_tiles or h < 1 or w < 1 for h, w in cfg.supported_aspect_ratios):
        problems.append(f"aspect ratios {cfg.supported_aspect_ratios} exceed {cfg.max_num_tiles} tiles")
    if cfg.intermediate_taps not in TAPS:
        problems.append(f"intermediate_taps must be one of {TAPS}, got {cfg.intermediate_taps!r}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return cfg


def from_hf_config(data: dict, where: str = "config.json", **overrides) -> VisionConfig:
    """From an HF MllamaConfig dict (config.json, with vision_config and text_config) or
    a bare vision_config dict plus `text_dim=` in overrides."""
    vision = data.get("vision_config", data)
    text = data.get("text_config", {})
    if vision.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{where}: vision hidden_act {vision['hidden_act']!r} is not supported (gelu only)")
    max_tiles = int(vision.get("max_num_tiles", 4))
    ratios = vision.get("supported_aspect_ratios") or all_aspect_ratios(max_tiles)
    fields = dict(
        tile_size=int(vision.get("image_size", 560)),
        patch_size=int(vision.get("patch_size", 14)),
        num_channels=int(vision.get("num_channels", 3)),
        dim=int(vision.get("hidden_size", 1280)),
        n_layers=int(vision.get("num_hidden_layers", 32)),
        n_global_layers=int(vision.get("num_global_layers", 8)),
        n_heads=int(vision.get("attention_heads", 16)),
        ffn_dim=int(vision.get("intermediate_size", 5120)),
        norm_eps=float(vision.get("norm_eps", 1e-5)),
        max_num_tiles=max_tiles,
        supported_aspect_ratios=tuple(tuple(int(v) for v in r) for r in ratios),
        intermediate_layers=tuple(int(i) for i in vision.get("intermediate_layers_indices", (3, 7, 15, 23, 30))),
        text_dim=int(text.get("hidden_size", 4096)),
        # HF checkpoints compute what the transformers they are checked against computes
        # (5.x: each tapped layer's output); Meta checkpoints what Meta's reference does.
        intermediate_taps="layer_output",
        image_token_id=int(data.get("image_token_index", text.get("vocab_size", 128256))),
    )
    fields.update(overrides)
    cfg = validate(VisionConfig(**fields), where)
    declared = vision.get("vision_output_dim")
    if declared is not None and int(declared) != cfg.output_dim:
        raise ValueError(f"{where}: vision_output_dim {declared} != width {cfg.dim} x "
                         f"(1 + {len(cfg.intermediate_layers)} intermediate layers) = {cfg.output_dim}")
    return cfg


def from_meta_params(params: dict, where: str = "params.json", **overrides) -> VisionConfig:
    """From a Meta params.json: only the tile size and tile count are in the file."""
    max_tiles = int(params.get("vision_max_num_chunks", 4))
    fields = dict(tile_size=int(params.get("vision_chunk_size", 560)), max_num_tiles=max_tiles,
                  supported_aspect_ratios=all_aspect_ratios(max_tiles), text_dim=int(params["dim"]),
                  image_token_id=int(params.get("vocab_size", 128256)))
    fields.update(overrides)
    return validate(VisionConfig(**fields), where)
