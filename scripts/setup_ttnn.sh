#!/usr/bin/env bash
# Create .venv-ttnn: Python 3.12, ttnn (pinned), numpy and the project's torch-free runtime,
# for the ttnn backend (runtime.load(OUT, backend="ttnn")). No torch is ever installed here.
# Without a Tenstorrent card the backend uses ttnn's mock clusters, whose kernel-compiler
# stand-in needs Debian's binutils-riscv64-unknown-elf: installed with apt-get when missing.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

TTNN_VERSION="0.81.1"
VENV=.venv-ttnn
MARKER="$VENV/.ttcompile-ttnn-installed"

find_python312() {
  for candidate in "${PYTHON312:-}" /root/.pyenv/versions/3.12.1/bin/python3.12 \
                   "$(command -v pyenv >/dev/null 2>&1 && pyenv prefix 3.12 2>/dev/null)/bin/python3.12" \
                   "$HOME/.pyenv/versions/3.12.1/bin/python3.12" python3.12; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 \
       && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "setup_ttnn: no Python 3.12 found (ttnn $TTNN_VERSION has wheels for 3.10 and 3.12 only); set PYTHON312=..." >&2
  exit 1
}

pip_install() {  # quiet, without the warnings of find-links folders that do not exist
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

installed() {
  [ -f "$MARKER" ] && [ ! pyproject.toml -nt "$MARKER" ] && "$VENV/bin/python" - "$TTNN_VERSION" <<'EOF' 2>/dev/null
import importlib.metadata as m, importlib.util as u, sys
assert m.version("ttnn") == sys.argv[1]
for name in ("numpy", "ml_dtypes", "safetensors", "tokenizers", "jinja2", "tiktoken", "PIL", "runtime.ttnn_backend"):
    assert u.find_spec(name), name
assert u.find_spec("torch") is None, "torch must not be in .venv-ttnn"
EOF
}

# --- the RISC-V binutils the mock's kernel-compiler stand-in links its stub ELF with
if ! command -v riscv64-unknown-elf-ld >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=none; fi
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq binutils-riscv64-unknown-elf >/dev/null
  else
    echo "setup_ttnn: warning: riscv64-unknown-elf-ld missing and apt-get unavailable; the ttnn mock" \
         "needs binutils-riscv64-unknown-elf (real Tenstorrent hardware does not)" >&2
  fi
fi

# --- the environment
if ! installed; then
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    rm -rf "$VENV"
    "$(find_python312)" -m venv "$VENV"
  fi
  pip_install "ttnn==$TTNN_VERSION" numpy ml_dtypes safetensors tokenizers jinja2 tiktoken pillow
  # The project itself without its dependencies: nothing here may pull torch.
  pip_install --no-deps -e .
  "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("torch") is not None)' \
    || { echo "setup_ttnn: torch found in $VENV; it must stay torch-free" >&2; exit 1; }
  touch "$MARKER"
fi

# --- the mock runtime (SFPI stand-in), prepared once per ttnn install
if command -v riscv64-unknown-elf-ld >/dev/null 2>&1; then
  "$VENV/bin/python" -c 'from runtime.ttnn_backend import mock; mock.prepare()'
fi
echo "setup_ttnn: $VENV ready (ttnn $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("ttnn"))'), $("$VENV/bin/python" --version))"
