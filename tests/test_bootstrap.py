"""core/bootstrap.py against explicit loops (one resample at a time, float64), the draws the
studies' intervals were computed with before the module existed, and the behaviour of the
two-level variant on data whose variance sits at one level only."""
import math

import numpy as np
import pytest

from attnrhythm.core.bootstrap import (bootstrap_ci, clustered_ci, paired_difference, percentile_interval,
                                       resample_indices)


def loop_percentile(replicates, level):
    """The percentile interval by sorting and linear interpolation, written out."""
    x = sorted(float(v) for v in replicates)
    out = []
    for p in ((1 - level) / 2, (1 + level) / 2):
        pos = p * (len(x) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(x) - 1)
        out.append(x[lo] + (pos - lo) * (x[hi] - x[lo]))
    return tuple(out)


def test_resample_indices_are_the_documented_draws():
    idx = resample_indices(7, 50, [3, 1])
    assert idx.shape == (50, 7) and idx.min() >= 0 and idx.max() < 7
    assert np.array_equal(idx, np.random.default_rng([3, 1]).integers(0, 7, size=(50, 7)))
    assert not np.array_equal(idx, resample_indices(7, 50, [3, 2]))
    with pytest.raises(ValueError):
        resample_indices(0, 10)


@pytest.mark.parametrize("level", [0.95, 0.9, 0.5])
def test_percentile_interval_against_a_loop(level):
    reps = np.random.default_rng(0).normal(size=401)
    assert percentile_interval(reps, level) == pytest.approx(loop_percentile(reps, level), rel=1e-12)
    assert all(math.isnan(v) for v in percentile_interval([1.0, math.nan, 2.0]))  # undefined on a resample


def test_bootstrap_ci_against_a_loop():
    values = np.random.default_rng(1).exponential(size=25)
    values[[3, 9]] = np.nan  # dropped before resampling
    kept = values[np.isfinite(values)]
    draws = np.random.default_rng(4).integers(0, kept.size, size=(300, kept.size))
    means = [sum(kept[i] for i in row) / kept.size for row in draws]
    assert bootstrap_ci(values, n_boot=300, seed=4) == pytest.approx(loop_percentile(means, 0.95), rel=1e-12)
    medians = [float(np.median(kept[row])) for row in draws]
    assert bootstrap_ci(values, np.median, n_boot=300, seed=4) == pytest.approx(loop_percentile(medians, 0.95))
    assert bootstrap_ci([np.nan, 2.0, 2.0]) == (2.0, 2.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_paired_difference_resamples_pairs():
    rng = np.random.default_rng(2)
    before = rng.uniform(size=40)
    after = before + 0.1 + rng.normal(0, 0.01, 40)  # a small, consistent gain over a large spread
    before[5] = np.nan  # that pair is dropped
    got = paired_difference(before, after, n_boot=500, seed=7)
    diff = (after - before)[np.isfinite(before)]
    assert got["n"] == 39 and got["mean"] == pytest.approx(diff.mean())
    assert got["ci"] == bootstrap_ci(diff, n_boot=500, seed=7)
    assert 0.09 < got["ci"][0] < got["mean"] < got["ci"][1] < 0.11  # pairing removes the spread of `before`
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0], [1.0, 2.0])


def loop_clustered(values, n_boot, seed, shared_items):
    """Two levels written out: per resample, units with replacement, then items (one draw for all
    units, or one per unit), the mean of the chosen cells; the generator used in that order."""
    rng = np.random.default_rng(seed)
    n_units, n_items = values.shape
    units = rng.integers(0, n_units, size=(n_boot, n_units))
    items = rng.integers(0, n_items, size=(n_boot, 1 if shared_items else n_units, n_items))
    out = []
    for b in range(n_boot):
        cells = [values[units[b, j], items[b, 0 if shared_items else j, i]]
                 for j in range(n_units) for i in range(n_items)]
        out.append(sum(cells) / len(cells))
    return loop_percentile(out, 0.95)


@pytest.mark.parametrize("shared_items", [True, False])
def test_clustered_ci_against_a_loop(shared_items):
    values = np.random.default_rng(3).normal(size=(4, 9))
    got = clustered_ci(values, n_boot=200, seed=5, shared_items=shared_items)
    assert got == pytest.approx(loop_clustered(values, 200, 5, shared_items), rel=1e-12)


def test_clustered_ci_sees_each_level():
    rng = np.random.default_rng(0)
    items = rng.normal(0, 1, 60)
    # seeds that differ only by a constant: the unit level carries variance an items-only bootstrap misses
    by_seed = np.stack([items + shift for shift in (-1.0, 0.0, 1.0, 2.0)])
    two_level = clustered_ci(by_seed, n_boot=2000, seed=1)
    flat = bootstrap_ci(by_seed.mean(0), n_boot=2000, seed=1)
    assert two_level[1] - two_level[0] > 2 * (flat[1] - flat[0])
    # identical seeds: the unit level adds nothing, the interval is the items' interval
    same = np.stack([items] * 4)
    width = np.diff(clustered_ci(same, n_boot=2000, seed=1))[0]
    assert width == pytest.approx(np.diff(bootstrap_ci(items, n_boot=2000, seed=2))[0], rel=0.15)
    # crossed design: an item effect shared by every seed is resampled once per resample (kept
    # correlated), so the interval is wider than when each seed draws its own items
    assert np.diff(clustered_ci(same, n_boot=2000, seed=1, shared_items=False))[0] < 0.7 * width
    with pytest.raises(ValueError, match="finite"):
        clustered_ci(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="units, items"):
        clustered_ci(np.ones(3))
