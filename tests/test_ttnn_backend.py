"""The ttnn backend: compiled programs replayed through real ttnn 0.81.1 on mock meshes.

The programs are compiled here (this environment has torch); the replay runs in
.venv-ttnn (ttnn, no torch) through tests/ttnn_side/replay.py. Without a Tenstorrent card
the backend opens the mock cluster of the program's target, where ttnn runs its own
argument, shape, memory-config and allocator checks on every op. These tests skip only
when .venv-ttnn cannot be created at all (scripts/setup_ttnn.sh, which CI runs first).

Covered on every target (N150, N300, T3K, TG): SmolLM2 (weight-free), a tiny Llama and a
tiny Qwen2 (with weights), paged (the default) and contiguous (--no-paged-attention), and
two decoder layers of each seed model config at full width (weight-free); each replay
issues every op of prefill and decode (ops issued == ops in the program) with zero ttnn
errors. Programs of one target share one replay process (one mesh each, in turn).
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lowering.optable import OPS
from lowering.program import Program

ROOT = Path(__file__).resolve().parents[1]
TTNN_PYTHON = ROOT / ".venv-ttnn" / "bin" / "python"
REPLAY = ROOT / "tests" / "ttnn_side" / "replay.py"
TIMEOUT = 600
pytestmark = pytest.mark.slow  # every test replays through ttnn in another process


@pytest.fixture(scope="session")
def ttnn_python() -> Path:
    """.venv-ttnn's python, creating the environment if needed; skips (with the reason)
    only when it cannot be created."""
    if not TTNN_PYTHON.exists():
        done = subprocess.run(["bash", str(ROOT / "scripts" / "setup_ttnn.sh")], cwd=ROOT,
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 or not TTNN_PYTHON.exists():
            pytest.skip(f".venv-ttnn cannot be created here: {(done.stderr or done.stdout)[-600:]}")
    return TTNN_PYTHON


def _run_replay(python: Path, artifacts: list[Path], *args: str) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TT_METAL_")}
    done = subprocess.run([str(python), str(REPLAY), *map(str, artifacts), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(artifacts), \
        f"replay printed {len(results)} results for {len(artifacts)} artifacts (exit {done.returncode}):\n" \
        f"{done.stderr[-3000:]}"
    return done.returncode, results, done.stderr


def replay(python: Path, artifact: Path, *args: str) -> tuple[int, dict, str]:
    """(exit status, printed JSON, stderr) of one replay in .venv-ttnn."""
    status, results, stderr = _run_replay(python, [artifact], *args)
    return status, results[0], stderr


def replay_all(python: Path, artifacts: dict[str, Path], *args: str) -> tuple[dict[str, dict], str]:
    """Replay several artifacts (of one target) in one .venv-ttnn process: label -> result."""
    _, results, stderr = _run_replay(python, list(artifacts.values()), *args)
    return dict(zip(artifacts, results)), stderr


def check_replayed(result: dict, stderr: str, target: str,
                   functions=("prefill", "decode", "decode_logits")) -> dict:
    """Every op of every function (`functions`, all the program has) issued, on the mock
    cluster of `target`, without torch."""
    summary = result["summary"]
    assert summary["target"] == target and summary["device"] == "mock"
    assert f"using the mock {target} cluster" in stderr
    assert set(summary["functions"]) == set(result["program_ops"]) == set(functions)
    for name, f in summary["functions"].items():
        assert f["ops_issued"] == f["ops_in_program"] == result["program_ops"][name], (name, f)
    assert summary["ok"]
    assert not result["torch_imported"]
    return summary


def failures(results: dict[str, dict]) -> str:
    """One line per artifact that did not replay (ttnn's report indented under it)."""
    lines = []
    for label, result in results.items():
        if "error" in result:
            lines.append(f"{label}: " + result["error"]["report"].replace("\n", "\n    "))
        elif not result["summary"]["ok"]:
            lines.append(f"{label}: not ok: {json.dumps(result['summary'])[:2000]}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the op table
def test_every_table_op_has_a_ttnn_implementation_that_takes_its_parameters():
    """TTNN_OPS covers lowering.optable.OPS (importing the backend needs no ttnn), and each
    function accepts the table's positional parameters and keywords. (It may implement
    ops the table does not have yet.)"""
    from runtime.ttnn_backend import TTNN_OPS

    assert sorted(set(OPS) - set(TTNN_OPS)) == []
    for name, d in OPS.items():
        inspect.signature(TTNN_OPS[name]).bind(object(), *[object()] * len(d.params),
                                               **{k: object() for k in d.kwargs})


# ------------------------------------------------------------------ the models on every target
TARGETS = ["N150", "N300", "T3K", "TG"]


@pytest.mark.parametrize("target", TARGETS)
def test_models_replay_on_every_target(ttnn_python, tiny_model, smollm2_dir, compile_artifact, target):
    """SmolLM2 (all 30 layers, weights allocated on the device), a tiny Llama and a tiny
    Qwen2 (with their converted weights), paged (the default) and the tiny Llama also with
    contiguous caches (--no-paged-attention): every op of prefill and decode issued, zero
    ttnn errors."""
    from compiler.targets import TARGETS as COMPILER_TARGETS

    if not COMPILER_TARGETS[target].supported:
        pytest.skip(f"the compiler does not compile for {target} yet")
    artifacts = {
        "tiny-llama": compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256, target=target),
        "tiny-qwen2": compile_artifact(tiny_model("tiny-qwen2", "qwen2"), max_seq_len=256, target=target),
        "tiny-llama contiguous": compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256,
                                                  target=target, no_paged_attention=True),
        "SmolLM2": compile_artifact(smollm2_dir, no_weights=True, target=target),
    }
    results, stderr = replay_all(ttnn_python, artifacts)
    assert not failures(results), failures(results)
    for label, result in results.items():
        summary = check_replayed(result, stderr, target)
        assert summary["mesh_shape"] == list(COMPILER_TARGETS[target].mesh_shape)
        assert summary["decode_users_per_chip"] == 32  # batch 1, a tile of users on the device
        assert summary["functions"]["prefill"]["rows"] == 128
        assert summary["memory_moves"] == [], (label, summary["memory_moves"])
        assert summary["weights"] == ("device" if label == "SmolLM2" else "host")
        ops = {**summary["functions"]["prefill"]["op_counts"], **summary["functions"]["decode"]["op_counts"]}
        paged = ("ttnn.experimental.paged_fill_cache", "ttnn.transformer.chunked_scaled_dot_product_attention",
                 "ttnn.transformer.paged_scaled_dot_product_attention_decode")
        contiguous = ("ttnn.fill_cache", "ttnn.transformer.scaled_dot_product_attention",
                      "ttnn.transformer.scaled_dot_product_attention_decode")
        for name in paged if label != "tiny-llama contiguous" else contiguous:
            assert ops.get(name), (label, name)
    decode = results["SmolLM2"]["summary"]["functions"]["decode"]["op_counts"]
    assert decode["ttnn.experimental.paged_update_cache"] == 60


