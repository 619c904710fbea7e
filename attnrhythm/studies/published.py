"""The per-problem files a reproduction publishes, and the check that every table recomputes
from them (issue 18).

A reproduction folder holds, beside ``reproduction.json``:

* ``per_problem.jsonl``: one row per (problem, Table 2 claim): ``problem``, ``claim`` (the key
  of ``table2`` in reproduction.json), ``observed``, ``random`` (null where the statistic is
  undefined).  Over the rows where both are defined, ``sum(observed) / sum(random) - 1`` is the
  claim's lift, and ``couplings_table`` on them gives its intervals.
* ``per_problem_table1.jsonl``: one row per perturbed problem: ``problem``, ``top`` and
  ``bottom`` (its mean Jaccard at the top- and bottom-FAI positions, null when it has none).
* ``per_problem_layer_ranges.jsonl``: as ``per_problem.jsonl`` with a ``range`` key.
* ``metrics.jsonl.gz``: every response's record (the analysis's ``metrics.jsonl`` with
  ``fai_global_disjoint`` added), from which the peak-rule sweep is redone.

:func:`check_folder` recomputes every lift and interval of a folder from these files, checks
each verdict against ``verdicts.verdict`` and that no number is counted twice, and returns what
it found wrong (``scripts/check_reproductions.py`` runs it on every ``docs/reproduction*/``).
"""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

from attnrhythm import io
from attnrhythm.core.couplings import ALL_COUPLINGS, DISJOINT, couplings_table
from attnrhythm.studies.verdicts import MAGNITUDES, claims

TABLE2 = "per_problem.jsonl"
TABLE1 = "per_problem_table1.jsonl"
RANGES = "per_problem_layer_ranges.jsonl"
SERIES = "metrics.jsonl.gz"
FILES = (TABLE2, TABLE1, RANGES, SERIES)


# ---------------------------------------------------------------- writing

def table2_rows(records: list[dict], claims) -> list[dict]:
    """One row per (record, claim) in record order (the order the intervals resample in)."""
    rows = []
    for r in records:
        couplings = r.get("couplings") or {}
        for claim in claims:
            pair = couplings.get(claim) or {}
            rows.append(dict(problem=r["id"], claim=claim, observed=pair.get("observed"), random=pair.get("random")))
    return rows


def table1_rows(problems: list[dict]) -> list[dict]:
    """One row per perturbed problem (``perturbations.jsonl`` 'problem' lines)."""
    return [dict(problem=p["problem_id"], top=p.get("top_mean"), bottom=p.get("bottom_mean")) for p in problems]


def range_rows(ranges: dict) -> list[dict]:
    rows = []
    for name, entry in ranges.items():
        names = [c for c in ALL_COUPLINGS if c in entry.get("table", {})]
        records = [dict(id=pid, couplings=c or {}) for pid, c in (entry.get("per_problem") or {}).items()]
        rows += [dict(range=name, **row) for row in table2_rows(records, names)]
    return rows


def write_series(path, records: list[dict]) -> Path:
    """The records as gzipped JSON lines, byte-identical for identical records (no timestamp)."""
    text = "".join(io.json_line(r) for r in records)
    return io.write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))


