"""Couplings between the attention rhythm and token entropy (docs/method.md section 5, Table 2).

Per-response statistics are batched: series are ``[B, T]`` with a bool ``mask`` (or ``[T]``,
``mask=None``), one row per problem, and every statistic returns ``(observed [B], random [B])``
as float64, NaN where the statistic is undefined for that row (e.g. no peaks).  The
aggregation over problems, with bootstrap intervals, is ``couplings_table``.

Peaks (*Decision*, the paper does not define them; ``find_peaks``): a position is a peak when it
is a local maximum (strictly greater than its left neighbour, not smaller than its right one)
and lies in TopQ(series, peak_q).  Every statistic takes ``peak_rule`` instead: any function
``(series [B, T], mask [B, T] | None) -> peaks bool [B, T]`` (the sweep over peak rules,
``peak_rules.py``, passes top-q and prominence rules); None is ``find_peaks`` with ``peak_q``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from typing import Callable

from torch import Tensor

from attnrhythm.core.bootstrap import percentile_interval, resample_indices
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.topq import defined_positions, top_q_mask

COUPLINGS = ("entropy_at_waad_peaks", "receiver_global_cooccurrence", "fai_follows_waad")

PAPER_TABLE2 = {
    "entropy_at_waad_peaks": dict(label="entropy at WAAD peaks", unit="value",
                                  random=0.2386, observed=0.3608, lift=0.5197),
    "receiver_global_cooccurrence": dict(label="receiver & global FAI peak co-occurrence", unit="share",
                                         random=0.2241, observed=0.6084, lift=1.7149),
    "fai_follows_waad": dict(label="FAI peak follows or coincides with a WAAD peak", unit="share",
                             random=0.3687, observed=0.5253, lift=0.4247),
}
"""Li et al. (arXiv 2510.13554) Table 2 as printed.  Note: the first row's lift does not follow
from its rounded means (0.3608 / 0.2386 - 1 = +51.2%, printed +51.97%); the other two do."""

DISJOINT = "receiver_global_cooccurrence_disjoint"
"""Coupling (b) with disjoint head sets: the global-head FAI formed without the receiver heads,
so a head in both sets cannot make the two FAI peaks coincide by construction.  Not in the
paper; compared with its co-occurrence row (``PAPER_ROW``)."""
ALL_COUPLINGS = COUPLINGS + (DISJOINT,)
LABELS = {**{name: row["label"] for name, row in PAPER_TABLE2.items()},
          DISJOINT: "receiver & global FAI peak co-occurrence, disjoint head sets"}
PAPER_ROW = {**{name: name for name in COUPLINGS}, DISJOINT: "receiver_global_cooccurrence"}
"""The paper's Table 2 row each coupling is set beside."""
RECEIVER_COUPLINGS = ("receiver_global_cooccurrence", DISJOINT)
"""The couplings that depend on the receiver heads."""


def _batched(*xs):
    """Add a batch dim to 1-D inputs (None passes through); returns (squeeze, xs)."""
    squeeze = xs[0].dim() == 1
    return squeeze, [x if x is None or not squeeze else x[None] for x in xs]


def find_peaks(series: Tensor, mask: Tensor | None = None, q: float = 0.4) -> Tensor:
    """Peaks of a per-token series.

    A defined position t (real token, non-NaN) is a peak when ``x[t] > x[t-1]``,
    ``x[t] >= x[t+1]`` and t is in ``TopQ(x, q)`` (``topq.top_q_mask``: ceil(q n) of the n
    defined values, ties to the earlier position).  A missing neighbour -- before the first token,
    after the last real one, padding, or NaN -- imposes no condition: the first token is compared
    to its right neighbour only, the last defined one to its left neighbour only.

    Args:
        series: ``[B, T]`` or ``[T]`` float; mask: bool like it or None.
    Returns:
        bool like ``series``.
    """
    squeeze, (x, mask) = _batched(series.detach(), mask)
    defined = defined_positions(x, mask)
    filled = torch.where(defined, x, torch.zeros_like(x))
    left = F.pad(filled, (1, 0))[:, :-1]
    left_ok = F.pad(defined, (1, 0), value=False)[:, :-1]
    right = F.pad(filled, (0, 1))[:, 1:]
    right_ok = F.pad(defined, (0, 1), value=False)[:, 1:]
    local_max = (~left_ok | (filled > left)) & (~right_ok | (filled >= right))
    peaks = defined & local_max & top_q_mask(x, defined, q)
    return peaks[0] if squeeze else peaks


PeakRule = Callable[[Tensor, "Tensor | None"], Tensor]


def _peaks(series: Tensor, mask: Tensor | None, peak_q: float, peak_rule: PeakRule | None) -> Tensor:
    """Peaks of ``[B, T]`` series by ``peak_rule``, or by ``find_peaks`` at ``peak_q`` when None."""
    return find_peaks(series, mask, peak_q) if peak_rule is None else peak_rule(series, mask)


