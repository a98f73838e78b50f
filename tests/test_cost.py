"""The device time estimate (compiler/cost.py): hand-computed costs of tiny hand-built
programs equal the module's (bytes, FLOPs, collectives, dispatch); changes that must slow
a program make the estimate larger; `--report` prints the estimate by op class.

No timing assertions: every figure here is arithmetic on the program and the target row.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

from compiler import cost
from compiler.cli import main
from compiler.memory import device_bytes
from compiler.targets import get_target
from lowering.program import Function, InputSpec, Op, Program, TensorSpec
from models_ref.config import seed_model_dirs

N150, T3K, TG = get_target("N150"), get_target("T3K"), get_target("TG")
HIFI = {"math_fidelity": "HiFi2", "fp32_dest_acc_en": True, "packer_l1_acc": True}
US = 1e-6


def _act(*shape, dtype="bfloat16", layer=0):
    return TensorSpec(list(shape), dtype, layer=layer)


def _weight(shape, dtype, placement=None):
    return {"shape": list(shape), "dtype": dtype, "layout": "TILE", "recipe": [], "layer": 0,
            "placement": placement or {"dim": None, "axes": [], "partial": False}, "role": "w"}


def _program(target, ops, tensors, weights=None, state=None, inputs=(), name="decode", options=None):
    fn = Function(name, list(inputs), [], [ops[-1].out[0]] if ops and ops[-1].out else [], ops, tensors)
    return Program(target.name, list(target.mesh_shape), {}, {"block_size": 32, **(options or {})},
                   weights or {}, state or {}, {name: fn})


def _linear(x, w, out, fidelity="HiFi2"):
    return Op("ttnn.linear", [f"%{x}", f"%{w}"], {"dtype": "bfloat16",
                                                 "compute_kernel_config": {**HIFI, "math_fidelity": fidelity}},
              [out], layer=0)


def _matmul_program(k=4096, n=4096, rows=1, wdtype="bfloat8_b", fidelity="HiFi2", target=N150, name="decode"):
    return _program(target, [_linear("x", "w", "y", fidelity)],
                    {"x": _act(1, 1, rows, k), "y": _act(1, 1, rows, n)}, {"w": _weight((k, n), wdtype)}, name=name)


# ---------------------------------------------------------------- bytes and FLOPs
def test_decode_matmul_reads_its_weight_at_the_interleaved_rate():
    """x [1, 4096] (one tile row: 32 x 4096 x 2 B) @ w [4096, 4096] bfloat8_b (128 x 128
    tiles of 1088 B) -> y: DRAM bound at 190 GB/s on N150."""
    [c] = cost.op_costs(_matmul_program(), "decode", N150)
    weight, x, y = 128 * 128 * 1088, 32 * 4096 * 2, 32 * 4096 * 2
    assert c.dram_bytes == weight + x + y == 18_350_080
    assert c.flops == 2 * 32 * 4096 * 4096
    assert c.cores == 64  # 128 output tiles over an 8x8 grid
    assert c.bound == "dram" and c.seconds == pytest.approx((weight + x + y) / 190e9)
    assert c.cls == "matmul" and c.fidelity == "HiFi2"


def test_small_matmul_is_bound_by_the_shortest_kernel():
    [c] = cost.op_costs(_matmul_program(k=64, n=128), "decode", N150)
    assert c.dram_bytes == 32 * 64 * 2 + 2 * 4 * 1088 + 32 * 128 * 2 and c.cores == 4
    assert c.flops == 2 * 32 * 64 * 128
    assert c.bound == "floor" and c.seconds == pytest.approx(N150.op_kernel_min_us * US)


def test_prefill_matmul_is_compute_bound_at_its_fidelity():
    """2048 rows @ a bfloat4_b [4096, 4096]: 68.7 GFLOP; LoFi on 64 cores at 4096 FLOPs a
    cycle, 1 GHz, x MATMUL_EFFICIENCY; HiFi4 takes four passes."""
    lofi = cost.op_costs(_matmul_program(rows=2048, wdtype="bfloat4_b", fidelity="LoFi"), "decode", N150)[0]
    flops = 2 * 2048 * 4096 * 4096
    assert lofi.flops == flops and lofi.bound == "compute"
    assert lofi.seconds == pytest.approx(flops / (64 * 4096 * 1e9 * cost.MATMUL_EFFICIENCY))
    hifi4 = cost.op_costs(_matmul_program(rows=2048, wdtype="bfloat4_b", fidelity="HiFi4"), "decode", N150)[0]
    assert hifi4.seconds == pytest.approx(4 * lofi.seconds)


def test_sharded_weights_split_over_chips():
    """A column-parallel weight on T3K: each chip reads its eighth."""
    split = {"dim": 1, "axes": [1], "partial": False}
    program = _program(T3K, [_linear("x", "w", "y")], {"x": _act(1, 1, 1, 4096), "y": _act(1, 1, 1, 512)},
                       {"w": _weight((4096, 4096), "bfloat8_b", split)})
    [c] = cost.op_costs(program, "decode", T3K)
    assert c.dram_bytes == 128 * 16 * 1088 + 32 * 4096 * 2 + 32 * 512 * 2
    assert c.flops == 2 * 32 * 4096 * 512


def _attention_program(context_cap=64 * 32):
    cache = TensorSpec([context_cap // 32, 2, 32, 64], "bfloat8_b", kind="state", layer=0)
    op = Op("ttnn.transformer.paged_scaled_dot_product_attention_decode", ["%q", "%k", "%v"],
            {"page_table_tensor": "%page_table", "cur_pos_tensor": "%cur_pos", "scale": 0.125,
             "compute_kernel_config": {**HIFI, "math_fidelity": "HiFi4"}}, ["o"], layer=0)
    inputs = [InputSpec("page_table", "page_table", [1, context_cap // 32], "int32"),
              InputSpec("cur_pos", "positions", [1], "int32")]
    tensors = {"q": _act(1, 1, 4, 64), "o": _act(1, 1, 4, 64),
               "page_table": TensorSpec([1, context_cap // 32], "int32", "ROW_MAJOR", kind="input"),
               "cur_pos": TensorSpec([1], "int32", "ROW_MAJOR", kind="input")}
    return _program(N150, [op], tensors, state={"k": cache, "v": cache}, inputs=inputs)


def test_decode_attention_reads_the_kv_of_the_context():
    """One user, 2 KV heads of 64, bfloat8_b: K and V up to the position (1000 -> 1024
    rows), each KV group's 2 query heads padded to a 32-row tile."""
    [c] = cost.op_costs(_attention_program(), "decode", N150, context=1000)
    kv = 2 * device_bytes((2, 1024, 64), "bfloat8_b")
    assert kv == 2 * 2 * 32 * 2 * 1088
    small = 2 * (32 * 64 * 2) + 64 * 4 + 4  # q and the output tile-padded; page table and position row-major
    assert c.dram_bytes == kv + small
    assert c.flops == 2 * 2 * 1 * 2 * 32 * 1024 * 64
    assert c.cls == "attention"
    longer = cost.op_costs(_attention_program(), "decode", N150, context=2000)[0]
    assert longer.dram_bytes > c.dram_bytes


