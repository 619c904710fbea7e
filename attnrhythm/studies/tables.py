"""Markdown of the studies' tables: the analysis's Table 2 (``couplings.md``), the peak-rule sweep
and the whole reproduction report (``REPRODUCTION.md``).  Pure functions of the tables the
studies compute (``core/couplings.py``, ``core/peak_rules.py``, ``studies/verdicts.py``); the
studies write what these return.
"""
from __future__ import annotations

import json
import math

from attnrhythm.core.couplings import ALL_COUPLINGS, LABELS, PAPER_ROW, PAPER_TABLE2
from attnrhythm.core.peak_rules import PEAKS_COUNTED, closest_to_paper
from attnrhythm.studies.verdicts import FACTOR, MIN_PROBLEMS, RANGES


# ---------------------------------------------------------------- number formats

def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def value(v, unit: str = "value", digits: int = 4) -> str:
    """A mean: a share in percent, anything else as a number; "n/a" when undefined."""
    if not _finite(v):
        return "n/a"
    return f"{100 * v:.{digits - 2}f}%" if unit == "share" else f"{v:.{digits}f}"


def lift(v, digits: int = 2) -> str:
    """A relative change, signed, in percent."""
    return f"{100 * v:+.{digits}f}%" if _finite(v) else "n/a"


def pct(v) -> str:
    return f"{100 * v:.1f}%" if _finite(v) else "n/a"


def num(v) -> str:
    return f"{v:.3f}" if _finite(v) else "n/a"


def signed(v) -> str:
    return lift(v, 1)


def bracket(ci, fmt) -> str:
    """``[lo, hi]`` of an interval in ``fmt``."""
    return "n/a" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


FORMATS = dict(signed=signed, pct=pct, num=num)
"""The formats of ``verdicts.claims`` rows (their ``fmt``)."""


def _unit(name: str) -> str:
    return PAPER_TABLE2[PAPER_ROW.get(name, name)]["unit"] if PAPER_ROW.get(name, name) in PAPER_TABLE2 else "value"


# ---------------------------------------------------------------- the analysis's Table 2

