#!/usr/bin/env bash
# The credit comparison, end to end, on the embedded model:
#
#   1. a supervised warm start on solver-written Countdown solutions (train split) -> OUT/warm
#   2. greedy pass@1 of the warm start on EVAL_N held-out test problems            -> OUT/warm/eval.json
#   3. GRPO from the warm start, one run per credit and seed (same data, seeds, steps)
#   4. greedy pass@1 of each trained model on the same test problems             -> OUT/RUN/eval.json
#   5. paired gains with 95% bootstrap intervals, curves                          -> OUT/results.{json,md}, OUT/*.png
#
# PRESET=cpu (default without a GPU) or gpu picks the sizes of `attnrhythm train` (see
# docs/training.md); every size below is an environment variable.  A killed comparison resumes
# where it stopped: finished runs (with eval.json) are skipped, an unfinished one starts again
# (with SAVE_STEPS, from its newest checkpoint).
#
#   OUT=runs/experiment  TASK=countdown-pairs (warm start and evaluation; countdown-easy is harder)
#   TRAIN_TASK=$TASK (GRPO; e.g. countdown-easy-dense)
#   MODEL=smollm2-135m  CREDITS="none random entropy local global coupled"
#   SEEDS="0"  STEPS=<preset>  SFT_STEPS=30  EVAL_N=256  EXTRA="" (more train flags)
#   EVAL_TOKENS=128, AVG_TOKENS=64 (new tokens of the greedy and the avg@k evaluation; 192 both
#   for countdown-worked*, whose worked solutions run up to 166 tokens, 128 both for
#   countdown-pairs-worked)
#   JOBS=1 (runs trained side by side; on a 2-core CPU, JOBS=2 with one thread each halves the wall
#   time)  THREADS=<cores / JOBS> (torch threads per run)
#   AVG_K=0: k > 0 also scores every model by avg@k on the dev set (k samples per problem at
#   temperature 1.0, <= AVG_TOKENS new tokens: the lower-variance score of docs/training/results.md)
#   -> RUN/eval_avg{k}.json, compared as the test set dev-avg{k}
#   SAVE_STEPS=0: N > 0 checkpoints every run every N optimizer steps, and a killed run resumes
#   from its newest checkpoint (bit for bit on CPU, docs/training.md) instead of starting again:
#   for runs longer than a session
#   FINAL=0: 1 = score the start and every finished run once more, on the task's final split
#   (countdown-pairs: a held-out set that no recipe decision has seen) -> RUN/eval_final.json
#   (and with AVG_K, RUN/eval_final_avg{k}.json), OUT/final/results.{json,md}; run it once, after
#   the runs of a comparison are fixed
#
# Each run folder records the commit of the training code that made it (RUN/commit.txt), so a
# comparison can show that all of its runs used the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then bash scripts/setup.sh; fi  # installs into .venv once (see setup.sh)
PY=$(bash scripts/python.sh)
export PATH="$(dirname "$PY"):$PATH"

OUT=${OUT:-runs/experiment}
TASK=${TASK:-countdown-pairs}
TRAIN_TASK=${TRAIN_TASK:-$TASK}
MODEL=${MODEL:-smollm2-135m}
CREDITS=${CREDITS:-"none random entropy local global coupled"}
SEEDS=${SEEDS:-0}
SFT_STEPS=${SFT_STEPS:-30}
EVAL_N=${EVAL_N:-256}
JOBS=${JOBS:-1}
THREADS=${THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
EXTRA=${EXTRA:-}
FINAL=${FINAL:-0}
AVG_K=${AVG_K:-0}
SAVE_STEPS=${SAVE_STEPS:-0}
FINAL_N=${FINAL_N:-285}
# countdown-worked's warm-start completions run 124-166 tokens (scripts/warm_start_lengths.py), and
# countdown-pairs-worked's 56-101: a shorter budget would cut the answer off and score it 0
case $TASK in
  countdown-worked*) TOKENS_DEFAULT=192 AVG_TOKENS_DEFAULT=192 ;;
  countdown-pairs-worked*) TOKENS_DEFAULT=128 AVG_TOKENS_DEFAULT=128 ;;
  *) TOKENS_DEFAULT=128 AVG_TOKENS_DEFAULT=64 ;;
esac
EVAL_TOKENS=${EVAL_TOKENS:-$TOKENS_DEFAULT}
AVG_TOKENS=${AVG_TOKENS:-$AVG_TOKENS_DEFAULT}
CODE_DIR=$("$PY" -c "import attnrhythm, os; print(os.path.dirname(os.path.dirname(attnrhythm.__file__)))")
COMMIT=$(git -C "$CODE_DIR" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ $COMMIT != unknown ]] && [[ -n $(git -C "$CODE_DIR" status --porcelain -- attnrhythm 2>/dev/null) ]]; then
  COMMIT="$COMMIT+dirty"
fi
if [[ -z ${PRESET:-} ]]; then
  PRESET=$("$PY" -c "import torch; print('gpu' if torch.cuda.is_available() else 'cpu')")
fi
STEPS_FLAG=${STEPS:+--max-steps $STEPS}

export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
stamp() { date +%H:%M:%S; }
echo "[$(stamp)] $TRAIN_TASK -> $TASK on $MODEL, preset $PRESET: credits {$CREDITS} x seeds {$SEEDS}, eval on $EVAL_N test problems"

if [[ ! -f $OUT/warm/config.json ]]; then
  echo "[$(stamp)] warm start ($SFT_STEPS steps) -> $OUT/warm"
  attnrhythm sft --model "$MODEL" --task "$TASK" --steps "$SFT_STEPS" --lr 1e-4 --batch-size 8 \
    --n 2000 --seed 1234 --out "$OUT/warm"