# ---------------------------------------------------------------- collectives
def _all_reduce_program(target, axis=1, links=1, cols=4096):
    op = Op("ttnn.all_reduce", ["%x"], {"cluster_axis": axis, "num_links": links}, ["y"], layer=0)
    return _program(target, [op], {"x": _act(1, 1, 1, cols), "y": _act(1, 1, 1, cols)})


def test_all_reduce_on_the_t3k_ring():
    """8 chips in a ring: start-up 9.07 us + 5.82 us x 8/2 hops, then 2 x 7/8 of the 256 KiB
    tile-padded row through the busiest link, both directions, at 12.5 GB/s x 0.75."""
    [c] = cost.op_costs(_all_reduce_program(T3K), "decode", T3K)
    tensor = 32 * 4096 * 2
    assert c.link_bytes == 2 * 7 * tensor // 8
    expected = (9.07 + 5.82 * 4) * US + c.link_bytes / (2 * 1 * 12.5e9 * cost.LINK_EFFICIENCY["ring"])
    assert c.cls == "collectives" and c.seconds == pytest.approx(expected)


def test_all_gather_on_a_tg_line_uses_its_axis_and_links():
    """TG's axis 0 is a line of 8 chips: 4.47 us + 1.91 us x 7, then 7 inputs through
    the end chip's 2 links at 12.5 GB/s x 0.87."""
    op = Op("ttnn.all_gather", ["%x", 3], {"cluster_axis": 0, "num_links": 2}, ["y"])
    program = _program(TG, [op], {"x": _act(1, 1, 32, 1024), "y": _act(1, 1, 32, 8192)})
    [c] = cost.op_costs(program, "decode", TG)
    assert c.link_bytes == 7 * 32 * 1024 * 2
    expected = (4.47 + 1.91 * 7) * US + c.link_bytes / (2 * 12.5e9 * cost.LINK_EFFICIENCY["line"])
    assert c.seconds == pytest.approx(expected)


