"""Llama 3.2 Vision's language model, without images.

Without an image, Hugging Face's MllamaTextModel skips its cross-attention layers (and
Meta's text_only_inference does too). The compiled program keeps them (it also serves
images): for a user without an image its cross-attention caches are zero and its row
mask zero, so each layer is an identity. A tiny random MllamaForConditionalGeneration
(5 decoder layers, cross-attention at HF layers 1 and 3, gates opened to 1 so that they
would matter) is compiled from its HF directory and its logits are compared with HF's on
token-only input. The Meta layout (`text_model.` prefix) reads the same text weights.
"""
from __future__ import annotations

import json

import pytest
import torch

from fixtures import pcc
from models_ref.config import load_config
from models_ref.weights import open_checkpoint

TEXT = dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2, intermediate_size=328,
            vocab_size=1000, num_hidden_layers=5, cross_attention_layers=[1, 3], max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
              attention_heads=2, image_size=56, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0],
              vision_output_dim=128, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
TOKENS = list(range(3, 1000, 13))[:60]
PREFILL = 20


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(MllamaConfig(text_config=TEXT, vision_config=VISION,
                                                        image_token_index=1000)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if p.dim() == 1 and p.shape[0] == TEXT["hidden_size"]:
                p.add_(1.0)
            if "gate" in name:  # open the cross-attention gates: they must still not matter
                p.fill_(1.0)
    path = tmp_path_factory.mktemp("tiny-mllama")
    model.save_pretrained(path)
    return path, model


def test_config_is_the_text_decoder(mllama):
    path, _ = mllama
    cfg = load_config(path)
    assert cfg.n_layers == 3 and cfg.cross_attention_layers == (1, 2)
    reader = open_checkpoint(path)
    assert reader.shapes()["tok_embeddings.weight"] == (1000, 192)  # the 8 image-token rows dropped
    hf_layer_4 = reader.get("layers.2.feed_forward.w2.weight")  # self layer 2 is HF layer 4
    from safetensors.torch import load_file
    raw = load_file(str(path / "model.safetensors"))
    key = next(k for k in raw if k.endswith("layers.4.mlp.down_proj.weight"))  # 4.x or 5.x prefix
    assert torch.equal(hf_layer_4, raw[key])


@pytest.mark.parametrize("target", ["N150", "T3K"])
def test_text_program_matches_hf_without_images(mllama, compile_artifact, target):
    import runtime

    path, model = mllama
    out = compile_artifact(path, optimizations="float32", max_seq_len=256, target=target)
    program = json.loads((out / "program.json").read_text())
    assert program["model"]["cross_attention_layers"] == [1, 2]
    got = runtime.load(out, matmul="exact").teacher_forced_logits(TOKENS, PREFILL)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([TOKENS])).logits[0, PREFILL - 1: len(TOKENS) - 1].float().numpy()
    p = pcc(got, want)
    print(f"\ntiny mllama text-only on {target}, float32: PCC vs HF {p:.9f}")
    assert p > 0.99999


def test_meta_layout_reads_the_same_text_weights(mllama, tmp_path):
    """A Meta-style checkpoint of the text decoder (text_model. prefix, self-attention
    layers 0..2) gives the reader the same tensors as the HF directory. (Meta's params.json
    cannot describe a tiny vision tower, whose geometry Meta hard-codes: the image-side
    Meta layouts are covered by tests/test_vision_ref.py's transform tests.)"""
    from models_ref.weights import MetaReader

    path, _ = mllama
    hf = open_checkpoint(path)
    text = [name for name in hf.shapes() if name.startswith(("layers.", "tok_embeddings", "norm", "output"))]
    state = {"text_model." + name: hf.get(name).clone() for name in text}
    folder = tmp_path / "meta"
    folder.mkdir()
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps({
        "dim": 192, "n_layers": 3, "n_heads": 6, "n_kv_heads": 2, "vocab_size": 1000, "multiple_of": 8,
        "ffn_dim_multiplier": 328 / 512, "norm_eps": 1e-5, "rope_theta": 10000.0, "use_scaled_rope": False,
        "max_seq_len": 512}))
    meta = open_checkpoint(folder)
    assert isinstance(meta, MetaReader) and meta.cfg.vision is None
    for name in text:
        assert torch.equal(meta.get(name), hf.get(name)), name
