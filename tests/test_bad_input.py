"""Bad input to `ttcompile` and to the runtime.

Every case must end with exit status 2 and exactly one line on stderr that names the file
(when there is one) and the problem, with no traceback; and nothing half-written may be
left behind: no artifact folder (-o OUT), no temporary folder beside it, no weight-cache
entry (complete or partial) in the --cache root. A few representative cases run the real
`ttcompile` executable in a subprocess; the rest call compiler.cli.main in-process.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures import make_hf_model, make_meta_model  # noqa: E402

from compiler.cli import main  # noqa: E402

ERROR_PREFIX = "ttcompile: error: "


def _ttcompile_command() -> list[str]:
    exe = Path(sys.executable).parent / "ttcompile"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "compiler.cli"]


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def meta_model(hf_model, tmp_path_factory) -> Path:
    return make_meta_model(hf_model, tmp_path_factory.mktemp("meta") / "tiny-meta")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


_DROP = object()  # _edit_config(model, key=_DROP) removes the key


def _edit_config(model: Path, **changes) -> None:
    cfg = json.loads((model / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))


def _rewrite_safetensors(model: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    path = model / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


class _RunsShell:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---------------------------------------------------------------- checks
def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _assert_one_line_error(rc, stderr: str, expected: list[str]) -> str:
    assert rc == 2, f"exit status {rc}, stderr: {stderr!r}"
    assert "Traceback" not in stderr
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    message = lines[0]
    assert message.startswith(ERROR_PREFIX), message
    for text in expected:
        assert str(text) in message, f"{text!r} not in {message!r}"
    return message


def _assert_nothing_left(out: Path, cache: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    # out.parent is a folder of its own: no temporary sibling (.OUT.xxxx) either.
    assert not out.parent.exists() or not any(out.parent.iterdir()), _snapshot(out.parent)
    # The cache may at most hold an empty <cache>/<TARGET>/ folder (and the memo of file
    # hashes, which is complete by construction): no entry, no temp dir.
    assert not list(cache.glob("*/*")), f"weight cache entries left: {_snapshot(cache)}"
    assert not [p for p in cache.rglob("*") if p.is_file() and p.name != "file-hashes.json"], \
        _snapshot(cache)


def _argv(tmp_path: Path, model, *extra: str) -> tuple[list[str], Path, Path]:
    """ttcompile arguments writing to tmp_path/build/out with the cache in tmp_path/cache."""
    out = tmp_path / "build" / "out"
    cache = tmp_path / "cache"
    argv = [str(model), "-o", str(out), "--cache", str(cache), "-q", *extra]
    return argv, out, cache


def _expect_error_in_process(capsys, tmp_path, model, expected, *extra) -> str:
    argv, out, cache = _argv(tmp_path, model, *extra)
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    message = _assert_one_line_error(rc, captured.err, expected)
    _assert_nothing_left(out, cache)
    return message


def _expect_error_subprocess(tmp_path, model, expected, *extra, env=None) -> str:
    argv, out, cache = _argv(tmp_path, model, *extra)
    argv.remove("-q")  # the default (progress bars on) must stay one line too
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(_ttcompile_command() + argv, capture_output=True, text=True,
                          env=full_env, cwd=tmp_path, timeout=600)
    message = _assert_one_line_error(proc.returncode, proc.stderr, expected)
    assert proc.stdout == ""
    _assert_nothing_left(out, cache)
    return message


# ---------------------------------------------------------------- broken model dirs
# Each case gets (folder for its inputs, the tiny HF model, the same model in Meta layout)
# and returns (model path to compile, texts the error line must contain, extra CLI args).
CASES = {}


def case(fn):
    CASES[fn.__name__.lstrip("_")] = fn
    return fn


@case
def _missing_config(tmp, hf, meta):
    model = tmp / "no-config"
    model.mkdir()
    shutil.copy(hf / "model.safetensors", model)
    return model, [model, "not a model directory", "config.json", "params.json"], []


@case
def _malformed_config(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    (model / "config.json").write_text('{"hidden_size": 192, "num_attention_heads": ')
    return model, [model / "config.json", "malformed JSON"], []


@case
def _config_not_object(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    (model / "config.json").write_text("[192, 6]")
    return model, [model / "config.json", "expected a JSON object"], []


@case
def _config_missing_field(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    _edit_config(model, num_hidden_layers=_DROP)
    return model, [model / "config.json", "missing field 'num_hidden_layers'"], []


@case
def _config_field_wrong_type(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    _edit_config(model, num_key_value_heads="2")
    return model, [model / "config.json", "num_key_value_heads", "positive integer"], []


@case
def _config_rope_scaling_not_object(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    _edit_config(model, rope_scaling=[8.0])
    return model, [model / "config.json", "rope_scaling"], []


@case
def _unknown_architecture(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    _edit_config(model, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    return model, [model / "config.json", "unknown architecture", "GPT2LMHeadModel"], []


@case
def _hidden_not_divisible_by_heads(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    _edit_config(model, num_attention_heads=5, num_key_value_heads=1, head_dim=_DROP)
    return model, [model / "config.json", "hidden_size 192", "not divisible", "5"], []


@case
def _heads_not_multiple_of_kv_heads(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    _edit_config(model, num_key_value_heads=4)
    return model, [model / "config.json", "num_attention_heads (6)", "not a multiple",
                   "num_key_value_heads (4)"], []


@case
def _corrupt_safetensors_header(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    path = model / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"  # the JSON header starts right after its u64 length
    path.write_bytes(bytes(data))
    return model, [path, "not a valid safetensors file"], []


@case
def _safetensors_header_length_absurd(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    return model, [path, "not a valid safetensors file"], []


@case
def _truncated_safetensors(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return model, [path, "not a valid safetensors file"], []


@case
def _safetensors_truncated_in_header(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return model, [path, "not a valid safetensors file"], []


@case
def _wrong_shape(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    path = _rewrite_safetensors(
        model, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(100, 192)))
    return model, [path, "layers.1.feed_forward.w3.weight", "shape [100, 192]", "[328, 192]"], []


@case
def _missing_tensor(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    path = _rewrite_safetensors(model, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    return model, [path, "missing tensor", "layers.1.attention.wv.weight"], []


@case
def _index_names_missing_shard(tmp, hf, meta):
    from safetensors import safe_open

    model = _copy(hf, tmp / "m")
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    weight_map = {k: ("model-00002-of-00002.safetensors" if ".layers.1." in k else "model.safetensors")
                  for k in keys}
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model, [index, "model-00002-of-00002.safetensors", "does not exist"], []


@case
def _malformed_index(tmp, hf, meta):
    model = _copy(hf, tmp / "m")
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    return model, [index, "malformed safetensors index"], []


@case
def _no_weight_files(tmp, hf, meta):
    model = tmp / "config-only"
    model.mkdir()
    shutil.copy(hf / "config.json", model)
    return model, [model, "no *.safetensors weights found"], []


@case
def _unknown_target(tmp, hf, meta):
    return hf, ["unknown target 'N999'", "N150"], ["--target", "N999"]


@case
def _batch_size_3(tmp, hf, meta):
    return hf, ["batch size 3", "not supported"], ["--batch-size", "3"]


@case
def _bad_block_size(tmp, hf, meta):
    return hf, ["block size 48", "multiple of 32"], ["--block-size", "48"]


@case
def _max_seq_len_beyond_model(tmp, hf, meta):
    return hf, ["--max-seq-len 100000", "max_position_embeddings (512)"], ["--max-seq-len", "100000"]


@case
def _unknown_pass_name(tmp, hf, meta):
    return hf, ["--print-after", "unknown pass", "no_such_pass"], ["--print-after", "no_such_pass"]


@case
def _path_is_a_file(tmp, hf, meta):
    path = tmp / "model.safetensors"
    shutil.copy(hf / "model.safetensors", path)
    return path, [path, "not a directory"], []


@case
def _path_does_not_exist(tmp, hf, meta):
    path = tmp / "no-such-model"
    return path, [path, "no such model directory"], []


@case
def _empty_directory(tmp, hf, meta):
    path = tmp / "empty"
    path.mkdir()
    return path, [path, "not a model directory"], []


@case
def _pth_not_a_zip(tmp, hf, meta):
    model = _copy(meta, tmp / "m")
    path = model / "consolidated.00.pth"
    path.write_bytes(b"this is not a torch checkpoint\n" * 10)
    return model, [path, "not a torch.save zip checkpoint"], []


@case
def _pth_truncated(tmp, hf, meta):
    model = _copy(meta, tmp / "m")
    path = model / "consolidated.00.pth"
    path.write_bytes(path.read_bytes()[:50_000])
    return model, [path, "not a torch.save zip checkpoint"], []


@case
def _pth_entry_not_a_tensor(tmp, hf, meta):
    model = _copy(meta, tmp / "m")
    path = model / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    state["norm.weight"] = [1.0, 2.0]
    torch.save(state, path)
    return model, [path, "'norm.weight' is not a tensor"], []


@case
def _pth_not_a_state_dict(tmp, hf, meta):
    model = _copy(meta, tmp / "m")
    path = model / "consolidated.00.pth"
    torch.save([torch.zeros(3)], path)
    return model, [path, "expected a state dict"], []


@case
def _meta_missing_tensor(tmp, hf, meta):
    model = _copy(meta, tmp / "m")
    path = model / "consolidated.00.pth"
    state = torch.load(path, weights_only=True)
    del state["layers.0.feed_forward.w2.weight"]
    torch.save(state, path)
    return model, [path, "missing tensor", "layers.0.feed_forward.w2.weight"], []


@case
def _meta_params_malformed(tmp, hf, meta):
    model = _copy(meta, tmp / "m")
    (model / "params.json").write_text("{dim: 192}")
    return model, [model / "params.json", "malformed JSON"], []


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_in_process(name, tmp_path, hf_model, meta_model, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model, expected, extra = CASES[name](inputs, hf_model, meta_model)
    _expect_error_in_process(capsys, tmp_path, model, expected, *extra)


# ---------------------------------------------------------------- the real executable
@pytest.mark.parametrize("name", ["malformed_config", "truncated_safetensors", "batch_size_3"])
def test_bad_input_real_cli(name, tmp_path, hf_model, meta_model):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model, expected, extra = CASES[name](inputs, hf_model, meta_model)
    _expect_error_subprocess(tmp_path, model, expected, *extra)


def test_unknown_fake_device_real_cli(tmp_path, hf_model):
    _expect_error_subprocess(tmp_path, hf_model, ["unknown target 'P999'"], env={"FAKE_DEVICE": "P999"})


def _not_yet_supported(monkeypatch, name: str) -> None:
    """Mark one row of the target table as not compiled by this version (whichever rows
    are supported when the test runs)."""
    import dataclasses

    from compiler.targets import TARGETS

    monkeypatch.setitem(TARGETS, name, dataclasses.replace(TARGETS[name], supported=False))


def test_target_not_yet_supported(tmp_path, hf_model, capsys, monkeypatch):
    _not_yet_supported(monkeypatch, "N300")
    _expect_error_in_process(capsys, tmp_path, hf_model, ["N300", "not yet supported"], "--target", "N300")


def test_fake_device_not_yet_supported(tmp_path, hf_model, capsys, monkeypatch):
    _not_yet_supported(monkeypatch, "T3K")
    monkeypatch.setenv("FAKE_DEVICE", "T3K")
    _expect_error_in_process(capsys, tmp_path, hf_model, ["T3K", "not yet supported"])


def test_usage_errors_are_one_line_real_cli(tmp_path, hf_model):
    _expect_error_subprocess(tmp_path, hf_model, ["--optimizations", "fast"], "--optimizations", "fast")


def test_bad_environment_variable(tmp_path, hf_model, capsys, monkeypatch):
    monkeypatch.setenv("MAX_PREFILL_CHUNK_SIZE", "lots")
    _expect_error_in_process(capsys, tmp_path, hf_model, ["MAX_PREFILL_CHUNK_SIZE", "lots"])


# ---------------------------------------------------------------- malicious pickles
def _malicious_meta(meta: Path, dst: Path, marker: Path, raw: bool) -> Path:
    model = _copy(meta, dst)
    path = model / "consolidated.00.pth"
    payload = {"norm.weight": _RunsShell(f"touch {marker}")}
    if raw:  # a bare pickle, as torch.save's legacy format would hold
        path.write_bytes(pickle.dumps(payload))
    else:  # inside a genuine torch.save zip, next to real tensors
        state = torch.load(path, weights_only=True)
        torch.save({**state, **payload}, path)
    return model


def test_malicious_payload_is_live(tmp_path, meta_model):
    """The test's payload really runs code when loaded unsafely (so refusing it means something)."""
    marker = tmp_path / "PWNED_sanity"
    model = _malicious_meta(meta_model, tmp_path / "evil", marker, raw=False)
    torch.load(model / "consolidated.00.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_malicious_pickle_refused_in_process(raw, tmp_path, meta_model, capsys):
    marker = tmp_path / "PWNED_marker"
    model = _malicious_meta(meta_model, tmp_path / "inputs" / "evil", marker, raw)
    expected = [model / "consolidated.00.pth"] + (
        ["not a torch.save zip checkpoint"] if raw else ["refused", "system", "never run"])
    _expect_error_in_process(capsys, tmp_path, model, expected)
    assert not marker.exists(), "the pickle's code ran"


def test_malicious_pickle_refused_real_cli(tmp_path, meta_model):
    marker = tmp_path / "PWNED_marker"
    model = _malicious_meta(meta_model, tmp_path / "inputs" / "evil", marker, raw=False)
    _expect_error_subprocess(tmp_path, model, [model / "consolidated.00.pth", "refused"])
    assert not marker.exists(), "the pickle's code ran"


# ---------------------------------------------------------------- failures late in the compile
def test_failure_while_converting_weights_leaves_no_cache_entry(tmp_path, hf_model, capsys, monkeypatch):
    from models_ref.weights import SafetensorsReader, WeightError

    real_get, calls = SafetensorsReader.get, []

    def failing_get(self, name):
        calls.append(name)
        if len(calls) > 5:
            raise WeightError(f"{self.where(name)}: cannot read tensor '{name}' (simulated)")
        return real_get(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", failing_get)
    _expect_error_in_process(capsys, tmp_path, hf_model, ["model.safetensors", "simulated"])
    assert len(calls) > 5  # the failure did happen half-way through the conversion
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_failure_while_writing_artifact_leaves_nothing(tmp_path, hf_model, capsys, monkeypatch):
    import runtime.tokenizer

    def failing_copy(model_dir, out_dir):
        (Path(out_dir) / "tokenizer.json").write_text("{half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime.tokenizer, "copy_tokenizer_files", failing_copy)
    argv, out, _ = _argv(tmp_path, hf_model)
    capsys.readouterr()
    rc = main(argv)
    _assert_one_line_error(rc, capsys.readouterr().err, ["No space left on device"])
    assert not out.exists()
    assert not any(out.parent.iterdir()), _snapshot(out.parent)  # no temporary sibling


def test_failed_recompile_keeps_previous_artifact(tmp_path, hf_model, capsys):
    argv, out, cache = _argv(tmp_path, hf_model)
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = _copy(hf_model, tmp_path / "inputs" / "m")
    (broken / "config.json").write_text("{")
    argv[0] = str(broken)
    capsys.readouterr()
    rc = main(argv)
    _assert_one_line_error(rc, capsys.readouterr().err, [broken / "config.json", "malformed JSON"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


# ---------------------------------------------------------------- runtime
@pytest.fixture(scope="module")
def artifact(hf_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifact")
    out = root / "out"
    rc = main([str(hf_model), "-o", str(out), "--cache", str(root / "cache"), "-q",
               "--max-seq-len", "128", "--optimizations", "float32"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def session(artifact):
    import runtime
    return runtime.load(artifact)


def test_prompt_longer_than_max_seq_len(session):
    assert session.max_seq_len == 128
    with pytest.raises(ValueError, match=r"200 tokens.*max-seq-len 128"):
        session.generate([[5] * 200], max_generated_tokens=4)
    with pytest.raises(ValueError, match="max-seq-len"):  # no room left for one generated token
        session.generate([[5] * 128], max_generated_tokens=4)
    with pytest.raises(ValueError, match="max-seq-len"):  # one user of a batch too long
        session.generate([[5] * 10, [5] * 300], max_generated_tokens=4)
    with pytest.raises(ValueError, match="max-seq-len"):
        session.teacher_forced_logits([5] * 200, prefill_len=100)


def test_empty_prompt(session):
    with pytest.raises(ValueError, match="empty prompt"):
        session.generate([[]], max_generated_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        session.generate([[5, 6], []], max_generated_tokens=4)


def test_prompt_that_fits_still_runs(session):
    (out,) = session.generate([[5] * 120], max_generated_tokens=4, stop_at_eos=False)
    assert len(out) == 4
    (out,) = session.generate([[5] * 127], max_generated_tokens=4, stop_at_eos=False)
    assert len(out) == 1  # generation stops at max-seq-len


def test_load_of_a_folder_that_is_not_an_artifact(tmp_path, hf_model):
    import runtime

    for path in (tmp_path, hf_model, tmp_path / "missing"):
        with pytest.raises(ValueError, match="not a ttcompile artifact"):
            runtime.load(path)


def test_load_of_a_damaged_artifact(tmp_path, artifact):
    import runtime

    damaged = _copy(artifact, tmp_path / "damaged")
    (damaged / "program.json").write_text('{"target": "N150"')
    with pytest.raises(ValueError, match="unreadable artifact"):
        runtime.load(damaged)


def test_load_unknown_backend(artifact):
    import runtime

    with pytest.raises(ValueError, match="unknown backend"):
        runtime.load(artifact, backend="cuda")


def test_load_of_a_no_weights_artifact(tmp_path, hf_model):
    import runtime

    argv, out, _ = _argv(tmp_path, hf_model, "--no-weights")
    assert main(argv) == 0
    with pytest.raises(ValueError, match="--no-weights"):
        runtime.load(out)