# ---------------------------------------------------------------- dispatch
def test_traced_and_untraced_dispatch():
    """Traced: every op's work + the 6 us gap. Untraced: the larger of that and the 30 us
    the host takes to dispatch an op. Per class, the work; the rest is dispatch."""
    program = _program(N150, [_linear("x", "w", "y"), _linear("y", "w2", "z")],
                       {"x": _act(1, 1, 1, 4096), "y": _act(1, 1, 1, 4096), "z": _act(1, 1, 1, 64)},
                       {"w": _weight((4096, 4096), "bfloat8_b"), "w2": _weight((4096, 64), "bfloat8_b")})
    big, small = cost.op_costs(program, "decode", N150)
    traced = cost.decode_estimate(program, N150)
    assert traced.seconds == pytest.approx(big.seconds + small.seconds + 2 * 6 * US)
    assert traced.by_class["matmul"] == pytest.approx(big.seconds + small.seconds)
    assert traced.by_class["dispatch"] == pytest.approx(12 * US) and traced.ops == 2
    untraced = cost.decode_estimate(program, N150, traced=False)
    assert untraced.seconds == pytest.approx(max(big.seconds + 6 * US, 30 * US) + 30 * US)
    assert sum(untraced.by_class.values()) == pytest.approx(untraced.seconds)
    assert traced.tokens_per_s_per_user == pytest.approx(1 / traced.seconds)


def test_host_views_cost_nothing():
    ops = [Op("ttnn.unsqueeze_to_4D", ["%x"], {}, ["x4"]), _linear("x4", "w", "y")]
    program = _program(N150, ops, {"x": _act(1, 4096), "x4": _act(1, 1, 1, 4096), "y": _act(1, 1, 1, 4096)},
                       {"w": _weight((4096, 4096), "bfloat8_b")})
    assert cost.decode_estimate(program, N150).ops == 1


def test_prefill_runs_every_chunk():
    """A 300-token prompt pads to 512 rows; with 256-row chunks it is two calls."""
    one = _matmul_program(rows="S", name="prefill")
    one.functions["prefill"].tensors = {"x": _act(1, 1, "S", 4096), "y": _act(1, 1, "S", 4096)}
    one.options["prefill_chunk"] = 256
    two = cost.prefill_estimate(one, N150, prompt_tokens=300)
    single = cost.function_estimate(one, "prefill", N150, traced=False, seq=256)
    assert two.ops == 2 and two.seconds == pytest.approx(2 * single.seconds)


