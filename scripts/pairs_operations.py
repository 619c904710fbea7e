"""Per-operation breakdown of countdown-pairs evaluations: how many problems that need +, -, *
or / each model solves (docs/training/results.md, "what moves").

    python scripts/pairs_operations.py docs/training/evals/warm/eval.json docs/training/evals/*-s*/eval.json

A problem's operations are the ones that reach its target from its two numbers (some reach it
with two, e.g. 2 * 2 = 2 + 2); a model's score per problem is its share of correct samples
(0/1 for greedy pass@1).  Prints the Markdown table of results.md: the start, then each run
in credit order and seed order.
"""
from __future__ import annotations

import json
import os
import sys

from attnrhythm.core.credit import CREDIT_NAMES


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


def label(path: str) -> tuple[tuple, str]:
    """A row's sort key and name, from its run folder (evals/warm/eval.json -> "warm start",
    evals/coupled-s1/eval.json -> "coupled, seed 1"): the start, then the credits in registry order."""
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    credit, _, seed = run.rpartition("-s")
    if run == "warm":
        return (-1, 0), "warm start"
    if credit in CREDIT_NAMES and seed.isdigit():
        return (CREDIT_NAMES.index(credit), int(seed)), f"{credit}, seed {seed}"
    return (len(CREDIT_NAMES), 0), os.path.splitext(path)[0]


def table(paths: list[str]) -> str:
    tables = dict(sorted((label(p), breakdown(p)) for p in paths))
    ops = sorted({op for t in tables.values() for op in t}, key=lambda o: (-max(t.get(o, (0, 0))[1] for t in tables.values()), o))
    sizes = {op: next(t[op][1] for t in tables.values() if op in t) for op in ops}
    lines = ["| model | " + " | ".join(f"needs {' or '.join(op)} ({sizes[op]})" for op in ops) + " |",
             "|---|" + "---|" * len(ops)]
    for (_, name), t in tables.items():
        cells = [(f"{t[op][0]:g}" if t[op][0] == int(t[op][0]) else f"{t[op][0]:.1f}") if op in t else "0" for op in ops]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: " + __doc__.strip().splitlines()[2].strip())
    print(table(sys.argv[1:]))
