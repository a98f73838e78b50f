"""Whose fault an error is.

- `CompileError` (a ValueError): the user's model, options or target. `ttcompile` prints
  one line and exits 2. Config and checkpoint errors from models_ref (ConfigError,
  WeightError) are ValueErrors too and are reported the same way.
- `InternalCompilerError`: a bug in ttcompile (a pass that crashed, a verifier violation,
  an op the lowering table lacks). It names the pass and the graph node, says it is a
  bug, and `ttcompile` exits 3.
"""
from __future__ import annotations

EXIT_USER = 2
EXIT_INTERNAL = 3


class CompileError(ValueError):
    """The model cannot be compiled for this target with these options."""


class InternalCompilerError(RuntimeError):
    """A bug in the compiler, not in the user's input."""

    def __init__(self, stage: str, mode: str | None, node: str | None, detail: str):
        self.stage, self.mode, self.node, self.detail = stage, mode, node, detail
        where = f"{stage}" + (f" ({mode})" if mode else "") + (f", node %{node}" if node else "")
        super().__init__(f"internal compiler error in {where}: {detail} "
                         "(this is a bug in ttcompile, not in your model; please report it)")


# What to install for a module the command could not import, by top-level package.
_INSTALL = {
    "torch": "PyTorch's CPU build (pip install torch --index-url https://download.pytorch.org/whl/cpu, "
             "or scripts/setup.sh in a checkout)",
    "transformers": "the compiler extras (pip install 'ttcompile[compiler]')",
    "gguf": "the compiler extras (pip install 'ttcompile[compiler]')",
    "ttnn": "ttnn 0.81.1 for Python 3.10 or 3.12 (scripts/setup_ttnn.sh makes .venv-ttnn)",
}


def missing_dependency(error: ModuleNotFoundError, command: str) -> str:
    """One line saying what to install when `command` cannot import a dependency."""
    package = (error.name or "").split(".")[0]
    how = _INSTALL.get(package, f"the package '{package}' (pip install {package})")
    line = f"{command} needs {package}, which this Python does not have: install {how}"
    if package == "torch" and command == "ttrun":
        line += "; or run with --backend ttnn where ttnn is installed"
    return line


def node_in_traceback(tb) -> str | None:
    """The innermost fx node a failing pass was working on: the nearest frame's local
    variable `node` (passes iterate `for node in gm.graph.nodes`)."""
    import torch.fx

    found = None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("node")
        if isinstance(candidate, torch.fx.Node):
            found = candidate.name
        tb = tb.tb_next
    return found
