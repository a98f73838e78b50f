"""A program function prepared for the emulator: steps, and the loops that run them.

A Step is one op with its arguments resolved once ("t" tensor, "tl" tensor list, "s"
host-scalar template, "v" literal), its output dtypes, and the values it is the last to
read (released after it: liveness.py). Two loops run steps on a list-per-chip
environment: run_one_chip (a single chip, kept lean: decode runs it ~500 times per
token) and run_chip_by_chip (any mesh, each op on every chip, collectives over all).
The batched mesh loop, chips as leading dimensions, is mesh.run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from lowering.program import is_tensor_ref, resolve_scalar, tensor_name

from .liveness import releases
from .ops import quantize_like


class EmulatorError(RuntimeError):
    pass


@dataclass
class Bound:
    """A step's arguments split once into literals and the slots looked up per call."""
    args: tuple
    tensor_args: tuple
    scalar_args: tuple
    kwargs: dict
    tensor_kwargs: tuple
    scalar_kwargs: tuple


@dataclass
class Step:
    op: object
    impl: object
    collective: bool
    args: list  # ("t", name) | ("tl", [names]) | ("s", value-template) | ("v", literal)
    kwargs: dict
    out: list[str]
    out_dtypes: list[str]
    release: list[str] = field(default_factory=list)  # values last read here (liveness.py)

    @property
    def bound(self) -> Bound:
        if "_bound" not in self.__dict__:
            args, kw = self.args, self.kwargs
            self.__dict__["_bound"] = Bound(
                tuple(v if k == "v" else None for k, v in args),
                tuple((i, v) for i, (k, v) in enumerate(args) if k in ("t", "tl")),
                tuple((i, v) for i, (k, v) in enumerate(args) if k == "s"),
                {n: v for n, (k, v) in kw.items() if k == "v"},
                tuple((n, v) for n, (k, v) in kw.items() if k == "t"),
                tuple((n, v) for n, (k, v) in kw.items() if k == "s"))
        return self.__dict__["_bound"]


def step_arg(value, tensors):
    if isinstance(value, list) and value and all(is_tensor_ref(v) for v in value):  # e.g. concat's tensors
        return ("tl", [step_arg(v, tensors)[1] for v in value])
    if is_tensor_ref(value):
        name = tensor_name(value)
        if name not in tensors:
            raise EmulatorError(f"op reads unknown tensor '{name}'")
        return ("t", name)
    if isinstance(value, (str, list)) and "$" in json.dumps(value):
        return ("s", value)
    return ("v", value)


def attach_releases(steps: list["Step"], keep: set[str]) -> None:
    """Set each step's `release`: the values the steps produce that it is the last to
    read (or that nothing reads), except those in `keep` (state, the function's results)."""
    produced = {name for step in steps for name in step.out}
    reads = [{n for kind, v in [*step.args, *step.kwargs.values()] if kind in ("t", "tl")
              for n in (v if kind == "tl" else [v])} for step in steps]
    for step, names in zip(steps, releases(reads, [step.out for step in steps], keep)):
        step.release = [n for n in names if n in produced]


def run_one_chip(steps, env, scalars) -> None:
    """The single-chip loop, kept lean: decode runs it ~500 times per token. Literal
    arguments are bound once (_Step.bound); only tensors and host scalars are looked up."""
    for step in steps:
        bound = step.bound
        args = list(bound.args)
        for i, name in bound.tensor_args:
            args[i] = [env[n][0] for n in name] if isinstance(name, list) else env[name][0]
        for i, template in bound.scalar_args:
            args[i] = resolve_scalar(template, scalars)
        kwargs = bound.kwargs
        if bound.tensor_kwargs or bound.scalar_kwargs:
            kwargs = dict(kwargs)
            for key, name in bound.tensor_kwargs:
                kwargs[key] = env[name][0]
            for key, template in bound.scalar_kwargs:
                kwargs[key] = resolve_scalar(template, scalars)
        result = step.impl(*args, **kwargs)
        if len(step.out) == 1:
            env[step.out[0]] = [as_device(result, step.out_dtypes[0])]
        elif step.out:
            for name, dtype, r in zip(step.out, step.out_dtypes, result):
                env[name] = [as_device(r, dtype)]
        for name in step.release:
            del env[name]


def run_chip_by_chip(steps, env, scalars, chips: int) -> int:
    """Every op on every chip of a list-per-chip environment; collectives see all chips.
    Returns the number of collectives run."""
    collectives = 0

    def value(arg, chip):
        kind, v = arg
        if kind == "t":
            return env[v][chip]
        if kind == "tl":
            return [env[n][chip] for n in v]
        return resolve_scalar(v, scalars) if kind == "s" else v

    for step in steps:
        if step.collective:
            first, *rest = step.args
            results = step.impl(env[first[1]], *[value(a, 0) for a in rest],
                                **{k: value(a, 0) for k, a in step.kwargs.items()})
            per_chip = [(r,) for r in results]
            collectives += 1
        elif step.out and _replicated(step, env):
            # Every chip holds the same inputs: compute once, every chip holds the result.
            result = step.impl(*[value(a, 0) for a in step.args],
                               **{k: value(a, 0) for k, a in step.kwargs.items()})
            per_chip = [result if isinstance(result, (list, tuple)) else [result]] * chips
        else:
            per_chip = []
            for chip in range(chips):
                result = step.impl(*[value(a, chip) for a in step.args],
                                   **{k: value(a, chip) for k, a in step.kwargs.items()})
                per_chip.append(result if isinstance(result, (list, tuple)) else [result])
        for i, (name, dtype) in enumerate(zip(step.out, step.out_dtypes)):
            converted = {}  # one conversion per distinct result object
            for results_c in per_chip:
                r = results_c[i]
                if id(r) not in converted:
                    converted[id(r)] = as_device(r, dtype)
            env[name] = [converted[id(results_c[i])] for results_c in per_chip]
        for name in step.release:
            del env[name]
    return collectives


def _replicated(step, env) -> bool:
    """True when every tensor the (pure) op reads is the same object on every chip."""
    for kind, v in list(step.args) + list(step.kwargs.values()):
        for name in (v if kind == "tl" else [v] if kind == "t" else []):
            held = env[name]
            if any(t is not held[0] for t in held):
                return False
    return True


_PLAIN = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def as_device(value: torch.Tensor, dtype: str) -> torch.Tensor:
    """Round an op's result to its output dtype (block floats are held in bfloat16)."""
    plain = _PLAIN.get(dtype)
    if plain is not None:
        return value if value.dtype == plain else value.to(plain)
    return quantize_like(value, dtype)
