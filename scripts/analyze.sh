#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct on 70 packaged GSM8K problems,
# offline on CPU.  Writes runs/analyze/{metrics.jsonl,couplings.md,report.html,*.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$(bash scripts/python.sh)" -m attnrhythm.cli analyze --model smollm2-135m --data gsm8k --n 70 --out runs/analyze "$@"
