"""Meta checkpoints split over several consolidated.NN.pth files load shard by shard.

- the same weights in 1, 2 and 4 model-parallel shards compile to the same program.json
  and the same converted weights, bit for bit (no repack step: MetaReader concatenates
  each tensor from the mapped shards when conversion asks for it);
- reading a tensor drops the checkpoint pages it was copied from, so mapped file pages do
  not add up to the whole checkpoint (benchmarks/bench_meta_shards.py measures a few-GB
  checkpoint: peak RSS against checkpoint size).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compiler import artifact
from compiler.driver import compile_model
from compiler.options import CompileOptions
from fixtures import make_hf_model, make_meta_model
from models_ref.weights import MetaReader, _MappedPages, open_checkpoint

# 8 heads / 4 KV heads / vocab and FFN divisible by 4: splits evenly into 4 Meta shards.
SHAPE = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
             intermediate_size=344, vocab_size=1000, num_hidden_layers=3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta-shards")
    hf = make_hf_model(root / "hf", "llama", seed=3, **SHAPE)
    # Same folder name everywhere: the name is part of the program (model.name).
    return {n: make_meta_model(hf, root / f"shards-{n}" / "llama-meta", shards=n) for n in (1, 2, 4)}


def _compile(path: Path, cache: Path, target: str):
    options = CompileOptions(target=target, optimizations="accuracy", max_seq_len=256, cache_dir=cache)
    result = compile_model(path, options)
    weights_dir, _ = artifact.convert_weights(result, cache)
    return result, weights_dir


@pytest.mark.parametrize("target", ["N150", "T3K"])
def test_sharded_checkpoints_compile_to_the_same_program_and_weights(checkpoints, tmp_path, target):
    assert len(list(checkpoints[4].glob("consolidated.*.pth"))) == 4
    results = {n: _compile(path, tmp_path / "cache", target) for n, path in checkpoints.items()}
    programs = {n: r.program.dumps() for n, (r, _) in results.items()}
    assert programs[1] == programs[2] == programs[4]
    files = {n: sorted(p.name for p in d.glob("*.safetensors")) for n, (_, d) in results.items()}
    assert files[1] == files[2] == files[4] and len(files[1]) == 1 + 3  # global + one per layer
    for name in files[1]:
        one = load_file(str(results[1][1] / name))
        for n in (2, 4):
            other = load_file(str(results[n][1] / name))
            assert one.keys() == other.keys()
            for key in one:
                assert torch.equal(one[key], other[key]), (n, name, key)


def test_reader_concatenates_along_the_model_parallel_dims(checkpoints):
    one, four = open_checkpoint(checkpoints[1]), open_checkpoint(checkpoints[4])
    assert isinstance(four, MetaReader) and len(four.files) == 4
    assert one.shapes() == four.shapes()
    for name in ("tok_embeddings.weight", "output.weight", "layers.1.attention.wq.weight",
                 "layers.2.attention.wo.weight", "layers.0.feed_forward.w2.weight", "norm.weight"):
        assert torch.equal(one.get(name), four.get(name)), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_reading_a_tensor_drops_its_mapped_pages(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    torch.save({"big": torch.ones(16 << 20, dtype=torch.bfloat16)}, path)  # 32 MB
    shard = torch.load(str(path), mmap=True, weights_only=True)
    pages = _MappedPages([path])
    assert pages.ranges, "the checkpoint should be mapped"

    def resident_kb() -> int:
        total, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if "-" in line.split(" ")[0] and len(line.split()) >= 5:
                inside = line.split()[-1] == str(path.resolve())
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    copy = shard["big"].clone()  # touches every page
    before = resident_kb()
    pages.release(shard["big"])
    after = resident_kb()
    assert before >= 30 * 1024 and after < before / 8, (before, after)
    assert torch.equal(shard["big"], copy), "dropped pages read back from the file"
