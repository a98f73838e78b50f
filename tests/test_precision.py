"""Per-layer precision: `ttcompile --precision FILE.json|auto` (compiler/precision_file.py,
compiler/precision_search.py, passes/precision.py) and `ttrun accuracy` (runtime/accuracy.py).

Files are tt_transformers' decoder-config shape ({"decoders": {"3": {"precision_cfg":
{"FF1_FF3": "BFP8"}, "fidelity_cfg": {"LI_FF1_FF3": "HIFI2_FP16"}}}}); layers the file
names get its settings, the others the mode's, and layers are stamped per precision class
(the program equals the fully traced one).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler import cli
from compiler.driver import compile_model
from compiler.options import CompileOptions
from compiler.precision_file import plan_to_file, read_precision_file
from passes.precision import plan_precision

FILE = {"decoders": {"1": {"precision_cfg": {"FF1_FF3": "BFP8", "WQKV": "BF16"},
                           "fidelity_cfg": {"LI_FF1_FF3": "HIFI2_FP16"}},
                     "3": {"precision_cfg": {"FF2": "BFP4", "KV_CACHE": "BF16"}}},
        "lm_head": {"precision": "BFP4", "fidelity": "HIFI4"}}


@pytest.fixture(scope="module")
def four_layers(tiny_model) -> Path:
    return tiny_model("tiny-4-layers", num_hidden_layers=4)


def _write(tmp_path: Path, data, name="precision.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _kernel(program, fn: str, layer: int, weight: str) -> dict:
    """The compute-kernel config of the linear reading `weight` in decoder layer `layer`."""
    (op,) = [op for op in program.functions[fn].ops
             if op.layer == layer and op.op == "ttnn.linear" and weight in json.dumps(op.args)]
    return op.kwargs["compute_kernel_config"]


def test_a_file_changes_the_layers_it_names_and_no_others(four_layers, tmp_path):
    path = _write(tmp_path, FILE)
    options = CompileOptions(no_weights=True, max_seq_len=256, precision=str(path))
    program = compile_model(four_layers, options).program
    mode = compile_model(four_layers, CompileOptions(no_weights=True, max_seq_len=256)).program
    w, base = program.weights, mode.weights
    assert w["layers.1.feed_forward.w1.weight"]["dtype"] == "bfloat8_b" != base["layers.1.feed_forward.w1.weight"]["dtype"]
    assert w["layers.1.attention.wqkv.weight"]["dtype"] == "bfloat16"
    assert w["layers.3.feed_forward.w2.weight"]["dtype"] == "bfloat4_b"
    assert program.state["layers.3.attention.k_cache"].dtype == "bfloat16" != mode.state["layers.3.attention.k_cache"].dtype
    assert w["output.weight"]["dtype"] == "bfloat4_b"
    changed = {"layers.1.feed_forward.w1.weight", "layers.1.feed_forward.w3.weight", "layers.1.attention.wqkv.weight",
               "layers.3.feed_forward.w2.weight", "output.weight"}
    assert {n for n in w if w[n]["dtype"] != base[n]["dtype"]} == changed
    for fn in ("prefill", "decode"):
        assert _kernel(program, fn, 1, "layers.1.feed_forward.w1.weight") == {
            "math_fidelity": "HiFi2", "fp32_dest_acc_en": False, "packer_l1_acc": True}
        assert _kernel(program, fn, 2, "layers.2.feed_forward.w1.weight") == _kernel(
            mode, fn, 2, "layers.2.feed_forward.w1.weight")
    assert program.precision["source"] == "precision.json" and len(program.precision["layers"]) == 4


def test_layers_stamped_per_class_equal_the_fully_traced_program(four_layers, tmp_path):
    path = _write(tmp_path, FILE)
    options = CompileOptions(no_weights=True, max_seq_len=256, precision=str(path))
    stamped = compile_model(four_layers, options)
    assert stamped.counters  # compiled
    full = compile_model(four_layers, options, full_trace=True)
    assert stamped.program.dumps() == full.program.dumps()


def test_a_plan_written_as_a_file_reads_back_as_the_same_plan(four_layers, tmp_path):
    from models_ref.config import load_config
    cfg = load_config(four_layers)
    plan = read_precision_file(_write(tmp_path, FILE), cfg, "performance")
    again = read_precision_file(_write(tmp_path, plan_to_file(plan), "again.json"), cfg, "performance")
    assert again.layers == plan.layers and (again.lm_head, again.li_lm_head) == (plan.lm_head, plan.li_lm_head)
    assert plan.layers[0] == plan_precision(cfg, "performance").layers[0]


@pytest.mark.parametrize("data, entry", [
    ({"decoders": {"4": {"precision_cfg": {"FF2": "BFP8"}}}}, "decoders.4"),
    ({"decoders": {"0": {"precision_cfg": {"FF2": "BFP2"}}}}, "decoders.0.precision_cfg.FF2"),
    ({"decoders": {"0": {"fidelity_cfg": {"LI_FF2": "HIFI9"}}}}, "decoders.0.fidelity_cfg.LI_FF2"),
    ({"decoders": {"0": {"precision_cfg": {"FF9": "BFP8"}}}}, "decoders.0.precision_cfg"),
    ({"layers": {}}, "decoders"),
    ('{"decoders": {"0": ', "not JSON"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_entry_exit_2(four_layers, tmp_path, capsys, data, entry):
    path = _write(tmp_path, data)
    out = tmp_path / "out"
    rc = cli.main([str(four_layers), "--no-weights", "--precision", str(path), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and str(path) in err and entry in err, err
    assert not out.exists()


def test_report_lists_the_precision_of_every_layer(four_layers, tmp_path, capsys):
    path = _write(tmp_path, FILE)
    rc = cli.main([str(four_layers), "--no-weights", "--precision", str(path), "--report", "-o",
                   str(tmp_path / "out"), "-q"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "per layer (--precision precision.json)" in text
    assert "layers 1       bfloat16 / bfloat8_b / bfloat8_b / bfloat8_b" in text
    assert json.loads((tmp_path / "out" / "precision.json").read_text())["decoders"]["3"]["precision_cfg"] == {
        "FF2": "BFP4", "KV_CACHE": "BF16"}


def test_auto_keeps_its_bound_and_the_program_follows_its_choice(four_layers, monkeypatch):
    """The search on a tiny model (random calibration ids: it has no tokenizer): the top-1
    it reports keeps the bound plus the margin, the program's weights have the dtypes it
    chose and its kernels the start policy's, and a bound the starting assignment already
    misses (1.0) lowers nothing."""
    import torch

    from compiler import precision_search

    ids = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    monkeypatch.setattr(precision_search, "calibration_tokens", lambda model_dir, path, n: ids[:n])
    for bound in (0.8, 1.0):
        result = compile_model(four_layers, CompileOptions(max_seq_len=256, precision="auto", min_top1=bound))
        chosen = result.precision_file["chosen"]
        assert chosen["calibration_top1"] >= bound + chosen["margin"] or not chosen["lowered"]
        for layer, settings in enumerate(result.program.precision["layers"]):
            for group in ("wqkv", "ff1_ff3", "ff2"):
                name = {"wqkv": "attention.wqkv", "ff1_ff3": "feed_forward.w1", "ff2": "feed_forward.w2"}[group]
                assert result.program.weights[f"layers.{layer}.{name}.weight"]["dtype"] == settings[group]
            # the start policy's kernels whatever --optimizations says (performance's LoFi
            # would cut a bfloat8_b w1 to 5 significant bits)
            fidelity = _kernel(result.program, "decode", layer, "feed_forward.w1")["math_fidelity"]
            assert fidelity == ("LoFi" if settings["ff1_ff3"] == "bfloat4_b" else "HiFi2")
        sizes = chosen["weight_bytes"]
        assert sizes["auto"] <= sizes["bfloat16"]
        assert bool(chosen["lowered"]) == (bound == 0.8)  # 1.0: even the start assignment misses it


@pytest.fixture(scope="module")
def tiny_search(four_layers):
    """The search's state on the tiny model, calibrated on random ids (it has no tokenizer)."""
    import torch

    from compiler import precision_search
    from models_ref.weights import open_checkpoint

    ids = torch.randint(0, 1000, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    reader = open_checkpoint(four_layers)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision_search, "calibration_tokens", lambda model_dir, path, n: ids[:n])
        return precision_search.Search(reader.cfg, reader, CompileOptions(precision="auto"), four_layers)


