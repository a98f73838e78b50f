"""The CPU emulator backend: executes a Program's ops with torch, one tensor per chip.

Weights are read from the converted-weight cache and rounded to their device dtype once,
at load (block floats through the shared numpy quantiser). Each function is prepared
once into a list of steps with resolved argument getters, so a decode step is a tight
loop over ops.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowering.optable import OPS
from lowering.program import Function, Program, is_tensor_ref, resolve_scalar, tensor_name

from .ops import IMPLS, TORCH_DTYPES, quantize_like


class EmulatorError(RuntimeError):
    pass


@dataclass
class _Step:
    op: object
    impl: object
    args: list  # ("t", name) | ("s", value-template) | ("v", literal)
    kwargs: dict
    out: list[str]
    out_dtypes: list[str]


def _arg(value, tensors):
    if is_tensor_ref(value):
        name = tensor_name(value)
        if name not in tensors:
            raise EmulatorError(f"op reads unknown tensor '{name}'")
        return ("t", name)
    if isinstance(value, (str, list)) and "$" in json.dumps(value):
        return ("s", value)
    return ("v", value)


class EmulatorBackend:
    name = "emulator"

    def __init__(self, program: Program, weights_dir: Path | None, weights: dict | None = None):
        self.program = program
        self.linear_weights = self._linear_weight_names(program)
        self.env: dict[str, torch.Tensor] = {}
        self._load_weights(weights_dir, weights)
        self.reset()
        self.steps = {name: self._prepare(fn) for name, fn in program.functions.items()}
        self.ops_executed: Counter = Counter()
        self.invocations: Counter = Counter()

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _linear_weight_names(program: Program) -> set[str]:
        names = set()
        for fn in program.functions.values():
            for op in fn.ops:
                if op.op == "ttnn.linear" and tensor_name(op.args[1]) in program.weights:
                    names.add(tensor_name(op.args[1]))
        return names

    def _load_weights(self, weights_dir: Path | None, weights: dict | None) -> None:
        from safetensors.torch import safe_open

        if weights is None:
            weights = {}
            index = json.loads((Path(weights_dir) / "index.json").read_text())["weights"]
            for shard in sorted(set(index.values())):
                with safe_open(str(Path(weights_dir) / shard), framework="pt") as f:
                    for key in f.keys():
                        weights[key] = f.get_tensor(key)
        for name, spec in self.program.weights.items():
            if name not in weights:
                raise EmulatorError(f"weight '{name}' is missing from the converted weights")
            t = quantize_like(weights[name], spec["dtype"])
            if name in self.linear_weights:
                t = t.t().contiguous()  # [N, K]: F.linear's layout; values unchanged
            self.env[name] = t

    def reset(self) -> None:
        """Zero all device state (KV caches)."""
        for name, spec in self.program.state.items():
            self.env[name] = torch.zeros(spec.shape, dtype=TORCH_DTYPES[spec.dtype])

    # ------------------------------------------------------------------ preparation
    def _prepare(self, fn: Function) -> list[_Step]:
        known = set(self.env) | set(fn.tensors)
        steps = []
        for op in fn.ops:
            if op.op not in IMPLS:
                raise EmulatorError(f"op {op.op} has no emulator implementation")
            args = [_arg(a, known) for a in op.args]
            kwargs = {k: _arg(v, known) for k, v in op.kwargs.items()}
            if OPS[op.op].outputs == 0:
                cache = tensor_name(op.args[0])
                kwargs["cache_dtype"] = ("v", self.program.state[cache].dtype)
            dtypes = [fn.tensors[o].dtype for o in op.out]
            steps.append(_Step(op, IMPLS[op.op], args, kwargs, list(op.out), dtypes))
        return steps

    # ------------------------------------------------------------------ execution
    def run(self, fn_name: str, inputs: dict[str, np.ndarray], scalars: dict[str, int] | None = None,
            skip: set[int] | None = None) -> list[np.ndarray]:
        fn = self.program.functions[fn_name]
        env = dict(self.env)
        for spec in fn.inputs:
            env[spec.name] = torch.from_numpy(np.ascontiguousarray(inputs[spec.source], dtype=np.int64)
                                              ).reshape([d if d != "S" else -1 for d in spec.shape])
        scalars = scalars or {}

        def value(kind, v):
            return env[v] if kind == "t" else resolve_scalar(v, scalars) if kind == "s" else v

        with torch.inference_mode():
            for step in self.steps[fn_name]:
                args = [value(*a) for a in step.args]
                kwargs = {k: value(*a) for k, a in step.kwargs.items()}
                result = step.impl(*args, **kwargs)
                if not step.out:
                    continue
                results = result if isinstance(result, (list, tuple)) else [result]
                for name, dtype, r in zip(step.out, step.out_dtypes, results):
                    env[name] = r if r.dtype == TORCH_DTYPES[dtype] and dtype in ("bfloat16", "float32") \
                        else quantize_like(r, dtype)
        self.ops_executed[fn_name] += len(self.steps[fn_name])
        self.invocations[fn_name] += 1
        return [env[o].float().numpy() for o in fn.outputs]
