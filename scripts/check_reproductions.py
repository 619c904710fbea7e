"""Recompute every published reproduction table from its per-problem files (issue 18).

    python scripts/check_reproductions.py                  # every docs/reproduction*/ folder
    python scripts/check_reproductions.py runs/repro       # any reproduce output folder
    python scripts/check_reproductions.py --no-sweep ...   # skip the peak-rule sweep (the slow part)

For each folder: every Table 2 lift as sum(observed) / sum(random) - 1 from ``per_problem.jsonl``
and every interval with the same bootstrap; Table 1 from ``per_problem_table1.jsonl``; the layer
ranges from ``per_problem_layer_ranges.jsonl``; the peak-rule sweep from ``metrics.jsonl.gz``;
each verdict against the rule of ``studies/verdicts.py``; no number counted twice; the disjoint
co-occurrence row and the head overlap present.  Exit 1 if anything differs.
"""
import argparse
import sys
from pathlib import Path

from attnrhythm.studies.published import check_folder

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", help="reproduction folders (default: docs/reproduction*/)")
    parser.add_argument("--no-sweep", action="store_true", help="do not redo the peak-rule sweep")
    args = parser.parse_args(argv)
    folders = [Path(f) for f in args.folders] or sorted(p for p in (ROOT / "docs").glob("reproduction*")
                                                         if (p / "reproduction.json").exists())
    failed = False
    for folder in folders:
        if not (folder / "reproduction.json").exists():
            print(f"{folder}: no reproduction.json (not a reproduce output folder)", file=sys.stderr)
            return 2
        errors, checked = check_folder(folder, sweep=not args.no_sweep)
        print(f"{folder}: {'FAILED' if errors else 'ok'} ({'; '.join(checked)})")
        for error in errors:
            print(f"  {error}")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
