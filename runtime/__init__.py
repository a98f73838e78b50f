"""Run compiled programs: `runtime.load(OUT)`, `runtime.run(prompts, program=OUT)`.

Importing this package does not import torch; the emulator backend imports it when used.
"""
from __future__ import annotations

from .session import Session, Stats, load

__all__ = ["Session", "Stats", "load", "run"]


def run(prompts, program, backend: str = "emulator", **generate_keywords):
    """Load the artifact at `program` and generate for `prompts` (see Session.generate)."""
    return load(program, backend=backend).generate(prompts, **generate_keywords)