def read_series(path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_files(folder, records: list[dict], claims, perturbed: list[dict], ranges: dict) -> list[str]:
    """Write the four per-problem files into ``folder``; returns their names."""
    folder = Path(folder)
    io.write_jsonl(folder / TABLE2, table2_rows(records, claims))
    io.write_jsonl(folder / TABLE1, table1_rows(perturbed))
    io.write_jsonl(folder / RANGES, range_rows(ranges))
    write_series(folder / SERIES, records)
    return list(FILES)


# ---------------------------------------------------------------- recomputing

def _table(rows: list[dict], claim: str, n_boot: int, seed: int) -> dict:
    mine = [r for r in rows if r["claim"] == claim]
    as_float = lambda v: math.nan if v is None else float(v)  # noqa: E731
    return couplings_table({claim: dict(observed=[as_float(r["observed"]) for r in mine],
                                        random=[as_float(r["random"]) for r in mine])}, n_boot=n_boot, seed=seed)[claim]


def lift_from_sums(rows: list[dict], claim: str) -> float:
    """sum(observed) / sum(random) - 1 over the claim's rows where both are defined."""
    pairs = [(r["observed"], r["random"]) for r in rows if r["claim"] == claim
             and r["observed"] is not None and r["random"] is not None]
    if not pairs:
        return math.nan
    return sum(o for o, _ in pairs) / sum(x for _, x in pairs) - 1


def _undefined(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _close(a, b, tol: float = 1e-9) -> bool:
    """Equal within ``tol``; an undefined statistic is NaN when recomputed and null once written
    to JSON, and the two are the same (Gemma's layer thirds have no heads left for a disjoint set)."""
    if _undefined(a) or _undefined(b):
        return _undefined(a) and _undefined(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _compare(where: str, got: dict, want: dict, keys, errors: list[str]) -> None:
    for key in keys:
        if not _close(got.get(key), want.get(key)):
            errors.append(f"{where}.{key}: recomputed {got.get(key)!r}, published {want.get(key)!r}")


COUPLING_KEYS = ("observed", "random", "lift", "observed_ci", "random_ci", "lift_ci", "n")


def check_folder(folder, sweep: bool = True) -> tuple[list[str], list[str]]:
    """(errors, what was checked) for one reproduction folder; see the module docstring."""
    from attnrhythm.core.peak_rules import PeakRule, coupling_sweep
    from attnrhythm.studies.perturb import summarize

    folder = Path(folder)
    errors, checked = [], []
    result = io.read_json(folder / "reproduction.json")
    missing = [name for name in FILES if not (folder / name).exists()]
    if missing:
        errors.append(f"{folder}: {', '.join(missing)} missing (rerun `attnrhythm reproduce` and publish it)")
    boot = result.get("bootstrap") or {}
    n_boot, seed = boot.get("n_boot", 2000), boot.get("seed", 0)  # published before they were stored: defaults
    if (folder / TABLE2).exists():
        rows = io.read_jsonl(folder / TABLE2)
        for claim, want in result["table2"].items():
            if not _close(lift_from_sums(rows, claim), want["lift"]):
                errors.append(f"table2.{claim}: sum(observed)/sum(random) - 1 = {lift_from_sums(rows, claim)!r}, "
                              f"published {want['lift']!r}")
            _compare(f"table2.{claim}", _table(rows, claim, n_boot, seed), want, COUPLING_KEYS, errors)
            checked.append(f"Table 2 {claim}")
    if (folder / TABLE1).exists():
        rows = io.read_jsonl(folder / TABLE1)
        t1 = result["table1"]
        again = summarize([dict(top_mean=r["top"], bottom_mean=r["bottom"]) for r in rows], t1["n_boot"],
                          t1["bootstrap_seed"])
        for key in ("top", "bottom", "difference", "top_below_bottom"):
            _compare(f"table1.{key}", again[key], t1[key], ("mean", "share", "ci"), errors)
        _compare("table1", again, t1, ("n_compared", "n_problems"), errors)
        checked.append("Table 1")
    if (folder / RANGES).exists():
        rows = io.read_jsonl(folder / RANGES)
        for name, entry in result.get("layer_ranges", {}).items():
            mine = [r for r in rows if r["range"] == name]
            for claim, want in entry["table"].items():
                _compare(f"layer_ranges.{name}.{claim}", _table(mine, claim, n_boot, seed), want, COUPLING_KEYS, errors)
                checked.append(f"layer range {name} {claim}")
    if sweep and (folder / SERIES).exists() and result.get("peak_rule_sweep"):
        stored = result["peak_rule_sweep"]
        rules = list(dict.fromkeys((r["kind"], r["value"]) for r in stored))
        again = coupling_sweep(read_series(folder / SERIES), [PeakRule(k, v) for k, v in rules],
                               k=boot.get("coupling_k", 3), n_boot=n_boot, seed=seed)
        index = {(r["rule"], r["coupling"]): r for r in again}
        for want in stored:
            got = index.get((want["rule"], want["coupling"]))
            if got is None:
                errors.append(f"sweep {want['rule']} {want['coupling']}: not recomputed")
                continue
            _compare(f"sweep.{want['rule']}.{want['coupling']}", got, want, COUPLING_KEYS + ("density", "density_ci"),
                     errors)
        checked.append(f"peak-rule sweep ({len(stored)} rows)")
    errors += check_claims(result) + check_overlap(result)
    checked.append(f"{len(result['claims'])} verdicts")
    return errors, checked


def check_claims(result: dict) -> list[str]:
    """Each claim's verdict and counting follow ``verdicts.claims`` from the stored tables (the
    verdict rule from its interval, ``verdicts.repeats`` for what is counted), and no claim is
    counted twice."""
    errors = []
    if "analysis" not in result:
        return ["reproduction.json does not say which layers the analysis used ('analysis'): the rows that repeat "
                "Table 2 cannot be told apart (refresh it with reproduce.refresh)"]
    again = {c["key"]: c for c in claims(result["table2"], result["table1"], result.get("layer_ranges", {}),
                                         result["analysis"], result.get("head_overlap"))}
    for c in result["claims"]:
        want = again.get(c.get("key"))
        if want is None:
            errors.append(f"claim {c['claim']!r}: not a claim of these tables")
            continue
        for field in ("direction", "magnitude", "verdict", "counted"):
            if c.get(field) != want[field]:
                errors.append(f"claim {c['claim']!r}: stored {field} {c.get(field)!r}, the rule gives {want[field]!r}")
        if c["magnitude"] not in MAGNITUDES:
            errors.append(f"claim {c['claim']!r}: magnitude {c['magnitude']!r} is none of {MAGNITUDES}")
    keys = [c.get("key") for c in result["claims"] if c.get("counted", True)]
    errors += [f"claim {key!r} is counted twice" for key in sorted({k for k in keys if keys.count(k) > 1})]
    return errors


def check_overlap(result: dict) -> list[str]:
    """The disjoint co-occurrence row and the head overlap are there."""
    errors = []
    if DISJOINT not in result["table2"]:
        errors.append("Table 2 has no co-occurrence row with disjoint head sets")
    if not result.get("head_overlap"):
        errors.append("no head overlap reported")
    return errors
