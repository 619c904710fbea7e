"""Verdicts on the paper's claims: the direction of an effect and its magnitude, each number
counted once.

For a claim with our 95% interval ``[lo, hi]`` of the effect, the paper's value and the value
of no effect (``null``: 0 for a lift or a difference, 0.5 for a share of problems):

* **direction**: *reproduced* when the interval excludes no effect on the paper's side;
  *opposite* when it excludes no effect on the other side; *inconclusive* when it includes no
  effect.
* **magnitude** (measured from ``null``, so a share's effect is its distance from 50%):
  *not reproduced* when the interval excludes the paper's value; *reproduced* when the paper's
  value lies inside the interval **and** the whole interval lies within a factor ``FACTOR`` of
  it (same sign, between half and double the paper's effect); *undetermined* otherwise (the
  interval is too wide to say, or too few problems stand behind it); *not judged* where the
  paper gives no number for this quantity (v2 Table 10's layer ranges, the disjoint head sets).
  A wide interval that happens to contain the paper's value is not a reproduction.

The wording names both, e.g. "direction reproduced, magnitude not".  Fewer than
``MIN_PROBLEMS`` problems (or no interval): direction inconclusive, magnitude undetermined.

:func:`claims` turns the tables of a reproduction into claim rows, each in a *family*
(``FAMILIES``): the paper's main numbers (Tables 1 and 2), the co-occurrence with disjoint head
sets, and the layer ranges.  A row that repeats a number counted elsewhere (:func:`repeats`: the
default range, for a coupling that does not involve receiver heads; disjoint sets where no head
was shared) is shown but not counted, so the summary (:func:`claims_summary`) counts each number
once.  :func:`directions_by_choice` says, per
coupling, under which analysis choices (peak rule, layer range, head sets) its direction holds.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from attnrhythm.core.couplings import (ALL_COUPLINGS, COUPLINGS, DISJOINT, LABELS, PAPER_ROW, PAPER_TABLE2,
                                       RECEIVER_COUPLINGS)

MIN_PROBLEMS = 10
"""*Decision*: below this many problems a percentile bootstrap interval means little."""
FACTOR = 2.0
"""*Decision*: "magnitude reproduced" needs the whole interval within this factor of the paper's
effect (between 1/FACTOR and FACTOR times it), so imprecision cannot earn it."""

DIRECTIONS = ("greater", "less")
MAGNITUDES = ("reproduced", "not reproduced", "undetermined", "not judged")
FAMILIES = {"main": "Paper's numbers (Tables 1 and 2)",
            "disjoint": "Co-occurrence with disjoint head sets",
            "layer ranges": "Layer ranges (v2 Table 10)"}
RANGES = ("bottom", "middle", "top")


@dataclass(frozen=True)
class Verdict:
    direction: str  # "reproduced" | "opposite" | "inconclusive"
    magnitude: str  # one of MAGNITUDES
    label: str      # e.g. "direction reproduced, magnitude not"
    why: str        # one sentence with the reason for each level

    @property
    def reproduced(self) -> bool:
        """Both levels (or the direction where the magnitude is not judged)."""
        return self.direction == "reproduced" and self.magnitude in ("reproduced", "not judged")


def _float(v) -> float:
    return math.nan if v is None else float(v)


LABELS_BY_LEVEL = {
    ("reproduced", "reproduced"): "direction and magnitude reproduced",
    ("reproduced", "not reproduced"): "direction reproduced, magnitude not",
    ("reproduced", "undetermined"): "direction reproduced, magnitude undetermined",
    ("reproduced", "not judged"): "direction reproduced (magnitude not judged)",
    ("inconclusive", "not reproduced"): "direction inconclusive, magnitude not",
    ("inconclusive", "undetermined"): "inconclusive: the interval includes no effect and the paper's value",
    ("inconclusive", "not judged"): "direction inconclusive (magnitude not judged)",
    ("opposite", "not reproduced"): "not reproduced: opposite direction",
    ("opposite", "not judged"): "not reproduced: opposite direction",
}


def verdict(ci, paper: float, direction: str | None = None, *, null: float = 0.0, n: int | None = None,
            judge_magnitude: bool = True, min_problems: int = MIN_PROBLEMS) -> Verdict:
    """The two-level verdict of one claim.

    Args:
        ci: our 95% interval ``(lo, hi)`` of the effect (None or NaN: no interval).
        paper: the paper's value of the same effect.
        direction: the side the paper claims, ``"greater"`` or ``"less"`` than ``null``; None
            takes it from ``paper`` vs ``null``.
        null: the value of no effect.  n: problems behind the interval.
        judge_magnitude: False where the paper gives no number for this quantity (sign-only claims).
    """
    lo, hi = (math.nan, math.nan) if ci is None else (_float(ci[0]), _float(ci[1]))
    paper = _float(paper)
    if direction is None:
        if not math.isfinite(paper) or paper == null:
            raise ValueError("the paper's value does not fix a direction; pass direction='greater' or 'less'")
        direction = "greater" if paper > null else "less"
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    unjudged = "not judged" if not judge_magnitude else "undetermined"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Verdict("inconclusive", unjudged, "inconclusive",
                       "no interval: too few problems with this statistic defined")
    if n is not None and n < min_problems:
        return Verdict("inconclusive", unjudged, "inconclusive",
                       f"inconclusive at this sample size: {n} problems, fewer than {min_problems}")
    sign = 1 if direction == "greater" else -1
    if (lo > null and sign > 0) or (hi < null and sign < 0):
        d, d_why = "reproduced", "the interval excludes no effect, on the paper's side"
    elif (lo > null and sign < 0) or (hi < null and sign > 0):
        d, d_why = "opposite", "the interval excludes no effect, on the side opposite to the paper"
    else:
        d, d_why = "inconclusive", "the interval includes no effect"
    if not judge_magnitude:
        m, m_why = "not judged", "the paper gives no number for this quantity (its sign is compared)"
    elif lo <= paper <= hi:
        effect = paper - null
        low, high = sorted((effect / FACTOR, effect * FACTOR))
        if low <= lo - null and hi - null <= high:
            m, m_why = "reproduced", (f"the paper's value lies inside the interval, and the whole interval within a "
                                      f"factor {FACTOR:g} of its effect")
        else:
            m, m_why = "undetermined", (f"the paper's value lies inside the interval, but the interval reaches beyond "
                                        f"a factor {FACTOR:g} of its effect: too wide to say")
    else:
        where = "above" if paper > hi else "below"
        ours = "smaller" if (paper > hi) == (sign > 0) else "larger"
        m, m_why = "not reproduced", f"the paper's value lies {where} the interval (our effect is {ours})"
        if d == "opposite":
            m_why = "the paper's value lies outside the interval (our effect is of the opposite sign)"
    return Verdict(d, m, LABELS_BY_LEVEL[(d, m)], f"{d_why}; {m_why}")


def summary_line(verdicts: list[Verdict], noun: str = "claims") -> str:
    """One line over verdicts, e.g. "5 claims: direction reproduced in 4, inconclusive in 1;
    magnitude reproduced in 0, undetermined in 1, not reproduced in 4" (a level's values that
    no verdict takes are left out, except "reproduced")."""
    directions = Counter(v.direction for v in verdicts)
    magnitudes = Counter(v.magnitude for v in verdicts)
    d = [f"direction reproduced in {directions['reproduced']}"] + [
        f"{value} in {directions[value]}" for value in ("inconclusive", "opposite") if directions[value]]
    judged = [m for m in MAGNITUDES if m != "not judged"]
    text = f"{len(verdicts)} {noun if len(verdicts) != 1 else noun.removesuffix('s')}: " + ", ".join(d)
    if any(magnitudes[m] for m in judged):
        text += "; magnitude " + ", ".join(f"{m} in {magnitudes[m]}" for m in judged
                                           if magnitudes[m] or m == "reproduced")
    if magnitudes["not judged"]:
        text += f" (magnitude not judged in {magnitudes['not judged']}: the paper gives no number)"
    return text


# ---------------------------------------------------------------- claims of a reproduction

def _row(key, claim, table, family, ours, ci, paper, null, fmt, n, judge=True, counted=True, note=None) -> dict:
    v = verdict(ci, paper, null=null, n=n, judge_magnitude=judge)
    row = dict(key=key, claim=claim, table=table, family=family, counted=counted, ours=ours, ci=ci, paper=paper,
               null=null, fmt=fmt, n=n, verdict=v.label, why=v.why, direction=v.direction, magnitude=v.magnitude)
    if note:
        row["paper_note"] = note
    return row


def repeats(key: str, range_layers, analysis: dict, overlap: dict) -> str | None:
    """Why a claim row repeats a number counted elsewhere, or None when it does not.

    A layer-range row repeats Table 2 when the range is the analysis's own layers and the
    coupling does not involve receiver heads, or they were ranked in those layers in both.  A
    disjoint-sets row repeats its co-occurrence row when no response shares a head between the
    two sets (``overlap``'s ``shared_max`` is 0: nothing was taken out)."""
    name, _, coupling = key.rpartition("/")
    if coupling == DISJOINT and (overlap.get(name or "table2") or {}).get("shared_max") == 0:
        return "no head shared: the co-occurrence row again; not counted"
    if name and list(range_layers or []) == list(analysis.get("layers") or [None]) and (
            coupling not in RECEIVER_COUPLINGS or analysis.get("receiver_layers") == "sampled"):
        return "the Table 2 number again; not counted"
    return None


UNDEFINED = "undefined: no problem has this statistic (e.g. no global head is left once the receiver heads are taken out); not counted"


def undefined(row: dict) -> str | None:
    """UNDEFINED when no problem defines a couplings-table row (it has no interval to judge), else
    None: such a row is shown but not counted, rather than counted as inconclusive."""
    return UNDEFINED if not row.get("n") else None


def claims(table2: dict, table1: dict, ranges: dict, analysis: dict | None = None,
           overlap: dict | None = None) -> list[dict]:
    """Every claim with our value, interval, the paper's value, the verdict, its family and
    whether the summary counts it (``repeats``).

    Args:
        table2: ``couplings_table`` rows (``DISJOINT`` among them when measured).
        table1: the perturbation summary (``perturb.summarize``).
        ranges: ``{range: {"layers": [...], "table": couplings table}}``.
        analysis: ``{"layers": the analysis's layers, "receiver_layers": "all" | "sampled"}``.
        overlap: ``{"table2" | range: records.head_overlap(...)}``.
    """
    analysis, overlap = analysis or {}, overlap or {}
    rows = []
    for name in COUPLINGS:
        if name in table2:
            r, paper = table2[name], PAPER_TABLE2[name]
            rows.append(_row(name, f"{paper['label']}: observed above random (lift > 0)", "Table 2", "main",
                             r["lift"], r["lift_ci"], paper["lift"], 0.0, "signed", r["n"]))
    for label, key, null in (("top-FAI minus bottom-FAI mean Jaccard < 0", "difference", 0.0),
                             ("share of problems with top-FAI Jaccard < bottom-FAI > 50%", "top_below_bottom", 0.5)):
        stat = table1[key]
        rows.append(_row(key, label, "Table 1", "main", stat.get("mean", stat.get("share")), stat["ci"],
                         stat["paper"], null, "num" if key == "difference" else "pct", table1["n_compared"]))
    if DISJOINT in table2:
        r, again = table2[DISJOINT], undefined(table2[DISJOINT]) or repeats(DISJOINT, None, analysis, overlap)
        rows.append(_row(DISJOINT, f"{LABELS[DISJOINT]}: observed above random (lift > 0)", "Table 2, disjoint sets",
                         "disjoint", r["lift"], r["lift_ci"], PAPER_TABLE2[PAPER_ROW[DISJOINT]]["lift"], 0.0, "signed",
                         r["n"], judge=False, counted=again is None,
                         note=again or "sign compared with the paper's co-occurrence"))
    for name in RANGES:
        entry = ranges.get(name, {})
        for coupling in ALL_COUPLINGS:
            r = entry.get("table", {}).get(coupling)
            if r is None:
                continue
            again = undefined(r) or repeats(f"{name}/{coupling}", entry.get("layers"), analysis, overlap)
            rows.append(_row(f"{name}/{coupling}", f"{name} third: {LABELS[coupling]}, lift > 0", "v2 Table 10",
                             "layer ranges", r["lift"], r["lift_ci"], PAPER_TABLE2[PAPER_ROW[coupling]]["lift"], 0.0,
                             "signed", r["n"], judge=False, counted=again is None,
                             note=again or "middle layers; sign compared"))
    return rows


def _as_verdict(row: dict) -> Verdict:
    return Verdict(row["direction"], row["magnitude"], row["verdict"], row["why"])


def claims_summary(rows: list[dict]) -> str:
    """The summary over claim rows, one sentence per family, counting only ``counted`` rows,
    e.g. "Paper's numbers (Tables 1 and 2): 5 numbers: direction reproduced in 4, ...".
    """
    parts = []
    for family, title in FAMILIES.items():
        mine = [r for r in rows if r.get("family", "main") == family]
        counted = [r for r in mine if r.get("counted", True)]
        if not mine:
            continue
        void = sum(1 for r in mine if r.get("paper_note") == UNDEFINED)
        extra = len(mine) - len(counted) - void
        why = ([f"{extra} row{'s' if extra != 1 else ''} repeat{'s' if extra == 1 else ''} a number counted elsewhere"]
               if extra else []) + ([f"{void} row{'s' if void != 1 else ''} {'are' if void != 1 else 'is'} undefined "
                                     "(no problem has the statistic)"] if void else [])
        if not counted:
            parts.append(f"{title}: no number of its own ({' and '.join(why)})")
            continue
        text = f"{title}: {summary_line([_as_verdict(r) for r in counted], 'numbers')}"
        if why:
            text += f"; not counted: {' and '.join(why)}"
        parts.append(text)
    return ". ".join(parts)


def directions_by_choice(rows: list[dict], sweep: list[dict] | None, default_rule: str = "top-q 0.4") -> list[dict]:
    """Per coupling of the paper, the direction verdict under each analysis choice the
    reproduction measured: the default (``rows``' Table 2 row), every other peak rule (``sweep``
    rows), every layer range (counted rows) and, for the co-occurrence, the same with disjoint
    head sets (choices named "... with disjoint sets").

    Returns one dict per coupling: ``coupling``, ``label``, ``choices`` ({choice: direction}),
    ``holds`` (True when the direction is reproduced under every choice measured),
    ``not_measured`` (choices that should be there and are not, e.g. disjoint head sets in a
    reproduction made before they existed), and the choices by direction (``reproduced``,
    ``inconclusive``, ``opposite``: lists of names).
    """
    by_key = {r["key"]: r for r in rows if "key" in r}

    def choices_of(coupling: str, suffix: str = "") -> dict:
        choices = {}
        if coupling in by_key:
            choices[f"default ({default_rule}){suffix}"] = by_key[coupling]["direction"]
        for s in sweep or []:
            if s["coupling"] == coupling and s["rule"] != default_rule:
                paper = PAPER_TABLE2[PAPER_ROW[coupling]]["lift"]
                choices[f"{s['rule']}{suffix}"] = verdict(s["lift_ci"], paper, n=s["n"]).direction
        for name in RANGES:
            r = by_key.get(f"{name}/{coupling}")
            if r is not None and r.get("counted", True):
                choices[f"{name} third{suffix}"] = r["direction"]
        return choices

    out = []
    for coupling in COUPLINGS:
        choices, missing = choices_of(coupling), []
        if coupling == PAPER_ROW[DISJOINT]:
            choices.update(choices_of(DISJOINT, " with disjoint sets"))
            if DISJOINT not in by_key:
                missing.append("disjoint head sets")
        if not choices:
            continue
        grouped = {d: [c for c, v in choices.items() if v == d] for d in ("reproduced", "inconclusive", "opposite")}
        out.append(dict(coupling=coupling, label=LABELS[coupling], choices=choices, not_measured=missing,
                        holds=len(grouped["reproduced"]) == len(choices), **grouped))
    return out
