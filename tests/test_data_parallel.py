"""Data parallel (`ttcompile --data-parallel N`): replicas of one program on sub-meshes.

- Layouts come from the target table (compiler/data_parallel.py): every count a system
  takes gives a replica target of the same architecture whose mesh tiles the system's;
  the others are refused with the reason and the counts that work.
- On the emulator every user's tokens (greedy and sampled on the device, host-sampling
  programs, contiguous caches) and teacher-forced logits are bit-identical to the
  single-replica program's: a replica is that program, with its share of the users.
- On ttnn's mock T3K and TG the replicas open as sub-meshes (create_submeshes; a TG's
  8x1 columns reshaped to 1x8) and replay every op of every function (slow: .venv-ttnn).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import runtime
from compiler import cli
from compiler.data_parallel import choices, replica_layout, replica_target
from compiler.errors import CompileError
from compiler.options import CompileOptions
from compiler.targets import TARGETS
from runtime.replicas import ReplicaPages
from test_ttnn_backend import replay_all, ttnn_python  # noqa: F401 (a fixture)

PROMPTS = [[5, 17, 300, 2], list(range(40, 95)), [7] * 9, list(range(900, 960, 3))]
STEPS = 10


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("tiny-llama", "llama")


def compiled(compile_artifact, model, **options):
    return compile_artifact(model, max_seq_len=256, **options)


# ------------------------------------------------------------------ layouts and refusals
@pytest.mark.parametrize("system", list(TARGETS))
def test_every_count_a_system_takes_is_a_target_row_carved_from_its_mesh(system):
    host = TARGETS[system]
    for count, name in choices(host).items():
        replica = TARGETS[name]
        assert replica.arch == host.arch and replica.num_chips * count == host.num_chips
        layout = replica_layout(CompileOptions(target=system, data_parallel=count, batch_size=count))
        if count == 1:
            assert layout is None
            continue
        rows, cols = layout.submesh_shape
        assert host.mesh_shape[0] % rows == 0 and host.mesh_shape[1] % cols == 0
        assert sorted(layout.submesh_shape) == sorted(replica.mesh_shape)  # reshaped when transposed
    for count in range(2, host.num_chips + 1):
        if count not in choices(host):
            assert replica_target(host, count) is None
            with pytest.raises(CompileError, match=f"--data-parallel {count} on {system}"):
                replica_layout(CompileOptions(target=system, data_parallel=count, batch_size=count))


def test_the_reference_splits():
    """The issue's examples: a T3K as four N300s or eight N150s; a TG as four T3Ks on its
    8x1 columns (the reference reshapes them to 1x8), 16 N300s or 32 N150s."""
    def layout(system, count):
        found = replica_layout(CompileOptions(target=system, data_parallel=count, batch_size=count))
        return found.replica.name, found.submesh_shape

    assert layout("T3K", 4) == ("N300", (1, 2)) and layout("T3K", 8) == ("N150", (1, 1))
    assert layout("TG", 4) == ("T3K", (8, 1)) and layout("TG", 16) == ("N300", (1, 2))
    assert layout("TG", 32) == ("N150", (1, 1))


@pytest.mark.parametrize("args, reason", [
    (["--data-parallel", "3"], "3 replicas do not divide its 8 chips"),
    (["--data-parallel", "2", "--batch-size", "2"], "no wormhole_b0 target is a 4-chip sub-mesh"),
    (["--data-parallel", "4", "--batch-size", "2"], "--batch-size 2 does not split over 4 replicas"),
    (["--data-parallel", "8", "--batch-size", "512"], "--batch-size 512 does not split over 8 replicas"),
    (["--data-parallel", "0"], "--data-parallel 0 must be at least 1"),
])
def test_bad_combinations_are_refused(model, tmp_path, capsys, args, reason):
    out = tmp_path / "out"
    rc = cli.main([str(model), "--target", "T3K", *args, "-o", str(out), "--cache", str(tmp_path / "c"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and reason in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "c").exists()


def test_a_replica_the_model_does_not_fit_is_refused(tmp_path, capsys):
    """Llama 3.1 70B fits a T3K, not the N300 a quarter of it is: refused, naming both."""
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "models_ref" / "seed_configs" / "llama3.1-70b"
    out = tmp_path / "out"
    rc = cli.main([str(config), "--no-weights", "--target", "T3K", "--data-parallel", "4", "--batch-size", "4",
                   "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "each replica is an N300" in err and "GB per chip on N300" in err, err
    assert not out.exists()


# ------------------------------------------------------------------ artifact and report
def test_program_and_manifest_record_the_replicas(compile_artifact, model):
    out = compiled(compile_artifact, model, target="T3K", data_parallel=4, batch_size=8)
    program = json.loads((out / "program.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert program["target"] == "N300" and program["mesh_shape"] == [1, 2]  # one replica's functions
    assert program["functions"]["decode"]["inputs"][0]["shape"] == [1, 2]  # 8 users / 4 replicas
    assert program["replicas"] == {"count": 4, "system": "T3K", "system_mesh_shape": [1, 8],
                                   "submesh_shape": [1, 2], "mesh_shape": [1, 2], "batch_size": 2}
    assert (program["options"]["target"], program["options"]["batch_size"], program["options"]["data_parallel"]) \
        == ("T3K", 8, 4)
    assert manifest["target"] == "T3K" and manifest["data_parallel"] == program["replicas"]
    assert program["memory_plan"]["replicas"] == 4 and program["memory_plan"]["target"] == "N300"


def test_report_is_per_replica(model, tmp_path, capsys):
    rc = cli.main([str(model), "--target", "T3K", "--data-parallel", "8", "--batch-size", "16", "--no-weights",
                   "--max-seq-len", "256", "--report", "-o", str(tmp_path / "out"), "-q"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "on N150 (1 chip, 12 GB DRAM per chip), performance, batch 2 x 8 replicas on T3K (16 users" in text
    assert "T3K as 8 x N150" in text


# ------------------------------------------------------------------ emulator: each user as alone
def greedy(session, prompts):
    return session.generate(prompts, max_generated_tokens=STEPS, stop_at_eos=False)


def sampled(session, prompts, seeds, temperature=1.0, top_p=0.95) -> np.ndarray:
    """Tokens [users, STEPS] sampled on the device with each user's seed: the first from
    the prefill's argmax, then decode_sample steps."""
    session.reset()
    for user, ids in enumerate(prompts):
        session.pages.reserve(user, len(ids) + STEPS)
    session.backend.seed_sampling(seeds)
    tokens = np.array([int(np.argmax(session.prefill(ids, user))) for user, ids in enumerate(prompts)])
    positions = np.array([len(ids) for ids in prompts])
    out = [tokens]
    for _ in range(STEPS - 1):
        tokens = session.decode_sample(tokens, positions, temperature, top_p)
        positions = positions + 1
        out.append(tokens)
    return np.stack(out, 1)


