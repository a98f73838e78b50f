"""A generated sweep: small Llama-shaped configs compiled for every Wormhole target and
replayed through ttnn 0.81.1 on the target's mock mesh.

The compiler must never emit a program ttnn rejects (issue 11: heads of 16, 48, 80 and
100 used to compile, run on the emulator, and be rejected by ttnn). Each config here either
replays with zero ttnn errors, every op of every function issued, or is refused at compile
time with a reason listed in EXPECTED_REFUSALS. Configs are compiled weight-free in this
process (compile_model, as `ttcompile --no-weights`); the programs of one target replay in
one .venv-ttnn process (tests/ttnn_side/replay.py).

How the configs are chosen (`sweep_configs`, deterministic): 12 Llama configs per target,
config i (0..11) of target t (0..3 in TARGETS order) taking
- head_dim HEAD_DIMS[i % 6] (16, 48, 64, 80, 100, 128: whole tiles or not) and heads /
  KV heads HEADS[(i + t) % 4] ((4, 4), (6, 2), (5, 1), (9, 3): MHA, GQA, MQA, heads that
  divide no mesh). Over any two consecutive targets every (head_dim, heads) pair occurs,
  so over the four targets each of the 24 pairs is replayed twice, on different meshes;
- hidden size heads x head_dim (Llama's rule; e.g. 80, 144, 240, 400, 720, 900 are not
  whole tiles) for one of the two configs of each head_dim, heads x 21 (84, 105, 126, 189:
  never whole tiles; Llama allows hidden != heads x head_dim) for the other;
- intermediate size 328 or 200 and vocabulary 1000 or 49155 (neither is whole tiles or
  splits evenly over the chips), and the options: the defaults, accuracy mode (bfloat8_b
  attention and caches), 32 users per decode batch, contiguous (unpaged) caches. These
  alternate along i and shift with t, so no size or option is tied to one head_dim or
  head layout.
Beside them, one Qwen3 config per target (per-head q/k RMSNorm before rotary, over heads
of 80 and 100, padded to whole tiles, and of 160 and 256, wider than 128, where ttnn's
rotary takes no fp32 dest accumulation) and one config that must be refused (an odd
head_dim has no RoPE pairs). 14 configs per target, 56 in all: 2-3 minutes on 2 shared
cores, half of it TG's replay.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_ttnn_backend import check_replayed, failures, replay_all, ttnn_python  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow  # every test replays through ttnn in another process

TARGETS = ("N150", "N300", "T3K", "TG")
HEAD_DIMS = (16, 48, 64, 80, 100, 128)
HEADS = ((4, 4), (6, 2), (5, 1), (9, 3))
INTERMEDIATE = (328, 200)
VOCAB = (1000, 49155)
OPTIONS = ({}, {"optimizations": "accuracy"}, {"batch_size": 32}, {"paged_attention": False})
QWEN3_HEAD_DIMS = (80, 160, 100, 256)  # and heads wider than 128 (rotary without fp32 dest acc)
MAX_SEQ_LEN = 256

# label -> what the refusal says (a regex): configs that must not compile, and why.
EXPECTED_REFUSALS = {
    "llama-hd45-h4-kv2-d180-f200-v1000": r"head_dim 45 must be even for RoPE",
}


@dataclass(frozen=True)
class SweepConfig:
    arch: str
    head_dim: int
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    vocab: int
    options: dict = field(default_factory=dict, hash=False)

    @property
    def model(self) -> str:
        """The config's name (its folder): the sizes."""
        return (f"{self.arch}-hd{self.head_dim}-h{self.heads}-kv{self.kv_heads}-d{self.hidden}"
                f"-f{self.intermediate}-v{self.vocab}")

    @property
    def label(self) -> str:
        """The sizes and the compile options."""
        return self.model + "".join(f"-{k}={v}" for k, v in sorted(self.options.items()))


