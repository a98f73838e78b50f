"""Llama 3.2 Vision programs end to end on the emulator: images in, text out.

A tiny random MllamaForConditionalGeneration (5 decoder layers with cross-attention at HF
layers 1 and 3, i.e. before self-attention layers 1 and 2; a vision tower of 4 local and 2
global layers with taps, 56-pixel tiles, up to 4 tiles) is compiled from its HF directory
and run with a real photograph (matplotlib's sample Grace Hopper, cropped to a non-square
2-tile aspect ratio) against Hugging Face float32 on the same weights, teacher-forced.
Run with -s to see the figures.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import runtime
from fixtures import pcc

TEXT = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=192,
            vocab_size=100, num_hidden_layers=5, cross_attention_layers=[1, 3], rms_norm_eps=1e-5,
            max_position_embeddings=256, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=2,
              image_size=56, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3],
              vision_output_dim=96)
IMAGE = 100  # <|image|>: the first row after the vocabulary
PROMPT = [1, 5, IMAGE, 7, 8, 9, 10, 11]  # two tokens before the image: HF's rows that see no tile
TOKENS = PROMPT + [(11 * i + 20) % 97 + 3 for i in range(20)]
TARGETS = ["N150", pytest.param("N300", marks=pytest.mark.slow), pytest.param("T3K", marks=pytest.mark.slow),
           pytest.param("TG", marks=pytest.mark.slow)]
BOUNDS = {"float32": 0.99999, "accuracy": 0.999}


def photo(crop=(0, 0, 400, 200)):
    import matplotlib
    from PIL import Image

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    return Image.open(path).convert("RGB").crop(crop)


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    from fixtures import random_mllama

    model = random_mllama(TEXT, VISION, IMAGE, gates=None)
    path = tmp_path_factory.mktemp("tiny-mllama-vision")
    model.save_pretrained(path)
    return path, model


def hf_inputs(tokens, image):
    from runtime.images import ImageConfig, cross_attention_token_mask, preprocess

    if image is None:
        return {"input_ids": torch.tensor([tokens])}
    p = preprocess(image, ImageConfig(tile_size=56, max_tiles=4))
    mask = cross_attention_token_mask(tokens, IMAGE, [p.num_tiles], 4)
    return {"input_ids": torch.tensor([tokens]), "pixel_values": torch.tensor(p.pixel_values)[None, None],
            "aspect_ratio_ids": torch.tensor([[p.aspect_ratio_id]]),
            "aspect_ratio_mask": torch.tensor(p.aspect_ratio_mask)[None, None],
            "cross_attention_mask": torch.tensor(mask)[None]}


def hf_rows(model, tokens, prefill, image):
    with torch.no_grad():
        logits = model(**hf_inputs(tokens, image)).logits[0].float()
    return logits[prefill - 1: len(tokens) - 1].numpy()


@pytest.fixture(scope="module")
def program(mllama, compile_artifact):
    path, _ = mllama

    def get(mode="float32", target="N150", **options):
        return compile_artifact(path, optimizations=mode, target=target, max_seq_len=256, max_num_blocks=64,
                                **options)
    return get


def test_the_photo_is_a_non_square_multi_tile_image():
    from runtime.images import ImageConfig, preprocess

    p = preprocess(photo(), ImageConfig(tile_size=56, max_tiles=4))
    assert p.num_tiles == 2 and p.aspect_ratio == (1, 2)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mode", ["float32", "accuracy"])
def test_logits_with_an_image_match_hf(mllama, program, mode, target):
    _, model = mllama
    session = runtime.load(program(mode, target))
    got = session.teacher_forced_logits(TOKENS, len(PROMPT), image=photo())
    want = hf_rows(model, TOKENS, len(PROMPT), photo())
    value = pcc(got, want)
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    print(f"\ntiny Llama 3.2 Vision with a photo, {mode} on {target}: PCC {value:.9f}, top-1 {top1:.3f}")
    assert value >= BOUNDS[mode]


def test_an_image_changes_the_answer_and_none_is_hf_text_only(mllama, program):
    """With the image the logits differ (as in HF); without it the same program equals HF's
    text-only forward, which skips the cross-attention layers."""
    _, model = mllama
    session = runtime.load(program())
    text = [t if t != IMAGE else 3 for t in TOKENS]
    with_image = session.teacher_forced_logits(TOKENS, len(PROMPT), image=photo())
    without = session.teacher_forced_logits(text, len(PROMPT))
    assert np.abs(with_image - without).max() > 0.1
    assert pcc(without, hf_rows(model, text, len(PROMPT), None)) >= BOUNDS["float32"]


def test_greedy_generation_equals_hf(mllama, program):
    _, model = mllama
    session = runtime.load(program())
    (got,) = session.generate([PROMPT], max_generated_tokens=12, images=[photo()], stop_at_eos=False)
    with torch.no_grad():
        want = model.generate(**hf_inputs(PROMPT, photo()), max_new_tokens=12, do_sample=False,
                              min_new_tokens=12)[0, len(PROMPT):].tolist()
    print(f"\ngreedy with a photo: {got} (HF {want})")
    assert got == want


def test_a_batch_mixing_images_and_text_equals_each_user_alone(program):
    """Four users in one batch: two with different images (2 tiles and 4 tiles), two
    without: every user's tokens equal what it gets alone."""
    session = runtime.load(program(batch_size=4))
    prompts = [PROMPT, [1, 4, 6, 8, 9], [IMAGE, 3, 5, 7], [1, 2, 3]]
    images = [photo(), None, photo((0, 0, 500, 500)), None]
    together = session.generate(prompts, max_generated_tokens=8, images=images, stop_at_eos=False)
    alone = [session.generate([p], max_generated_tokens=8, images=[im], stop_at_eos=False)[0]
             for p, im in zip(prompts, images)]
    assert together == alone
    assert together[0] != together[2]  # the images matter


