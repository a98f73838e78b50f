"""`ttcompile` on a tiny model: the artifact, the inspection flags, the environment
overrides and the converted-weight cache.

The first test runs the real executable; the rest call compiler.cli.main in-process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures import make_hf_model  # noqa: E402

from compiler.cli import main  # noqa: E402
from compiler.pipeline import PASS_NAMES  # noqa: E402
from lowering.program import Program  # noqa: E402

TOKENIZER_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": '{"chat_template": "{{ messages[0][\'content\'] }}", "eos_token": "</s>"}',
    "special_tokens_map.json": '{"eos_token": "</s>"}',
}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Llama with tokenizer files beside it (copied verbatim; never parsed here)."""
    path = make_hf_model(tmp_path_factory.mktemp("cli") / "tiny-llama")
    for name, text in TOKENIZER_FILES.items():
        (path / name).write_text(text)
    return path


def _ttcompile_command() -> list[str]:
    exe = Path(sys.executable).parent / "ttcompile"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "compiler.cli"]


def _compile(capsys, model_dir, out, cache, *extra, quiet=True):
    """main() in-process; returns (exit status, stdout, stderr)."""
    capsys.readouterr()
    argv = [str(model_dir), "-o", str(out), "--cache", str(cache), *extra] + (["-q"] if quiet else [])
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its mtime and size (folders included)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(root.rglob("*"))}


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("*/*"))


