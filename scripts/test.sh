#!/usr/bin/env bash
# The test command: installs what the tests need (into .venv, see setup.sh), then runs the whole
# suite offline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=$(bash scripts/python.sh)
# the suite starts `attnrhythm`, `torchrun` and `python -m ...` in subprocesses: the venv's first
export PATH="$(dirname "$PY"):$PATH"
exec "$PY" -m pytest -q "$@"