def _share(numer: Tensor, denom: Tensor) -> Tensor:
    """Per-row ratio of two counts (or sums) ``[B]``, NaN where the denominator is 0."""
    numer, denom = numer.to(torch.float64), denom.to(torch.float64)
    return torch.where(denom > 0, numer / denom.clamp(min=1e-300), torch.full_like(numer, math.nan))


def _paired(observed: Tensor, random: Tensor, squeeze: bool) -> tuple[Tensor, Tensor]:
    """NaN the baseline where the observed value is undefined, so both skip the same rows."""
    random = torch.where(torch.isnan(observed), torch.full_like(random, math.nan), random)
    return (observed[0], random[0]) if squeeze else (observed, random)


def entropy_at_waad_peaks(entropy: Tensor, waad: Tensor, mask: Tensor | None = None,
                          peak_q: float = 0.4, peak_rule: PeakRule | None = None) -> tuple[Tensor, Tensor]:
    """Coupling (a).  observed = mean entropy at WAAD peaks; random = mean entropy over all
    response tokens (tokens with NaN entropy are left out of both).  ``[B, T] -> ([B], [B])``."""
    squeeze, (entropy, waad, mask) = _batched(entropy.detach(), waad.detach(), mask)
    ent_ok = defined_positions(entropy, mask)
    h = torch.where(ent_ok, entropy, torch.zeros_like(entropy)).to(torch.float64)
    at_peak = _peaks(waad, mask, peak_q, peak_rule) & ent_ok
    observed = _share((h * at_peak).sum(-1), at_peak.sum(-1))
    random = _share(h.sum(-1), ent_ok.sum(-1))
    return _paired(observed, random, squeeze)


def receiver_global_cooccurrence(fai_receiver: Tensor, fai_global: Tensor, mask: Tensor | None = None,
                                 peak_q: float = 0.4, peak_rule: PeakRule | None = None) -> tuple[Tensor, Tensor]:
    """Coupling (b).  observed = share of receiver-head FAI peaks that are also global-head FAI
    peaks; random = share of global-FAI peaks among the defined global-FAI tokens.
    ``[B, T] -> ([B], [B])``."""
    squeeze, (fai_receiver, fai_global, mask) = _batched(fai_receiver.detach(), fai_global.detach(), mask)
    recv_peaks = _peaks(fai_receiver, mask, peak_q, peak_rule)
    glob_peaks = _peaks(fai_global, mask, peak_q, peak_rule)
    observed = _share((recv_peaks & glob_peaks).sum(-1), recv_peaks.sum(-1))
    random = _share(glob_peaks.sum(-1), defined_positions(fai_global, mask).sum(-1))
    return _paired(observed, random, squeeze)


def within_k_after(peaks: Tensor, k: int) -> Tensor:
    """Positions t with some peak u, t-k <= u <= t (the peak itself and the k tokens after it).
    bool ``[B, T] -> [B, T]``."""
    n_pos = peaks.shape[-1]
    padded = F.pad(peaks, (k, 0), value=False)
    return torch.stack([padded[..., k - o: k - o + n_pos] for o in range(k + 1)]).any(0)


def fai_follows_waad(fai: Tensor, waad: Tensor, mask: Tensor | None = None, k: int = 3,
                     peak_q: float = 0.4, peak_rule: PeakRule | None = None) -> tuple[Tensor, Tensor]:
    """Coupling (c).  observed = share of FAI peaks at a WAAD peak or within k tokens after one;
    random = its expectation when the FAI peaks are moved to a uniformly random subset of the
    defined FAI positions of the same size, in closed form: the expected share of a uniform
    m-subset equals (defined positions within k after a WAAD peak) / (defined positions).
    ``[B, T] -> ([B], [B])``; see ``fai_follows_waad_shuffled_mc`` for the Monte-Carlo version."""
    squeeze, (fai, waad, mask) = _batched(fai.detach(), waad.detach(), mask)
    fai_peaks = _peaks(fai, mask, peak_q, peak_rule)
    near = within_k_after(_peaks(waad, mask, peak_q, peak_rule), k)
    defined = defined_positions(fai, mask)
    observed = _share((fai_peaks & near).sum(-1), fai_peaks.sum(-1))
    random = _share((near & defined).sum(-1), defined.sum(-1))
    return _paired(observed, random, squeeze)


def fai_follows_waad_shuffled_mc(fai: Tensor, waad: Tensor, mask: Tensor | None = None, k: int = 3,
                                 peak_q: float = 0.4, n_shuffles: int = 1000,
                                 generator: torch.Generator | None = None, peak_rule: PeakRule | None = None) -> Tensor:
    """Monte-Carlo baseline of coupling (c): shuffle the FAI peak positions uniformly among the
    defined FAI positions (count kept) ``n_shuffles`` times and average the share.  ``[B]``
    (NaN for rows without FAI peaks).  Used to check the closed form of ``fai_follows_waad``."""
    squeeze, (fai, waad, mask) = _batched(fai.detach(), waad.detach(), mask)
    n_peaks = _peaks(fai, mask, peak_q, peak_rule).sum(-1)
    near = within_k_after(_peaks(waad, mask, peak_q, peak_rule), k)
    defined = defined_positions(fai, mask)
    out = torch.full((fai.shape[0],), math.nan, dtype=torch.float64)
    for b in range(fai.shape[0]):  # a loop over problems; each is vectorised over shuffles
        m = int(n_peaks[b])
        if m == 0:
            continue
        near_defined = near[b][defined[b]].to(torch.float64)
        keys = torch.rand(n_shuffles, near_defined.numel(), generator=generator, dtype=torch.float64)
        chosen = keys.argsort(-1)[:, :m]  # a uniform m-subset per shuffle
        out[b] = near_defined[chosen].mean(-1).mean()
    return out[0] if squeeze else out


