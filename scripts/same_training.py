"""Do two training logs record the same training?  The check behind "a refactor changed no training result".

    python scripts/same_training.py docs/training/evals/none-s0/metrics.jsonl \\
        docs/training/refactor_check/48e5e51/metrics.jsonl

Each file is a run's metrics.jsonl (one JSON object per optimizer step).  Over the steps both logs
have, every logged number (loss, grad_norm, reward, accuracy, entropy, lengths, ...) must be equal,
to every digit; only wall-clock fields differ between machines and loads, so they are left out.
Prints one line per step and exits 1 at the first difference.
"""
from __future__ import annotations

import json
import sys

TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def read(path: str) -> dict[int, dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["step"]: {k: v for k, v in row.items() if k not in TIMING} for row in rows if "step" in row}


def differences(a: dict[int, dict], b: dict[int, dict]) -> list[str]:
    """Each (step, key) whose value differs, over the steps both logs have."""
    found = []
    for step in sorted(set(a) & set(b)):
        for key in sorted(set(a[step]) | set(b[step])):
            if a[step].get(key) != b[step].get(key):
                found.append(f"step {step} {key}: {a[step].get(key)!r} != {b[step].get(key)!r}")
    return found


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/same_training.py A/metrics.jsonl B/metrics.jsonl")
    first, second = read(sys.argv[1]), read(sys.argv[2])
    common = sorted(set(first) & set(second))
    if not common:
        sys.exit(f"no step in common: {sys.argv[1]} has {sorted(first)}, {sys.argv[2]} has {sorted(second)}")
    found = differences(first, second)
    for line in found:
        print(line)
    print(f"{len(common)} common steps, {len(found)} differences "
          f"({len(first[common[0]])} logged values a step, timing left out)")
    sys.exit(1 if found else 0)
