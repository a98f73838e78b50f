"""The emulator's small C kernels: compiled with the system's C compiler at first use and
loaded with ctypes.

Each kernel is a C file beside this module. It is built into ~/.cache/ttcompile/kernels/,
keyed by its source, the flags and the CPU (-march=native), into a temporary file renamed
into place (concurrent processes may build at once; the rename is atomic and the results
are the same file). Without a compiler, or inside torch_only(), `library()` is None and
the callers take their torch paths.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

# No contraction of a * b + c into one rounding: the kernels round as the torch maths they stand for.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]
HERE = Path(__file__).parent

_loaded: dict[str, ctypes.CDLL | None] = {}
_why: dict[str, str] = {}
_enabled = [True]


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "|".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def library_path(name: str) -> Path:
    source = HERE / f"{name}.c"
    key = hashlib.sha256("\n".join([source.read_text(), " ".join(FLAGS), platform.machine(), _cpu_key()])
                          .encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "ttcompile" / "kernels" / f"{name}-{key}.so"


def _build(source: Path, path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(source)], capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library(name: str, signatures: dict[str, list]) -> ctypes.CDLL | None:
    """The kernel `name` (HERE/name.c) with its functions' argument types set, or None (no
    compiler, a failed build, or torch_only()). Built and loaded once per process."""
    if not _enabled[0]:
        return None
    if name not in _loaded:
        path = library_path(name)
        try:
            if not path.exists():
                _build(HERE / f"{name}.c", path)
            lib = ctypes.CDLL(str(path))
            for function, signature in signatures.items():  # [argtypes] (void) or (argtypes, restype)
                argtypes, restype = signature if isinstance(signature, tuple) else (signature, None)
                getattr(lib, function).restype = restype
                getattr(lib, function).argtypes = argtypes
        except OSError as exc:
            _why[name] = str(exc)
            lib = None
        _loaded[name] = lib
    return _loaded[name]


def why(name: str) -> str:
    """Why kernel `name` is not in use ('' when it is, or was never asked for)."""
    return _why.get(name, "" if _enabled[0] else "disabled (torch_only)")


@contextlib.contextmanager
def torch_only():
    """Run without the C kernels (to compare their results with torch's paths)."""
    before = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = before
