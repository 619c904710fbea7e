"""Peak rules, the coupling sweep over them, and two-level verdicts (issue 8, items 1 and 2), on
synthetic series whose peaks and couplings are known by construction."""
import math

import numpy as np
import pytest
import torch

from attnrhythm.core import peak_rules
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.couplings import DISJOINT, couplings_table, find_peaks, response_couplings
from attnrhythm.core.peak_rules import (DEFAULT_RULES, PeakRule, closest_to_paper, coupling_sweep, parse_rule,
                                        peak_density, prominence_peaks)
from attnrhythm.studies.tables import sweep_markdown
from attnrhythm.studies.verdicts import Verdict, summary_line, verdict


# ---------------------------------------------------------------- rules
def test_topq_rule_is_find_peaks():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 40, generator=g, dtype=torch.float64)
    x[1, 30:] = math.nan
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[2, 25:] = False
    for q in (0.1, 0.2, 0.3, 0.4):
        assert torch.equal(PeakRule("topq", q)(x, mask), find_peaks(x, mask, q))


def test_prominence_peaks_known_series():
    x = torch.tensor([0.0, 3.0, 0.0, 1.0, 0.0, 5.0, 4.0, 5.0, 0.0], dtype=torch.float64)
    std = float(x.std(unbiased=False))
    # prominences: 3 (index 1), 1 (index 3), and 5 for both 5s (scipy ignores a peak of the same
    # height when it extends the base line, so neither 5 is "under" the other)
    got = lambda p: torch.nonzero(prominence_peaks(x, None, p / std)).flatten().tolist()  # noqa: E731
    assert got(0.5) == [1, 3, 5, 7]
    assert got(2.0) == [1, 5, 7]
    assert got(4.0) == [5, 7]
    assert got(10.0) == []


def test_prominence_peaks_skip_undefined_positions_and_rows_are_independent():
    from scipy.signal import find_peaks as scipy_find_peaks

    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 30, generator=g, dtype=torch.float64)
    x[0, 10] = math.nan  # a gap: its neighbours become adjacent
    x[1, 20:] = math.nan  # undefined tail (FAI at the end of a response)
    mask = torch.ones(4, 30, dtype=torch.bool)
    mask[2, 15:] = False  # padding
    x[3] = 1.0  # constant: no peaks
    peaks = prominence_peaks(x, mask, 0.5)
    for b in range(3):
        ok = (~torch.isnan(x[b]) & mask[b]).numpy()
        where = np.flatnonzero(ok)
        v = x[b].numpy()[where]
        idx, _ = scipy_find_peaks(v, prominence=0.5 * v.std())
        assert torch.nonzero(peaks[b]).flatten().tolist() == where[idx].tolist()
        assert not peaks[b][~torch.as_tensor(ok)].any()
        one = prominence_peaks(x[b], mask[b], 0.5)
        assert torch.equal(one, peaks[b])
    assert not peaks[3].any()
    assert not prominence_peaks(torch.tensor([1.0, 2.0]), None, 0.1).any()  # fewer than 3 values


def test_density_falls_with_prominence_and_rises_with_q():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 200, generator=g, dtype=torch.float64).cumsum(-1) * 0.2 + torch.randn(8, 200, generator=g,
                                                                                              dtype=torch.float64)
    prom = [float(peak_density(PeakRule("prominence", p)(x), x).mean()) for p in (0.25, 0.5, 1.0, 2.0)]
    topq = [float(peak_density(PeakRule("topq", q)(x), x).mean()) for q in (0.1, 0.2, 0.3, 0.4)]
    assert prom == sorted(prom, reverse=True) and prom[0] > prom[-1]
    assert topq == sorted(topq) and topq[0] < topq[-1]
    assert all(d <= q for d, q in zip(topq, (0.1, 0.2, 0.3, 0.4)))  # peaks are a subset of TopQ


def test_parse_rule_and_bad_rules():
    assert parse_rule("topq:0.2") == PeakRule("topq", 0.2)
    assert parse_rule("prominence:0.5").name == "prominence 0.5 sd"
    with pytest.raises(ValueError, match="topq:Q"):
        parse_rule("peaks:1")
    with pytest.raises(ValueError):
        PeakRule("topq", 1.5)