def test_t3k_as_four_n300s_gives_every_user_the_n300_result(compile_artifact, model):
    dp = runtime.load(compiled(compile_artifact, model, target="T3K", data_parallel=4, batch_size=4))
    one = runtime.load(compiled(compile_artifact, model, target="N300"))
    assert dp.batch_size == 4 and one.batch_size == 1
    assert greedy(dp, PROMPTS) == greedy(one, PROMPTS)
    # a decode step runs each of the 4 replicas once, with its one user
    assert dp.backend.invocations["decode"] == one.backend.invocations["decode"] == len(PROMPTS) * (STEPS - 1)
    for ids, prefill in ((PROMPTS[1], 30), (PROMPTS[3], 12)):
        assert np.array_equal(dp.teacher_forced_logits(ids, prefill), one.teacher_forced_logits(ids, prefill))
    seeds = [11, 23, 5, 8]
    draws = sampled(dp, PROMPTS, seeds)
    for user, ids in enumerate(PROMPTS):
        assert np.array_equal(draws[user], sampled(one, [ids], [seeds[user]])[0])
    assert len({tuple(d) for d in draws}) > 1  # the users' draws are their own


def test_t3k_as_eight_n150s_gives_every_user_the_n150_result(compile_artifact, model):
    dp = runtime.load(compiled(compile_artifact, model, target="T3K", data_parallel=8, batch_size=8))
    one = runtime.load(compiled(compile_artifact, model, target="N150"))
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]
    assert greedy(dp, prompts) == greedy(one, prompts)
    ids = PROMPTS[1]
    assert np.array_equal(dp.teacher_forced_logits(ids, 20), one.teacher_forced_logits(ids, 20))


