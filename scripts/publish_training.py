"""Copy a training comparison into docs/ so that every number recomputes from files there.

    python scripts/publish_training.py runs/r1 docs/training/evals

For the start (`warm`) and every finished run folder of RUNS (one with config.yaml and eval.json): its config.yaml,
commit.txt, training log (metrics.jsonl: every optimizer step's loss, reward, grad_norm, ...; the
warm start's warm_start.json) and each evaluation (eval.json, eval_avg*.json, eval_final*.json) without the model's
completions (what `attnrhythm compare` reads: each problem and its scores).  Then

    attnrhythm compare --start docs/training/evals/warm docs/training/evals/none-s* ... \\
        --test-sets dev=eval.json dev-avg4=eval_avg4.json final=eval_final.json \\
        final-avg4=eval_final_avg4.json --out docs/training

gives back results.json and summary.json.  Evaluations are written atomically; DEST holds only
what this script copies, and a rerun replaces those files with the runs' current ones.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from attnrhythm import io

KEEP = ("config.yaml", "commit.txt", "metrics.jsonl", "warm_start.json")


def publish(runs: str, dest: str) -> list[str]:
    written = []
    for folder in sorted(glob.glob(os.path.join(runs, "*"))):
        name = os.path.basename(folder)
        if not os.path.isdir(folder) or not (name == "warm" or os.path.exists(os.path.join(folder, "config.yaml"))):
            continue
        if not os.path.exists(os.path.join(folder, "eval.json")):
            continue  # still training, or killed: train_experiment.sh writes eval.json after training ends
        out = os.path.join(dest, name)
        os.makedirs(out, exist_ok=True)
        for file in KEEP:
            if os.path.exists(os.path.join(folder, file)):
                shutil.copyfile(os.path.join(folder, file), os.path.join(out, file))
                written.append(os.path.join(out, file))
        for path in sorted(glob.glob(os.path.join(folder, "eval*.json"))):
            with open(path, encoding="utf-8") as f:
                evaluation = json.load(f)
            evaluation["problems"] = [{k: v for k, v in p.items() if k != "completions"}
                                      for p in evaluation["problems"]]
            target = os.path.join(out, os.path.basename(path))
            io.write_json(target, evaluation)
            written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/publish_training.py RUNS_DIR DEST_DIR")
    for path in publish(sys.argv[1], sys.argv[2]):
        print(path)