def test_accuracy_programs_replay(ttnn_python, tiny_model, compile_artifact):
    out = compile_artifact(tiny_model("tiny-qwen2", "qwen2"), max_seq_len=256, optimizations="accuracy")
    status, result, stderr = replay(ttnn_python, out)
    assert status == 0, result.get("error", {}).get("report", stderr[-3000:])
    check_replayed(result, stderr, "N150")


def test_float32_programs_are_refused_with_the_reason(ttnn_python, tiny_model, compile_artifact):
    """float32 programs are the emulator's exact reference; ttnn 0.81.1 takes bfloat16 where
    they keep float32 (embedding tables, rotary inputs): a ValueError, before ttnn is
    imported (so also in a Python without ttnn), and the replay reports it."""
    import runtime
    from runtime.ttnn_backend import TtnnUnsupportedProgram

    out = compile_artifact(tiny_model("tiny-qwen2", "qwen2"), max_seq_len=256, optimizations="float32")
    with pytest.raises(ValueError, match="float32 is the emulator's exact reference mode; ttnn takes bfloat16"):
        runtime.load(out, backend="ttnn")
    assert issubclass(TtnnUnsupportedProgram, ValueError)
    status, result, _ = replay(ttnn_python, out)
    assert status == 5 and result["error"]["refused"], result
    assert "backend='emulator'" in result["error"]["report"]


def test_batch_32_replays(ttnn_python, tiny_model, compile_artifact):
    out = compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256, batch_size=32)
    status, result, stderr = replay(ttnn_python, out)
    assert status == 0, result.get("error", {}).get("report", stderr[-3000:])
    assert check_replayed(result, stderr, "N150")["decode_users_per_chip"] == 32