def sweep_configs(target: str) -> list[SweepConfig]:
    t = TARGETS.index(target)
    configs = []
    for i in range(12):
        head_dim = HEAD_DIMS[i % len(HEAD_DIMS)]
        heads, kv = HEADS[(i + t) % len(HEADS)]
        hidden = heads * head_dim if (i + i // len(HEAD_DIMS)) % 2 == 0 else heads * 21
        configs.append(SweepConfig("llama", head_dim, heads, kv, hidden, INTERMEDIATE[(i // 3 + i // 6) % 2],
                                   VOCAB[(i // 3 + t) % 2], OPTIONS[(i // 2 + t) % len(OPTIONS)]))
    heads, kv = HEADS[t]
    configs.append(SweepConfig("qwen3", QWEN3_HEAD_DIMS[t], heads, kv, heads * 21, 328, VOCAB[t % 2]))
    configs.append(SweepConfig("llama", 45, 4, 2, 180, 200, 1000))  # refused: no RoPE pairs
    return configs


def _config_dir(root: Path, c: SweepConfig) -> Path:
    from fixtures import hf_config

    folder = root / c.model
    if not (folder / "config.json").exists():
        even = c.head_dim + c.head_dim % 2  # transformers refuses an odd head_dim itself: written after
        hf_config(c.arch, hidden_size=c.hidden, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                  head_dim=even, intermediate_size=c.intermediate, vocab_size=c.vocab).save_pretrained(folder)
        if even != c.head_dim:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "head_dim": c.head_dim}, indent=2))
    return folder


def test_the_sweep_covers_the_spread():
    """Every head_dim with every head layout (over the targets, twice), hidden and vocab
    sizes that are and are not whole tiles, both intermediate sizes, every option set, on
    every target."""
    llama = {t: [c for c in sweep_configs(t) if c.arch == "llama" and c.label not in EXPECTED_REFUSALS]
             for t in TARGETS}
    pairs = [(c.head_dim, c.heads, c.kv_heads) for cs in llama.values() for c in cs]
    assert sorted(set(pairs)) == sorted((d, h, k) for d in HEAD_DIMS for h, k in HEADS)
    assert all(pairs.count(p) == 2 for p in set(pairs))
    for d in HEAD_DIMS:  # no size or option tied to a head_dim
        same = [c for cs in llama.values() for c in cs if c.head_dim == d]
        assert {c.hidden == c.heads * d for c in same} == {True, False}, d
        assert {c.intermediate for c in same} == set(INTERMEDIATE) and {c.vocab for c in same} == set(VOCAB), d
        assert len({json.dumps(c.options, sort_keys=True) for c in same}) >= 3, d
    for t, cs in llama.items():
        assert len(cs) == 12
        assert {c.hidden % 32 != 0 for c in cs} == {True, False}, t
        assert {c.intermediate for c in cs} == set(INTERMEDIATE) and {c.vocab for c in cs} == set(VOCAB), t
        assert {json.dumps(c.options, sort_keys=True) for c in cs} == {json.dumps(o, sort_keys=True) for o in OPTIONS}
        assert len({c.label for c in sweep_configs(t)}) == len(sweep_configs(t))
    assert sum(len(sweep_configs(t)) for t in TARGETS) == 56


@pytest.mark.parametrize("target", TARGETS)
def test_sweep_replays_on_the_mock_mesh(ttnn_python, tmp_path_factory, target):  # noqa: F811
    """Each config of the target compiles weight-free and replays through ttnn with zero
    errors, every op of every function issued, or is refused at compile time as
    EXPECTED_REFUSALS says."""
    from compiler.driver import compile_model
    from compiler.options import CompileOptions

    root = tmp_path_factory.mktemp(f"sweep-{target}")
    configs = tmp_path_factory.getbasetemp() / "sweep-configs"
    artifacts, refused = {}, {}
    for c in sweep_configs(target):
        options = CompileOptions(target=target, no_weights=True, max_seq_len=MAX_SEQ_LEN, **c.options)
        try:
            result = compile_model(_config_dir(configs, c), options)
        except ValueError as e:  # CompileError and ConfigError: the user's model, refused with a reason
            refused[c.label] = str(e)
            continue
        out = root / c.label
        out.mkdir()
        (out / "program.json").write_text(result.program.dumps())
        artifacts[c.label] = out
    unexpected = {k: v for k, v in refused.items() if k not in EXPECTED_REFUSALS}
    assert not unexpected, f"refused at compile time, not expected: {unexpected}"
    for label, reason in EXPECTED_REFUSALS.items():
        assert label in refused, f"{label} compiled; expected a refusal matching {reason!r}"
        assert re.search(reason, refused[label]), (label, refused[label])

    results, stderr = replay_all(ttnn_python, artifacts)
    assert not failures(results), failures(results)
    for label, result in results.items():
        functions = tuple(json.loads((artifacts[label] / "program.json").read_text())["functions"])
        check_replayed(result, stderr, target, functions)
    print(f"\n{target}: {len(artifacts)} configs replayed with zero ttnn errors, {len(refused)} refused as expected")