# ---------------------------------------------------------------- what must slow a program
def _decode_layer(wdtype="bfloat8_b", collectives=1, fidelity="HiFi2", rows=1):
    ops = [_linear("x", "w", "y", fidelity)]
    tensors = {"x": _act(1, 1, rows, 4096), "y": _act(1, 1, rows, 4096)}
    for i in range(collectives):
        ops.append(Op("ttnn.all_reduce", ["%y"], {"cluster_axis": 1, "num_links": 1}, [f"r{i}"], layer=0))
        tensors[f"r{i}"] = _act(1, 1, rows, 4096)
    return _program(T3K, ops, tensors, {"w": _weight((4096, 4096), wdtype)})


def test_a_bfloat16_weight_is_slower_than_bfloat8_b():
    assert cost.decode_estimate(_decode_layer("bfloat16"), T3K).seconds > \
        cost.decode_estimate(_decode_layer("bfloat8_b"), T3K).seconds


def test_one_more_collective_is_slower():
    for traced in (True, False):
        assert cost.decode_estimate(_decode_layer(collectives=2), T3K, traced=traced).seconds > \
            cost.decode_estimate(_decode_layer(collectives=1), T3K, traced=traced).seconds


def test_hifi4_is_slower_than_lofi_on_a_compute_bound_matmul():
    lofi = _matmul_program(rows=2048, wdtype="bfloat4_b", fidelity="LoFi")
    hifi4 = _matmul_program(rows=2048, wdtype="bfloat4_b", fidelity="HiFi4")
    assert cost.decode_estimate(hifi4, N150).seconds > cost.decode_estimate(lofi, N150).seconds
    # ... and makes no difference where DRAM bounds the op
    assert cost.decode_estimate(_matmul_program(fidelity="HiFi4"), N150).seconds == \
        pytest.approx(cost.decode_estimate(_matmul_program(fidelity="LoFi"), N150).seconds)


def test_dram_sharded_what_if_is_faster_for_decode_matmuls():
    program = _matmul_program()
    assert cost.decode_estimate(program, N150, sharded_matmuls=True).seconds < \
        cost.decode_estimate(program, N150).seconds


# ---------------------------------------------------------------- whole programs
def test_a_compiled_program_is_estimated_below_the_bandwidth_bound(tmp_path):
    from compiler.driver import compile_model
    from compiler.options import CompileOptions

    result = compile_model(seed_model_dirs()["llama3.2-1b"], CompileOptions(target="N150", no_weights=True))
    estimate = cost.decode_estimate(result.program, context=1024)
    assert 0 < estimate.tokens_per_s_per_user < result.plan.decode_tokens_per_s_per_user(1024)
    assert {c.op for c in estimate.costs} <= set(cost.OPS)
    assert estimate.by_class["collectives"] == 0  # one chip
    assert cost.prefill_estimate(result.program).ops > 0


def test_report_prints_where_the_time_goes(tmp_path, capsys):
    rc = main([str(seed_model_dirs()["llama3.2-1b"]), "--no-weights", "--target", "N300", "--report",
               "-o", str(tmp_path / "out"), "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("device time (estimate", "decode tokens/s/user (estimate)", "prefill TTFT (estimate)",
                 "where the time goes", "decode bound (peak DRAM)"):
        assert text in out, text
    lines = out.splitlines()
    for cls in cost.CLASSES:
        assert any(line.strip().startswith(cls) and " ms " in line for line in lines), cls


def test_cost_is_torch_free():
    code = "import sys, compiler.cost\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_blackhole_rates_come_from_its_row():
    bh = get_target("P150")
    assert bh.clock_ghz == 1.35 and bh.dram_interleaved_gbs > N150.dram_interleaved_gbs
    program = replace(_matmul_program(), target="P150")
    [c] = cost.op_costs(program, "decode", bh)
    assert c.seconds == pytest.approx(c.dram_bytes / 344e9)
