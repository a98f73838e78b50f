"""One op table, two backends: every TTNN op the lowering can emit is in lowering.optable.OPS,
and every OPS entry has an emulator implementation and a ttnn implementation (and the
emulator has nothing the table lacks). Signatures agree with the table's parameters.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import subprocess
from pathlib import Path

import pytest

from lowering.optable import OPS, check_op
from runtime.emulator.ops import IMPLS

from test_lowering import MODES, compiled_tiny_models

ROOT = Path(__file__).resolve().parents[1]
TTNN_BACKEND = "runtime.ttnn_backend"


@pytest.fixture
def emitted() -> dict[tuple, set[str]]:
    """Op names the lowering emits, per (optimizations, arch, function), for tiny llama and
    qwen2 models compiled in every optimization mode."""
    return {(mode, arch, name): {op.op for op in fn.ops}
            for (mode, arch), result in compiled_tiny_models().items()
            for name, fn in result.program.functions.items()}


def test_every_table_op_has_an_emulator_implementation():
    missing = sorted(set(OPS) - set(IMPLS))
    assert not missing, f"ops in lowering.optable.OPS without an emulator implementation: {missing}"


def test_every_emulator_implementation_is_in_the_table():
    extra = sorted(set(IMPLS) - set(OPS))
    assert not extra, f"emulator implementations of ops missing from lowering.optable.OPS: {extra}"


@pytest.mark.parametrize("name", sorted(OPS))
def test_emulator_signature_accepts_the_table(name):
    """Every parameter and keyword the table lets the lowering pass binds to the emulator op
    (plus what the executor adds: the mesh shape for collectives)."""
    d = OPS[name]
    executor = {"mesh_shape": (1, 1)} if getattr(d, "collective", False) else {}
    sig = inspect.signature(IMPLS[name])
    sig.bind(*[object()] * len(d.params), **{k: object() for k in d.kwargs}, **executor)


def test_everything_the_lowering_emits_is_in_the_table(emitted):
    assert len(emitted) == len(MODES) * 2 * 3  # prefill, decode (sampling on the device), decode_logits
    used = set().union(*emitted.values())
    assert used <= set(OPS), sorted(used - set(OPS))
    assert used <= set(IMPLS)


def test_decode_and_prefill_use_their_own_ops(emitted):
    for (mode, arch, fn), ops in emitted.items():
        decode_only = {"ttnn.experimental.paged_update_cache", "ttnn.experimental.nlp_create_qkv_heads_decode",
                       "ttnn.transformer.scaled_dot_product_attention_decode",
                       "ttnn.experimental.nlp_concat_heads_decode"}
        prefill_only = {"ttnn.fill_cache", "ttnn.experimental.nlp_create_qkv_heads",
                        "ttnn.transformer.scaled_dot_product_attention", "ttnn.experimental.nlp_concat_heads",
                        "ttnn.slice"}
        mine, theirs = (decode_only, prefill_only) if fn.startswith("decode") else (prefill_only, decode_only)
        assert mine <= ops and not theirs & ops, (mode, arch, fn)


# ------------------------------------------------------------------ check_op
def test_check_op_accepts_a_valid_op():
    check_op("ttnn.linear", ["%x", "%w"], {"bias": "%b", "dtype": "bfloat16"})
    check_op("ttnn.experimental.nlp_create_qkv_heads_decode", ["%x"], {"num_heads": 8, "num_kv_heads": 2})


def test_check_op_rejects_unknown_kwargs():
    with pytest.raises(ValueError, match=r"ttnn.linear: unknown keyword arguments \['transpose_b'\]"):
        check_op("ttnn.linear", ["%x", "%w"], {"transpose_b": True, "dtype": "bfloat16"})
    with pytest.raises(ValueError, match="unknown keyword"):
        check_op("ttnn.fill_cache", ["%c", "%x", 0], {"memory_config": None})


def test_check_op_rejects_unknown_ops_and_wrong_arity():
    with pytest.raises(ValueError, match="unknown op ttnn.matmul"):
        check_op("ttnn.matmul", ["%a", "%b"], {})
    with pytest.raises(ValueError, match="1 positional arguments"):
        check_op("ttnn.linear", ["%x"], {})
    with pytest.raises(ValueError, match="positional"):
        check_op("ttnn.add", ["%a", "%b", "%c"], {})


def test_table_entries_are_consistent():
    for name, d in OPS.items():
        assert d.name == name and name.startswith("ttnn.")
        assert len(set(d.params) | set(d.kwargs)) == len(d.params) + len(d.kwargs), name
        assert d.outputs >= 0


# ------------------------------------------------------------------ the ttnn backend
def _ttnn_ops_elsewhere(python: Path) -> set[str]:
    """TTNN_OPS keys read in another environment (the ttnn one, which has no torch)."""
    code = f"import {TTNN_BACKEND} as m; print('\\n'.join(sorted(m.TTNN_OPS)))"
    done = subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(done.stdout.split())


def test_every_table_op_has_a_ttnn_implementation():
    """The ttnn half of "one op table, two backends": runtime.ttnn_backend.TTNN_OPS."""
    if importlib.util.find_spec(TTNN_BACKEND) is None:
        pytest.skip(f"{TTNN_BACKEND} does not exist yet (the ttnn backend is being written)")
    try:
        module = importlib.import_module(TTNN_BACKEND)
        assert hasattr(module, "TTNN_OPS"), f"{TTNN_BACKEND} must expose a mapping TTNN_OPS"
        ttnn_ops = set(module.TTNN_OPS)
    except ModuleNotFoundError as e:
        if e.name != "ttnn":
            raise
        other = ROOT / ".venv-ttnn" / "bin" / "python"
        if not other.exists():
            pytest.fail(f"{TTNN_BACKEND} needs ttnn at import and there is no .venv-ttnn to check "
                        "TTNN_OPS in; import ttnn lazily or create .venv-ttnn")
        ttnn_ops = _ttnn_ops_elsewhere(other)
    missing = sorted(set(OPS) - ttnn_ops)
    assert not missing, f"ops in lowering.optable.OPS without a ttnn implementation: {missing}"
