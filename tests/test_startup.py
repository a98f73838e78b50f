"""What makes a weight-free `ttcompile` process start fast, checked for what it changes.

- the process imports neither sympy nor torch._dynamo (torch's Python meta kernels import
  them on first use; compiler/shape_rules.py keeps propagation off those kernels) nor
  ml_dtypes (runtime/blockfloat.py imports it only to round to bfloat16);
- the fast layer renaming of weight recipes (lowering/stamp._recipe_stamper) gives what
  the element-by-element one gives, types included, and walks what JSON cannot carry;
- the fast copy of the decode function (lowering/sampling._clone) equals copy.deepcopy's
  and shares no mutable object with the original.
"""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.driver import compile_model
from compiler.options import CompileOptions
from lowering.sampling import _clone
from lowering.stamp import _recipe, _recipe_stamper
from models_ref.config import public_config_dirs

ROOT = Path(__file__).resolve().parents[1]


def test_weight_free_compile_avoids_slow_imports(tmp_path):
    code = ("import sys\nfrom compiler.cli import main\n"
            f"assert main(['models_ref/seed_configs/llama3.2-1b', '--no-weights', '-q', '-o', {str(tmp_path)!r}]) == 0\n"
            "slow = sorted(m for m in ('sympy', 'torch._dynamo', 'ml_dtypes') if m in sys.modules)\n"
            "assert not slow, slow\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "program.json").exists()


def _typed(value):
    """A value with every element's type beside it (1 == 1.0 == True otherwise)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_typed(v) for v in value])
    if isinstance(value, dict):
        return ("dict", {k: _typed(v) for k, v in value.items()})
    return (type(value).__name__, value)


RECIPES = [
    ["transpose", ["source", "layers.1.feed_forward.w1.weight"]],
    ["concat", 1, [["select_heads", 1, 128, [0, 1], ["transpose", ["source", "layers.1.attention.wq.weight"]]],
                   ["pad", 0, 64, ["source", "layers.0.attention.wk.weight"], 1.0]]],
    ["scale", 0.5, ["reshape", [1, 1, 32, 64], ["source", "layers.1.q_norm.weight"]], None, True],
    ["source", "xlayers.1.not_a_prefix", "layers.10.other_layer", "layers.1."],
    ["source", ("layers.1.a", 3)],  # a tuple: _recipe leaves it alone
    ["source", {"name": "layers.1.a"}],  # an object: likewise
    ["source", 'layers.1.say "hi"'],  # an escape in the JSON text
    ["nan", float("nan"), float("inf")],
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_stamper_renames_as_recipe_does(recipe):
    stamp = _recipe_stamper(recipe, 1)
    for dst in (1, 2, 79):
        got, want = stamp(dst), _recipe(recipe, 1, dst)
        assert repr(_typed(got)) == repr(_typed(want))
        assert got is not recipe


def test_clone_is_a_deep_copy():
    result = compile_model(public_config_dirs()["llama3.2-1b"], CompileOptions(no_weights=True))
    fn = result.program.functions["decode_logits"]
    cloned = _clone(fn)
    assert cloned == copy.deepcopy(fn)

    def mutable_ids(value, seen):
        if isinstance(value, (list, dict)) or hasattr(value, "__dict__"):
            seen.add(id(value))
            items = value.values() if isinstance(value, dict) else (
                value if isinstance(value, list) else vars(value).values())
            for item in items:
                mutable_ids(item, seen)
        return seen

    assert not mutable_ids(cloned, set()) & mutable_ids(fn, set())
