"""The training tables of the README and docs/training/results.md, read from a compare summary.

    python scripts/training_tables.py table3 docs/training/summary.json
    python scripts/training_tables.py readme docs/training/summary.json

``table3``: our credits beside the paper's Table 3, one row per credit in the paper's order: the
paper's Countdown accuracy (docs/method.md, section 6), how many seeds ran, our mean end score on
the greedy (`dev`) and avg@4 (`dev-avg4`) sets (`pass1_end`), and the mean same-seed difference
from `none` on each (`versus.mean`).  ``readme``: plain GRPO's gain over the start on both sets,
then each credit against `none` with the same seeds (interval and verdict as `attnrhythm compare`
gives them).  tests/test_training_scripts.py checks that the pages hold these tables.
"""
from __future__ import annotations

import json
import sys

from attnrhythm.core.credit import CREDIT_NAMES
from attnrhythm.train.compare import judged, points

PAPER = [("none", "GRPO (`none`)", 52.6), ("random", "+ random credit", 55.0),
         ("entropy", "+ high-entropy credit (`entropy`)", 57.7), ("local", "+ local-chunk credit", 59.9),
         ("global", "+ global-anchor credit", 60.4), ("coupled", "+ coupled rhythm credit", 63.1)]
SETS = ("dev", "dev-avg4")
FAMILIES = (("dev", "dev set"), ("final", "final set, scored once"))
"""Test sets by family: greedy pass@1 on FAMILY, avg@4 on FAMILY-avg4 (each summary names its score)."""


def readme(summary: list[dict]) -> str:
    """Plain GRPO's gain over the start on every set, then every credit minus `none` with the same
    seeds (a line per credit and set family that scored it)."""
    rows = {(row["credit"], row["test_set"]): row for row in summary}
    n = len(rows[("none", "dev")]["seeds"])
    lines = [f"| score | warm start | after GRPO (mean of {n} seeds) | gain (95% CI, seeds x problems) "
             "| seeds above start |", "|---|---|---|---|---|"]
    for family, label in FAMILIES:
        for test_set in (f"{family}-avg4", family):
            if ("none", test_set) in rows:
                r = rows[("none", test_set)]
                lines.append(f"| {r['score']}, {label} ({r['n_test']} problems) | {100 * r['pass1_start']:.1f}% "
                             f"| {100 * r['pass1_end']:.1f}% | {judged(r['gain'], len(r['seeds']))} "
                             f"| {r['seeds_above_start']} of {len(r['seeds'])} |")
    lines += ["", "| credit minus `none`, same seed | seeds | avg@4 (95% CI, seeds x problems) | seeds better / worse "
              "| greedy pass@1 (95% CI) | seeds better / worse |", "|---|---|---|---|---|---|"]
    for family, label in FAMILIES:
        for credit in CREDIT_NAMES[1:]:  # every credit but `none`, in registry order
            if (credit, family) not in rows:
                continue
            cells = []
            for test_set in (f"{family}-avg4", family):
                v = rows.get((credit, test_set), {}).get("versus")
                cells += [judged(v, len(v["seeds"])), f"{v['seeds_better']} / {v['seeds_worse']}"] if v else ["", ""]
            name = credit if family == "dev" else f"{credit}, {label}"
            lines.append(f"| {name} | {len(rows[(credit, family)]['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(summary: list[dict]) -> str:
    lines = ["| credit | paper | seeds run | ours, greedy | ours, avg@4 | minus `none`, same seed (greedy; avg@4) |",
             "|---|---|---|---|---|---|"]
    for credit, label, paper in PAPER:
        rows = {row["test_set"]: row for row in summary if row["credit"] == credit}
        if not rows:
            lines.append(f"| {label} | {paper} | 0 | | | |")
            continue
        ends = [f"{100 * rows[s]['pass1_end']:.1f}%" if s in rows else "" for s in SETS]
        versus = "; ".join(points(rows[s]["versus"]["mean"]) for s in SETS if "versus" in rows.get(s, {}))
        seeds = len(next(iter(rows.values()))["seeds"])
        lines.append(f"| {label} | {paper} | {seeds} | {ends[0]} | {ends[1]} | {versus} |")
    return "\n".join(lines)


TABLES = {"table3": table, "readme": readme}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in TABLES:
        sys.exit("usage: python scripts/training_tables.py {table3,readme} SUMMARY_JSON")
    with open(sys.argv[2], encoding="utf-8") as f:
        print(TABLES[sys.argv[1]](json.load(f)))
