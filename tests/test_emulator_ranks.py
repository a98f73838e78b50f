"""The emulator's chips as ranks of torch.distributed (runtime/emulator/ranks.py): bit for
bit the single process's logits and tokens, each rank holding its share of the weights;
`ttrun --ranks N`; a rank killed mid-run stops the others with an error naming it."""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import runtime
from rank_worker import measure
from runtime import cli
from runtime.emulator.launch import launch
from runtime.emulator.ranks import RankLayout
from serve_helpers import tiny_chat_model

WORKER = Path(__file__).resolve().parent / "rank_worker.py"
TARGETS = ("N300", "T3K", "TG")


@pytest.fixture(scope="module")
def programs(tiny_model, compile_artifact) -> dict[str, Path]:
    model = tiny_model("llama_plain")
    return {t: compile_artifact(model, target=t, optimizations="performance", max_seq_len=128) for t in TARGETS}


@pytest.fixture(scope="module")
def single(programs) -> dict[str, dict]:
    """Each program's measurements in this one process (the reference)."""
    return {t: measure(runtime.load(out)) for t, out in programs.items()}


@pytest.fixture(scope="module")
def chat_program(tiny_model, smollm2_dir, compile_artifact) -> Path:
    """A tiny TG program that speaks SmolLM2's tokenizer (for ttrun)."""
    return compile_artifact(tiny_chat_model(tiny_model, smollm2_dir), target="TG", optimizations="performance",
                            max_seq_len=128)


def test_layout_cuts_the_mesh_into_equal_blocks():
    tg = RankLayout.of((8, 4), 4)
    assert tg.grid == (4, 1) and tg.block == (2, 4)
    assert tg.chips(1) == list(range(8, 16)) and tg.owner(17) == 2 and tg.peers(3, 0) == [0, 1, 2, 3]
    t3k = RankLayout.of((1, 8), 2)
    assert t3k.block == (1, 4) and t3k.chips(1) == [4, 5, 6, 7] and t3k.peers(0, 1) == [0, 1]
    both = RankLayout.of((8, 4), 16)  # rows cut in 8, columns in 2
    assert both.block == (1, 2) and both.chips(3) == [6, 7] and both.peers(3, 0) == [1, 3, 5, 7, 9, 11, 13, 15]
    for mesh, world in (((8, 4), 3), ((1, 2), 4), ((1, 8), 16)):
        with pytest.raises(ValueError, match="equal blocks"):
            RankLayout.of(mesh, world)


def test_each_chip_reads_its_piece_as_the_whole_weight_rounded_and_cut(programs):
    """shards.chip_pieces (a rank reads only its pieces) against the whole tensor rounded to
    its dtype, then cut (shards.place), bit for bit: the TG program's weights from the
    cache, and block floats cut along the last dimension inside and across exponent groups."""
    import json

    import torch

    from runtime.emulator.ops import quantize_like
    from runtime.emulator.shards import WeightSource, chip_pieces, place
    from runtime.session import read_artifact

    program, manifest = read_artifact(programs["TG"])
    mesh = tuple(program.mesh_shape)
    with WeightSource(Path(manifest["weights"]), None) as source:
        for name, spec in program.weights.items():
            want = place(quantize_like(source.read(name), spec["dtype"]), spec.get("placement"), mesh)
            got = chip_pieces(source, name, spec, mesh, [5, 30])
            assert all(torch.equal(g, want[c]) for g, c in zip(got, [5, 30])), name
    weights = {"w": torch.randn(32, 128, generator=torch.Generator().manual_seed(0)) * 3}
    for axes, dtype in (([1], "bfloat8_b"), ([0], "bfloat4_b"), ([0, 1], "bfloat8_b")):  # cuts of 32, 16, 4
        spec = {"dtype": dtype, "placement": {"dim": 1, "axes": axes}}
        want = place(quantize_like(weights["w"], dtype), spec["placement"], (8, 4))
        got = chip_pieces(WeightSource(None, weights), "w", spec, (8, 4), list(range(32)))
        assert all(torch.equal(g, w) for g, w in zip(got, want)), json.dumps(spec)


def _run_ranks(world: int, programs: list[Path], dest: Path) -> dict[str, list[dict]]:
    """The worker as `world` ranks over `programs`: {program folder: [each rank's results]}."""
    assert launch([sys.executable, str(WORKER), str(dest), *map(str, programs)], world) == 0
    return {p.name: [dict(np.load(dest / f"{p.name}.rank{r}.npz")) for r in range(world)] for p in programs}


