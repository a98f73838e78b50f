"""Weights that load once, and honest timing, on the ttnn backend (mock meshes).

The first load of a program on a system converts its weights on the host and writes ttnn's
own tensor files of them under <weights dir>/ttnn/<key>/ (runtime/ttnn_backend/weight_files.py);
later loads read them. Loads run in .venv-ttnn through tests/ttnn_side/weight_load.py, each
in its own process (as a later run of the program would), and print what they placed.

The artifacts here are compiled into a weight cache of this module's own, so that the
entries under it are only the ones these tests make. Programs are compiled with host
sampling: the weight files do not depend on how decode ends, and the tests then do not
depend on the sampling ops.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_ttcompile
from test_ttnn_backend import ROOT, TIMEOUT, ttnn_python  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # loads through ttnn in another process
LOAD = ROOT / "tests" / "ttnn_side" / "weight_load.py"


@pytest.fixture(scope="module")
def compile_private(tmp_path_factory):
    """`compile_private(model_dir, **options) -> OUT`, weights in this module's own cache."""
    root, cache = tmp_path_factory.mktemp("weights_artifacts"), tmp_path_factory.mktemp("weights_cache")

    def run(model_dir, **options) -> Path:
        return run_ttcompile(root, model_dir, cache, sampling="host", max_seq_len=256, **options)
    return run


def load(python: Path, artifact: Path, *args: str, expect_exit: int = 0) -> tuple[dict | None, str]:
    """(printed JSON or None, stderr) of one load in a fresh .venv-ttnn process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TT_METAL_")}
    done = subprocess.run([str(python), str(LOAD), str(artifact), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == expect_exit, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), done.stderr


def weights_dir(artifact: Path) -> Path:
    return Path(json.loads((artifact / "manifest.json").read_text())["weights"])


def entry_files(entry: Path) -> dict[str, tuple[int, int]]:
    """file name -> (size, mtime_ns) of every file in an entry."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(entry).iterdir())}


# ------------------------------------------------------------------ weights that load once
@pytest.mark.parametrize("target", ["N150", "T3K", "TG"])
def test_second_load_reads_the_ttnn_files_and_places_the_same_tensors(ttnn_python, tiny_model, compile_private,
                                                                     target):
    """First load: every device tensor converted on the host once and written (each file
    equals, read back on the host, a fresh conversion: every chip's part, bit for bit).
    Second load, in a new process: no conversion, every file read, none written (mtimes
    unchanged), and the same device tensors (on a mock, what can be compared: one chip's
    shape and padded shape, dtype, layout, memory, mesh placement, chips). No torch."""
    out = compile_private(tiny_model("tiny-llama", "llama"), target=target)
    shutil.rmtree(weights_dir(out) / "ttnn", ignore_errors=True)
    first, _ = load(ttnn_python, out, "--check-files", "--no-warmup")
    wl = first["weight_load"]
    tensors = len(first["tensors"])
    assert wl["from"] == "converted, ttnn files written"
    assert wl["conversions"] == wl["files_written"] == first["files_checked"] == tensors
    assert tensors > len(json.loads((out / "program.json").read_text())["weights"])  # + the per-user RoPE matrix
    entry = Path(wl["files"])
    assert entry.parent == weights_dir(out) / "ttnn" and first["entries"] == [entry.name]
    files = entry_files(entry)
    assert len(files) == tensors + 1  # and the manifest

    second, _ = load(ttnn_python, out, "--no-warmup")
    wl2 = second["weight_load"]
    assert wl2["from"] == "ttnn files" and wl2["files"] == str(entry)
    assert wl2["conversions"] == wl2["files_written"] == 0 and wl2["files_read"] == tensors
    assert entry_files(entry) == files and second["entries"] == [entry.name]
    assert second["tensors"] == first["tensors"]
    wqkv = second["tensors"]["layers.0.attention.wqkv.weight"]
    if target == "T3K":  # split weights: one chip's part of each, on all 8 chips
        assert wqkv["chips"] == 8 and "PlacementShard(1)" in wqkv["topology"]
    if target == "TG":  # split over both mesh axes: 32 parts
        assert wqkv["chips"] == 32 and "MeshShape([32])" in wqkv["topology"]
    assert not first["torch_imported"] and not second["torch_imported"]