def test_the_search_drops_the_activation_bits_hifi2_does_not_multiply():
    """precision_sim.src_b is the SrcB part fidelity.py's first pass takes of a bfloat16 activation."""
    import torch

    from compiler.precision_sim import src_b
    from runtime.emulator import fidelity

    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 3
    rounded = x.bfloat16().float()
    high, low = fidelity.split(fidelity.src_value(rounded, "B"), "B")
    assert torch.equal(src_b(x), high)
    assert low.abs().max() > 0  # some bit was dropped


def test_fisher_weighing_predicts_the_kl_a_change_to_a_layer_output_makes(tiny_search):
    """A small change d to layer i's output moves the logits by KL ~ mean((g . d)^2) / 2
    over the probes' gradients g (the Fisher information): checked against running the
    changed rows through the later layers. Measured ratios 0.995 and 1.009 (256 samples; the
    gradients one layer off give 0.30)."""
    import torch

    from compiler.precision_search import _kl

    m = tiny_search.model
    tokens = tiny_search.tokens[:, :64]
    head = m.exact[m.head_name]
    keep, probes = m.fisher_probes(tokens, head, samples=256)
    base = m.logits(m.module.norm(keep[-1])[0, 0], head, False)
    generator = torch.Generator().manual_seed(2)
    for layer in (0, 2):
        out = keep[layer + 1]
        d = 0.01 * out.pow(2).mean().sqrt() * torch.randn(out.shape, generator=generator)
        h = m.hidden(tokens, device=False, start=layer + 1, x=out + d)
        kl = _kl(base, m.logits(h, head, False))
        predicted = float((probes[layer] * d[0, 0]).sum(-1).pow(2).mean()) / 2
        print(f"layer {layer}: Fisher {predicted:.3e}, KL {kl:.3e}, ratio {predicted / kl:.3f}")
        assert 0.8 < predicted / kl < 1.25, (layer, predicted, kl)


def test_a_check_that_starts_from_the_accepted_layers_equals_a_full_run(tiny_search, monkeypatch):
    """Search.top1 on an assignment that extends the accepted one runs only the layers from
    the first it changes, and gives what a run of every layer gives."""
    import torch

    from compiler.precision_search import rank

    search, runs = tiny_search, []
    ranked = rank(search.sensitivities())
    accepted = [c for c in ranked if c.layer in (0, 1)][:3]
    extended = accepted + [c for c in ranked if c.layer == 3 and c.level == 1][:2]
    search.accept(accepted, search.top1(accepted)[1])
    layer = search.model.layer
    monkeypatch.setattr(search.model, "layer", lambda i, *args: runs.append(i) or layer(i, *args))
    reused_top1, reused = search.top1(extended)
    assert runs == [3]
    search.accepted = None
    full_top1, full = search.top1(extended)
    assert runs == [3, 0, 1, 2, 3]
    assert len(reused) == len(full) == search.cfg.n_layers + 1
    assert all(torch.equal(a, b) for a, b in zip(reused, full))
    assert reused_top1 == full_top1