# ---------------------------------------------------------------- the artifact
def test_compile_writes_artifact_real_cli(model, tmp_path):
    out, cache = tmp_path / "build" / "out", tmp_path / "cache"
    proc = subprocess.run(_ttcompile_command() + [str(model), "--target", "N150", "-o", str(out),
                                                  "--cache", str(cache)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"wrote {out}" in proc.stdout

    program = Program.loads((out / "program.json").read_text())
    assert program.target == "N150" and list(program.mesh_shape) == [1, 1]
    assert set(program.functions) == {"prefill", "decode", "decode_logits"}  # decode samples on the device
    assert all(len(f.ops) > 0 for f in program.functions.values())

    manifest = _manifest(out)
    assert manifest["source"]["path"] == str(model.resolve())
    assert manifest["source"]["format"] == "hf"
    assert isinstance(manifest["source"]["fingerprint"], str) and len(manifest["source"]["fingerprint"]) >= 16
    assert manifest["target"] == "N150" and manifest["mesh_shape"] == [1, 1]
    options = manifest["options"]
    assert options["optimizations"] == "performance" and options["batch_size"] == 1
    assert options["max_seq_len"] == 512  # the model's max_position_embeddings (< 4096)
    assert options["block_size"] == 32 and options["max_num_blocks"] == 1024
    assert {"python", "torch", "ttcompile"} <= set(manifest["versions"])

    # The weight-cache entry: <cache>/<TARGET>/<key>/ with index.json and safetensors shards.
    weights = Path(manifest["weights"])
    assert weights.parent == cache / "N150"
    assert _entries(cache) == [weights]
    index = json.loads((weights / "index.json").read_text())["weights"]
    assert set(index) == set(program.weights)
    assert all((weights / shard).is_file() for shard in set(index.values()))

    # Tokenizer, chat template and generation config travel with the artifact.
    for name in [*TOKENIZER_FILES, "generation_config.json"]:
        assert (out / name).read_bytes() == (model / name).read_bytes(), name
    assert set(manifest["tokenizer_files"]) == {*TOKENIZER_FILES, "generation_config.json"}

    # Nothing else beside OUT (the temporary folder was renamed into place).
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    assert not [p for p in (cache / "N150").iterdir() if p.name.startswith(".")]


def test_default_output_folder(model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main([str(model), "--cache", str(tmp_path / "cache"), "--optimizations", "accuracy",
                 "--no-weights", "-q"]) == 0
    out = tmp_path / "build" / "tiny-llama-N150-accuracy"
    assert (out / "program.json").is_file() and (out / "manifest.json").is_file()
    assert f"wrote {Path('build') / 'tiny-llama-N150-accuracy'}" in capsys.readouterr().out


def test_program_records_options(model, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = _compile(capsys, model, out, tmp_path / "cache", "--no-weights", "--batch-size", "4",
                          "--max-seq-len", "256", "--block-size", "64", "--max-num-blocks", "16",
                          "--optimizations", "float32", "--target", "n150")
    assert rc == 0, err
    options = _manifest(out)["options"]
    assert (options["batch_size"], options["max_seq_len"], options["block_size"],
            options["max_num_blocks"], options["optimizations"]) == (4, 256, 64, 16, "float32")
    assert Program.loads((out / "program.json").read_text()).options == options


# ---------------------------------------------------------------- inspection flags
def test_print_after_one_pass(model, tmp_path, capsys):
    rc, stdout, err = _compile(capsys, model, tmp_path / "out", tmp_path / "cache", "--no-weights",
                               "--print-after", "fuse_qkv")
    assert rc == 0, err
    headers = [line for line in stdout.splitlines() if "IR after" in line]
    assert headers == ["// ----- IR after fuse_qkv (prefill) -----",
                       "// ----- IR after fuse_qkv (decode) -----"]
    assert "qkv_heads(" in stdout
    assert "wqkv" in stdout  # the fused weight


def test_print_after_all(model, tmp_path, capsys):
    rc, stdout, err = _compile(capsys, model, tmp_path / "out", tmp_path / "cache", "--no-weights",
                               "--print-after-all")
    assert rc == 0, err
    headers = [line for line in stdout.splitlines() if "IR after" in line]
    assert headers == [f"// ----- IR after {name} ({mode}) -----"
                       for mode in ("prefill", "decode") for name in PASS_NAMES]
    # One section per pass: each section is the IR (not empty) up to the next header.
    sections = stdout.split("// ----- IR after ")[1:]
    assert all(section.count("\n%") > 10 for section in sections)


def test_dump_writes_files(model, tmp_path, capsys):
    dump, out = tmp_path / "dump", tmp_path / "out"
    rc, stdout, err = _compile(capsys, model, out, tmp_path / "cache", "--no-weights", "--dump", str(dump))
    assert rc == 0, err
    expected = {f"{mode}_{i:02d}_{name}.txt" for mode in ("prefill", "decode")
                for i, name in enumerate(PASS_NAMES, start=1)} | {"program.json"}
    assert {p.name for p in dump.iterdir()} == expected
    assert "IR after canonicalize (prefill)" in (dump / "prefill_01_canonicalize.txt").read_text()
    assert (dump / "program.json").read_text() == (out / "program.json").read_text()
    assert "IR after" not in stdout  # dumping does not print


def test_emit_python(model, tmp_path, capsys):
    rc, stdout, err = _compile(capsys, model, tmp_path / "out", tmp_path / "cache", "--no-weights",
                               "--emit", "python")
    assert rc == 0, err
    assert "import ttnn" in stdout
    assert "def prefill(" in stdout and "def decode(" in stdout
    assert "ttnn.linear(" in stdout and "ttnn.rms_norm(" in stdout
    assert "ttnn.embedding(" in stdout


def test_verify(model, tmp_path, capsys):
    rc, stdout, err = _compile(capsys, model, tmp_path / "out", tmp_path / "cache", "--verify")
    assert rc == 0, err
    assert (tmp_path / "out" / "program.json").is_file()


def test_verify_runs_after_every_pass(model, tmp_path, capsys, monkeypatch):
    from compiler import pipeline
    from compiler.verify import verify as real_verify

    calls = []

    def counting_verify(gm, ctx, **kwargs):
        calls.append((ctx.mode, kwargs.get("after")))
        return real_verify(gm, ctx, **kwargs)

    monkeypatch.setattr(pipeline, "verify", counting_verify)
    rc, _, err = _compile(capsys, model, tmp_path / "out", tmp_path / "cache", "--no-weights", "--verify")
    assert rc == 0, err
    assert calls == [(mode, name) for mode in ("prefill", "decode") for name in PASS_NAMES]


def test_verify_catches_a_broken_pass(model, tmp_path, capsys, monkeypatch):
    """A pass that drops a fact other passes rely on compiles silently without --verify and
    is stopped, naming the pass and the node, with it."""
    import passes.fuse_mlp
    from compiler.facts import LAYER

    real_run = passes.fuse_mlp.run

    def broken_run(gm, ctx):
        gm = real_run(gm, ctx)
        next(n for n in gm.graph.nodes if n.op == "call_function").meta.pop(LAYER)
        return gm

    monkeypatch.setattr(passes.fuse_mlp, "run", broken_run)
    rc, _, err = _compile(capsys, model, tmp_path / "unchecked", tmp_path / "cache", "--no-weights")
    assert rc == 0, err
    rc, _, err = _compile(capsys, model, tmp_path / "checked", tmp_path / "cache", "--no-weights", "--verify")
    assert rc == 3, err  # a compiler bug, not the user's input (2)
    assert re.search(r"after pass 'fuse_mlp' \(prefill\), node %\w+: no layer annotation", err), err
    assert "bug in ttcompile" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "checked").exists()


def test_no_weights_compiles_from_config_alone(model, tmp_path, capsys):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(model / "config.json", config_only)
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc, stdout, err = _compile(capsys, config_only, out, cache, "--no-weights")
    assert rc == 0, err
    manifest = _manifest(out)
    assert manifest["weights"] is None and manifest["source"]["fingerprint"] is None
    assert manifest["options"]["no_weights"] is True
    assert not cache.exists() or not any(cache.rglob("*"))
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "program.json"]


# ---------------------------------------------------------------- environment overrides
def test_fake_device_is_honoured(model, tmp_path, capsys, monkeypatch):
    import dataclasses

    from compiler.targets import TARGETS

    monkeypatch.setenv("FAKE_DEVICE", "N150")
    out = tmp_path / "out"
    rc, _, err = _compile(capsys, model, out, tmp_path / "cache", "--no-weights")
    assert rc == 0, err
    assert _manifest(out)["target"] == "N150"

    # T3K, as long as this version cannot compile it (forced here so that the test does not
    # depend on which rows of the target table are supported yet).
    monkeypatch.setitem(TARGETS, "T3K", dataclasses.replace(TARGETS["T3K"], supported=False))
    monkeypatch.setenv("FAKE_DEVICE", "T3K")
    rc, _, err = _compile(capsys, model, tmp_path / "out2", tmp_path / "cache", "--no-weights")
    assert rc == 2
    assert "T3K is not yet supported" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out2").exists()

    # An explicit --target wins over the environment.
    rc, _, err = _compile(capsys, model, tmp_path / "out3", tmp_path / "cache", "--no-weights",
                          "--target", "N150")
    assert rc == 0, err
    assert _manifest(tmp_path / "out3")["target"] == "N150"


def test_max_prefill_chunk_size_env(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAX_PREFILL_CHUNK_SIZE", "4")  # thousands of tokens, as in the seed
    out = tmp_path / "out"
    rc, _, err = _compile(capsys, model, out, tmp_path / "cache", "--no-weights")
    assert rc == 0, err
    assert _manifest(out)["options"]["max_prefill_chunk"] == 4 * 1024

    rc, _, err = _compile(capsys, model, tmp_path / "out2", tmp_path / "cache", "--no-weights",
                          "--max-prefill-chunk", "2048")
    assert rc == 0, err
    assert _manifest(tmp_path / "out2")["options"]["max_prefill_chunk"] == 2048


def test_tt_cache_path_env(model, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("TT_CACHE_PATH", str(cache))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([str(model), "-o", str(out), "-q"]) == 0
    weights = Path(_manifest(out)["weights"])
    assert weights.parent == cache / "N150" and (weights / "index.json").is_file()


# ---------------------------------------------------------------- the weight cache
def test_second_compile_reuses_converted_weights(model, tmp_path, capsys):
    cache = tmp_path / "cache"
    rc, _, err = _compile(capsys, model, tmp_path / "out1", cache)
    assert rc == 0, err
    before = _tree_state(cache)
    rc, _, err = _compile(capsys, model, tmp_path / "out2", cache, quiet=False)
    assert rc == 0, err
    assert "reusing converted weights" in err
    assert "converting weights" not in err
    assert _tree_state(cache) == before  # not a byte, not an mtime changed
    assert _manifest(tmp_path / "out1")["weights"] == _manifest(tmp_path / "out2")["weights"]


def test_optimization_mode_gets_its_own_cache_entry(model, tmp_path, capsys):
    cache = tmp_path / "cache"
    weights = {}
    for mode in ("performance", "accuracy"):
        rc, _, err = _compile(capsys, model, tmp_path / mode, cache, "--optimizations", mode)
        assert rc == 0, err
        weights[mode] = _manifest(tmp_path / mode)["weights"]
    assert weights["performance"] != weights["accuracy"]
    assert _entries(cache) == sorted(Path(w) for w in weights.values())


def _with_one_value_changed(model: Path, parent: Path, tensor: str, index) -> Path:
    """A copy of `model` under `parent`, with the same folder name (the model's name is part
    of its config), that differs in one weight value."""
    from safetensors.torch import load_file, save_file

    dst = parent / model.name
    shutil.copytree(model, dst)
    tensors = load_file(str(model / "model.safetensors"))
    tensors[tensor][index] += 0.25
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    assert (dst / "model.safetensors").stat().st_size == (model / "model.safetensors").stat().st_size
    return dst


def test_modified_checkpoint_gets_its_own_cache_entry(model, tmp_path, capsys):
    """A checkpoint with one weight value changed must not reuse the original's weights."""
    cache = tmp_path / "cache"
    modified = _with_one_value_changed(model, tmp_path / "modified", "model.layers.1.mlp.down_proj.weight",
                                       (100, 100))
    assert modified.name == model.name
    rc, _, err = _compile(capsys, model, tmp_path / "a", cache)
    assert rc == 0, err
    rc, _, err = _compile(capsys, modified, tmp_path / "b", cache)
    assert rc == 0, err
    a, b = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    assert a["source"]["fingerprint"] != b["source"]["fingerprint"]
    assert a["weights"] != b["weights"]
    assert len(_entries(cache)) == 2


def test_any_single_changed_value_changes_the_fingerprint(model, tmp_path):
    """Wherever the one changed value sits in the file, the source fingerprint changes."""
    from safetensors import safe_open

    from models_ref.weights import open_checkpoint

    original = open_checkpoint(model).fingerprint()
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        names = [k for k in f.keys() if len(f.get_slice(k).get_shape()) == 2]  # all >= 64 x 192
    missed = []
    for i, name in enumerate(names):
        dst = _with_one_value_changed(model, tmp_path / f"m{i}", name, (50, 150))
        if open_checkpoint(dst).fingerprint() == original:
            missed.append(name)
        shutil.rmtree(dst.parent)
    assert not missed, f"one changed value in {len(missed)} of {len(names)} tensors went unnoticed: {missed}"


def test_retrained_checkpoint_gets_its_own_cache_entry(model, tmp_path, capsys):
    cache = tmp_path / "cache"
    other = make_hf_model(tmp_path / "tiny-llama", seed=1)  # same config and name, new weights
    rc, _, err = _compile(capsys, model, tmp_path / "a", cache)
    assert rc == 0, err
    rc, _, err = _compile(capsys, other, tmp_path / "b", cache)
    assert rc == 0, err
    assert _manifest(tmp_path / "a")["weights"] != _manifest(tmp_path / "b")["weights"]
    assert len(_entries(cache)) == 2


def test_compiled_program_runs(model, tmp_path, capsys):
    """The artifact runs without the model directory (tokenizer files aside)."""
    import runtime

    out = tmp_path / "out"
    rc, _, err = _compile(capsys, model, out, tmp_path / "cache", "--optimizations", "float32",
                          "--max-seq-len", "128")
    assert rc == 0, err
    moved = tmp_path / "elsewhere"
    shutil.move(str(out), moved)
    (generated,) = runtime.load(moved).generate([[1, 2, 3, 4]], max_generated_tokens=5, stop_at_eos=False)
    assert len(generated) == 5 and all(0 <= t < 1000 for t in generated)


def test_help_lists_every_interface_option():
    help_text = subprocess.run(_ttcompile_command() + ["--help"], capture_output=True, text=True,
                               timeout=120, env={**os.environ, "COLUMNS": "200"}).stdout
    for flag in ("--target", "--output", "--optimizations", "--batch-size", "--max-seq-len",
                 "--max-prefill-chunk", "--block-size", "--max-num-blocks", "--no-weights", "--cache",
                 "--print-after", "--print-after-all", "--dump", "--verify", "--emit", "--report"):
        assert flag in help_text, flag


@pytest.mark.parametrize("optimizations", ["performance", "accuracy"])
def test_the_folder_name_does_not_change_the_program(model, tmp_path, capsys, optimizations):
    """The same checkpoint in folders named like Qwen2.5-7B and like a 70B (names that used
    to select other precision policies) compiles to the same program, ops and dtypes
    alike; only the recorded name differs. The chosen policy is in program.json."""
    programs = []
    for name in ("Qwen2.5-7B-Instruct", "Llama-3.1-70B-Instruct"):
        folder = tmp_path / name
        shutil.copytree(model, folder)
        out = tmp_path / f"out-{name}"
        rc, _, err = _compile(capsys, folder, out, tmp_path / "cache", "--optimizations", optimizations)
        assert rc == 0, err
        data = json.loads((out / "program.json").read_text())
        assert data["model"].pop("name") == name
        assert data["precision"]["mode"] == optimizations and data["precision"]["policy"]["attention"]
        programs.append(data)
    assert programs[0] == programs[1]


def test_report_prints_the_precision_policy(model, tmp_path, capsys):
    rc, out, err = _compile(capsys, model, tmp_path / "out", tmp_path / "cache", "--no-weights", "--report",
                            "--optimizations", "accuracy")
    assert rc == 0, err
    assert "precision (accuracy): weights attention bfloat16, ff1_ff3 bfloat8_b" in out