@pytest.mark.parametrize("case", ["not an image", "truncated jpeg", "missing path", "no image token",
                                  "two image tokens", "text-only program"])
def test_bad_images_fail_before_any_work(case, program, tmp_path, tiny_model, compile_artifact):
    """One ValueError naming the problem, raised before any device work: the other users'
    results are the same as before."""
    session = runtime.load(program(batch_size=4))
    good = session.generate([PROMPT], max_generated_tokens=4, images=[photo()], stop_at_eos=False)
    bad_file = tmp_path / "bad.jpg"
    prompt, image, expected = PROMPT, None, ""
    if case == "not an image":
        bad_file.write_text("this is not a picture")
        image, expected = bad_file, "bad.jpg"
    elif case == "truncated jpeg":
        import matplotlib
        data = open(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data",
                                 "grace_hopper.jpg"), "rb").read()
        bad_file.write_bytes(data[: len(data) // 3])
        image, expected = bad_file, "bad.jpg"
    elif case == "missing path":
        image, expected = tmp_path / "nowhere.png", "nowhere.png"
    elif case == "no image token":
        prompt, image, expected = [1, 5, 7], photo(), "exactly one <|image|> token"
    elif case == "two image tokens":
        prompt, image, expected = [IMAGE, 5, IMAGE], photo(), "exactly one <|image|> token"
    else:
        session = runtime.load(compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256))
        prompt, image, expected = [1, 5, 7], photo(), "no vision function"
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        session.generate([PROMPT if case != "text-only program" else [1, 2], prompt],
                         max_generated_tokens=4, images=[photo() if case != "text-only program" else None, image])
    assert "prompt 1" in str(info.value) and "\n" not in str(info.value)
    if case != "text-only program":
        again = session.generate([PROMPT], max_generated_tokens=4, images=[photo()], stop_at_eos=False)
        assert again == good


def _word_tokenizer(folder):
    """A word-level tokenizer for the tiny model: w0..w99, <|image|> = 100, a chat template
    that renders an image item as <|image|> (Llama 3.2 Vision's templates do)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(100)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|image|>"])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|> {% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}{% endif %}{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "w2"}))


def test_ttrun_prompt_and_vision_preset_with_images(program, tmp_path, capsys):
    import shutil

    from runtime import cli

    out = tmp_path / "program"
    shutil.copytree(program(batch_size=4), out)
    _word_tokenizer(out)
    image = tmp_path / "hopper.png"
    photo().save(image)
    assert cli.main(["prompt", "--program", str(out), "--image", str(image), "--max-generated-tokens", "4",
                     "--no-stop-at-eos", "w5 w7 w9"]) == 0
    captured = capsys.readouterr()
    assert "> w5 w7 w9" in captured.out and "tokens/s" in captured.err
    assert cli.main(["vision", "--program", str(out), "--max-generated-tokens", "3"]) == 0
    assert "Describe this image" in capsys.readouterr().out
    assert cli.main(["prompt", "--program", str(out), "--image", str(tmp_path / "none.png"), "w1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.png" in err and len(err.splitlines()) == 1