def test_replicas_of_two_users_with_host_sampling(compile_artifact, model):
    """Two users per replica (users 1, 3, 5, 7 are each replica's second) against the N300
    program of batch 2 given the same pairs; logits leave the device (--sampling host)."""
    dp = runtime.load(compiled(compile_artifact, model, target="T3K", data_parallel=4, batch_size=8,
                               sampling="host"))
    pairs = runtime.load(compiled(compile_artifact, model, target="N300", batch_size=2, sampling="host"))
    assert not dp.samples_on_device
    prompts = PROMPTS + [p[1:] for p in PROMPTS]
    assert greedy(dp, prompts) == greedy(pairs, prompts)  # the generator groups 2 and 2, in order
    sampled_dp = dp.generate(prompts, max_generated_tokens=STEPS, temperature=0.8, seed=4, stop_at_eos=False)
    assert all(len(t) == STEPS for t in sampled_dp)


def test_contiguous_caches(compile_artifact, model):
    dp = runtime.load(compiled(compile_artifact, model, target="T3K", data_parallel=8, batch_size=8,
                               no_paged_attention=True))
    one = runtime.load(compiled(compile_artifact, model, target="N150", no_paged_attention=True))
    assert not dp.paged
    assert greedy(dp, PROMPTS[:3]) == greedy(one, PROMPTS[:3])


def test_each_replica_has_its_own_page_pool():
    """User u's blocks come from replica u // 2's pool of 3, numbered within it."""
    from runtime.pages import PagePoolExhausted

    pages = ReplicaPages(replicas=4, users_per_replica=2, num_blocks=3, block_size=32, blocks_per_user=4)
    first = pages.reserve(0, 2 * 32)
    third = pages.reserve(2, 3 * 32)  # replica 1: a pool of its own, all 3 blocks
    assert sorted(third) == [0, 1, 2] and set(first) <= {0, 1, 2}
    with pytest.raises(PagePoolExhausted):
        pages.reserve(1, 2 * 32)  # replica 0 has one block left
    pages.release(0)
    assert len(pages.reserve(1, 2 * 32)) == 2
    table = pages.table(8)
    assert table.shape == (8, 4) and list(table[2, :3]) == third and not table[0].any()


# ------------------------------------------------------------------ ttnn: sub-meshes on the mock
@pytest.mark.slow
def test_replicas_replay_on_mock_t3k_sub_meshes(ttnn_python, compile_artifact, model):
    """T3K as 4 x N300 (with weights: the first replica writes the ttnn weight files, the
    others read them) and as 8 x N150 (weight-free): every op of every function issued
    on every replica's sub-mesh, without torch."""
    artifacts = {"4 x N300": compiled(compile_artifact, model, target="T3K", data_parallel=4, batch_size=8),
                 "8 x N150": compiled(compile_artifact, model, target="T3K", data_parallel=8, batch_size=8,
                                      no_weights=True)}
    results, stderr = replay_all(ttnn_python, artifacts)
    for label, (count, replica, shape) in {"4 x N300": (4, "N300", [1, 2]), "8 x N150": (8, "N150", [1, 1])}.items():
        check_replicas(results[label], "T3K", count, replica, shape)
        assert f"{count} replicas of the {replica} program on {'x'.join(map(str, shape))} sub-meshes" in stderr
    loads = [r["weight_load"]["from"] for r in results["4 x N300"]["summary"]["replicas"]]
    assert loads[1:] == ["ttnn files"] * 3, loads


@pytest.mark.slow
def test_replicas_replay_on_mock_tg_columns(ttnn_python, compile_artifact, model):
    """TG as 4 x T3K: sub-meshes of 8x1 (the Galaxy's columns) reshaped to the T3K's 1x8."""
    out = compiled(compile_artifact, model, target="TG", data_parallel=4, batch_size=4, no_weights=True)
    results, stderr = replay_all(ttnn_python, {"tg": out})
    summary = check_replicas(results["tg"], "TG", 4, "T3K", [1, 8])
    assert summary["submesh_shape"] == [8, 1]


def check_replicas(result: dict, system: str, count: int, replica: str, shape: list) -> dict:
    """Every replica on a sub-mesh of `shape` of the mock `system` issued every op."""
    assert "error" not in result, result["error"]["report"]
    summary = result["summary"]
    assert (summary["target"], summary["device"], summary["replica_target"]) == (system, "mock", replica)
    assert summary["submeshes"] == [shape] * count and len(summary["replicas"]) == count
    for each in summary["replicas"]:
        assert each["target"] == replica and each["ok"]
        for name, f in each["functions"].items():
            assert f["ops_issued"] == f["ops_in_program"] == result["program_ops"][name], (name, f)
    assert summary["ok"] and not result["torch_imported"]
    return summary