# ------------------------------------------------------------------ seed configs at full width
SEED_MAX_SEQ_LEN = 32768  # 1024 blocks of 32 per user: the default pool (see below)


@pytest.fixture(scope="session")
def seed_two_layer_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each shipped public config.json (the nine seed models, Qwen3, Mistral) with two
    decoder layers (the text decoder's, for Llama 3.2 Vision, without its cross-attention
    layers): full width, every other field verbatim."""
    from models_ref.config import public_config_dirs

    root = tmp_path_factory.mktemp("seed_two_layers")
    out = {}
    for name, folder in public_config_dirs().items():
        config = json.loads((folder / "config.json").read_text())
        text = config["text_config"] if "text_config" in config and "num_hidden_layers" not in config else config
        text["num_hidden_layers"] = 2
        if "cross_attention_layers" in text:
            text["cross_attention_layers"] = []
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config, indent=2))
        out[name] = root / name
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_seed_configs_two_layers_replay_at_full_width(ttnn_python, seed_two_layer_dirs, compile_artifact, target):
    """Two decoder layers of every shipped config at full width (hidden 2048 to 8192,
    their head counts, vocabularies and tied or untied heads; Qwen3's q/k norms, Mistral's
    sliding window), weight-free, on every target: zero ttnn errors, every op issued, no
    op over a core's L1."""
    from compiler.targets import TARGETS as COMPILER_TARGETS

    if not COMPILER_TARGETS[target].supported:
        pytest.skip(f"the compiler does not compile for {target} yet")
    artifacts = {name: compile_artifact(folder, no_weights=True, target=target, max_seq_len=SEED_MAX_SEQ_LEN)
                 for name, folder in seed_two_layer_dirs.items()}
    results, stderr = replay_all(ttnn_python, artifacts)
    assert not failures(results), failures(results)
    for name, result in results.items():
        summary = check_replayed(result, stderr, target)
        assert summary["l1"]["over_capacity"] == [], (name, summary["l1"]["over_capacity"])
        assert summary["memory_moves"] == [], (name, summary["memory_moves"])


@pytest.mark.parametrize("target", ["P150", "P300", "P150X4"])
def test_blackhole_targets_replay(ttnn_python, tiny_model, smollm2_dir, seed_two_layer_dirs, compile_artifact,
                                  target):
    """Blackhole rows of the target table replay on ttnn's Blackhole mocks (public tt-umd
    cluster descriptors): a tiny Llama with weights, SmolLM2 and two full-width layers of
    Llama 3.1 8B weight-free; every op issued, zero ttnn errors."""
    from compiler.targets import TARGETS as COMPILER_TARGETS

    artifacts = {
        "tiny-llama": compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256, target=target),
        "SmolLM2": compile_artifact(smollm2_dir, no_weights=True, target=target),
        "llama3.1-8b x2": compile_artifact(seed_two_layer_dirs["llama3.1-8b"], no_weights=True, target=target,
                                           max_seq_len=SEED_MAX_SEQ_LEN),
    }
    results, stderr = replay_all(ttnn_python, artifacts)
    assert not failures(results), failures(results)
    for label, result in results.items():
        summary = check_replayed(result, stderr, target)
        assert summary["mesh_shape"] == list(COMPILER_TARGETS[target].mesh_shape)
        assert summary["l1"]["over_capacity"] == [], (label, summary["l1"]["over_capacity"])


@pytest.mark.parametrize("target", ["N150", "TG"])
def test_later_prefill_chunks_replay(ttnn_python, tiny_model, seed_two_layer_dirs, compile_artifact, target):
    """The runtime prefills long prompts chunk by chunk: a chunk from position 128 (its own
    blocks of the user's page-table row, attention to everything before it) replays too,
    for a tiny model and a full-width 70B layer pair."""
    artifacts = {
        "tiny-llama": compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256, target=target),
        "llama3.1-70b": compile_artifact(seed_two_layer_dirs["llama3.1-70b"], no_weights=True, target=target,
                                         max_seq_len=SEED_MAX_SEQ_LEN),
    }
    results, stderr = replay_all(ttnn_python, artifacts, "--chunk-start", "128")
    assert not failures(results), failures(results)
    for result in results.values():
        assert check_replayed(result, stderr, target)["chunk_start"] == 128


