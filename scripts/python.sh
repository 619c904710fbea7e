#!/usr/bin/env bash
# The interpreter setup.sh installed into: $PYTHON if set, else the project's .venv.
if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; else echo "$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"; fi
