#!/usr/bin/env bash
# Create .venv (Python 3.11, CPU torch, the compiler, the emulator, the server, the test tools).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch: the CPU build. On this project's CI machines `torch==2.13.0` resolves to a CPU
# wheel on local disk; elsewhere set TORCH_SPEC and, for a CPU-only machine, PIP_INDEX_URL
# to PyTorch's CPU wheel index (see README).
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

find_python() {
  for candidate in "${PYTHON:-}" python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python3.11" python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "setup: no Python >= 3.10 found (set PYTHON=...)" >&2; exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
if ! .venv/bin/python -c 'import compiler, transformers, gguf, pytest, xdist, fastapi, uvicorn, prometheus_client, openai' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.ttcompile-installed ]; then
  .venv/bin/python -m pip install -q -e ".[compiler,test,serve]"
  touch .venv/.ttcompile-installed
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
