"""Shape rules (compiler/shape_rules.py) give what the meta kernels give.

- on every node of the seed models' graphs (every pass, both modes, the vision tower),
  each rule's result has the shape and dtype of the op run on meta tensors, and every
  rule in the table is exercised;
- arguments a rule does not cover (mixed dtypes, a zero-dim tensor, a reshape that fails,
  tensor indexing) fall back to the meta kernels (the rule returns None).
(tests/test_startup.py: the compile process then imports neither sympy nor torch._dynamo.)
"""
from __future__ import annotations

import operator

import pytest
import torch

from compiler import dialect, shape_rules
from compiler.driver import compile_model
from compiler.errors import CompileError
from compiler.options import CompileOptions
from models_ref import ops as ref
from models_ref.config import public_config_dirs

# Between them: sharding and collectives, qkv bias, a sliding window, q/k norms, the
# vision tower and cross-attention, paged and contiguous caches.
COMBOS = [("llama3.2-1b", "N150", {}), ("llama3.2-1b", "N150", {"paged_attention": False}),
          ("llama3.1-70b", "TG", {}), ("qwen2.5-7b", "N300", {}), ("mistral-7b-v0.1", "T3K", {}),
          ("qwen3-4b", "N150", {}), ("llama3.2-11b-vision", "T3K", {})]


def _same(rule_out, meta_out) -> bool:
    if isinstance(meta_out, (tuple, list)):
        return (isinstance(rule_out, tuple) and len(rule_out) == len(meta_out)
                and all(_same(a, b) for a, b in zip(rule_out, meta_out)))
    if isinstance(meta_out, torch.Tensor):
        return (isinstance(rule_out, torch.Tensor) and rule_out.device.type == "meta"
                and tuple(rule_out.shape) == tuple(meta_out.shape) and rule_out.dtype == meta_out.dtype)
    return rule_out == meta_out


@pytest.fixture(scope="module")
def checked():
    """Compile COMBOS with every rule's result compared to the meta kernels'; returns
    (mismatches, rules that fired, nodes checked)."""
    mismatches, fired, count = [], set(), [0]
    function_result, module_result = shape_rules.function_result, shape_rules.module_result

    def check(kind, key, rule_out, run):
        if rule_out is None:
            return None
        meta_out = run()
        count[0] += 1
        fired.add(key)
        if not _same(rule_out, meta_out):
            mismatches.append((kind, getattr(key, "__name__", key), rule_out, meta_out))
        return rule_out

    def checked_function(target, args, kwargs):
        return check("function", target, function_result(target, args, kwargs),
                     lambda: target(*args, **kwargs))

    def checked_module(module, args, kwargs):
        return check("module", type(module), module_result(module, args, kwargs),
                     lambda: module(*args, **kwargs))

    mp = pytest.MonkeyPatch()
    mp.setattr(shape_rules, "function_result", checked_function)
    mp.setattr(shape_rules, "module_result", checked_module)
    try:
        dirs = public_config_dirs()
        for name, target, options in COMBOS:
            try:
                compile_model(dirs[name], CompileOptions(target=target, no_weights=True, **options))
            except CompileError:
                pass  # a refusal comes after both modes' pipelines: their graphs were checked
    finally:
        mp.undo()
    return mismatches, fired, count[0]


def test_rules_agree_with_meta_kernels(checked):
    mismatches, _, count = checked
    assert count > 1000
    assert mismatches == []


def test_every_rule_is_exercised(checked):
    _, fired, _ = checked
    missing = (set(shape_rules.FUNCTION_RULES) | set(shape_rules.MODULE_RULES)) - fired
    assert not missing, sorted(getattr(m, "__name__", str(m)) for m in missing)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("target, args", [
    (dialect.add, (_meta(2, 3), _meta(2, 3, dtype=torch.bfloat16))),  # mixed dtypes
    (dialect.add, (_meta(2, 3), torch.empty((), device="meta"))),  # a zero-dim operand promotes differently
    (dialect.mul, (_meta(2, 3, dtype=torch.int64), 1.5)),  # an integer tensor and a float
    (operator.add, (2, 3)),  # shape arithmetic
    (dialect.linear, (_meta(1, 1, 4, 8), _meta(6, 8))),  # K does not match
    (ref.split_heads, (_meta(1, 1, 4, 10), 4, 3, False)),  # 10 != 4 * 3
    (operator.getitem, (_meta(4, 8), 0)),  # tensor indexing
])
def test_uncovered_arguments_fall_back(target, args):
    assert shape_rules.function_result(target, args, {}) is None
