"""Image preprocessing for Llama 3.2 Vision, equal to transformers' MllamaImageProcessor.

numpy and Pillow only: this is the torch-free runtime side. For each image:

1. load: a path (opened with Pillow, EXIF orientation applied, `convert("RGB")`, as
   transformers' load_image), a PIL.Image (alpha composited onto white, no EXIF
   rotation, as the processor's convert_to_rgb), or a uint8 array `[H, W]`, `[H, W, C]`
   or `[C, H, W]` (C in 1, 3, 4; 1 is repeated, 4 composited onto white);
2. tile layout: among the supported arrangements (h, w) of at most `max_tiles` tiles,
   the canvas `(h*tile, w*tile)` whose limiting scale min(canvas_h/H, canvas_w/W) is the
   smallest one >= 1 (upscaling), else the largest one < 1; ties go to the smaller area;
3. resize with Pillow's BILINEAR on uint8 to the aspect-preserving size that fits the
   canvas (each side at least one tile where the canvas allows, floor rounding);
4. pad bottom/right with 0 (black, before normalisation) to the canvas;
5. rescale (float64 * 1/255 -> float32) and normalise ((x - mean) / std in float32);
6. split into h*w tiles in row-major order; pad with all-zero tiles to `max_tiles`.

Outputs per image: pixel_values `[max_tiles, 3, tile, tile]` float32, the aspect ratio
(h, w), aspect_ratio_id (1-based index of (h, w) in the supported list; 0 = no image),
aspect_ratio_mask `[max_tiles]` int64 (1 for the h*w real tiles), num_tiles.
`cross_attention_token_mask` is the processor's per-token tile mask for the text side.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Llama 3.2 Vision's preprocessor_config.json
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageConfig:
    tile_size: int = 560
    max_tiles: int = 4
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BILINEAR

    @classmethod
    def from_preprocessor_config(cls, data: dict) -> "ImageConfig":
        """From an HF preprocessor_config.json dict (size, max_image_tiles, image_mean, ...)."""
        size = data.get("size") or {}
        if size.get("height") != size.get("width"):
            raise ValueError(f"preprocessor config: tiles must be square, got size {size}")
        return cls(tile_size=int(size.get("height", 560)), max_tiles=int(data.get("max_image_tiles", 4)),
                   mean=tuple(data.get("image_mean", CLIP_MEAN)), std=tuple(data.get("image_std", CLIP_STD)),
                   rescale_factor=float(data.get("rescale_factor", 1 / 255)),
                   resample=int(data.get("resample", Image.Resampling.BILINEAR)))


@dataclass
class ProcessedImage:
    pixel_values: np.ndarray          # [max_tiles, 3, tile, tile] float32
    aspect_ratio: tuple[int, int]     # (tiles high, tiles wide)
    aspect_ratio_id: int
    aspect_ratio_mask: np.ndarray = field(repr=False)  # [max_tiles] int64

    @property
    def num_tiles(self) -> int:
        return self.aspect_ratio[0] * self.aspect_ratio[1]


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """(h, w) with h*w <= max_tiles, h-major: id k is entry k-1."""
    return [(h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles]


def optimal_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The canvas (height, width) in pixels the image is fitted into (step 2 above)."""
    canvases = np.array(supported_aspect_ratios(max_tiles)) * tile
    scale_h = canvases[:, 0] / height
    scale_w = canvases[:, 1] / width
    scales = np.minimum(scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = up.min() if len(up) else scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    best = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]), int(best[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Resized (height, width): aspect kept, clamped between one tile and the canvas."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


# ---------------------------------------------------------------- loading
def _white_composite(image: Image.Image) -> np.ndarray:
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def _from_path(path: Path) -> np.ndarray:
    if not path.exists():
        raise ValueError(f"{path}: no such image file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
            return np.array(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file (Pillow cannot identify its format)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: truncated or corrupt image ({e})") from None


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"image array must hold uint8 pixels (0..255), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # [C, H, W]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be [H, W], [H, W, C] or [C, H, W] with C in 1, 3, 4; "
                         f"got shape {tuple(array.shape)}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def load_rgb(image) -> np.ndarray:
    """A path, PIL.Image or uint8 array -> RGB uint8 `[H, W, 3]` (ValueError naming the problem)."""
    if isinstance(image, (str, os.PathLike)):
        text = str(image)
        if text.startswith(("http://", "https://")):
            raise ValueError(f"{text}: URLs are not fetched; download the image and give its path")
        rgb = _from_path(Path(text))
    elif isinstance(image, Image.Image):
        try:
            rgb = _white_composite(image)
        except OSError as e:
            raise ValueError(f"image: truncated or corrupt image ({e})") from None
    elif isinstance(image, np.ndarray):
        rgb = _from_array(image)
    else:
        raise ValueError(f"expected an image path, a PIL.Image or a uint8 array, got {type(image).__name__}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"image has no pixels (size {rgb.shape[1]}x{rgb.shape[0]})")
    return rgb


# ---------------------------------------------------------------- preprocessing
def preprocess(image, config: ImageConfig = ImageConfig()) -> ProcessedImage:
    """One image (path, PIL.Image or uint8 array) -> tiles, aspect ratio id and mask."""
    rgb = load_rgb(image)
    tile = config.tile_size
    height, width = rgb.shape[:2]
    canvas_h, canvas_w = optimal_canvas(height, width, config.max_tiles, tile)
    new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, tile)
    resized = np.array(Image.fromarray(rgb).resize((new_w, new_h), resample=config.resample))
    chw = np.moveaxis(resized, -1, 0)
    chw = np.pad(chw, ((0, 0), (0, canvas_h - new_h), (0, canvas_w - new_w)), constant_values=0)
    pixels = (chw.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.array(config.mean, dtype=np.float32)[:, None, None]
    std = np.array(config.std, dtype=np.float32)[:, None, None]
    pixels = (pixels - mean) / std
    rows, cols = canvas_h // tile, canvas_w // tile
    tiles = pixels.reshape(3, rows, tile, cols, tile).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile, tile)
    out = np.zeros((config.max_tiles, 3, tile, tile), dtype=np.float32)
    out[: rows * cols] = tiles
    mask = np.zeros(config.max_tiles, dtype=np.int64)
    mask[: rows * cols] = 1
    ratio = (rows, cols)
    return ProcessedImage(out, ratio, supported_aspect_ratios(config.max_tiles).index(ratio) + 1, mask)


def preprocess_batch(images: list[list], config: ImageConfig = ImageConfig()) -> dict[str, np.ndarray]:
    """Images per prompt -> HF's processor arrays: pixel_values `[B, I, T, 3, tile, tile]`,
    aspect_ratio_ids `[B, I]`, aspect_ratio_mask `[B, I, T]` (absent images: zeros, id 0,
    mask `[1, 0, ...]` as HF pads them), num_tiles (lists)."""
    done = [[preprocess(im, config) for im in sample] for sample in images]
    batch, most = len(done), max((len(s) for s in done), default=0)
    if most == 0:
        raise ValueError("no images given")
    t, tile = config.max_tiles, config.tile_size
    pixels = np.zeros((batch, most, t, 3, tile, tile), dtype=np.float32)
    ids = np.zeros((batch, most), dtype=np.int64)
    masks = np.zeros((batch, most, t), dtype=np.int64)
    masks[:, :, 0] = 1
    for b, sample in enumerate(done):
        for i, p in enumerate(sample):
            pixels[b, i], ids[b, i], masks[b, i] = p.pixel_values, p.aspect_ratio_id, p.aspect_ratio_mask
    return {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": masks,
            "num_tiles": [[p.num_tiles for p in s] for s in done]}


def cross_attention_token_mask(token_ids: list[int], image_token_id: int, num_tiles: list[int],
                               max_tiles: int) -> np.ndarray:
    """The processor's `cross_attention_mask` of one prompt: `[S, images, max_tiles]` int64.

    Image k's <|image|> token and every later token up to the next image token see its
    `num_tiles[k]` real tiles; the last image is seen to the end; consecutive image tokens
    are a group that all see to the end of the group's text. Tokens before the first
    image token see nothing (their rows are all zero)."""
    locations = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if len(locations) != len(num_tiles):
        raise ValueError(f"{len(locations)} image tokens in the prompt but {len(num_tiles)} images")
    length = len(token_ids)
    spans = [[a, b] for a, b in zip(locations, locations[1:] + [length])]
    end = length
    for span in reversed(spans):  # consecutive image tokens attend together
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    mask = np.zeros((length, len(locations), max_tiles), dtype=np.int64)
    for k, ((start, stop), tiles) in enumerate(zip(spans, num_tiles)):
        mask[start:stop, k, :tiles] = 1
    return mask