def test_default_seed_program_page_table_fits_the_pool(ttnn_python, seed_two_layer_dirs, compile_artifact):
    """A seed config compiled with the defaults (the longest context that fits): ttnn's paged
    ops require a user's page-table row to be shorter than the pool (`max_num_blocks_per_seq
    must be less than max_num_blocks`); passes/paged_kv.py sizes the pool for that."""
    out = compile_artifact(seed_two_layer_dirs["llama3.2-1b"], no_weights=True)
    program = Program.loads((out / "program.json").read_text())
    per_user = program.options["max_seq_len"] // program.options["block_size"]
    assert per_user < program.options["max_num_blocks"]
    status, result, stderr = replay(ttnn_python, out)
    assert status == 0, result.get("error", {}).get("report", stderr[-3000:])
    check_replayed(result, stderr, "N150")


# ------------------------------------------------------------------ the first rejected op
def test_first_rejected_op_names_node_layer_and_ttnns_message(ttnn_python, tiny_model, compile_artifact,
                                                              tmp_path):
    """A linear given a weight whose inner dim does not match: the replay stops there."""
    out = compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256)
    program = Program.loads((out / "program.json").read_text())
    prefill = program.functions["prefill"]
    index = next(i for i, op in enumerate(prefill.ops) if op.op == "ttnn.linear" and op.layer == 1)
    bad = prefill.ops[index]
    bad.args[1] = "%layers.1.feed_forward.w2.weight"  # [ffn, dim]: inner dim ffn != dim
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "program.json").write_text(program.dumps())

    status, result, stderr = replay(ttnn_python, broken)
    assert status == 3, result
    error = result["error"]
    assert (error["function"], error["index"], error["op"]) == ("prefill", index, "ttnn.linear")
    assert (error["node"], error["layer"]) == (bad.node, 1)
    assert "TT_FATAL" in error["ttnn_message"] and "backtrace" not in error["ttnn_message"]
    report = error["report"]
    assert f"ttnn rejected op {index} of 'prefill': ttnn.linear" in report
    assert f"graph node: {bad.node}" in report and "layer: 1" in report
    assert "%layers.1.feed_forward.w2.weight: shape [328, 192]" in report
    assert error["ttnn_message"].splitlines()[-1] in report


# ------------------------------------------------------------------ host-side fidelity
@pytest.mark.parametrize("script, verdict", [
    ("check_blockfloat.py", r"TOTAL \d+ conversions .* 0 mismatches"),
    ("check_placements.py", r"\d+ cases, 0 mismatches"),
])
def test_host_conversion_matches_ttnn(ttnn_python, script, verdict):
    """The shared numpy block-float quantiser equals ttnn's host conversion bit for bit;
    mesh placements (replicated, split over one or both axes) and TILE padding as ttnn
    does them equal the program's (and the emulator's) semantics."""
    import re

    env = {k: v for k, v in os.environ.items() if not k.startswith("TT_METAL_")}
    done = subprocess.run([str(ttnn_python), str(ROOT / "tests" / "ttnn_side" / script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0 and re.search(verdict, done.stdout), (done.stdout[-3000:], done.stderr[-2000:])


def test_without_ttnn_the_backend_says_what_to_do(tiny_model, compile_artifact):
    """This environment (torch, no ttnn): a ValueError that names the set-up step."""
    import importlib.util

    import runtime
    from runtime.ttnn_backend import TtnnNotInstalled

    if importlib.util.find_spec("ttnn") is not None:
        pytest.skip("this Python has ttnn (a Tenstorrent machine's combined environment)")
    out = compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256)
    with pytest.raises(TtnnNotInstalled, match="scripts/setup_ttnn.sh"):
        runtime.load(out, backend="ttnn")


def test_a_python_without_torch_gets_one_line_saying_what_to_install(ttnn_python, tiny_model, compile_artifact):
    """.venv-ttnn has the project but not torch, like `pip install .` into a fresh venv:
    ttcompile and the emulator backend of ttrun say what to install, in one line, exit 2."""
    bin_dir = Path(ttnn_python).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("TT_METAL_")}
    done = subprocess.run([str(bin_dir / "ttcompile"), str(tiny_model("tiny-llama", "llama")), "--no-weights"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "ttcompile needs torch" in done.stderr and "CPU build" in done.stderr
    out = compile_artifact(tiny_model("tiny-llama", "llama"), max_seq_len=256)
    done = subprocess.run([str(bin_dir / "ttrun"), "prompt", "--program", str(out), "--backend", "emulator",
                           "--no-instruct", "hello"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "ttrun needs torch" in done.stderr and "--backend ttnn" in done.stderr