# ---------------------------------------------------------------- the sweep
def synthetic_records(n=30, length=120, seed=0):
    """WAAD spikes every 10 tokens (isolated, same height, plus small noise); the global FAI
    peaks one token after each WAAD spike, the receiver FAI peaks at the same tokens as the
    global FAI; entropy is high at the WAAD spikes.  So every coupling holds strongly under a
    rule that finds the spikes, and coupling (c)'s random baseline is 4 / 10 (k = 3: the spike
    and the three tokens after it)."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        spikes = np.arange(5, length - 10, 10)
        waad = rng.normal(0, 0.05, length)
        waad[spikes] += 3.0
        fai = rng.normal(0, 0.05, length)
        fai[spikes + 1] += 2.0
        fai[-5:] = np.nan  # undefined tail
        entropy = rng.uniform(0.1, 0.3, length)
        entropy[spikes] += 1.0
        entropy[0] = np.nan
        receiver = fai + rng.normal(0, 0.01, length)
        tolist = lambda a: [None if not np.isfinite(v) else float(v) for v in a]  # noqa: E731
        records.append(dict(waad=tolist(waad), fai=tolist(fai), entropy=tolist(entropy),
                            fai_receiver=tolist(receiver)))
    return records


def test_sweep_rows_and_known_couplings():
    records = synthetic_records()
    rules = [PeakRule("topq", 0.1), PeakRule("topq", 0.4), PeakRule("prominence", 1.0), PeakRule("prominence", 2.0)]
    rows = coupling_sweep(records, rules, n_boot=200)
    assert len(rows) == 3 * len(rules)
    by = {(r["rule"], r["coupling"]): r for r in rows}
    for rule in ("prominence 1 sd", "prominence 2 sd"):
        # these rules find exactly the spikes (11 per 120 tokens)
        c = by[(rule, "fai_follows_waad")]
        assert c["observed"] == pytest.approx(1.0)
        assert c["densities"]["waad"][0] == pytest.approx(11 / 120, abs=0.01)
        assert c["random"] == pytest.approx(44 / 115, abs=0.01)  # spike + 3 after, over the defined FAI tokens
        assert c["lift"] > 1.4
        assert by[(rule, "receiver_global_cooccurrence")]["observed"] == pytest.approx(1.0)
        assert by[(rule, "entropy_at_waad_peaks")]["lift"] > 2
    # top-q 0.1 takes ceil(0.1 n) = 12 values: the 11 spikes and at most one noise bump
    c = by[("top-q 0.1", "fai_follows_waad")]
    assert c["observed"] > 0.9 and c["densities"]["waad"][0] == pytest.approx(0.1, abs=0.01) and c["lift"] > 1.2
    # the loose rule (local maxima among the top 40%) also marks noise bumps: denser, weaker
    loose = by[("top-q 0.4", "fai_follows_waad")]
    assert loose["densities"]["waad"][0] > 0.2 and loose["random"] > by[("top-q 0.1", "fai_follows_waad")]["random"]
    for r in rows:
        lo, hi = r["lift_ci"]
        assert lo <= r["lift"] <= hi and r["n"] == 30
        assert r["density_ci"][0] <= r["density"] <= r["density_ci"][1]


def test_sweep_topq_04_is_the_main_table():
    """The project rule in the sweep gives exactly the numbers of the main pipeline (no rule
    passed: find_peaks at config.peak_q)."""
    records = synthetic_records(n=12, seed=3)
    rows = coupling_sweep(records, [peak_rules.PROJECT_RULE], n_boot=300, seed=5)
    series, mask = peak_rules.batch_series(records)
    main = couplings_table(response_couplings(series["waad"], series["fai"], mask, entropy=series["entropy"],
                                              fai_receiver=series["fai_receiver"], config=RhythmConfig()),
                           n_boot=300, seed=5)
    for r in rows:
        for key in ("observed", "random", "lift", "observed_ci", "random_ci", "lift_ci", "n"):
            assert r[key] == main[r["coupling"]][key], (r["coupling"], key)


def test_sweep_without_receiver_series():
    records = [{k: v for k, v in r.items() if k != "fai_receiver"} for r in synthetic_records(n=5)]
    rows = coupling_sweep(records, [PeakRule("topq", 0.2)], n_boot=50)
    assert {r["coupling"] for r in rows} == {"entropy_at_waad_peaks", "fai_follows_waad"}


def test_closest_to_paper_markdown_and_figure(tmp_path):
    rows = coupling_sweep(synthetic_records(n=10), DEFAULT_RULES, n_boot=100)
    best = closest_to_paper(rows)
    dist = {}
    for r in rows:
        if r["coupling"] in peak_rules.BASELINE_COUPLINGS:
            dist[r["rule"]] = dist.get(r["rule"], 0) + abs(r["random"] - r["paper_random"])
    assert best["rule"] == min(dist, key=dist.get)
    one = closest_to_paper(rows, "fai_follows_waad")
    assert abs(one["random"] - one["paper_random"]) == min(abs(r["random"] - r["paper_random"]) for r in rows
                                                             if r["coupling"] == "fai_follows_waad")
    text = sweep_markdown(rows)
    assert all(rule.name in text for rule in DEFAULT_RULES)
    assert f"**{best['rule']}**" in text
    from attnrhythm.studies.figures import sweep_figure

    sweep_figure(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000


# ---------------------------------------------------------------- two-level verdicts
@pytest.mark.parametrize("ci, paper, null, label, direction, magnitude", [
    # REPRODUCTION.md's SmolLM2 numbers
    ((0.226, 0.278), 0.5197, 0.0, "direction reproduced, magnitude not", "reproduced", "not reproduced"),
    ((0.789, 0.986), 1.7149, 0.0, "direction reproduced, magnitude not", "reproduced", "not reproduced"),
    ((-0.016, 0.026), 0.4247, 0.0, "direction inconclusive, magnitude not", "inconclusive", "not reproduced"),
    ((-0.071, -0.008), -0.097, 0.0, "direction reproduced, magnitude not", "reproduced", "not reproduced"),
    ((0.51, 0.70), 0.8714, 0.5, "direction reproduced, magnitude not", "reproduced", "not reproduced"),
    # Gemma's Table 1: the paper's value inside an interval spanning a factor 50 -> undetermined
    ((-0.219, -0.004), -0.097, 0.0, "direction reproduced, magnitude undetermined", "reproduced", "undetermined"),
    # and the other cases: inside and within a factor 2 of the paper's effect (0.26 to 1.04)
    ((0.40, 0.60), 0.52, 0.0, "direction and magnitude reproduced", "reproduced", "reproduced"),
    ((0.26, 1.04), 0.52, 0.0, "direction and magnitude reproduced", "reproduced", "reproduced"),  # the edges
    ((0.25, 0.60), 0.52, 0.0, "direction reproduced, magnitude undetermined", "reproduced", "undetermined"),
    ((0.40, 1.05), 0.52, 0.0, "direction reproduced, magnitude undetermined", "reproduced", "undetermined"),
    ((-0.10, 0.60), 0.52, 0.0, "inconclusive: the interval includes no effect and the paper's value",
     "inconclusive", "undetermined"),
    ((-0.30, -0.10), 0.52, 0.0, "not reproduced: opposite direction", "opposite", "not reproduced"),
    ((-0.12, -0.08), -0.097, 0.0, "direction and magnitude reproduced", "reproduced", "reproduced"),
    # a share: the effect is measured from 50% (paper 87.1% -> effect 0.371, factor 2: 68.6% to 124%)
    ((0.70, 0.95), 0.8714, 0.5, "direction and magnitude reproduced", "reproduced", "reproduced"),
    ((0.60, 0.95), 0.8714, 0.5, "direction reproduced, magnitude undetermined", "reproduced", "undetermined"),
])
def test_verdict_levels(ci, paper, null, label, direction, magnitude):
    v = verdict(ci, paper, null=null, n=100)
    assert (v.label, v.direction, v.magnitude) == (label, direction, magnitude)


def test_magnitude_rule_against_a_reference():
    """The magnitude level against the rule of issue 18 written out on its own, over a grid of
    intervals around positive and negative paper values and nulls 0 and 0.5."""
    def reference(lo, hi, paper, null):
        if not lo <= paper <= hi:
            return "not reproduced"
        e, a, b = paper - null, lo - null, hi - null
        inside = (e / 2 <= a and b <= 2 * e) if e > 0 else (2 * e <= a and b <= e / 2)
        return "reproduced" if inside else "undetermined"

    grid = np.linspace(-1.5, 1.5, 31)
    for paper, null in ((0.52, 0.0), (-0.097, 0.0), (0.8714, 0.5), (0.2, 0.5)):
        for lo in grid:
            for hi in grid[grid >= lo]:
                assert verdict((lo, hi), paper, null=null, n=100).magnitude == reference(lo, hi, paper, null)


def test_verdict_wording_says_which_side():
    v = verdict((0.226, 0.278), 0.5197, n=100)
    assert "above the interval (our effect is smaller)" in v.why and "paper's side" in v.why
    v = verdict((-0.071, -0.008), -0.097, n=100)
    assert "below the interval (our effect is smaller)" in v.why
    v = verdict((0.6, 0.7), 0.52, n=100)
    assert "below the interval (our effect is larger)" in v.why
    assert "too wide to say" in verdict((-0.219, -0.004), -0.097, n=21).why


def test_verdict_inconclusive_cases_and_direction():
    assert verdict(None, 0.5).label == "inconclusive"
    assert verdict((math.nan, 1.0), 0.5).direction == "inconclusive"
    small = verdict((0.3, 0.6), 0.5, n=5)
    assert (small.direction, small.magnitude) == ("inconclusive", "undetermined") and "fewer than 10" in small.why
    assert verdict((0.3, 0.6), 0.5, n=5, judge_magnitude=False).magnitude == "not judged"
    sign_only = verdict((0.1, 0.2), 0.52, n=100, judge_magnitude=False)
    assert sign_only.label == "direction reproduced (magnitude not judged)" and sign_only.reproduced
    # an explicit direction overrides the paper's sign; a paper value at null needs one
    assert verdict((-0.3, -0.1), 0.0, "less", n=100).direction == "reproduced"
    with pytest.raises(ValueError, match="direction"):
        verdict((0.1, 0.2), 0.0)
    with pytest.raises(ValueError, match="direction must be"):
        verdict((0.1, 0.2), 0.5, "up")


def test_summary_line():
    vs = [verdict((0.226, 0.278), 0.52, n=100), verdict((0.4, 0.6), 0.52, n=100),
          verdict((-0.016, 0.026), 0.42, n=100), verdict((0.1, 0.2), 0.52, n=100, judge_magnitude=False),
          verdict((-0.3, -0.1), 0.52, n=100), verdict((0.1, 2.0), 0.52, n=100)]
    assert all(isinstance(v, Verdict) for v in vs)
    assert summary_line(vs) == ("6 claims: direction reproduced in 4, inconclusive in 1, opposite in 1; magnitude "
                                "reproduced in 1, not reproduced in 3, undetermined in 1 (magnitude not judged in 1: "
                                "the paper gives no number)")


def test_sweep_with_disjoint_head_sets():
    """The disjoint co-occurrence counts the receiver-FAI peaks among the peaks of the series
    given as ``fai_global_disjoint``: the global FAI itself gives the co-occurrence row's
    values; noise unrelated to the receiver peaks gives a lift near 0."""
    records = synthetic_records(n=20)
    same = [dict(r, fai_global_disjoint=r["fai"]) for r in records]
    rows = coupling_sweep(same, [PeakRule("topq", 0.1)], n_boot=100)
    by = {r["coupling"]: r for r in rows}
    assert by[DISJOINT]["label"] != by["receiver_global_cooccurrence"]["label"]
    for key in ("observed", "random", "lift", "n", "density"):
        assert by[DISJOINT][key] == by["receiver_global_cooccurrence"][key], key
    assert by[DISJOINT]["paper_lift"] == by["receiver_global_cooccurrence"]["paper_lift"]
    rng = np.random.default_rng(5)
    noise = [dict(r, fai_global_disjoint=[float(v) for v in rng.normal(0, 1, len(r["fai"]))]) for r in records]
    by = {r["coupling"]: r for r in coupling_sweep(noise, [PeakRule("topq", 0.1)], n_boot=200)}
    assert by["receiver_global_cooccurrence"]["lift"] > 3
    assert by[DISJOINT]["lift_ci"][0] < 0 < by[DISJOINT]["lift_ci"][1]  # no coupling left
