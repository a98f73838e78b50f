"""The ttnn backend: programs replayed through real ttnn (a card, or ttnn's mock cluster).

TTNN_OPS maps every lowering.optable op name to the function that issues it.
Importing this package does not import ttnn (nor torch); creating a TtnnBackend does.
"""
from .backend import TtnnBackend, TtnnBackendError, TtnnOpError, TtnnUnsupportedProgram
from .mock import TtnnNotInstalled
from . import sampling_ops, vision_ops  # noqa: F401  (register their ops in TTNN_OPS)
from .ops import TTNN_OPS

__all__ = ["TTNN_OPS", "TtnnBackend", "TtnnBackendError", "TtnnNotInstalled", "TtnnOpError",
           "TtnnUnsupportedProgram"]