def _check(single: dict, ranks: list[dict]) -> None:
    """Every rank's logits and tokens are the single process's, bit for bit; every rank
    holds all of the replicated weights and only part of the sharded ones. (Chips whose
    matmul pieces are equal share one copy within a process, mesh.SharedPieces: split over
    ranks, each rank holds a copy of a piece its chips share, so the ranks hold at least
    the single process's sharded bytes between them, not an equal share each.)"""
    for result in ranks:
        assert np.array_equal(result["logits"], single["logits"])
        assert np.array_equal(result["tokens"], single["tokens"])
        assert result["weights"][1] == single["weights"][1]
    sharded = [int(r["weights"][0]) for r in ranks]
    assert sum(sharded) >= single["weights"][0]
    assert max(sharded) < single["weights"][0]


def test_two_ranks_equal_one_process(programs, single, tmp_path):
    results = _run_ranks(2, [programs[t] for t in TARGETS], tmp_path)
    for t in TARGETS:
        _check(single[t], results[programs[t].name])
    # the share that matters (1.34x: the tiny TG program's chips hold many equal pieces,
    # once, and its block-float operands at a byte a weight, beside float32 embeddings)
    assert single["TG"]["weights"][0] > 1.2 * single["TG"]["weights"][1]


@pytest.mark.slow
def test_four_ranks_equal_one_process(programs, single, tmp_path):
    results = _run_ranks(4, [programs["T3K"], programs["TG"]], tmp_path)
    for t in ("T3K", "TG"):
        _check(single[t], results[programs[t].name])


def test_rank_counts_that_do_not_cut_the_mesh_are_refused(programs, capsys):
    assert cli.main(["prompt", "hi", "--program", str(programs["TG"]), "--ranks", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3 ranks do not cut the 8x4 mesh" in err
    assert cli.main(["prompt", "hi", "--program", str(programs["N300"]), "--ranks", "4"]) == 2
    assert "equal blocks" in capsys.readouterr().err
    assert cli.main(["prompt", "hi", "--model", "x", "--ranks", "2"]) == 2
    assert "--program" in capsys.readouterr().err


def _ttrun(*args) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "prompt", *args]


def _rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's children, from their RANK variable."""
    pids = {}
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        pids.update({int(e[5:]): int(child) for e in env if e.startswith(b"RANK=")})
    return pids


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs Linux's /proc children lists")
@pytest.mark.parametrize("world,victim", [(2, 1), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_a_killed_rank_stops_the_others_with_an_error_naming_it(chat_program, world, victim):
    proc = subprocess.Popen(_ttrun("--program", str(chat_program), "--ranks", str(world), "--no-instruct",
                                   "--no-stop-at-eos", "--max-generated-tokens", "100", "Hello there"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        streamed = b""
        deadline = time.monotonic() + 240
        while b"\n" not in streamed or len(streamed.split(b"\n", 1)[1]) < 4:  # generating
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
            if select.select([proc.stdout], [], [], 1.0)[0]:
                streamed += os.read(proc.stdout.fileno(), 4096)
        pids = _rank_pids(proc.pid)
        assert sorted(pids) == list(range(world))
        os.kill(pids[victim], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)  # no hang: the others stop by themselves
    finally:
        if proc.poll() is None:
            proc.kill()
    err = err.decode()
    assert proc.returncode == 1, err
    assert [line for line in err.splitlines() if line.startswith("ttrun: error:")] == \
        [line for line in err.splitlines() if f"rank {victim} stopped" in line], err  # one line, naming it
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids.values())


@pytest.mark.slow
def test_ttrun_prints_the_same_text_with_ranks_and_under_torchrun(chat_program):
    args = ["--program", str(chat_program), "--max-generated-tokens", "8", "Hello there"]
    outputs = [subprocess.run(command, capture_output=True, text=True, timeout=300)
               for command in (_ttrun(*args), _ttrun(*args, "--ranks", "2"),
                               [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node",
                                "2", "-m", "runtime.cli", "prompt", *args])]
    for result in outputs:
        assert result.returncode == 0, result.stderr
    assert outputs[0].stdout.startswith("> Hello there\n") and len(outputs[0].stdout) > 20
    assert outputs[1].stdout == outputs[0].stdout and outputs[2].stdout == outputs[0].stdout
