"""Robustness of the Table 2 couplings to the peak rule (issue 8, item 2).

The paper does not define a peak.  The project's default (``couplings.find_peaks``) is a local
maximum in the top 40% of its series; on SmolLM2 that makes WAAD peaks about twice as dense as
the paper's (coupling (c)'s random baseline 69.6% against 36.9%), so each coupling is reported
over a family of rules, with the peak density and the random baseline each rule gives:

* ``top-q`` rules (``PeakRule("topq", q)``): ``find_peaks`` at q in {0.1, 0.2, 0.3, 0.4}.
* ``prominence`` rules (``PeakRule("prominence", p)``): ``scipy.signal.find_peaks`` with
  ``prominence = p * std`` of the response's defined values, p in {0.25, 0.5, 1, 2}.
  *Decision*: the unit is the series' own standard deviation (per response), not its range:
  the first response tokens often carry an outlying WAAD or FAI value, which would set the
  range alone; the standard deviation makes p comparable across responses, series and models
  (a prominence of one std is "a peak standing one typical fluctuation above its surroundings").
  Undefined positions (NaN, padding) are removed before scipy sees the series (the neighbours
  across a gap become adjacent); scipy never reports the first or last value, and a plateau
  counts once (its middle).  Fewer than 3 defined values or a constant series: no peaks.

``coupling_sweep(records, rules)`` returns one row per (rule, coupling): observed, random, lift
and their 95% bootstrap intervals from ``couplings.couplings_table`` (the same resamples and
seeds as the main table), plus the density of the peaks the coupling counts, with its own
bootstrap interval.  ``closest_to_paper`` names the rule whose random baseline is nearest the
paper's.  Records with a ``fai_global_disjoint`` series (global-head FAI without the receiver
heads) add the co-occurrence with disjoint head sets (``couplings.DISJOINT``) under each rule.
``studies/tables.py`` renders the sweep, ``studies.figures.sweep_figure`` draws it.

Integration: ``core/peak_rules.py``; needs the ``peak_rule`` argument of the coupling functions
in ``core/couplings.py`` (the accompanying patch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.bootstrap import bootstrap_ci
from attnrhythm.core.couplings import (ALL_COUPLINGS, DISJOINT, PAPER_ROW, PAPER_TABLE2, couplings_table, find_peaks,
                                       response_couplings)
from attnrhythm.core.topq import defined_positions

KINDS = ("topq", "prominence")
SERIES = ("waad", "fai", "fai_receiver")
PEAKS_COUNTED = {"entropy_at_waad_peaks": "waad", "receiver_global_cooccurrence": "fai_receiver",
                 "fai_follows_waad": "fai", DISJOINT: "fai_receiver"}
"""The series whose peaks each coupling counts (its 'observed' is a share of those peaks, or a
mean over them); the density reported beside the coupling is theirs.  Coupling (b)'s random
baseline is the global-FAI peak density itself, and (c)'s grows with the WAAD peak density; the
table carries all three densities."""


@dataclass(frozen=True)
class PeakRule:
    """A peak rule, callable as ``rule(series [B, T] or [T], mask | None) -> bool like series``.

    ``kind`` "topq": local maxima in the top ``value`` share (``couplings.find_peaks``);
    "prominence": scipy's peaks with prominence >= ``value`` x the response's std."""

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"peak rule kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "topq" and not 0 < self.value <= 1:
            raise ValueError(f"top-q share must be in (0, 1], got {self.value}")
        if self.kind == "prominence" and not self.value >= 0:
            raise ValueError(f"prominence must be >= 0, got {self.value}")

    @property
    def name(self) -> str:
        return f"top-q {self.value:g}" if self.kind == "topq" else f"prominence {self.value:g} sd"

    def __call__(self, series: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.kind == "topq":
            return find_peaks(series, mask, self.value)
        return prominence_peaks(series, mask, self.value)


DEFAULT_RULES = tuple([PeakRule("topq", q) for q in (0.1, 0.2, 0.3, 0.4)]
                      + [PeakRule("prominence", p) for p in (0.25, 0.5, 1.0, 2.0)])
PROJECT_RULE = PeakRule("topq", 0.4)
"""The rule of the main table (``RhythmConfig.peak_q`` = 0.4)."""


def parse_rule(text: str) -> PeakRule:
    """``"topq:0.2"`` or ``"prominence:0.5"`` -> PeakRule (for a ``--peak-rules`` option)."""
    kind, _, value = text.partition(":")
    try:
        return PeakRule(kind.strip(), float(value))
    except ValueError as err:
        raise ValueError(f"bad peak rule {text!r} (use topq:Q or prominence:P): {err}") from None


def prominence_peaks(series: Tensor, mask: Tensor | None, prominence: float) -> Tensor:
    """Peaks of each row with ``scipy.signal.find_peaks(x, prominence=prominence * std(x))`` over
    its defined values (see the module docstring).  ``[B, T]`` or ``[T]`` -> bool like it."""
    from scipy.signal import find_peaks as scipy_find_peaks

    squeeze = series.dim() == 1
    x = series.detach()[None] if squeeze else series.detach()
    m = None if mask is None else (mask[None] if squeeze else mask)
    defined = defined_positions(x, m)
    out = torch.zeros_like(defined)
    values = x.to(torch.float64).cpu().numpy()
    ok = defined.cpu().numpy()
    for b in range(x.shape[0]):
        where = np.flatnonzero(ok[b])
        if where.size < 3:
            continue
        v = values[b, where]
        scale = v.std()
        if not scale > 0:
            continue
        idx, _ = scipy_find_peaks(v, prominence=prominence * scale)
        out[b, torch.as_tensor(where[idx], dtype=torch.long)] = True
    return out[0] if squeeze else out


def peak_density(peaks: Tensor, series: Tensor, mask: Tensor | None = None) -> Tensor:
    """Peaks per defined position of each row: ``[B]`` float64, NaN for a row without any."""
    defined = defined_positions(series, mask)
    n = defined.sum(-1).to(torch.float64)
    count = (peaks & defined).sum(-1).to(torch.float64)
    return torch.where(n > 0, count / n.clamp(min=1), torch.full_like(n, math.nan))


def batch_series(records: list[dict]) -> tuple[dict[str, Tensor | None], Tensor]:
    """``{series: [B, T] float64 (NaN = undefined) or None}`` and the mask ``[B, T]`` (response
    tokens) from per-response records with lists ``waad``, ``fai``, ``entropy`` and optionally
    ``fai_receiver`` and ``fai_global_disjoint`` (None entries = undefined; a missing or None
    series = all undefined)."""
    width = max([len(r.get("waad") or []) for r in records] + [1])
    mask = torch.zeros(len(records), width, dtype=torch.bool)
    out = {}
    for key in ("waad", "fai", "entropy", "fai_receiver", "fai_global_disjoint"):
        x = torch.full((len(records), width), math.nan, dtype=torch.float64)
        present = False
        for b, r in enumerate(records):
            values = r.get(key)
            if values is None:
                continue
            present = True
            x[b, :len(values)] = torch.tensor([math.nan if v is None else float(v) for v in values],
                                              dtype=torch.float64)
        out[key] = x if present else None
    for b, r in enumerate(records):
        mask[b, :len(r.get("waad") or [])] = True
    return out, mask


def coupling_sweep(records: list[dict], rules=DEFAULT_RULES, *, k: int = 3, n_boot: int = 2000,
                   seed: int = 0) -> list[dict]:
    """Table 2 under each peak rule.

    Args:
        records: one dict per response (``metrics.jsonl`` records: ``waad``, ``fai``, ``entropy``,
            ``fai_receiver`` and optionally ``fai_global_disjoint`` lists, None = undefined).
        rules: PeakRule objects (default ``DEFAULT_RULES``); k: coupling (c)'s neighbourhood.
        n_boot, seed: bootstrap over problems, as ``couplings_table`` (each rule resamples with
            the same seeds, so rules are compared on the same resamples).
    Returns:
        one row per (rule, coupling): ``rule`` (name), ``kind``, ``value``, ``coupling``,
        ``label``, ``observed``, ``random``, ``lift`` and their ``*_ci``, ``n``, ``n_skipped``,
        ``density`` / ``density_ci`` (peaks of the series the coupling counts, per defined
        token, averaged over responses), ``densities`` ({series: (mean, ci)} for WAAD, FAI and
        receiver FAI), and the paper's ``paper_random`` / ``paper_observed`` / ``paper_lift``.
    """
    series, mask = batch_series(records)
    if series["waad"] is None or series["fai"] is None:
        raise ValueError("coupling_sweep needs waad and fai series in the records")
    config = RhythmConfig(coupling_k=k)
    rows = []
    for rule in rules:
        stats = response_couplings(series["waad"], series["fai"], mask, entropy=series["entropy"],
                                   fai_receiver=series["fai_receiver"], config=config, peak_rule=rule,
                                   fai_global_disjoint=series["fai_global_disjoint"])
        table = couplings_table(stats, n_boot=n_boot, seed=seed)
        densities = {}
        for j, key in enumerate(SERIES):
            if series[key] is None:
                continue
            d = peak_density(rule(series[key], mask), series[key], mask).numpy()
            defined = d[np.isfinite(d)]
            densities[key] = (float(defined.mean()) if defined.size else math.nan,
                              bootstrap_ci(d, n_boot=n_boot, seed=[seed, 100 + j]))
        for name in ALL_COUPLINGS:
            if name not in table:
                continue
            paper = PAPER_TABLE2[PAPER_ROW[name]]
            density = densities.get(PEAKS_COUNTED[name], (math.nan, (math.nan, math.nan)))
            rows.append(dict(rule=rule.name, kind=rule.kind, value=rule.value, coupling=name, **table[name],
                             density=density[0], density_ci=density[1], densities=densities,
                             paper_random=paper["random"], paper_observed=paper["observed"],
                             paper_lift=paper["lift"]))
    return rows


BASELINE_COUPLINGS = ("receiver_global_cooccurrence", "fai_follows_waad")
"""Couplings whose random baseline depends on the peak rule (a share of peak-marked tokens);
coupling (a)'s baseline is the mean entropy of all tokens, the same under every rule and on the
model's own scale, so it says nothing about peak density."""


def closest_to_paper(rows: list[dict], coupling: str | None = None) -> dict | None:
    """The row (``coupling`` given) or the rule (None: summed over ``BASELINE_COUPLINGS``) whose
    random baseline lies nearest the paper's, by absolute difference.  For None, returns
    ``{"rule": name, "distance": sum, "rows": {coupling: row}}``."""
    if coupling is not None:
        candidates = [r for r in rows if r["coupling"] == coupling and math.isfinite(r["random"])]
        return min(candidates, key=lambda r: abs(r["random"] - r["paper_random"])) if candidates else None
    by_rule: dict[str, dict] = {}
    for r in rows:
        if r["coupling"] in BASELINE_COUPLINGS and math.isfinite(r["random"]):
            by_rule.setdefault(r["rule"], {})[r["coupling"]] = r
    complete = {name: rs for name, rs in by_rule.items() if len(rs) == len(BASELINE_COUPLINGS)}
    if not complete:
        return None
    name = min(complete, key=lambda n: sum(abs(r["random"] - r["paper_random"]) for r in complete[n].values()))
    return dict(rule=name, rows=complete[name],
                distance=sum(abs(r["random"] - r["paper_random"]) for r in complete[name].values()))
