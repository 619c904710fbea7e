#!/usr/bin/env bash
# The small real experiment: Countdown (easy: 3 numbers <= 20) with SmolLM2-135M on CPU.
#
#   1. one supervised warm start on solver-written solutions (train split), saved as OUT/warm;
#   2. GRPO from OUT/warm with credit none, coupled and random: same seed, data and steps;
#   3. greedy pass@1 on the test split: zero-shot, warm start, and each trained model;
#   4. curves of reward and accuracy (attnrhythm plot) and a table of the evaluations.
#
# Sized for about an hour on 2 CPU cores (see the estimate printed at the start).  Every size is
# an environment variable:
#
#   OUT=runs/countdown  RL_STEPS=28 (optimizer steps)  PROMPTS=4  GENERATIONS=8  BATCH=8
#   MAX_LEN=128  LR=1e-5  SFT_STEPS=30  SFT_LR=1e-4  SFT_BATCH=8  EVAL_N=128  EVAL_SAMPLES=1
#   CREDITS="none coupled random"  SEED=0  THREADS=2  TASK=countdown-easy  MODEL=smollm2-135m
#
# One rollout batch = PROMPTS x GENERATIONS completions = (PROMPTS*GENERATIONS/BATCH) optimizer
# steps; RL_STEPS must be a multiple of that.  Finished phases are skipped on a rerun (delete
# their folder to redo one); the RL runs write no checkpoints (1.6 GB each with AdamW state).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/countdown}
TASK=${TASK:-countdown-easy}
MODEL=${MODEL:-smollm2-135m}
SEED=${SEED:-0}
THREADS=${THREADS:-2}
SFT_STEPS=${SFT_STEPS:-30}
SFT_LR=${SFT_LR:-1e-4}
SFT_BATCH=${SFT_BATCH:-8}
RL_STEPS=${RL_STEPS:-28}
PROMPTS=${PROMPTS:-4}
GENERATIONS=${GENERATIONS:-8}
BATCH=${BATCH:-8}
MAX_LEN=${MAX_LEN:-128}
LR=${LR:-1e-5}
EVAL_N=${EVAL_N:-128}
EVAL_SAMPLES=${EVAL_SAMPLES:-1}
CREDITS=${CREDITS:-"none coupled random"}

export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PER_ROLLOUT=$(( PROMPTS * GENERATIONS / BATCH ))
if (( PROMPTS * GENERATIONS % BATCH != 0 || RL_STEPS % PER_ROLLOUT != 0 )); then
  echo "PROMPTS*GENERATIONS must be a multiple of BATCH, and RL_STEPS a multiple of $PER_ROLLOUT" >&2
  exit 2
fi
mkdir -p "$OUT"
stamp() { date +%H:%M:%S; }
echo "[$(stamp)] $TASK, $MODEL: warm start $SFT_STEPS x $SFT_BATCH; RL $RL_STEPS steps = $(( RL_STEPS / PER_ROLLOUT )) rollout" \
     "batches of $PROMPTS x $GENERATIONS; credits: $CREDITS; eval $EVAL_N test problems"
# measured on the shared 2-core box (load ~2.5): warm start ~8-24 s per step of 8; one rollout batch
# of 32 completions ~110 s (generation ~80 s, 4 optimizer steps ~8 s each, attention pass ~7 s);
# greedy eval ~0.8 s per problem once the model stops at ~50 tokens (zero-shot runs to MAX_LEN: ~2x)
echo "  rough time: warm start ~$(( SFT_STEPS * 15 / 60 + 1 )) min," \
     "RL ~$(( RL_STEPS / PER_ROLLOUT * PROMPTS * GENERATIONS * 110 / 32 / 60 + 1 )) min per credit," \
     "eval ~$(( EVAL_N * 5 / 4 / 60 + 1 )) min per model"

# ---------------------------------------------------------------- 1. warm start (once, shared)
if [[ ! -f $OUT/warm/config.json ]]; then
  echo "[$(stamp)] warm start -> $OUT/warm"
  attnrhythm sft --model "$MODEL" --task "$TASK" --steps "$SFT_STEPS" --lr "$SFT_LR" \
    --batch-size "$SFT_BATCH" --n 2000 --seed 1234 --out "$OUT/warm"
fi

# ---------------------------------------------------------------- 2. GRPO, one run per credit
cat > "$OUT/rl.yaml" <<EOF
# shared by every credit: only --credit and --out differ between the runs (the learning rate is
# a flag: PyYAML reads "1e-5" as a string)
task: $TASK
model: $OUT/warm
seed: $SEED
device: cpu
num_generations: $GENERATIONS
per_device_batch: $BATCH
steps_per_generation: $PER_ROLLOUT
max_completion_length: $MAX_LEN
max_steps: $RL_STEPS
gradient_checkpointing: false   # 135M fits easily; recomputation would only cost CPU time
logging_steps: 1
save_steps: 0                   # no checkpoints: each would hold 1.6 GB of AdamW state
EOF
for credit in $CREDITS; do
  if [[ -f $OUT/$credit/config.json ]]; then continue; fi  # the final model is saved last
  rm -rf "${OUT:?}/$credit"
  echo "[$(stamp)] GRPO credit=$credit -> $OUT/$credit"
  attnrhythm train --config "$OUT/rl.yaml" --learning-rate "$LR" --credit "$credit" --out "$OUT/$credit"
  rm -rf "${OUT:?}/$credit"/checkpoint-*  # the final step's checkpoint (1.6 GB): the model is in the folder
done

# ---------------------------------------------------------------- 3. evaluation (test split)
evaluate() {  # evaluate MODEL FOLDER STEP
  if [[ -f $2/eval.json ]]; then return; fi
  echo "[$(stamp)] eval $1 -> $2/eval.json"
  mkdir -p "$2"
  attnrhythm eval --model "$1" --task "$TASK" --n "$EVAL_N" --samples "$EVAL_SAMPLES" \
    --max-new-tokens "$MAX_LEN" --seed 0 --step "$3" --out "$2/eval.json"
}
evaluate "$MODEL" "$OUT/zero-shot" 0
evaluate "$OUT/warm" "$OUT/warm" 0
for credit in $CREDITS; do evaluate "$OUT/$credit" "$OUT/$credit" "$RL_STEPS"; done

# ---------------------------------------------------------------- 4. curves and table
runs=()
for credit in $CREDITS; do runs+=("$OUT/$credit"); done
attnrhythm plot "${runs[@]}" "$OUT/zero-shot" "$OUT/warm" --metric reward accuracy \
  --out "$OUT/curves.png" --title "$TASK, SmolLM2-135M, warm start + GRPO ($RL_STEPS steps)"
python - "$OUT" zero-shot warm $CREDITS <<'EOF' | tee "$OUT/results.md"
import json, sys
from attnrhythm.train.evaluate import format_table
out, names = sys.argv[1], sys.argv[2:]
results = []
for name in names:
    with open(f"{out}/{name}/eval.json") as f:
        results.append({**json.load(f), "model": name})
print(format_table(results))
EOF
echo "[$(stamp)] done: $OUT/curves.png, $OUT/results.md"
