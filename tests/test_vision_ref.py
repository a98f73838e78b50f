"""Llama 3.2 Vision's image side against Hugging Face, on a tiny random Mllama (float32).

- the vision encoder + projector (models_ref/vision.py) equals MllamaVisionModel +
  multi_modal_projector on several tiles and non-square aspect ratios, traced or eager;
- the cross-attention layer split into cache fill + per-token layer
  (models_ref/cross_attention.py) equals MllamaCrossAttentionDecoderLayer on prefill rows
  (rows before the <|image|> token included) and on decode rows;
- a composition (our vision tower, cache fill and cross-attention layers interleaved
  with HF's self-attention layers) gives HF MllamaForConditionalGeneration's logits for a
  prompt with an image, prefilled then decoded token by token;
- the weight-name table covers every image-side tensor of an HF checkpoint, both layouts.
Weights are loaded through models_ref/vision_names.py, so the table is tested too.
"""
from __future__ import annotations


import pytest
import torch
import torch.fx

from fixtures import pcc, random_mllama
from models_ref import vision_names
from models_ref.config import ModelConfig
from models_ref.cross_attention import (CrossAttentionBlock, CrossAttentionCacheFill, cross_attention_masks,
                                        decode_rows)
from models_ref.vision import VisionTower
from models_ref.vision_config import from_hf_config
from runtime.images import ImageConfig, cross_attention_token_mask, preprocess

TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=100,
            num_hidden_layers=5, cross_attention_layers=[1, 3], rms_norm_eps=1e-5, max_position_embeddings=256,
            rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_global_layers=2, attention_heads=2,
              image_size=56, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3],
              vision_output_dim=96)
