#!/usr/bin/env bash
# Copies what `attnrhythm reproduce` wrote into docs/: REPRODUCTION.md becomes docs/REPRODUCTION.md
# (or docs/REPRODUCTION-NAME.md) with its figure links pointing at docs/reproduction[-NAME]/, where
# the run's small outputs go. The per-response metrics.jsonl (megabytes) is left out. DOCS=... writes
# into another folder than the project's docs/.
#
#   bash scripts/publish_reproduction.sh RUN_FOLDER [NAME]
#   bash scripts/publish_reproduction.sh runs/repro-gemma3-270m gemma3-270m
set -euo pipefail
run=${1:?usage: publish_reproduction.sh RUN_FOLDER [NAME]}
name=${2:-}
docs=${DOCS:-$(cd "$(dirname "$0")/.." && pwd)/docs}
[ -f "$run/REPRODUCTION.md" ] || { echo "error: $run/REPRODUCTION.md is missing: run attnrhythm reproduce --out $run first" >&2; exit 2; }
folder=reproduction${name:+-$name}
doc=$docs/REPRODUCTION${name:+-$name}.md
mkdir -p "$docs/$folder/figures"
for f in couplings.json couplings.md layer_ranges.json perturbation.html perturbation.json reproduction.json run.json; do
    [ -f "$run/$f" ] && cp "$run/$f" "$docs/$folder/$f"
done
cp "$run"/figures/*.png "$docs/$folder/figures/"
python3 - "$run/REPRODUCTION.md" "$doc" "$folder" <<'EOF'
import os, sys
source, target, folder = sys.argv[1:]
text = open(source, encoding="utf-8").read().replace("](figures/", f"]({folder}/figures/")
lines = text.rstrip("\n").split("\n")
if lines[-1].startswith("Outputs in this folder:"):
    lines[-1] = (f"Stored in [docs/{folder}/]({folder}/): `couplings.json`/`couplings.md` and `run.json` "
                 "(analysis; the run's per-response `metrics.jsonl` is not committed), `perturbation.json` and "
                 "`perturbation.html` (perturbation), `layer_ranges.json`, `reproduction.json` (everything above, "
                 "the peak-rule sweep included), `figures/`. The command above regenerates all of it.")
tmp = target + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
os.replace(tmp, target)
EOF
echo "wrote $doc and $docs/$folder/"
