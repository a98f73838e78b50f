"""Print a program function as readable ttnn calls, for people (`ttcompile --emit python`).
The runtime never executes this text."""
from __future__ import annotations

from .program import Function, Program, is_tensor_ref, tensor_name


def _py(value) -> str:
    if is_tensor_ref(value):
        name = tensor_name(value)
        return name if name.isidentifier() else f"weights[{name!r}]"
    if isinstance(value, str) and value.startswith("$"):
        return value[1:].replace("+", " + ")
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, str) and value in ("bfloat16", "bfloat8_b", "bfloat4_b", "float32", "uint32", "int32"):
        return f"ttnn.{value}"
    if isinstance(value, str) and value in ("TILE", "ROW_MAJOR"):
        return f"ttnn.{value}_LAYOUT"
    if isinstance(value, dict):
        inner = ", ".join(f"{k}={_py(v)}" for k, v in value.items())
        return f"ttnn.WormholeComputeKernelConfig({inner})" if "math_fidelity" in value else f"dict({inner})"
    return repr(value)


def emit_function(fn: Function) -> str:
    params = ["weights"] + [i.name for i in fn.inputs] + fn.scalars
    lines = [f"def {fn.name}({', '.join(params)}):"]
    layer = object()
    for op in fn.ops:
        if op.layer != layer:
            layer = op.layer
            lines.append(f"    # layer {layer}" if layer is not None else "    # embedding / head")
        args = [_py(a) for a in op.args] + [f"{k}={_py(v)}" for k, v in op.kwargs.items()]
        call = f"{op.op}({', '.join(args)})"
        lhs = ", ".join(op.out)
        lines.append(f"    {lhs} = {call}" if lhs else f"    {call}")
    lines.append(f"    return {', '.join(fn.outputs)}")
    return "\n".join(lines) + "\n"


def emit_program(program: Program) -> str:
    header = [f"# {program.model['name']} for {program.target} (mesh {program.mesh_shape}), "
              f"{program.options['optimizations']}", "import ttnn", ""]
    return "\n".join(header) + "\n\n".join(emit_function(f) for f in program.functions.values())
