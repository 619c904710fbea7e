"""Percentile bootstrap intervals: the one home for resampling in the package.

Every interval the studies print is a percentile bootstrap over independent units (problems,
or seeds then problems), drawn with numpy's ``default_rng(seed)``:

* :func:`resample_indices` ``(n, n_boot, seed) -> [n_boot, n]`` draws; callers that compute
  several statistics from the *same* resamples (a ratio of two means, a paired difference) index
  their arrays with one draw.
* :func:`percentile_interval` the ``level`` interval of bootstrap replicates.
* :func:`bootstrap_ci` one statistic of one sample (NaN values dropped first).
* :func:`paired_difference` mean of ``after - before`` over paired units, with its interval.
* :func:`clustered_ci` two levels: resample outer units (e.g. seeds), then inner units (e.g.
  problems) of a ``[units, items]`` array.

``seed`` is anything ``numpy.random.default_rng`` takes (an int or a list of ints: ``[seed,
stream]`` gives independent streams for statistics that must not share draws).  The draws are
``default_rng(seed).integers(0, n, size=(n_boot, n))``, so a function here reproduces any interval
computed that way before it moved here.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 2000


def resample_indices(n: int, n_boot: int = N_BOOT, seed=0) -> np.ndarray:
    """``[n_boot, n]`` int64 indices into n units, drawn with replacement."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"need at least one unit and one resample, got n={n}, n_boot={n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _tails(level: float) -> list[float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = round(50.0 * (1.0 - level), 9)  # 2.5 exactly for 0.95 (not 2.500000000000002)
    return [tail, 100.0 - tail]


def percentile_interval(replicates, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates ``[n_boot]`` (numpy's
    linear interpolation; a NaN replicate makes the interval NaN, as it should: the statistic is
    undefined on some resample)."""
    lo, hi = np.percentile(np.asarray(replicates, dtype=np.float64), _tails(level))
    return (float(lo), float(hi))


def _finite(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] | None = None, *,
                 n_boot: int = N_BOOT, seed=0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of ``statistic`` (None: the mean) over ``values``, one value per unit,
    resampled with replacement; NaN values are dropped first.  (nan, nan) when none is left."""
    x = _finite(values)
    if x.size == 0:
        return (math.nan, math.nan)
    idx = resample_indices(x.size, n_boot, seed)
    boot = x[idx].mean(1) if statistic is None else np.array([statistic(x[row]) for row in idx])
    return percentile_interval(boot, level)


def paired_difference(before, after, *, n_boot: int = N_BOOT, seed=0, level: float = LEVEL) -> dict:
    """``after - before`` over paired units (``[n]`` each, unit i of one paired with unit i of the
    other; pairs with a NaN are dropped): ``{"mean", "ci": (lo, hi), "n"}``, the interval from
    resampling pairs."""
    a, b = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (before, after))
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same length, got {a.shape} and {b.shape}")
    diff = (b - a)[np.isfinite(a) & np.isfinite(b)]
    if diff.size == 0:
        return dict(mean=math.nan, ci=(math.nan, math.nan), n=0)
    return dict(mean=float(diff.mean()), ci=bootstrap_ci(diff, n_boot=n_boot, seed=seed, level=level),
                n=int(diff.size))


def clustered_replicates(values, *, n_boot: int = N_BOOT, seed=0, shared_items: bool = True) -> np.ndarray:
    """``[n_boot]`` two-level bootstrap replicates of the grand mean of ``values`` ``[units, items]``
    (e.g. seeds x problems): each resample draws units with replacement, then items with
    replacement, and averages the chosen cells.

    ``shared_items`` True (crossed design: the same items under every unit, e.g. one test set
    evaluated by every seed) draws one set of items per resample for all chosen units, keeping
    each item's pairing across units; False (nested design: each unit has its own items) draws
    the items anew for each chosen unit.  NaN cells are not allowed (average or drop them first).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"clustered_ci needs a non-empty [units, items] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("clustered_ci needs finite values in every cell")
    n_units, n_items = x.shape
    rng = np.random.default_rng(seed)
    units = rng.integers(0, n_units, size=(n_boot, n_units))
    if shared_items:
        items = rng.integers(0, n_items, size=(n_boot, 1, n_items))
    else:
        items = rng.integers(0, n_items, size=(n_boot, n_units, n_items))
    return x[units[:, :, None], items].mean((1, 2))


def clustered_ci(values, *, n_boot: int = N_BOOT, seed=0, level: float = LEVEL,
                 shared_items: bool = True) -> tuple[float, float]:
    """Two-level percentile interval of the grand mean of ``values`` ``[units, items]``
    (:func:`clustered_replicates`)."""
    return percentile_interval(clustered_replicates(values, n_boot=n_boot, seed=seed, shared_items=shared_items),
                               level)


def two_sided_p(replicates) -> float:
    """Two-sided bootstrap p-value of 'the statistic is 0': twice the smaller share of
    replicates on either side of 0 (at most 1)."""
    boot = np.asarray(replicates, dtype=np.float64)
    return float(min(1.0, 2 * min((boot <= 0).mean(), (boot >= 0).mean())))
