"""Our credits beside the paper's Table 3 (docs/training/results.md), read from a compare summary.

    python scripts/table3.py docs/training/summary.json

One row per credit, in the paper's order: the paper's Countdown accuracy (docs/method.md, section
6), how many seeds ran, our mean end score on the greedy (`dev`) and avg@4 (`dev-avg4`) sets
(`pass1_end`), and the mean same-seed difference from `none` on each (`versus.mean`).  Prints a
markdown table; tests/test_training_scripts.py checks that the one in results.md is its output.
"""
from __future__ import annotations

import json
import sys

PAPER = [("none", "GRPO (`none`)", 52.6), ("random", "+ random credit", 55.0),
         ("entropy", "+ high-entropy credit (`entropy`)", 57.7), ("local", "+ local-chunk credit", 59.9),
         ("global", "+ global-anchor credit", 60.4), ("coupled", "+ coupled rhythm credit", 63.1)]
SETS = ("dev", "dev-avg4")


def table(summary: list[dict]) -> str:
    lines = ["| credit | paper | seeds run | ours, greedy | ours, avg@4 | minus `none`, same seed (greedy; avg@4) |",
             "|---|---|---|---|---|---|"]
    for credit, label, paper in PAPER:
        rows = {row["test_set"]: row for row in summary if row["credit"] == credit}
        if not rows:
            lines.append(f"| {label} | {paper} | 0 | | | |")
            continue
        ends = [f"{100 * rows[s]['pass1_end']:.1f}%" if s in rows else "" for s in SETS]
        versus = "; ".join(f"{100 * rows[s]['versus']['mean']:+.1f}" for s in SETS if "versus" in rows.get(s, {}))
        seeds = len(next(iter(rows.values()))["seeds"])
        lines.append(f"| {label} | {paper} | {seeds} | {ends[0]} | {ends[1]} | {versus} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/table3.py SUMMARY_JSON")
    with open(sys.argv[1], encoding="utf-8") as f:
        print(table(json.load(f)))
