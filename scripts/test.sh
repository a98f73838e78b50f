#!/usr/bin/env bash
# The full test suite, from a fresh machine: both environments, the real model, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f scripts/setup_ttnn.sh ]; then bash scripts/setup_ttnn.sh; fi
bash scripts/fetch_model.sh
exec .venv/bin/python -m pytest "$@"
