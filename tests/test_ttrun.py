"""`ttrun`: the seed's demo presets over a compiled program, with command-line overrides."""
from __future__ import annotations

import json

import pytest

from runtime import cli
from runtime.presets import PRESETS, read_prompts


def test_bundled_prompt_files_parse():
    for preset in PRESETS.values():
        entries = read_prompts(preset.prompts)
        assert entries and all(e.prompt for e in entries)
    assert len(read_prompts("batch-32.json")) == 32
    (long_context,) = read_prompts("long-context.json")
    assert len(long_context.context) > 200_000 and long_context.max_length == 65536


def test_prompt_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "not a list"}')
    with pytest.raises(ValueError, match="list of objects"):
        read_prompts(bad)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"prompt": "x", "context": "nowhere.txt"}]))
    with pytest.raises(ValueError, match="not found"):
        read_prompts(missing)


@pytest.fixture(scope="module")
def smol_program(smollm2_dir, compile_artifact):
    return compile_artifact(smollm2_dir, optimizations="accuracy", batch_size=4, max_seq_len=1024,
                            max_num_blocks=160)


@pytest.mark.slow
def test_batch_preset_with_overrides(smol_program, tmp_path, capsys):
    """Five prompts on a 4-user program run as two batches; context text is cut to max_length."""
    (tmp_path / "context.txt").write_text("Paris is the capital and largest city of France. " * 40)
    prompts = [{"prompt": "What is the capital of France?", "context": "context.txt", "max_length": 30}] + \
              [{"prompt": f"Count from {i} to {i + 3}."} for i in range(4)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    rc = cli.main(["batch-32", "--program", str(smol_program), "--input-prompts", str(tmp_path / "prompts.json"),
                   "--max-generated-tokens", "12"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.count("> ") == 5 and "Paris" in captured.out
    assert "tokens/s/user" in captured.err and "5 users" in captured.err


@pytest.mark.slow
def test_single_prompt_streams(smol_program, capsys):
    rc = cli.main(["prompt", "What is the capital of France?", "--program", str(smol_program),
                   "--max-generated-tokens", "12"])
    captured = capsys.readouterr()
    assert rc == 0 and "Paris" in captured.out and "time to first token" in captured.err
    # As scripts/demo.sh writes it: the prompt after the options.
    rc = cli.main(["prompt", "--program", str(smol_program), "--max-generated-tokens", "12",
                   "What is the capital of France?"])
    captured = capsys.readouterr()
    assert rc == 0 and "Paris" in captured.out


def test_errors_are_one_line(capsys, tmp_path):
    assert cli.main(["batch-1"]) == 2
    assert "--program" in capsys.readouterr().err
    assert cli.main(["batch-1", "--program", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a ttcompile artifact" in err
