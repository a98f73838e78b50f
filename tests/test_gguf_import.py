"""models_ref.gguf_import on a tiny GGUF file written here with gguf.GGUFWriter.

The file is laid out the way llama.cpp's converter writes a Llama checkpoint: q/k rows
permuted, a byte-level BPE ("gpt2") tokenizer with control tokens and a ChatML chat
template in the metadata. The test checks that the import yields a directory that
transformers loads, with the q/k permutation undone, and that re-running is a no-op.
No network, no real weights.
"""

from __future__ import annotations

import json
import os

import pytest

np = pytest.importorskip("numpy")
gguf = pytest.importorskip("gguf", reason="gguf is needed to write the tiny GGUF file")
torch = pytest.importorskip("torch", reason="the GGUF import runs on torch")
pytest.importorskip("transformers", reason="the GGUF import runs on transformers")
pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")

from models_ref import gguf_import  # noqa: E402
from models_ref.gguf_import import MARKER_NAME, import_gguf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_LAYERS = 2
HIDDEN = 32
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = HIDDEN // N_HEADS
FFN = 48
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _vocab():
    merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
    tokens = SPECIALS + _byte_alphabet() + ["he", "ll", "hell", "Ġw", "or"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3 control, 1 normal
    return tokens, types, merges


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF layout -> GGUF layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF; return the HF-layout float32 tensors it encodes."""
    rng = np.random.default_rng(seed)
    tokens, types, merges = _vocab()
    vocab = len(tokens)

    def rnd(*shape):
        return rng.standard_normal(shape).astype(np.float32) * 0.02

    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rnd(vocab, HIDDEN),
                                 "model.norm.weight": 1.0 + rnd(HIDDEN)}
    if not tied:
        hf["lm_head.weight"] = rnd(vocab, HIDDEN)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama-test")
    w.add_block_count(N_LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(vocab)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)  # <|endoftext|>; <|im_end|> must come in through the chat template
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        layer = {
            "self_attn.q_proj.weight": rnd(N_HEADS * HEAD_DIM, HIDDEN),
            "self_attn.k_proj.weight": rnd(N_KV_HEADS * HEAD_DIM, HIDDEN),
            "self_attn.v_proj.weight": rnd(N_KV_HEADS * HEAD_DIM, HIDDEN),
            "self_attn.o_proj.weight": rnd(HIDDEN, N_HEADS * HEAD_DIM),
            "mlp.gate_proj.weight": rnd(FFN, HIDDEN),
            "mlp.up_proj.weight": rnd(FFN, HIDDEN),
            "mlp.down_proj.weight": rnd(HIDDEN, FFN),
            "input_layernorm.weight": 1.0 + rnd(HIDDEN),
            "post_attention_layernorm.weight": 1.0 + rnd(HIDDEN),
        }
        hf.update({p + k: v for k, v in layer.items()})
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", layer["input_layernorm.weight"])
        w.add_tensor(b + "attn_q.weight", _llama_cpp_permute(layer["self_attn.q_proj.weight"], N_HEADS))
        w.add_tensor(b + "attn_k.weight", _llama_cpp_permute(layer["self_attn.k_proj.weight"], N_KV_HEADS))
        w.add_tensor(b + "attn_v.weight", layer["self_attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", layer["self_attn.o_proj.weight"])
        w.add_tensor(b + "ffn_norm.weight", layer["post_attention_layernorm.weight"])
        w.add_tensor(b + "ffn_gate.weight", layer["mlp.gate_proj.weight"])
        w.add_tensor(b + "ffn_up.weight", layer["mlp.up_proj.weight"])
        w.add_tensor(b + "ffn_down.weight", layer["mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", hf["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_import_tiny_llama(tmp_path, tied):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = tmp_path / "tiny.gguf"
    hf = _write_tiny_gguf(src, tied=tied)
    # The permutation is not the identity on these shapes, so the check below means something.
    q0 = hf["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(_llama_cpp_permute(q0, N_HEADS), q0)

    out = tmp_path / "hf"
    result = import_gguf(src, out, dtype="float32")
    assert result == out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", MARKER_NAME} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")], "staging folder left behind"
    assert json.loads((out / MARKER_NAME).read_text())["sha256"] == gguf_import._sha256(src)

    # Raw tensors: HF names, q/k back in HF row order, tied head not stored.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == set(hf), keys ^ set(hf)
        for k, v in hf.items():
            assert torch.equal(f.get_tensor(k), torch.from_numpy(v)), k
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied
    assert "quantization_config" not in config
    assert config["num_key_value_heads"] == N_KV_HEADS

    # transformers loads it as a plain checkpoint.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    sd = model.state_dict()
    for i in range(N_LAYERS):
        for name in ("q_proj", "k_proj"):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            assert torch.equal(sd[key], torch.from_numpy(hf[key])), key
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert torch.equal(sd["lm_head.weight"], torch.from_numpy(hf["lm_head.weight"]))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 2]])).logits
    assert logits.shape == (1, 4, len(_vocab()[0]))

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(tok("hello world").input_ids) == ["hell", "o", "Ġw", "or", "l", "d"]
    assert tok("<|im_end|>").input_ids == [2]  # control tokens stay whole
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [0, 2]  # GGUF eos + the template's end-of-turn token
    assert gen.bos_token_id == 1

    # Re-running is a no-op: nothing is rebuilt, nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def boom(*a, **k):
        raise AssertionError("re-import did work")

    mp = pytest.MonkeyPatch()
    mp.setattr(gguf_import, "_write_model", boom)
    try:
        assert import_gguf(src, out, dtype="float32") == out
    finally:
        mp.undo()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_failed_import_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src, tied=True)
    out = tmp_path / "hf"

    def fail(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(gguf_import, "_write_tokenizer", fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        import_gguf(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_default_dtype_and_replacement(tmp_path):
    from safetensors import safe_open

    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src, tied=True)
    out = tmp_path / "hf"
    import_gguf(src, out, dtype="float32")
    import_gguf(src, out)  # another dtype: the old import is replaced
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_cli_errors(tmp_path, capsys):
    assert gguf_import.main(["file", str(tmp_path / "missing.gguf"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such GGUF file" in err
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    assert gguf_import.main(["file", str(tmp_path / "bad.gguf"), str(tmp_path / "o")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        gguf_import.main(["nonsense"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_file(tmp_path, capsys):
    src = tmp_path / "tiny.gguf"
    _write_tiny_gguf(src, tied=True)
    out = tmp_path / "hf"
    assert gguf_import.main(["file", str(src), str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / MARKER_NAME).is_file()


def test_gguf_tensor_names_come_from_the_name_table():
    """The GGUF column of models_ref/names.py covers a Llama/Qwen2 GGUF's tensors (layer
    numbers kept); a tensor without a role is refused, naming it."""
    from models_ref.gguf_import import ImportErrorGGUF, check_tensor_names
    from models_ref.names import gguf_to_canonical

    assert gguf_to_canonical("blk.7.attn_q.weight") == "layers.7.attention.wq.weight"
    assert gguf_to_canonical("blk.0.ffn_down.weight") == "layers.0.feed_forward.w2.weight"
    assert gguf_to_canonical("token_embd.weight") == "tok_embeddings.weight"
    check_tensor_names(["token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight",
                        "blk.0.attn_q.bias", "blk.0.attn_q_norm.weight"], "x.gguf")
    with pytest.raises(ImportErrorGGUF, match="'rope_freqs.weight' has no role"):
        check_tensor_names(["token_embd.weight", "rope_freqs.weight"], "x.gguf")