fi

evaluate() {  # evaluate MODEL_DIR [final]: the dev set (eval.json) or the final split (eval_final.json)
  local file=$1/eval.json split=test n=$EVAL_N
  if [[ ${2:-} == final ]]; then file=$1/eval_final.json split=final n=$FINAL_N; fi
  [[ -f $file ]] && return
  echo "[$(stamp)] eval $1 ($split)"
  attnrhythm eval --model "$1" --task "$TASK" --split "$split" --n "$n" --samples 1 --max-new-tokens "$EVAL_TOKENS" --seed 0 \
    --out "$file"  # written atomically: a killed eval leaves no eval file
}
evaluate "$OUT/warm"

evaluate_sampled() {  # evaluate_sampled MODEL_DIR [final]: avg@AVG_K on the dev set or the final split
  local file=$1/eval_avg$AVG_K.json split=test n=$EVAL_N
  if [[ ${2:-} == final ]]; then file=$1/eval_final_avg$AVG_K.json split=final n=$FINAL_N; fi
  (( AVG_K > 0 )) && [[ ! -f $file ]] || return 0
  echo "[$(stamp)] eval $1 (avg@$AVG_K, $split)"
  attnrhythm eval --model "$1" --task "$TASK" --split "$split" --n "$n" --samples "$AVG_K" --temperature 1.0 \
    --max-new-tokens "$AVG_TOKENS" --seed 0 --out "$file"
}
evaluate_sampled "$OUT/warm"
TEST_SETS="dev=eval.json"
(( AVG_K > 0 )) && TEST_SETS="$TEST_SETS dev-avg$AVG_K=eval_avg$AVG_K.json"

train_one() {  # train_one CREDIT SEED: train from the warm start, then evaluate; output to RUN.log
  local run=$OUT/$1-s$2 resume=
  if (( SAVE_STEPS > 0 )) && compgen -G "$run/checkpoint-*" > /dev/null; then
    resume=--resume  # train takes the newest complete checkpoint (an incomplete one: step 0)
  else
    rm -rf "${run:?}"  # an unfinished run of this script's own
    : > "$run.log"
  fi
  echo "[$(stamp)] train credit=$1 seed=$2 -> $run (log: $run.log, code $COMMIT${resume:+, resumed})"
  # shellcheck disable=SC2086
  attnrhythm train --preset "$PRESET" --model "$OUT/warm" --task "$TRAIN_TASK" --credit "$1" --seed "$2" \
    --save-steps "$SAVE_STEPS" $resume $STEPS_FLAG $EXTRA --out "$run" >> "$run.log" 2>&1 || { echo "[$(stamp)] FAILED: $run (see $run.log)"; return 1; }
  rm -rf "${run:?}"/checkpoint-*   # optimizer state is large; the final model is in the folder
  echo "$COMMIT" > "$run/commit.txt"
  evaluate "$run" >> "$run.log" 2>&1
  evaluate_sampled "$run" >> "$run.log" 2>&1
  echo "[$(stamp)] finished $run"
}

if [[ $FINAL == 1 ]]; then  # the final split, once, for the start and every finished run
  evaluate "$OUT/warm" final
  evaluate_sampled "$OUT/warm" final
  finals=()
  for seed in $SEEDS; do
    for credit in $CREDITS; do
      run=$OUT/$credit-s$seed
      [[ -f $run/eval.json ]] || continue
      evaluate "$run" final
      evaluate_sampled "$run" final
      finals+=("$run")
    done
  done
  FINAL_SETS="final=eval_final.json"
  (( AVG_K > 0 )) && FINAL_SETS="$FINAL_SETS final-avg$AVG_K=eval_final_avg$AVG_K.json"
  # shellcheck disable=SC2086
  attnrhythm compare --start "$OUT/warm" "${finals[@]}" --test-sets $TEST_SETS $FINAL_SETS \
    --out "$OUT/final"
  echo "[$(stamp)] done: $OUT/final/results.md (dev and final sets)"
  exit 0
fi

runs=()
failed=0
for seed in $SEEDS; do
  for credit in $CREDITS; do
    run=$OUT/$credit-s$seed
    runs+=("$run")
    if [[ -f $run/eval.json ]]; then evaluate_sampled "$run"; continue; fi  # finished (a new score, if asked)
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || failed=1; done
    train_one "$credit" "$seed" &
  done
done
while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done
# A job that ended while nothing was waiting (during a foreground eval, or just after another job)
# is no longer running, so the loops above may never read its status: its eval.json tells.
for run in "${runs[@]}"; do [[ -f $run/eval.json ]] || failed=1; done
if (( failed )); then echo "[$(stamp)] a run failed; rerun this command to retry it (finished runs are kept)"; exit 1; fi

echo "[$(stamp)] results"
DEVICE=$("$PY" -c "import os, platform, torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU {platform.machine()}, {os.cpu_count()} cores')")
# shellcheck disable=SC2086
attnrhythm compare --start "$OUT/warm" "${runs[@]}" --test-sets $TEST_SETS --out "$OUT" --device "$DEVICE" \
  --run-command "PRESET=$PRESET TRAIN_TASK=$TRAIN_TASK CREDITS='$CREDITS' SEEDS='$SEEDS' EVAL_N=$EVAL_N ${STEPS:+STEPS=$STEPS }bash scripts/train_experiment.sh"
attnrhythm plot "${runs[@]}" --metric reward accuracy rollout/groups_with_signal --out "$OUT/curves.png" \
  --title "$TASK, $MODEL warm start + GRPO"
attnrhythm plot --rhythm "${runs[@]}" --out "$OUT/rhythm_drift.png"
echo "[$(stamp)] done: $OUT/results.md, $OUT/curves.png"
