"""Sampling on the device: the decode function that ends in one token id per user.

Built from the decode function that returns logits (kept beside it as "decode_logits",
for teacher forcing and accuracy runs): its ops, then ttnn's sampling tail as the
reference runs it. ttnn.sampling takes at most a power-of-two number of candidates (and
at most 4096 of them; the vocabulary is neither), so a top-k of 32 comes first:

    logits [1, 1, B, V] -> ttnn.topk(k=32) -> values [1, 1, B, 32], indices
    indices -> ttnn.typecast(int32) -> ttnn.to_layout(ROW_MAJOR)
    ttnn.sampling(values, indices, k, p, temp) -> token ids [1, 1, 1, B] (uint32)

Per user, the host gives k (1 for greedy, else 32), p (top-p) and temp (1 / temperature;
1 for greedy): top-k, then temperature, softmax over the k candidates, then the smallest
prefix whose mass exceeds p, then a draw (runtime/sampling.py has the same rule on the host,
and the emulator's ttnn.sampling follows it). Greedy is the argmax.
"""
from __future__ import annotations

import copy

from .optable import check_op
from .program import Function, InputSpec, Op, TensorSpec

TOP_K = 32  # ttnn.sampling's candidates per user (its top-k limit)
_PROGRAM_DATA = (Function, Op, TensorSpec, InputSpec)
_IMMUTABLE = (str, int, float, bool, type(None))


def _clone(value):
    """A deep copy of program data, as copy.deepcopy makes it (without its memo: a 70B
    decode function's 76,000 objects took it 0.1 s). Values of other types go to deepcopy."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is list:
        return [_clone(v) for v in value]
    if kind is dict:
        return {k: _clone(v) for k, v in value.items()}
    if kind is tuple:
        return tuple(_clone(v) for v in value)
    if kind in _PROGRAM_DATA:
        out = object.__new__(kind)
        out.__dict__.update({k: _clone(v) for k, v in value.__dict__.items()})
        return out
    return copy.deepcopy(value)


def with_device_sampling(fn: Function, users: int) -> Function:
    """The decode function `fn` (returning logits) extended to return sampled token ids."""
    out = _clone(fn)
    out.name = "decode"
    (logits,) = fn.outputs
    batch = out.tensors[logits].shape[2]
    inputs = {}
    for name, dtype in (("sample_k", "uint32"), ("sample_p", "bfloat16"), ("sample_temp", "bfloat16")):
        out.inputs.append(InputSpec(name, name, [users], dtype))
        inputs[name] = TensorSpec([users], dtype, "ROW_MAJOR", "DRAM", "input")
    # tensor order as lowering/stamp.canonical_names keeps it: tensors no op writes, then outputs in op order
    out.tensors = {**inputs, **out.tensors,
                   "sample_values": TensorSpec([1, 1, batch, TOP_K], "bfloat16"),
                   "sample_indices": TensorSpec([1, 1, batch, TOP_K], "uint32"),
                   "sample_indices_i32": TensorSpec([1, 1, batch, TOP_K], "int32"),
                   "sample_indices_rm": TensorSpec([1, 1, batch, TOP_K], "int32", "ROW_MAJOR"),
                   "sampled_tokens": TensorSpec([1, 1, 1, batch], "uint32", "ROW_MAJOR")}
    out.ops += [
        Op("ttnn.topk", ["%" + logits, TOP_K], {"dim": -1, "largest": True, "sorted": True},
           ["sample_values", "sample_indices"], "sample"),
        Op("ttnn.typecast", ["%sample_indices", "int32"], {}, ["sample_indices_i32"], "sample"),
        Op("ttnn.to_layout", ["%sample_indices_i32", "ROW_MAJOR"], {}, ["sample_indices_rm"], "sample"),
        Op("ttnn.sampling", ["%sample_values", "%sample_indices_rm"],
           {"k": "%sample_k", "p": "%sample_p", "temp": "%sample_temp"}, ["sampled_tokens"], "sample"),
    ]
    for op in out.ops[-4:]:
        check_op(op.op, op.args, op.kwargs)
    out.outputs = ["sampled_tokens"]
    return out
