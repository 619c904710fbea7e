"""Two-level verdicts (issue 8, item 1): the direction of an effect and its magnitude.

For a claim with our 95% interval ``[lo, hi]`` of the effect, the paper's value and the value
of no effect (``null``: 0 for a lift or a difference, 0.5 for a share of problems):

* **direction**: *reproduced* when the interval excludes no effect on the paper's side;
  *opposite* when it excludes no effect on the other side; *inconclusive* when it includes no
  effect.
* **magnitude**: *reproduced* when the paper's value lies inside the interval; *not reproduced*
  otherwise (the paper's value above or below our interval); *not judged* where the paper's
  value is not the same quantity (e.g. v2 Table 10's layer ranges are compared with the paper's
  middle-layer value for the sign only).

The wording names both, e.g. "direction reproduced, magnitude not".  Fewer than
``MIN_PROBLEMS`` problems (or no interval): *inconclusive* on both levels.

Integration: replaces ``verdict`` in ``studies/reproduce.py``; ``claims`` keeps its rows and
stores ``verdict(...).label`` / ``.why`` / ``.direction`` / ``.magnitude``; ``summary_line``
gives the line the command prints and the README quotes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MIN_PROBLEMS = 10
"""*Decision*: below this many problems a percentile bootstrap interval means little."""

DIRECTIONS = ("greater", "less")


@dataclass(frozen=True)
class Verdict:
    direction: str  # "reproduced" | "opposite" | "inconclusive"
    magnitude: str  # "reproduced" | "not reproduced" | "not judged" | "inconclusive"
    label: str      # e.g. "direction reproduced, magnitude not"
    why: str        # one sentence with the reason for each level

    @property
    def reproduced(self) -> bool:
        """Both levels (or the direction where the magnitude is not judged)."""
        return self.direction == "reproduced" and self.magnitude in ("reproduced", "not judged")


def _float(v) -> float:
    return math.nan if v is None else float(v)


def verdict(ci, paper: float, direction: str | None = None, *, null: float = 0.0, n: int | None = None,
            judge_magnitude: bool = True, min_problems: int = MIN_PROBLEMS) -> Verdict:
    """The two-level verdict of one claim.

    Args:
        ci: our 95% interval ``(lo, hi)`` of the effect (None or NaN: no interval).
        paper: the paper's value of the same effect.
        direction: the side the paper claims, ``"greater"`` or ``"less"`` than ``null``; None
            takes it from ``paper`` vs ``null``.
        null: the value of no effect.  n: problems behind the interval.
        judge_magnitude: False where ``paper`` is not the same quantity (sign-only claims).
    """
    lo, hi = (math.nan, math.nan) if ci is None else (_float(ci[0]), _float(ci[1]))
    paper = _float(paper)
    if direction is None:
        if not math.isfinite(paper) or paper == null:
            raise ValueError("the paper's value does not fix a direction; pass direction='greater' or 'less'")
        direction = "greater" if paper > null else "less"
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Verdict("inconclusive", "inconclusive", "inconclusive",
                       "no interval: too few problems with this statistic defined")
    if n is not None and n < min_problems:
        return Verdict("inconclusive", "inconclusive", "inconclusive",
                       f"inconclusive at this sample size: {n} problems, fewer than {min_problems}")
    sign = 1 if direction == "greater" else -1
    if (lo > null and sign > 0) or (hi < null and sign < 0):
        d, d_why = "reproduced", "the interval excludes no effect, on the paper's side"
    elif (lo > null and sign < 0) or (hi < null and sign > 0):
        d, d_why = "opposite", "the interval excludes no effect, on the side opposite to the paper"
    else:
        d, d_why = "inconclusive", "the interval includes no effect"
    if not judge_magnitude:
        m, m_why = "not judged", "the paper's value is compared for its sign only"
    elif lo <= paper <= hi:
        m, m_why = "reproduced", "the paper's value lies inside the interval"
    else:
        where = "above" if paper > hi else "below"
        ours = "smaller" if (paper > hi) == (sign > 0) else "larger"
        m, m_why = "not reproduced", f"the paper's value lies {where} the interval (our effect is {ours})"
        if d == "opposite":
            m_why = "the paper's value lies outside the interval (our effect is of the opposite sign)"
    label = {
        ("reproduced", "reproduced"): "direction and magnitude reproduced",
        ("reproduced", "not reproduced"): "direction reproduced, magnitude not",
        ("reproduced", "not judged"): "direction reproduced (magnitude not judged)",
        ("inconclusive", "reproduced"): "inconclusive: the interval includes no effect and the paper's value",
        ("inconclusive", "not reproduced"): "direction inconclusive, magnitude not",
        ("inconclusive", "not judged"): "direction inconclusive (magnitude not judged)",
        ("opposite", "not reproduced"): "not reproduced: opposite direction",
        ("opposite", "not judged"): "not reproduced: opposite direction",
    }[(d, m)]
    return Verdict(d, m, label, f"{d_why}; {m_why}")


def summary_line(verdicts: list[Verdict]) -> str:
    """One line over all claims, e.g. "5 claims: direction reproduced in 4, of which magnitude
    reproduced in 0 and not judged in 1; 1 inconclusive"."""
    n = len(verdicts)
    by = lambda level, value: sum(getattr(v, level) == value for v in verdicts)  # noqa: E731
    direction_ok = [v for v in verdicts if v.direction == "reproduced"]
    parts = [f"{n} claims: direction reproduced in {len(direction_ok)}"]
    if direction_ok:
        inner = [f"magnitude reproduced in {sum(v.magnitude == 'reproduced' for v in direction_ok)}"]
        not_judged = sum(v.magnitude == "not judged" for v in direction_ok)
        if not_judged:
            inner.append(f"not judged in {not_judged}")
        parts[0] += ", of which " + " and ".join(inner)
    if by("direction", "inconclusive"):
        parts.append(f"{by('direction', 'inconclusive')} inconclusive")
    if by("direction", "opposite"):
        parts.append(f"{by('direction', 'opposite')} in the opposite direction")
    return "; ".join(parts)