def couplings_markdown(table: dict[str, dict], meta: dict) -> str:
    """Markdown report of ``couplings_table`` beside the paper's Table 2.

    ``meta`` items (e.g. model, data, n, seed, command) are printed as ``- key: value`` lines
    in their order above the table; the number of problems used/skipped per coupling below it.
    """
    lines = ["## Table 2: couplings (ours vs paper)", ""]
    lines += [f"- {key}: {v}" for key, v in meta.items()]
    lines += ["", "| coupling | random (95% CI) | observed (95% CI) | lift (95% CI) | paper random / observed / lift |",
              "|---|---|---|---|---|"]
    for name, row in table.items():
        unit = _unit(name)
        paper = PAPER_TABLE2.get(name)
        paper_txt = (f"{value(paper['random'], unit)} / {value(paper['observed'], unit)} / {lift(paper['lift'])}"
                     if paper else "-")
        cell = lambda key, fmt: f"{fmt(row[key])} ({fmt(row[key + '_ci'][0])} to {fmt(row[key + '_ci'][1])})"  # noqa: E731
        lines.append(f"| {row['label']} | {cell('random', lambda v: value(v, unit))} | "
                     f"{cell('observed', lambda v: value(v, unit))} | {cell('lift', lift)} | {paper_txt} |")
    lines.append("")
    lines += [f"- {row['label']}: {row['n']} problems used, {row['n_skipped']} skipped (statistic undefined), "
              f"{row['n_boot']} bootstrap resamples" for row in table.values()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the peak-rule sweep

def _mean_ci(v, ci, share: bool, as_lift: bool = False) -> str:
    fmt = signed if as_lift else (pct if share else num)
    return f"{fmt(v)} {bracket(ci, fmt)}"


def sweep_markdown(rows: list[dict]) -> str:
    """The sweep as a Markdown section: one table per coupling (rules as rows), then which rule
    comes closest to the paper's random baselines and what the couplings are there."""
    lines = ["## Table 2 under other peak rules", "",
             "Top-q: local maxima in the top q of the series (the project's rule: q = 0.4). "
             "Prominence p: scipy.signal.find_peaks with prominence >= p x the response's standard deviation. "
             "Density: peaks per defined token of the series the coupling counts (mean over responses). "
             "Intervals: 95% bootstrap over problems.", ""]
    for name in ALL_COUPLINGS:
        sub = [r for r in rows if r["coupling"] == name]
        if not sub:
            continue
        paper = PAPER_TABLE2[PAPER_ROW[name]]
        share = paper["unit"] == "share"
        lines += [f"### {LABELS[name]}", "",
                  f"Paper{' (its co-occurrence row)' if PAPER_ROW[name] != name else ''}: random "
                  f"{pct(paper['random']) if share else num(paper['random'])}, observed "
                  f"{pct(paper['observed']) if share else num(paper['observed'])}, lift {signed(paper['lift'])}.", "",
                  f"| rule | peak density ({PEAKS_COUNTED[name]}) | random | observed | lift | problems |",
                  "|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(f"| {r['rule']} | {_mean_ci(r['density'], r['density_ci'], True)} | "
                         f"{_mean_ci(r['random'], r['random_ci'], share)} | "
                         f"{_mean_ci(r['observed'], r['observed_ci'], share)} | "
                         f"{_mean_ci(r['lift'], r['lift_ci'], share, as_lift=True)} | {r['n']} ({r['n_skipped']} skipped) |")
        lines.append("")
    best = closest_to_paper(rows)
    if best is not None:
        parts = [f"{PAPER_TABLE2[c]['label']}: random {pct(r['random'])} (paper {pct(r['paper_random'])}), "
                 f"lift {_mean_ci(r['lift'], r['lift_ci'], True, as_lift=True)} (paper {signed(r['paper_lift'])})"
                 for c, r in best["rows"].items()]
        lines += [f"Closest to the paper's random baselines (summed over the two share couplings): **{best['rule']}**; "
                  + "; ".join(parts) + ".", ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the reproduction report

RULE_TEXT = (
    "Two levels per claim, from the 95% bootstrap interval over problems. *Direction* reproduced: the interval "
    "excludes no effect, on the paper's side (opposite: on the other side; inconclusive: it includes no effect). "
    "*Magnitude* reproduced: the paper's value lies inside the interval and the whole interval lies within a factor "
    f"{FACTOR:g} of the paper's effect (same sign, between half and double); not reproduced: the interval excludes "
    "the paper's value; undetermined: neither (the interval is too wide to say); not judged: the paper gives no "
    f"number for this quantity. Fewer than {MIN_PROBLEMS} problems behind an interval: direction inconclusive, "
    "magnitude undetermined. Each number counts once in the summary: a layer-range row that repeats a Table 2 "
    "number is shown but not counted.")


def claims_table(rows: list[dict]) -> list[str]:
    lines = ["| claim | source | ours (95% CI) | paper | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        fmt = FORMATS[r["fmt"]]
        paper = fmt(r["paper"]) + (f" ({r['paper_note']})" if r.get("paper_note") else "")
        lines.append(f"| {r['claim']} | {r['table']} | {fmt(r['ours'])} {bracket(r['ci'], fmt)} | {paper} | "
                     f"**{r['verdict']}**: {r['why']} |")
    return lines


def choices_table(by_choice: list[dict]) -> list[str]:
    lines = ["| coupling | analysis choices | direction reproduced under | inconclusive under | opposite under |",
             "|---|---|---|---|---|"]
    for c in by_choice:
        cells = [", ".join(c[d]) or "none" for d in ("reproduced", "inconclusive", "opposite")]
        holds = ""
        if c["holds"]:
            missing = c.get("not_measured")
            holds = (f" (holds under every choice measured; {', '.join(missing)} not measured)" if missing
                     else " (**holds under every choice**)")
        lines.append(f"| {c['label']}{holds} | {len(c['choices'])} | " + " | ".join(cells) + " |")
    return lines


def overlap_table(overlap: dict) -> list[str]:
    lines = ["| head sets | receiver heads | of them in the analysed layers | global heads per response | "
             "shared heads per response: mean (min-max) | responses sharing any |", "|---|---|---|---|---|---|"]
    for name, o in overlap.items():
        lines.append(f"| {o['label']} | {o['receiver_heads']} | {o['receivers_in_layers']} | "
                     f"{o['global_heads_mean']:.1f} | {o['shared_mean']:.2f} ({o['shared_min']}-{o['shared_max']}) | "
                     f"{o['responses_sharing']} of {o['n_responses']} |")
    return lines


def table2_rows(table2: dict) -> list[str]:
    lines = ["| coupling | random (ours / paper) | observed (ours / paper) | lift (ours / paper) | problems |",
             "|---|---|---|---|---|"]
    for name in ALL_COUPLINGS:
        if name not in table2:
            continue
        row, paper = table2[name], PAPER_TABLE2[PAPER_ROW[name]]
        f = pct if paper["unit"] == "share" else num
        lines.append(f"| {LABELS[name]} | {f(row['random'])} {bracket(row['random_ci'], f)} / {f(paper['random'])} | "
                     f"{f(row['observed'])} {bracket(row['observed_ci'], f)} / {f(paper['observed'])} | "
                     f"{signed(row['lift'])} {bracket(row['lift_ci'], signed)} / {signed(paper['lift'])} | "
                     f"{row['n']} ({row['n_skipped']} skipped) |")
    return lines


def table1_rows(t: dict) -> list[str]:
    return ["| statistic | ours (95% CI) | paper |", "|---|---|---|",
            f"| mean Jaccard, top-FAI positions | {num(t['top']['mean'])} {bracket(t['top']['ci'], num)} | "
            f"{t['top']['paper']} |",
            f"| mean Jaccard, bottom-FAI positions | {num(t['bottom']['mean'])} {bracket(t['bottom']['ci'], num)} | "
            f"{t['bottom']['paper']} |",
            f"| top minus bottom (paired) | {num(t['difference']['mean'])} {bracket(t['difference']['ci'], num)} | "
            f"{t['difference']['paper']} |",
            f"| problems with top < bottom | {pct(t['top_below_bottom']['share'])} "
            f"{bracket(t['top_below_bottom']['ci'], pct)} | {pct(t['top_below_bottom']['paper'])} |",
            "", f"{t['n_compared']} problems compared ({t['n_skipped']} without both groups), "
            f"{t['top_below_bottom']['n_ties']} ties (counted as not below); settings: "
            f"`{json.dumps(t['settings'])}`; {num(t.get('seconds_per_problem'))} s per problem."]


def ranges_rows(ranges: dict) -> list[str]:
    names = [c for c in ALL_COUPLINGS if any(c in ranges.get(r, {}).get("table", {}) for r in RANGES)]
    lines = ["| layers | " + " | ".join(LABELS[c] for c in names) + " |", "|---|" + "---|" * len(names)]
    for name in RANGES:
        entry = ranges.get(name, {})
        cells = [f"{signed(entry['table'][c]['lift'])} {bracket(entry['table'][c]['lift_ci'], signed)}"
                 if c in entry.get("table", {}) else "n/a" for c in names]
        lines.append(f"| {name} {entry.get('layers', '')} | " + " | ".join(cells) + " |")
    return lines


OUTPUTS = ("Outputs in this folder: `metrics.jsonl`, `couplings.json` and `report.html` (analysis), "
           "`perturbations.jsonl`, `perturbation.json` and `perturbation.html` (perturbation), `layer_ranges.json`, "
           "`reproduction.json`, and the per-problem files every table recomputes from: `per_problem.jsonl` "
           "(Table 2), `per_problem_table1.jsonl`, `per_problem_layer_ranges.jsonl` and `metrics.jsonl.gz` (every "
           "response's series, for the peak-rule sweep).")


def reproduction_markdown(result: dict) -> str:
    """``REPRODUCTION.md`` from ``reproduction.json``'s content: the verdicts (the summary and what
    holds under every analysis choice), the head overlap, Tables 2 and 1, the layer ranges, the
    sweep and the figures."""
    rows, sweep, overlap = result["claims"], result.get("peak_rule_sweep"), result.get("head_overlap")
    lines = ["# Reproduction of Li et al. (arXiv 2510.13554), analysis claims", ""]
    lines += [f"- **{k}**: {v}" for k, v in result["meta"].items()]
    lines += ["", "## Verdicts", "", f"**Summary. {result['summary']}.**", "", RULE_TEXT, ""]
    lines += claims_table(rows)
    by_choice = result.get("choices")
    if by_choice:
        lines += ["", "## What holds under every analysis choice", "",
                  "The direction of each coupling under every analysis choice measured here: the default (top-q 0.4 "
                  "peaks, the analysis's layers, receiver heads over every layer), the other peak rules, the layer "
                  "ranges (receiver heads within each range) and, for the co-occurrence, disjoint head sets.", ""]
        lines += choices_table(by_choice)
    if overlap:
        lines += ["", "## Head overlap", "",
                  "How many heads the receiver set and each response's global set share. A head in both sets makes "
                  "receiver-FAI and global-FAI peaks coincide by construction; the disjoint row of Table 2 forms "
                  "the global FAI without the receiver heads.", ""]
        lines += overlap_table(overlap)
    lines += ["", "## Table 2: couplings", ""] + table2_rows(result["table2"])
    lines += ["", "## Table 1: perturbation", ""] + table1_rows(result["table1"])
    lines += ["", "## v2 Table 10: couplings by layer range", "",
              "The paper's Table 10 values are not restated in docs/method.md; each range is judged on the sign of "
              "its lift. Within a range every head comes from its layers, receiver heads included (Table 2 above "
              "ranks receiver heads over every layer), so the middle row's co-occurrence can differ from Table 2.", ""]
    lines += ranges_rows(result["layer_ranges"])
    if sweep:
        lines += ["", sweep_markdown(sweep).rstrip()]
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in result["figures"].items()]
    lines += ["", OUTPUTS]
    return "\n".join(lines) + "\n"
