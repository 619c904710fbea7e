#!/usr/bin/env bash
# Copies what `attnrhythm reproduce` wrote into docs/: REPRODUCTION.md becomes docs/REPRODUCTION.md
# (or docs/REPRODUCTION-NAME.md) with its figure links pointing at docs/reproduction[-NAME]/, where
# the run's tables and per-problem files go (per_problem*.jsonl, and metrics.jsonl.gz, every
# response's series, when it is under MAX_SERIES_MB, default 8), so that every table recomputes from
# docs/ alone (scripts/check_reproductions.py). The uncompressed metrics.jsonl is left out.
# A hand-written block between "<!-- findings -->" and "<!-- /findings -->" in the doc being
# replaced is kept (placed above the verdicts) and a warning says to check its numbers against the
# new run. DOCS=... writes into another folder than the project's docs/.
#
#   bash scripts/publish_reproduction.sh RUN_FOLDER [NAME]
#   bash scripts/publish_reproduction.sh runs/repro-gemma3-270m gemma3-270m
set -euo pipefail
run=${1:?usage: publish_reproduction.sh RUN_FOLDER [NAME]}
name=${2:-}
docs=${DOCS:-$(cd "$(dirname "$0")/.." && pwd)/docs}
max_mb=${MAX_SERIES_MB:-8}
[ -f "$run/REPRODUCTION.md" ] || { echo "error: $run/REPRODUCTION.md is missing: run attnrhythm reproduce --out $run first" >&2; exit 2; }
folder=reproduction${name:+-$name}
doc=$docs/REPRODUCTION${name:+-$name}.md
mkdir -p "$docs/$folder/figures"
for f in couplings.json couplings.md layer_ranges.json perturbation.html perturbation.json reproduction.json run.json \
         per_problem.jsonl per_problem_table1.jsonl per_problem_layer_ranges.jsonl; do
    [ -f "$run/$f" ] && cp "$run/$f" "$docs/$folder/$f"
done
if [ -f "$run/metrics.jsonl.gz" ]; then
    if [ "$(stat -c %s "$run/metrics.jsonl.gz")" -le $((max_mb * 1024 * 1024)) ]; then
        cp "$run/metrics.jsonl.gz" "$docs/$folder/metrics.jsonl.gz"
    else
        echo "warning: $run/metrics.jsonl.gz is over $max_mb MB and was not copied: the peak-rule sweep will not recompute from docs/" >&2
    fi
fi
cp "$run"/figures/*.png "$docs/$folder/figures/"
python3 - "$run/REPRODUCTION.md" "$doc" "$folder" "$docs/$folder" <<'EOF'
import os, sys
source, target, folder, stored = sys.argv[1:]
text = open(source, encoding="utf-8").read().replace("](figures/", f"]({folder}/figures/")
lines = text.rstrip("\n").split("\n")
per_problem = {"per_problem.jsonl": "Table 2: problem, claim, observed, random",
               "per_problem_table1.jsonl": "Table 1: problem, top, bottom",
               "per_problem_layer_ranges.jsonl": "the layer ranges",
               "metrics.jsonl.gz": "every response's series, for the peak-rule sweep"}
present = [f"`{name}` ({what})" for name, what in per_problem.items() if os.path.exists(os.path.join(stored, name))]
if lines[-1].startswith("Outputs in this folder:"):
    lines[-1] = (f"Stored in [docs/{folder}/]({folder}/): `couplings.json`/`couplings.md` and `run.json` (analysis), "
                 "`perturbation.json` and `perturbation.html` (perturbation), `layer_ranges.json`, `reproduction.json` "
                 "(everything above), `figures/`"
                 + (f", and the per-problem files {', '.join(present)}. `python scripts/check_reproductions.py "
                    f"docs/{folder}` recomputes every lift and interval from them" if present else
                    ". The per-problem files were not published with this run, so its tables cannot be recomputed "
                    "from docs/ (rerun the command above with this code to get them)")
                 + "; the command above regenerates all of it.")
old = open(target, encoding="utf-8").read() if os.path.exists(target) else ""
start, end = "<!-- findings -->", "<!-- /findings -->"
if start in old and end in old:
    block = old[old.index(start):old.index(end) + len(end)]
    at = next(i for i, line in enumerate(lines) if line.startswith("## "))
    lines[at:at] = block.split("\n") + [""]
    print(f"warning: kept the findings section of the old {os.path.basename(target)}: check its numbers against "
          "the new run", file=sys.stderr)
tmp = target + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
os.replace(tmp, target)
EOF
echo "wrote $doc and $docs/$folder/"