IMAGE_TOKEN = 100
TILE = ImageConfig(tile_size=56, max_tiles=4)
N = (56 // 14) ** 2 + 1  # 17 tokens per tile, padded to 24 inside the encoder (as 1601 -> 1608)


def sample_photo(name="grace_hopper.jpg"):
    import os

    import matplotlib
    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", name)


@pytest.fixture(scope="module")
def hf_model():
    return random_mllama(TEXT, VISION, IMAGE_TOKEN)


@pytest.fixture(scope="module")
def canonical(hf_model):
    text = hf_model.config.text_config
    vcfg = from_hf_config(hf_model.config.to_dict())
    return vision_names.canonical_from_hf(hf_model.state_dict(), vcfg, text.cross_attention_layers, text.vocab_size)


def text_cfg() -> ModelConfig:
    return ModelConfig(name="tiny-mllama", family="llama", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                       ffn_dim=96, vocab_size=100, norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                       tie_word_embeddings=False, qkv_bias=False, cross_attention_layers=(1, 2))


def tower(hf_model, canonical, **overrides) -> VisionTower:
    vcfg = from_hf_config(hf_model.config.to_dict(), **{"intermediate_taps": "layer_output", **overrides})
    model = VisionTower(vcfg).eval()
    model.load_state_dict({k: v for k, v in canonical.items() if k.startswith("vision_model.")}, strict=True)
    return model


def cross_block(canonical, layer, mode, **kw) -> CrossAttentionBlock:
    block = CrossAttentionBlock(text_cfg(), mode, **kw).eval()
    prefix = f"cross_attention_layers.{layer}."
    block.load_state_dict({k[len(prefix):]: v for k, v in canonical.items() if k.startswith(prefix)}, strict=True)
    return block


def hf_vision(hf_model, pixels, ids, mask):
    with torch.no_grad():
        feats = hf_model.model.vision_model(pixel_values=pixels, aspect_ratio_ids=ids,
                                             aspect_ratio_mask=mask).last_hidden_state
        return feats, hf_model.model.multi_modal_projector(feats)


def images():
    """Real photographs at tile 56: the portrait (2 x 2 at this tile size), a wide crop
    (1 x 4), a half-height crop (1 x 2: two padding tiles) and a small square one (1 tile,
    three padding tiles)."""
    from PIL import Image
    photo = Image.open(sample_photo()).convert("RGB")
    return [preprocess(sample_photo(), TILE), preprocess(photo.crop((0, 100, 512, 250)), TILE),
            preprocess(photo.crop((0, 0, 512, 256)), TILE), preprocess(photo.resize((40, 40)), TILE)]


def test_vision_tower_equals_hf(hf_model, canonical):
    model = tower(hf_model, canonical)
    ratios = []
    for im in images():
        pixels = torch.from_numpy(im.pixel_values)
        ids, mask = torch.tensor([im.aspect_ratio_id]), torch.from_numpy(im.aspect_ratio_mask)
        feats, want = hf_vision(hf_model, pixels[None, None], ids[None], mask[None, None])
        with torch.no_grad():
            got = model(pixels, ids, mask)
            got_feats = model.vision_model.vision_encoder(pixels, ids, mask)
        assert got.shape == (1, 1, 4 * N, 64)
        diff = (got - want.reshape(got.shape)).abs().max().item()
        fdiff = (got_feats - feats.reshape(got_feats.shape)).abs().max().item()
        print(f"\nvision tower, aspect ratio {im.aspect_ratio}: max |diff| features {fdiff:.2e}, "
              f"projected {diff:.2e}, PCC {pcc(got, want):.9f}")
        assert diff < 2e-5 and fdiff < 2e-5
        ratios.append(im.aspect_ratio)
    assert ratios == [(2, 2), (1, 4), (1, 2), (1, 1)]


def test_traced_tower_and_device_padding(hf_model, canonical):
    """fx traces the tower into leaf functions; padding tiles to 32 tokens (the device's
    tile) instead of 24 changes nothing (the extra rows are masked both ways)."""
    im = images()[1]
    pixels, ids, mask = torch.from_numpy(im.pixel_values), torch.tensor([im.aspect_ratio_id]), torch.from_numpy(
        im.aspect_ratio_mask)
    eager = tower(hf_model, canonical)
    gm = torch.fx.symbolic_trace(eager)
    leaves = {n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"}
    assert {"patchify", "encoder_attention_mask", "encoder_attention", "vision_features", "aspect_ratio_rows",
            "tanh_gate", "split_heads", "merge_heads"} <= leaves
    assert not leaves & {"unfold", "scaled_dot_product_attention", "stack", "embedding"}
    modules = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert modules == {"Linear", "LayerNorm"}
    padded = tower(hf_model, canonical, token_multiple=32)
    with torch.no_grad():
        want = eager(pixels, ids, mask)
        assert torch.equal(gm(pixels, ids, mask), want)
        diff = (padded(pixels, ids, mask) - want).abs().max().item()
    print(f"\ntiles padded to 32 tokens instead of 24: max |diff| {diff:.2e}")
    assert diff < 1e-5


def test_cross_attention_traces(canonical):
    """Cache fill and both modes of the layer trace into leaf functions and Linear calls and
    run traced as eager."""
    torch.manual_seed(6)
    vision, x = torch.randn(1, 1, 4 * N, 64), torch.randn(1, 1, 5, 64)
    xmask, row_mask = cross_attention_masks(torch.ones(5, 1, 4, dtype=torch.int64), N)
    for mode in ("prefill", "decode"):
        eager = torch.nn.ModuleList([cross_block(canonical, 0, mode, max_batch=5, cache_len=4 * N)])
        fill = torch.fx.symbolic_trace(CrossAttentionCacheFill(eager))
        step = torch.fx.symbolic_trace(eager[0])
        leaves = {n.target.__name__ for g in (fill, step) for n in g.graph.nodes if n.op == "call_function"}
        want = {"fill_cache", "rms_norm", "split_heads", "merge_heads", "tanh_gate",
                "cross_attention_decode" if mode == "decode" else "cross_attention"}
        assert want <= leaves, leaves
        with torch.no_grad():
            for user in range(5):
                fill(vision, user)
            user = 0 if mode == "prefill" else None
            got = step(x, xmask, row_mask, user)
            assert torch.equal(got, eager[0](x, xmask, row_mask, user))


def test_intermediate_taps_follow_meta_when_asked(hf_model, canonical):
    """transformers 5 taps the OUTPUT of local layer i; Meta's reference (the trained
    model) taps its INPUT, i.e. HF's output of layer i-1: taps 1, 3 in Meta's convention
    equal HF run with intermediate_layers_indices 0, 2."""
    im = images()[0]
    pixels, ids, mask = torch.from_numpy(im.pixel_values), torch.tensor([im.aspect_ratio_id]), torch.from_numpy(
        im.aspect_ratio_mask)
    meta = tower(hf_model, canonical, intermediate_taps="layer_input")
    vm = hf_model.model.vision_model
    saved = vm.intermediate_layers_indices
    try:
        vm.intermediate_layers_indices = [i - 1 for i in saved]
        _, want = hf_vision(hf_model, pixels[None, None], ids[None], mask[None, None])
    finally:
        vm.intermediate_layers_indices = saved
    _, hf_now = hf_vision(hf_model, pixels[None, None], ids[None], mask[None, None])
    with torch.no_grad():
        got = meta(pixels, ids, mask)
    assert (got - want.reshape(got.shape)).abs().max() < 2e-5
    assert (got - hf_now.reshape(got.shape)).abs().max() > 1e-2  # the conventions do differ


def _hf_masks(dense):
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
    return _prepare_cross_attention_mask(torch.as_tensor(dense)[None], num_vision_tokens=N, dtype=torch.float32)


def test_cross_attention_prefill_and_decode_equal_hf(hf_model, canonical):
    """Prefill: a prompt whose <|image|> is token 3 (rows 0-2 see no tile) and an image of
    2 tiles out of 4. Decode: two users, user 0 sees its image, user 1's row sees nothing."""
    torch.manual_seed(1)
    hf_layer = hf_model.model.language_model.layers[3]  # HF layer 3 = cross-attention layer 1
    tokens = [1, 5, 6, IMAGE_TOKEN, 7, 8, 9, 10, 11]
    dense = cross_attention_token_mask(tokens, IMAGE_TOKEN, [2], 4)
    x = torch.randn(1, len(tokens), 64)
    vision = [torch.randn(1, 4 * N, 64), torch.randn(1, 4 * N, 64)]
    prefill = cross_block(canonical, 1, "prefill", max_batch=2, cache_len=4 * N)
    decode = cross_block(canonical, 1, "decode", max_batch=2, cache_len=4 * N)
    with torch.no_grad():
        for user in (0, 1):
            CrossAttentionCacheFill(torch.nn.ModuleList([prefill, decode]))(vision[user][None], user)
        mask, full_row = _hf_masks(dense)
        want = hf_layer(x, cross_attention_states=vision[0], cross_attention_mask=mask, attention_mask=None,
                        full_text_row_masked_out_mask=full_row)
        xmask, row_mask = cross_attention_masks(torch.as_tensor(dense), N)
        got = prefill(x[None], xmask, row_mask, 0)[0]
        diff = (got - want).abs().max().item()
        before = (got[:, :3] - x[:, :3]).abs().max().item()
        print(f"\ncross-attention prefill: max |diff| {diff:.2e} (rows before the image move by {before:.3f})")
        assert diff < 1e-5 and before > 1e-3  # HF: those rows still receive gated attention
        # decode: user 0's row = its last prompt row; user 1 a row that sees no tile
        rows = torch.stack([torch.as_tensor(dense[-1]), torch.zeros(1, 4, dtype=torch.int64)])  # [2, 1, 4]
        xd = torch.randn(1, 2, 64)
        dmask, drow = cross_attention_masks(rows, N)
        got = decode(xd[None], dmask, drow, None)[0]
        for user in (0, 1):
            m, f = _hf_masks(rows[user:user + 1])
            want = hf_layer(xd[:, user:user + 1], cross_attention_states=vision[user], cross_attention_mask=m,
                            attention_mask=None, full_text_row_masked_out_mask=f)
            diff = (got[:, user] - want[:, 0]).abs().max().item()
            print(f"cross-attention decode, user {user}: max |diff| {diff:.2e}")
            assert diff < 1e-5
        assert torch.equal(decode_rows(xmask)[..., 0, :], dmask[..., 0, :])


def test_cross_attention_identity_cases(canonical):
    """Rows that see no tile pass unchanged under Meta's semantics, and under HF's when the
    user's cache row is all zeros (a text-only user in a batch)."""
    torch.manual_seed(2)
    x = torch.randn(1, 1, 2, 64)
    rows = torch.zeros(2, 1, 4, dtype=torch.int64)
    xmask, row_mask = cross_attention_masks(rows, N)
    meta = cross_block(canonical, 0, "decode", max_batch=2, cache_len=4 * N, semantics="meta")
    hf = cross_block(canonical, 0, "decode", max_batch=2, cache_len=4 * N)
    with torch.no_grad():
        meta.attention.fill(torch.randn(1, 1, 4 * N, 64), 0)
        assert torch.equal(meta(x, xmask, row_mask, None), x)
        hf.attention.fill(torch.randn(1, 1, 4 * N, 64), 0)  # user 1's row stays zero
        out = hf(x, xmask, row_mask, None)
    assert torch.equal(out[:, :, 1], x[:, :, 1]) and not torch.allclose(out[:, :, 0], x[:, :, 0])


def test_cross_attention_qk_rows_are_not_permuted(hf_model, canonical):
    """The text decoder's HF->Meta RoPE row permutation must not be applied to
    cross-attention q/k: copied verbatim they equal HF, permuted they do not (a permutation
    applied consistently to wq, wk, q_norm and k_norm would be harmless)."""
    from models_ref.weights import hf_to_meta_rows

    torch.manual_seed(3)
    x, vision = torch.randn(1, 1, 6, 64), torch.randn(1, 1, 4 * N, 64)
    xmask, row_mask = cross_attention_masks(torch.ones(6, 1, 4, dtype=torch.int64), N)

    def run(permute_norms):
        block = cross_block(canonical, 0, "prefill", cache_len=4 * N)
        att = block.attention
        with torch.no_grad():
            att.wq.weight.copy_(hf_to_meta_rows(att.wq.weight, 4))
            att.wk.weight.copy_(hf_to_meta_rows(att.wk.weight, 2))
            if permute_norms:
                att.q_norm.weight.copy_(hf_to_meta_rows(att.q_norm.weight, 1))
                att.k_norm.weight.copy_(hf_to_meta_rows(att.k_norm.weight, 1))
            att.fill(vision, 0)
            return block(x, xmask, row_mask, 0)

    block = cross_block(canonical, 0, "prefill", cache_len=4 * N)
    with torch.no_grad():
        block.attention.fill(vision, 0)
        want = block(x, xmask, row_mask, 0)
    assert (run(False) - want).abs().max() > 1e-3
    assert (run(True) - want).abs().max() < 1e-5
    assert vision_names.CROSS_ATTENTION_QK_PERMUTED is False


def test_end_to_end_logits_equal_hf(hf_model, canonical):
    """Our vision tower, cache fill and cross-attention layers interleaved with HF's
    embedding, self-attention layers, norm and head: prefill 8 tokens, decode 4, against
    MllamaForConditionalGeneration's logits on the whole sequence (one image of 2 tiles,
    <|image|> at position 2 so that rows 0-1 see no tile)."""
    from transformers import DynamicCache

    im = images()[2]
    tokens = [1, 5, IMAGE_TOKEN, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    prefill_len = 8
    dense = cross_attention_token_mask(tokens, IMAGE_TOKEN, [im.num_tiles], 4)
    pixels, ids, mask = torch.from_numpy(im.pixel_values), torch.tensor([im.aspect_ratio_id]), torch.from_numpy(
        im.aspect_ratio_mask)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor([tokens]), pixel_values=pixels[None, None], aspect_ratio_ids=ids[None],
                        aspect_ratio_mask=mask[None, None], cross_attention_mask=torch.as_tensor(dense)[None]).logits[0]

        lm = hf_model.model.language_model
        hf_cross = hf_model.config.text_config.cross_attention_layers
        blocks = {mode: torch.nn.ModuleList(cross_block(canonical, i, mode, cache_len=4 * N) for i in range(2))
                  for mode in ("prefill", "decode")}
        vision_tokens = tower(hf_model, canonical)(pixels, ids, mask)
        CrossAttentionCacheFill(blocks["prefill"] + blocks["decode"])(vision_tokens, 0)
        xmask, row_mask = cross_attention_masks(torch.as_tensor(dense), N)
        cache = DynamicCache()

        def run(positions, mode):
            h = lm.embed_tokens(torch.tensor([[tokens[p] for p in positions]]))
            pos = torch.tensor([positions])
            rope = lm.rotary_emb(h, pos)
            causal = None
            if len(positions) > 1:
                causal = torch.full((len(positions),) * 2, torch.finfo(torch.float32).min).triu(1)[None, None]
            rows = slice(positions[0], positions[-1] + 1) if mode == "prefill" else slice(prefill_len - 1, prefill_len)
            for idx, layer in enumerate(lm.layers):
                if idx in hf_cross:
                    block = blocks[mode][hf_cross.index(idx)]
                    h = block(h[None], xmask[:, :, rows], row_mask[:, :, rows], 0)[0]
                else:
                    h = layer(h, attention_mask=causal, position_ids=pos, cache=cache, position_embeddings=rope)
            return hf_model.lm_head(lm.norm(h))[0]

        got = [run(list(range(prefill_len)), "prefill")]
        got += [run([p], "decode") for p in range(prefill_len, len(tokens))]
        got = torch.cat(got)
    diff = (got - want).abs().max().item()
    print(f"\nend-to-end tiny Mllama with an image, logits of 12 positions: max |diff| {diff:.2e}, "
          f"PCC {pcc(got, want):.9f}")
    assert diff < 1e-4 and torch.equal(got.argmax(-1), want.argmax(-1))


def test_name_table_covers_hf_checkpoints(hf_model):
    """Every image-side tensor of the HF state dict has exactly one row, in both layouts, and
    every row names a tensor of the model; canonical names are Meta's."""
    text = hf_model.config.text_config
    vcfg = from_hf_config(hf_model.config.to_dict())
    state = hf_model.state_dict()
    names = vision_names.hf_name_map(vcfg, text.cross_attention_layers)
    cross = {f"model.language_model.layers.{h}." for h in text.cross_attention_layers}
    image_side = {k for k in state if k.startswith(("model.vision_model.", "model.multi_modal_projector."))
                  or k.startswith(tuple(cross)) or k.endswith("embed_tokens.weight")}
    rows = vision_names.expand(vcfg, text.cross_attention_layers)
    assert image_side == {r.hf for r in rows}
    legacy = {r.hf.replace("model.vision_model.", "vision_model.").replace(
        "model.multi_modal_projector.", "multi_modal_projector.").replace(
        "model.language_model.", "language_model.model.") for r in rows}
    assert legacy == {r.hf_legacy for r in rows} and set(names) == image_side | legacy
    # canonical names are Meta's, with the text decoder's "text_model." prefix dropped
    assert all(r.meta in (r.canonical, "text_model." + r.canonical) for r in rows)
    assert len({r.canonical for r in rows}) == len(rows) == len(image_side)
    shapes = vision_names.canonical_shapes(vcfg, 64, 4, 2, 96, 2)
    canon = vision_names.canonical_from_hf(state, vcfg, text.cross_attention_layers, text.vocab_size)
    assert {k: tuple(v.shape) for k, v in canon.items()} == shapes
    print(f"\nname table: {len(vision_names.NAME_TABLE)} rows, {len(rows)} tensors for this tiny model")


def test_llama32_11b_vision_shapes():
    """The seed config: HF config.json and Meta params.json give the same VisionConfig; the
    table's shapes are the modules' shapes; one image is 6404 vision tokens of width 4096
    (run on the meta device: shapes only)."""
    import json
    from pathlib import Path

    from models_ref.config import load_config
    from models_ref.vision_config import from_meta_params

    folder = Path(__file__).resolve().parents[1] / "models_ref" / "seed_configs" / "llama3.2-11b-vision"
    hf_json = json.loads((folder / "config.json").read_text())
    vcfg = from_hf_config(hf_json)
    # the same geometry; only where the taps are read differs (HF 5.x: layer outputs; Meta: inputs)
    meta = from_meta_params(json.loads((folder / "params.json").read_text()))
    assert vcfg == meta.replace(intermediate_taps="layer_output") and meta.intermediate_taps == "layer_input"
    assert (vcfg.tokens_per_tile, vcfg.padded_tokens_per_tile, vcfg.vision_tokens, vcfg.output_dim) == (
        1601, 1608, 6404, 7680)
    cfg = load_config(folder)
    shapes = vision_names.canonical_shapes(vcfg, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, 8)
    assert len(shapes) == len(vision_names.expand(vcfg, hf_json["text_config"]["cross_attention_layers"])) == 616
    with torch.device("meta"):
        model = VisionTower(vcfg)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
            k: v for k, v in shapes.items() if k.startswith("vision_model.")}
        out = model(torch.zeros(4, 3, 560, 560), torch.tensor([5]), torch.tensor([1, 1, 0, 0]))
        block = CrossAttentionBlock(cfg, "prefill")
    assert out.shape == (1, 1, 6404, 4096)
    prefix = "cross_attention_layers.0."
    assert {prefix + k: tuple(v.shape) for k, v in block.state_dict().items()} == {
        k: v for k, v in shapes.items() if k.startswith(prefix)}


def test_meta_grids_become_aspect_ratio_tables():
    """Meta stores the tile embeddings as [T, T, rows, D] grids and indexes them by the
    image's (h, w); the canonical table row for (h, w) is what Meta adds to each tile."""
    torch.manual_seed(4)
    vcfg = from_hf_config({"vision_config": VISION, "text_config": TEXT})
    grid = torch.randn(4, 4, 1, 32)
    table = vision_names.meta_ar_table(grid, vcfg.supported_aspect_ratios).reshape(-1, 4, 1, 32)
    assert torch.equal(table[0], torch.zeros(4, 1, 32))
    for k, (h, w) in enumerate(vcfg.supported_aspect_ratios, start=1):
        meta_added = torch.zeros(4, 1, 32)  # Meta's TilePositionEmbedding, written out
        meta_added[: h * w] = grid[:h, :w].reshape(h * w, 1, 32)
        assert torch.equal(table[k], meta_added)
    row = vision_names.expand(vcfg, [1, 3])[5]
    assert row.role == "vision_pre_tile_embed"
    assert vision_names.to_canonical(row, grid[:, :, 0], "meta", vcfg).shape == (9, 128)


def test_projector_columns_for_concatenated_taps():
    torch.manual_seed(5)
    final, taps = torch.randn(1, 1, 7, 32), [torch.randn(1, 1, 7, 32) for _ in range(5)]
    weight = torch.randn(64, 32 * 6)
    from models_ref.vision_ops import vision_features
    want = vision_features(final, taps) @ weight.T
    got = torch.cat([final, *taps], -1) @ vision_names.projector_columns_for_concat(weight, 32, 5).T
    assert torch.allclose(got, want, atol=1e-5)