def test_a_changed_program_or_ttnn_version_makes_a_new_entry(ttnn_python, tiny_model, compile_private, tmp_path):
    """Another ttnn version, or a program whose weight table differs (one weight's dtype),
    reading the same converted weights: each gets an entry of its own, and the first
    entry is left as it was and is still the one its program reads."""
    out = compile_private(tiny_model("tiny-llama", "llama"))
    shutil.rmtree(weights_dir(out) / "ttnn", ignore_errors=True)
    first, _ = load(ttnn_python, out, "--no-warmup")
    entry = Path(first["weight_load"]["files"])
    files = entry_files(entry)

    other_ttnn, _ = load(ttnn_python, out, "--no-warmup", "--pretend-ttnn-version", "0.0.1")
    assert other_ttnn["weight_load"]["from"] == "converted, ttnn files written"
    assert Path(other_ttnn["weight_load"]["files"]).name != entry.name and len(other_ttnn["entries"]) == 2

    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    program = json.loads((changed / "program.json").read_text())
    name = next(n for n, w in program["weights"].items() if w["dtype"] == "bfloat8_b")
    program["weights"][name]["dtype"] = "bfloat16"
    (changed / "program.json").write_text(json.dumps(program))
    other_program, _ = load(ttnn_python, changed, "--no-warmup")
    assert other_program["weight_load"]["from"] == "converted, ttnn files written"
    assert other_program["tensors"][name]["dtype"] == "DataType.BFLOAT16"
    assert len(other_program["entries"]) == 3 and entry.name in other_program["entries"]

    again, _ = load(ttnn_python, out, "--no-warmup")
    assert again["weight_load"]["from"] == "ttnn files" and again["weight_load"]["files"] == str(entry)
    assert entry_files(entry) == files


