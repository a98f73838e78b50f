"""runtime/images.py against transformers' MllamaImageProcessor (the PIL backend), on the
real photographs matplotlib ships, and its errors on inputs that are not images.

Llama 3.2 Vision's settings: 560-pixel tiles, at most 4, CLIP mean/std, bilinear.
Equality is exact (max |diff| 0.0): the same Pillow resize on uint8, then the same float64
rescale and float32 normalisation.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from runtime.images import (CLIP_MEAN, CLIP_STD, ImageConfig, cross_attention_token_mask, optimal_canvas,
                            preprocess, preprocess_batch)


def photo_path(name="grace_hopper.jpg") -> str:
    import matplotlib
    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", name)


def hf_processor(config: ImageConfig = ImageConfig()):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": config.tile_size, "width": config.tile_size},
                                   max_image_tiles=config.max_tiles, image_mean=list(config.mean),
                                   image_std=list(config.std))


def inputs(tmp_path):
    """Real photographs and variants: grace_hopper.jpg (600 x 512 portrait) as a path and
    as a PIL image, EXIF-rotated, wide and tall crops, a tiny one (upscaled), wide and large
    resized ones (downscaled into 3, 4 and 2 x 2 tiles), grayscale, as a uint8 array; the
    two RGBA PNGs (a wide logo, an icon)."""
    photo = Image.open(photo_path()).convert("RGB")
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    photo.save(rotated, exif=exif, quality=90)
    return {
        "portrait path": photo_path(),
        "portrait PIL": Image.open(photo_path()),
        "EXIF-rotated path": str(rotated),
        "wide crop": photo.crop((0, 120, 512, 260)),
        "tall crop": photo.crop((200, 0, 330, 600)),
        "tiny": photo.resize((61, 73)),
        "stretched 1500x450": photo.resize((1500, 450)),
        "huge 2500x600": photo.resize((2500, 600)),
        "large 1300x1250": photo.resize((1300, 1250)),
        "grayscale": photo.convert("L"),
        "array": np.asarray(photo.crop((0, 0, 512, 300))),
        "RGBA logo path": photo_path("logo2.png"),
        "RGBA logo PIL": Image.open(photo_path("logo2.png")),
        "RGBA icon array": np.asarray(Image.open(photo_path("Minduka_Present_Blue_Pack.png"))),
    }


def test_equals_hf_processor_on_photographs(tmp_path):
    hf = hf_processor()
    seen = set()
    for label, image in inputs(tmp_path).items():
        want = hf(images=[[image]], return_tensors="np")
        got = preprocess(image)
        diff = float(np.abs(got.pixel_values - want["pixel_values"][0, 0]).max())
        print(f"\n{label:18s} tiles {got.aspect_ratio} id {got.aspect_ratio_id}: max |diff| {diff}")
        assert diff == 0.0, label
        assert got.aspect_ratio_id == want["aspect_ratio_ids"][0, 0], label
        assert np.array_equal(got.aspect_ratio_mask, want["aspect_ratio_mask"][0, 0]), label
        seen.add(got.aspect_ratio)
    assert {(2, 1), (1, 2), (1, 3), (1, 4), (2, 2), (1, 1)} <= seen  # non-square layouts exercised


def test_other_tile_sizes_and_batches(tmp_path):
    """Another tile size and tile budget, and a batch of prompts with different numbers of
    images (absent images padded as HF pads them)."""
    config = ImageConfig(tile_size=336, max_tiles=6, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    hf = hf_processor(config)
    images = list(inputs(tmp_path).values())
    batch = [[images[0], images[3]], [images[5]], [images[7], images[4], images[11]]]
    want = hf(images=batch, return_tensors="np")
    got = preprocess_batch(batch, config)
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert np.array_equal(got[key], want[key]), key
    assert got["num_tiles"] == want["num_tiles"] == [[4, 2], [1], [5, 2, 2]]


def test_canvas_choice_matches_hf():
    from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas

    sizes = [(1, 1), (100, 3000), (3000, 100), (560, 560), (561, 560), (1120, 560), (800, 1500), (224, 896),
             (4000, 4000), (559, 1121), (37, 1500)]
    for h, w in sizes:
        for tiles in (1, 2, 4, 8):
            assert optimal_canvas(h, w, tiles, 560) == tuple(int(v) for v in get_optimal_tiled_canvas(h, w, tiles, 560))


def test_cross_attention_token_mask_matches_processor():
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    image = 9
    cases = [([1, 2, image, 3, 4], [2]), ([image, 1, 2, 3], [4]), ([1, image, 2, image, 3, 4], [1, 3]),
             ([1, image, image, 2, 3, image, 4], [2, 4, 1]), ([image, image, 5], [3, 3])]
    for tokens, tiles in cases:
        want = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(tokens, image)], [tiles], 4, len(tokens))[0]
        assert np.array_equal(cross_attention_token_mask(tokens, image, tiles, 4), want), tokens
    with pytest.raises(ValueError, match="2 image tokens in the prompt but 1 images"):
        cross_attention_token_mask([image, image], image, [1], 4)


def test_bad_inputs_raise_value_errors(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n")
    truncated = tmp_path / "truncated.jpg"
    data = open(photo_path(), "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    cases = [
        (tmp_path / "missing.jpg", "missing.jpg: no such image file"),
        (str(tmp_path), "not a file"),
        (text, "notes.jpg: not an image file"),
        (truncated, "truncated.jpg: truncated or corrupt image"),
        (empty, "empty.png: not an image file"),
        ("https://example.com/cat.jpg", "URLs are not fetched"),
        (np.zeros((20, 20, 3), dtype=np.float32), "uint8 pixels"),
        (np.zeros((20, 20, 2), dtype=np.uint8), "got shape"),
        (np.zeros((0, 20, 3), dtype=np.uint8), "no pixels"),
        (42, "got int"),
    ]
    for image, message in cases:
        with pytest.raises(ValueError, match=message):
            preprocess(image)


def test_preprocessor_config_and_torch_free_import():
    config = ImageConfig.from_preprocessor_config({
        "size": {"height": 560, "width": 560}, "max_image_tiles": 4, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "rescale_factor": 1 / 255, "resample": 2})
    assert config == ImageConfig()
    with pytest.raises(ValueError, match="square"):
        ImageConfig.from_preprocessor_config({"size": {"height": 560, "width": 448}})
    code = "import sys, runtime.images\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
