"""Per-operation breakdown of countdown-pairs evaluations: how many problems that need +, -, *
or / each model solves (docs/training/results.md, "what moves").

    python scripts/pairs_operations.py docs/training/evals/warm.json docs/training/evals/none-s*.json

A problem's operations are the ones that reach its target from its two numbers (some reach it
with two, e.g. 2 * 2 = 2 + 2); a model's score per problem is its share of correct samples
(0/1 for greedy pass@1).  Prints a Markdown table.
"""
from __future__ import annotations

import json
import os
import sys


def operations(numbers: list[int], target: int) -> str:
    a, b = sorted(numbers)
    ops = [op for op, ok in (("+", a + b == target), ("-", b - a == target), ("*", a * b == target),
                             ("/", b % a == 0 and b // a == target)) if ok]
    return "".join(ops) or "?"


def breakdown(path: str) -> dict[str, tuple[float, int]]:
    with open(path, encoding="utf-8") as f:
        problems = json.load(f)["problems"]
    out: dict[str, list[float]] = {}
    for p in problems:
        share = sum(s >= 1.0 for s in p["scores"]) / len(p["scores"])
        out.setdefault(operations(p["numbers"], p["target"]), []).append(share)
    return {op: (sum(v), len(v)) for op, v in out.items()}


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[2].strip())
        return 2
    tables = {os.path.splitext(p)[0]: breakdown(p) for p in paths}
    ops = sorted({op for t in tables.values() for op in t}, key=lambda o: (-max(t.get(o, (0, 0))[1] for t in tables.values()), o))
    print("| model | " + " | ".join(f"needs {op} ({next(t[op][1] for t in tables.values() if op in t)})" for op in ops) + " |")
    print("|---|" + "---|" * len(ops))
    for name, t in tables.items():
        print(f"| {name} | " + " | ".join(f"{t[op][0]:.1f}" if op in t else "" for op in ops) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
