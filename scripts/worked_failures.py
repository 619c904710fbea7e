"""Why countdown-worked warm starts fail: each failed sample of an evaluation sorted into one kind
(docs/training.md, "Warm start"; issue 15, item 5).

    python scripts/worked_failures.py docs/training/worked/*/eval.json

A worked completion (``train.sft.worked_completion``) ends with ``Found: a op b = c, ... X equals
the target. </think> <answer> expr </answer>``.  A failed sample is, by the first that applies:
- ``no answer``: no ``<answer>`` block (score 0);
- ``wrong numbers``: the answer is not a valid expression over exactly the given numbers;
- ``false step``: a step ``a op b = c`` after "Found:" is false (checked in exact Fractions);
- ``false claim``: every step is true but "X equals the target" names an X that is not the target;
- ``other``: the rest (e.g. true steps that are not the answer's expression).
A false step is an arithmetic slip; a false claim is a wrong verdict.  The model's text is only matched by a linear regular
expression over its first 4,000 characters: nothing is evaluated but the answer, by safe_eval.
"""
from __future__ import annotations

import json
import re
import sys
from fractions import Fraction

from attnrhythm.tasks.countdown import last_answer
from attnrhythm.tasks.safe_eval import InvalidExpression, evaluate, numbers_in

KINDS = ("no answer", "wrong numbers", "false step", "false claim", "other")
_NUMBER = r"-?\d+(?:/\d+)?"
_STEP = re.compile(rf"({_NUMBER}) ([-+*/]) ({_NUMBER}) = ({_NUMBER})")
_CLAIM = re.compile(rf"({_NUMBER}) equals the target")
_MAX_CHARS = 4000
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / b if b else None}


def failure_kind(completion: str, numbers: list[int], target: int) -> str:
    """The kind (one of KINDS) of a completion that did not reach ``target``."""
    text = completion[:_MAX_CHARS]
    answer = last_answer(text)
    if answer is None:
        return "no answer"
    try:
        if sorted(numbers_in(answer)) != sorted(numbers):
            return "wrong numbers"
        evaluate(answer)
    except InvalidExpression:
        return "wrong numbers"
    found = text.rpartition("Found:")[2] if "Found:" in text else ""
    for a, op, b, c in _STEP.findall(found):
        if _APPLY[op](Fraction(a), Fraction(b)) != Fraction(c):
            return "false step"
    claim = _CLAIM.search(found)
    if claim and Fraction(claim.group(1)) != target:
        return "false claim"
    return "other"


def failures(path: str) -> tuple[int, int, dict[str, int]]:
    """(samples, solved, failed samples per kind) of one evaluation file."""
    with open(path, encoding="utf-8") as f:
        problems = json.load(f)["problems"]
    counts = dict.fromkeys(KINDS, 0)
    samples = solved = 0
    for p in problems:
        for score, completion in zip(p["scores"], p["completions"]):
            samples += 1
            if score >= 1.0:
                solved += 1
            else:
                counts[failure_kind(completion, p["numbers"], p["target"])] += 1
    return samples, solved, counts


def table(paths: list[str]) -> str:
    lines = ["| evaluation | samples | solved | " + " | ".join(KINDS) + " |", "|---|---|---|" + "---|" * len(KINDS)]
    for path in paths:
        samples, solved, counts = failures(path)
        lines.append(f"| {path} | {samples} | {solved} | " + " | ".join(str(counts[k]) for k in KINDS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.stderr.write("usage: " + __doc__.strip().splitlines()[3].strip() + "\n")
        sys.exit(2)
    sys.stdout.write(table(sys.argv[1:]) + "\n")