def test_a_load_killed_half_way_leaves_nothing_trusted(ttnn_python, tiny_model, compile_private):
    """Killed (SIGKILL) after 5 files: only a temporary folder is left, which the next load
    neither reads nor keeps (it converts, writes the entry, and deletes the dead writer's
    folder). Interrupted, the load removes its temporary folder at once; a write that fails
    (a full disk) costs the entry, not the load. A folder at the
    key without its manifest, or with a file cut short, is not trusted: the load says so,
    converts, and replaces it; the load after that reads it."""
    out = compile_private(tiny_model("tiny-qwen2", "qwen2"), target="N300")
    root = weights_dir(out) / "ttnn"
    shutil.rmtree(root, ignore_errors=True)

    killed, _ = load(ttnn_python, out, "--no-warmup", "--kill-after-files", "5", expect_exit=-9)
    assert killed is None
    (left,) = list(root.iterdir())
    assert left.name.startswith(".tmp-") and len(list(left.iterdir())) == 5  # no manifest
    after, _ = load(ttnn_python, out, "--no-warmup")
    assert after["weight_load"]["from"] == "converted, ttnn files written"
    entry = Path(after["weight_load"]["files"])
    assert after["entries"] == [entry.name] and not left.exists()
    assert left.name.startswith(f".tmp-{entry.name}-")

    shutil.rmtree(root)
    interrupted, _ = load(ttnn_python, out, "--no-warmup", "--interrupt-after-files", "3")
    assert "simulated interrupt after 3 files" in interrupted["error"] and interrupted["entries"] == []
    full_disk, stderr = load(ttnn_python, out, "--no-warmup", "--fail-writes-after-files", "3")
    assert "writing the ttnn weight files failed" in stderr and "simulated full disk after 3 files" in stderr
    assert full_disk["weight_load"]["from"] == "converted" and full_disk["entries"] == []
    assert full_disk["weight_load"]["conversions"] == len(full_disk["tensors"])  # the load went on

    first, _ = load(ttnn_python, out, "--no-warmup")
    (entry / "manifest.json").unlink()  # as if the folder had been copied without it
    partial, _ = load(ttnn_python, out, "--no-warmup")
    assert partial["weight_load"]["from"] == "converted, ttnn files written"
    assert (entry / "manifest.json").is_file() and partial["entries"] == [entry.name]

    manifest = json.loads((entry / "manifest.json").read_text())["tensors"]
    victim = entry / manifest["layers.1.attention.wqkv.weight"]["file"]
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    cut, stderr = load(ttnn_python, out, "--no-warmup")
    assert "not using the ttnn weight files" in stderr and "has %d bytes" % (size // 2) in stderr
    assert cut["weight_load"]["from"] == "converted, ttnn files written" and cut["weight_load"]["conversions"]
    assert victim.stat().st_size == size and cut["entries"] == [entry.name]
    again, _ = load(ttnn_python, out, "--no-warmup")
    assert again["weight_load"]["from"] == "ttnn files" and again["tensors"] == first["tensors"]


def test_entry_key_changes_with_everything_that_changes_the_bytes(tmp_path):
    """entry_key over each of its parts; converted_identity over a rewritten shard. (No ttnn
    needed.)"""
    from runtime.ttnn_backend.weight_files import converted_identity, entry_key

    weights = {"w": {"shape": [64, 64], "dtype": "bfloat8_b", "layout": "TILE", "recipe": ["source", "w"],
                     "placement": {"dim": 1, "axes": [1], "partial": False}}}
    tensors = {"users": 32, "tensors": [{"name": "w", "kind": None}]}
    folder = tmp_path / "0123456789ab"
    folder.mkdir()
    (folder / "global.safetensors").write_bytes(b"x" * 10)
    (folder / "index.json").write_text(json.dumps({"weights": {"w": "global.safetensors"}}))
    converted = converted_identity(folder)
    base = entry_key(weights, tensors, converted, (1, 8), "0.81.1")
    assert base == entry_key(json.loads(json.dumps(weights)), tensors, dict(converted), [1, 8], "0.81.1")

    def changed(field, value):
        w = json.loads(json.dumps(weights))
        w["w"][field] = value
        return entry_key(w, tensors, converted, (1, 8), "0.81.1")

    variants = [changed("shape", [64, 128]), changed("dtype", "bfloat4_b"), changed("layout", "ROW_MAJOR"),
                changed("recipe", ["transpose", ["source", "w"]]),
                changed("placement", {"dim": 0, "axes": [1], "partial": False}),
                entry_key(weights, {**tensors, "users": 64}, converted, (1, 8), "0.81.1"),
                entry_key(weights, tensors, {**converted, "entry": "other"}, (1, 8), "0.81.1"),
                entry_key(weights, tensors, converted, (1, 2), "0.81.1"),
                entry_key(weights, tensors, converted, (1, 8), "0.82.0")]
    assert len({base, *variants}) == len(variants) + 1
    (folder / "global.safetensors").write_bytes(b"y" * 11)  # the converted entry rewritten
    assert converted_identity(folder) != converted


# ------------------------------------------------------------------ honest timing
def test_ttnn_load_warms_up_and_reports_it_apart(ttnn_python, tiny_model, compile_private):
    """On the ttnn backend, runtime.load runs every function once before returning; the
    load (with the weights' part and where they came from) and the warm-up (prefill,
    decode) are in Session.stats, apart from time to first token."""
    out = compile_private(tiny_model("tiny-llama", "llama"))
    result, _ = load(ttnn_python, out)
    stats = result["stats"]
    assert stats["load_s"] > stats["weights_s"] > 0 and stats["weights_from"] in (
        "ttnn files", "converted, ttnn files written")
    assert stats["warmup_prefill_s"] > 0 and stats["warmup_decode_s"] > 0
    assert result["summary"].startswith(f"load {stats['load_s']:.2f} s (weights ")
    assert ", warm-up " in result["summary"] and "(prefill " in result["summary"]


def test_ttrun_prints_load_and_warm_up_apart_from_time_to_first_token(ttnn_python, tiny_model, smollm2_dir,
                                                                     compile_private):
    """ttrun on the ttnn backend (mock N150) and on the emulator: the summary's first line is
    the load (and the ttnn warm-up), the second time to first token and tokens/s. (A tiny
    Llama with SmolLM2's vocabulary size and tokenizer files.)"""
    import re

    model = tiny_model("tiny-llama-smollm2-vocab", "llama", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, model / name)
    out = compile_private(model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TT_METAL_")}
    for bin_dir, backend in ((Path(ttnn_python).parent, "ttnn"), (ROOT / ".venv" / "bin", "emulator")):
        done = subprocess.run([str(bin_dir / "ttrun"), "prompt", "--program", str(out), "--backend", backend,
                               "--max-generated-tokens", "3", "--no-instruct", "Hello"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, done.stderr[-3000:]
        load_line, run_line = done.stderr.strip().splitlines()[-2:]
        assert run_line.startswith("time to first token ") and "tokens/s/user" in run_line
        if backend == "ttnn":
            assert re.fullmatch(r"load [\d.]+ s \(weights [\d.]+ s, (ttnn files|converted, ttnn files written)\), "
                                r"warm-up [\d.]+ s \(prefill [\d.]+ s, decode [\d.]+ s\)", load_line), load_line
        else:
            assert re.fullmatch(r"load [\d.]+ s, no warm-up", load_line), load_line


def test_emulator_loads_without_warm_up_and_generate_keeps_the_load_figures(tiny_model, compile_private):
    """The emulator compiles nothing, so it does not warm up (and refuses warmup=True);
    the load figures survive generate(), which makes the per-call statistics afresh."""
    import runtime

    out = compile_private(tiny_model("tiny-llama", "llama"))
    session = runtime.load(out)
    assert session.stats.load_s > 0 and session.stats.warmup_s == 0
    load_s = session.stats.load_s
    session.generate([[1, 2, 3]], max_generated_tokens=2, stop_at_eos=False)
    assert session.stats.load_s == load_s and session.stats.generated_tokens == 2
    assert session.stats.summary().splitlines()[0] == f"load {load_s:.2f} s, no warm-up"
    with pytest.raises(ValueError, match="emulator backend compiles nothing"):
        runtime.load(out, warmup=True)


def test_stats_keep_the_startup_figures_and_print_them_on_their_own_line():
    """Stats.startup() carries compile (ttrun --model), load and warm-up into the next
    call's statistics; summary() prints them on a first line, the run on the second."""
    from runtime.stats import Stats

    loaded = Stats(compile_s=9.5, load_s=1.25, weights_s=0.5, weights_from="ttnn files", warmup_prefill_s=2.0,
                   warmup_decode_s=0.5)
    call = Stats(users=1, **loaded.startup())
    call.time_to_first_token_s, call.decode_s, call.decode_steps, call.generated_tokens = 0.1, 1.0, 10, 11
    first, second = call.summary().splitlines()
    assert first == ("compile 9.50 s, load 1.25 s (weights 0.50 s, ttnn files), "
                     "warm-up 2.50 s (prefill 2.00 s, decode 0.50 s)")
    assert second.startswith("time to first token 100 ms, 10.0 tokens/s/user")
    assert Stats().summary().startswith("time to first token")  # statistics not made by runtime.load
