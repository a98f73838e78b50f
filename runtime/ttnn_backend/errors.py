"""The ttnn backend's errors, and ttnn's own messages without their C++ backtraces."""
from __future__ import annotations

from lowering.program import Op


class TtnnBackendError(RuntimeError):
    pass


class TtnnOpError(TtnnBackendError):
    """ttnn rejected an op of the program: which one, where it came from, and why."""

    def __init__(self, function: str, index: int, op: Op, message: str, inputs: list[str]):
        self.function, self.index, self.op, self.ttnn_message = function, index, op, message
        self.node, self.layer = op.node, op.layer
        lines = [f"ttnn rejected op {index} of '{function}': {op.op}",
                 f"  graph node: {op.node or '?'}",
                 f"  layer: {op.layer if op.layer is not None else '- (outside the decoder layers)'}",
                 *(f"  input {s}" for s in inputs),
                 "  ttnn says:", *("    " + line for line in message.splitlines())]
        super().__init__("\n".join(lines))


def ttnn_message(error: BaseException) -> str:
    """ttnn's own message without the C++ backtrace."""
    text = str(error).split("backtrace:")[0]
    lines = [line.rstrip() for line in text.splitlines() if line.strip() and line.strip() != "info:"]
    return "\n".join(lines) or type(error).__name__