def response_couplings(waad: Tensor, fai_global: Tensor, mask: Tensor | None = None,
                       entropy: Tensor | None = None, fai_receiver: Tensor | None = None,
                       config: RhythmConfig = RhythmConfig(),
                       peak_rule: PeakRule | None = None,
                       fai_global_disjoint: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    """All couplings available from the given series, ``{name: {"observed": [B], "random": [B]}}``
    (a coupling whose input is None is left out; ``fai_global_disjoint``, the global-head FAI
    without the receiver heads, adds ``DISJOINT``).  Uses ``config.coupling_k`` and ``peak_rule``
    (None: ``find_peaks`` at ``config.peak_q``)."""
    stats = {}
    q = config.peak_q
    if entropy is not None:
        stats["entropy_at_waad_peaks"] = entropy_at_waad_peaks(entropy, waad, mask, q, peak_rule)
    if fai_receiver is not None:
        stats["receiver_global_cooccurrence"] = receiver_global_cooccurrence(fai_receiver, fai_global, mask, q,
                                                                             peak_rule)
        if fai_global_disjoint is not None:
            stats[DISJOINT] = receiver_global_cooccurrence(fai_receiver, fai_global_disjoint, mask, q, peak_rule)
    stats["fai_follows_waad"] = fai_follows_waad(fai_global, waad, mask, config.coupling_k, q, peak_rule)
    return {name: dict(observed=o, random=r) for name, (o, r) in stats.items()}


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def couplings_table(per_response_stats, n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Table 2 aggregated over problems.

    Args:
        per_response_stats: ``{name: {"observed": [n], "random": [n]}}`` (tensors, arrays or
            lists; one value per problem), or a list of such dicts (e.g. one per batch), which
            are concatenated.
        n_boot: bootstrap resamples; seed: numpy seed (coupling i of ``ALL_COUPLINGS`` resamples
            with ``default_rng([seed, i])``, whatever other couplings are present).
    Returns:
        ``{name: {...}}`` with ``observed`` and ``random`` = means of the per-problem values over
        the problems where both are finite (the others are skipped and counted in
        ``n_skipped``), ``lift = (observed - random) / random`` (a ratio of the means), their
        95% percentile bootstrap intervals ``*_ci`` (problems resampled with replacement,
        the three statistics from the same resamples), ``n``, ``n_skipped``, ``n_boot``, ``label``.
    """
    if isinstance(per_response_stats, (list, tuple)):
        names = [n for n in ALL_COUPLINGS if any(n in d for d in per_response_stats)]
        per_response_stats = {n: {key: np.concatenate([_as_numpy(d[n][key]) for d in per_response_stats if n in d])
                                  for key in ("observed", "random")} for n in names}
    table = {}
    names = ([n for n in ALL_COUPLINGS if n in per_response_stats]
             + [n for n in per_response_stats if n not in ALL_COUPLINGS])
    for name in names:
        # the stream depends on the coupling, not on which other couplings are present
        stream = ALL_COUPLINGS.index(name) if name in ALL_COUPLINGS else len(ALL_COUPLINGS) + names.index(name)
        obs, rnd = _as_numpy(per_response_stats[name]["observed"]), _as_numpy(per_response_stats[name]["random"])
        if obs.shape != rnd.shape:
            raise ValueError(f"{name}: observed and random have different lengths {obs.shape} vs {rnd.shape}")
        keep = np.isfinite(obs) & np.isfinite(rnd)
        obs, rnd = obs[keep], rnd[keep]
        n = int(keep.sum())
        row = dict(label=LABELS.get(name, name), n=n, n_skipped=int((~keep).sum()),
                   n_boot=n_boot)
        nan2 = (math.nan, math.nan)
        if n == 0:
            row.update(observed=math.nan, random=math.nan, lift=math.nan,
                       observed_ci=nan2, random_ci=nan2, lift_ci=nan2)
        else:
            idx = resample_indices(n, n_boot, [seed, stream])  # one draw for the three statistics
            boot_obs, boot_rnd = obs[idx].mean(1), rnd[idx].mean(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                boot_lift = (boot_obs - boot_rnd) / boot_rnd
                lift = (obs.mean() - rnd.mean()) / rnd.mean()
            row.update(observed=float(obs.mean()), random=float(rnd.mean()), lift=float(lift),
                       observed_ci=percentile_interval(boot_obs), random_ci=percentile_interval(boot_rnd),
                       lift_ci=percentile_interval(boot_lift))
        table[name] = row
    return table
