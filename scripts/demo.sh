#!/usr/bin/env bash
# The main job on the embedded default: set up, fetch SmolLM2, compile for N150, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/fetch_model.sh
.venv/bin/ttcompile models/SmolLM2-135M-Instruct --target N150 -o build/SmolLM2-135M-Instruct-N150
.venv/bin/ttrun prompt --program build/SmolLM2-135M-Instruct-N150 "${@:-What is the capital of France? Answer in one sentence.}"
