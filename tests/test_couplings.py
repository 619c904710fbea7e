"""couplings.py against float64 loop re-implementations, planted peaks with known lifts,
the closed-form shuffle baseline, and the bootstrap aggregation."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.couplings import (DISJOINT, PAPER_TABLE2, couplings_table, entropy_at_waad_peaks,
                                       fai_follows_waad, fai_follows_waad_shuffled_mc, find_peaks,
                                       receiver_global_cooccurrence, response_couplings)
from attnrhythm.studies.tables import couplings_markdown

NAN = math.nan


# ---------------------------------------------------------------- reference loops
def ref_peaks(x, n_real, q):
    """Peaks of x[:n_real] (list, NaN undefined): local max (> left, >= right; missing or NaN
    neighbours impose nothing) within the ceil(q n) largest defined values (ties: earlier)."""
    ok = [t < n_real and not math.isnan(x[t]) for t in range(len(x))]
    cand = sorted((t for t in range(len(x)) if ok[t]), key=lambda t: (-x[t], t))
    top = set(cand[:math.ceil(Fraction(str(q)) * len(cand))])
    peaks = set()
    for t in top:
        left_ok = t == 0 or not ok[t - 1] or x[t] > x[t - 1]
        right_ok = t + 1 >= len(x) or not ok[t + 1] or x[t] >= x[t + 1]
        if left_ok and right_ok:
            peaks.add(t)
    return peaks


def ref_mean(values):
    return sum(values) / len(values) if values else NAN


def ref_stats(waad, fai, fai_recv, entropy, n, q, k):
    defined = [t for t in range(n) if not math.isnan(fai[t])]
    pw, pf, pr = ref_peaks(waad, n, q), ref_peaks(fai, n, q), ref_peaks(fai_recv, n, q)
    near = {t for t in range(n) if any(u in pw for u in range(t - k, t + 1))}
    ent = [t for t in range(n) if not math.isnan(entropy[t])]
    out = {}
    obs = ref_mean([entropy[t] for t in pw if t in ent])
    out["entropy_at_waad_peaks"] = (obs, NAN if math.isnan(obs) else ref_mean([entropy[t] for t in ent]))
    obs = len(pr & pf) / len(pr) if pr else NAN
    out["receiver_global_cooccurrence"] = (obs, NAN if math.isnan(obs) else len(pf) / len(defined))
    obs = len(pf & near) / len(pf) if pf else NAN
    out["fai_follows_waad"] = (obs, NAN if math.isnan(obs) else len(near & set(defined)) / len(defined))
    return out


def random_series(seed, B=6, T=24, levels=4):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = torch.arange(T)[None] < lengths[:, None]
    coarse = lambda: torch.randint(0, levels, (B, T), generator=g).double()  # noqa: E731  (plateaus, ties)
    waad = coarse() * mask
    fai, fai_recv = coarse(), coarse()
    tail = torch.arange(T)[None] >= lengths[:, None] - 4
    fai[tail | ~mask] = NAN
    fai_recv[tail | ~mask] = NAN
    entropy = torch.rand(B, T, generator=g, dtype=torch.float64)
    entropy[:, 0] = NAN  # as the capture gives it for a sequence's first token
    return waad, fai, fai_recv, entropy, mask, lengths


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)


# ---------------------------------------------------------------- peaks
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("q", [0.2, 0.4, 1.0])
def test_find_peaks_matches_reference(seed, q):
    waad, fai, _, _, mask, lengths = random_series(seed)
    for series in (waad, fai):
        peaks = find_peaks(series, mask, q)
        for b, n in enumerate(lengths.tolist()):
            assert {t for t in range(series.shape[1]) if peaks[b, t]} == ref_peaks(series[b].tolist(), n, q)


def test_find_peaks_hand_cases():
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 5.0, NAN, 4.0, 1.0, 6.0])
    # 0: no left, 3 >= 1 -> peak; 2: > 1 and >= 2 (plateau start) -> peak; 3: not > left;
    # 5: right is NaN -> only left; 7: left NaN -> only right; 9: last, only left
    assert find_peaks(x, None, 1.0).nonzero().flatten().tolist() == [0, 2, 5, 7, 9]
    # top 0.4 of the 9 defined values = ceil(3.6) = 4 largest: 6, 5, 4, 3
    assert find_peaks(x, None, 0.4).nonzero().flatten().tolist() == [0, 5, 7, 9]
    mask = torch.arange(10) < 5  # padding after position 4: position 4 loses its right neighbour
    assert find_peaks(x, mask, 1.0).nonzero().flatten().tolist() == [0, 2]


# ---------------------------------------------------------------- per-response statistics vs loops
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("q,k", [(0.4, 3), (0.3, 1), (0.6, 2)])
def test_statistics_match_reference(seed, q, k):
    waad, fai, fai_recv, entropy, mask, lengths = random_series(seed)
    cfg = RhythmConfig(peak_q=q, coupling_k=k)
    got = response_couplings(waad, fai, mask, entropy=entropy, fai_receiver=fai_recv, config=cfg)
    assert list(got) == ["entropy_at_waad_peaks", "receiver_global_cooccurrence", "fai_follows_waad"]
    n_defined = 0
    for b, n in enumerate(lengths.tolist()):
        ref = ref_stats(waad[b].tolist(), fai[b].tolist(), fai_recv[b].tolist(), entropy[b].tolist(), n, q, k)
        for name, (obs, rnd) in ref.items():
            assert same(got[name]["observed"][b].item(), obs), name
            assert same(got[name]["random"][b].item(), rnd), name
            n_defined += not math.isnan(obs)
    assert n_defined >= 6  # the random cases are not all skipped


def test_one_dimensional_input():
    waad, fai, fai_recv, entropy, mask, lengths = random_series(2)
    o, r = fai_follows_waad(fai[0], waad[0])
    ob, rb = fai_follows_waad(fai, waad, mask)
    assert o.dim() == 0 and same(o.item(), ob[0].item()) and same(r.item(), rb[0].item())


# ---------------------------------------------------------------- planted peaks, known answers
def planted(T=20, n_nan=2):
    waad = torch.zeros(T, dtype=torch.float64)
    waad[[3, 9, 15]] = 5.0
    entropy = torch.full((T,), 0.2, dtype=torch.float64)
    entropy[[3, 9, 15]] = 1.0
    fai = torch.zeros(T, dtype=torch.float64)
    fai[-n_nan:] = NAN
    return waad, entropy, fai


def test_planted_entropy_at_waad_peaks():
    waad, entropy, _ = planted()
    obs, rnd = entropy_at_waad_peaks(entropy, waad, None, peak_q=0.15)  # ceil(3) = the 3 planted peaks
    assert obs.item() == pytest.approx(1.0)
    assert rnd.item() == pytest.approx((3 * 1.0 + 17 * 0.2) / 20)
    assert (obs / rnd - 1).item() == pytest.approx(1 / 0.32 - 1)


def test_planted_cooccurrence():
    _, _, fai = planted()
    glob, recv = fai.clone(), fai.clone()
    glob[[2, 8, 14]] = 1.0
    recv[[2, 8, 11]] = 1.0
    obs, rnd = receiver_global_cooccurrence(recv, glob, None, peak_q=0.15)  # ceil(0.15 * 18) = 3
    assert obs.item() == pytest.approx(2 / 3) and rnd.item() == pytest.approx(3 / 18)


def test_planted_fai_follows_waad():
    waad, _, fai = planted()
    fai[[1, 5, 10]] = 1.0
    obs, rnd = fai_follows_waad(fai, waad, None, k=3, peak_q=0.15)
    # WAAD peaks 3, 9, 15 -> near = 3..6, 9..12, 15..18; FAI defined on 0..17 -> 11 / 18 near
    assert obs.item() == pytest.approx(2 / 3) and rnd.item() == pytest.approx(11 / 18)
    obs0, rnd0 = fai_follows_waad(fai, waad, None, k=0, peak_q=0.15)  # only coincidence counts
    assert obs0.item() == 0.0 and rnd0.item() == pytest.approx(3 / 18)


def test_no_peaks_is_skipped_not_zero():
    waad = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    fai = torch.full((2, 3), NAN)
    obs, rnd = fai_follows_waad(fai, waad)
    assert torch.isnan(obs).all() and torch.isnan(rnd).all()
    # entropy undefined at the only WAAD peak: the problem is skipped, baseline included
    waad, entropy, _ = planted()
    entropy[[3, 9, 15]] = NAN
    obs, rnd = entropy_at_waad_peaks(entropy, waad, None, peak_q=0.15)
    assert math.isnan(obs.item()) and math.isnan(rnd.item())


# ---------------------------------------------------------------- closed form vs shuffles
def test_closed_form_equals_exact_enumeration_and_monte_carlo():
    g = torch.Generator().manual_seed(7)
    T = 14
    waad = torch.randint(0, 6, (3, T), generator=g).double()
    fai = torch.randint(0, 6, (3, T), generator=g).double()
    fai[:, -3:] = NAN
    mask = torch.arange(T)[None] < torch.tensor([[14], [12], [9]])
    _, closed = fai_follows_waad(fai, waad, mask, k=1)
    mc = fai_follows_waad_shuffled_mc(fai, waad, mask, k=1, n_shuffles=20000, generator=g)
    for b in range(3):
        n = int(mask[b].sum())
        defined = [t for t in range(n) if not math.isnan(fai[b, t].item())]
        pw = ref_peaks(waad[b].tolist(), n, 0.4)
        near = {t for t in defined if any(u in pw for u in range(t - 1, t + 1))}
        m = len(ref_peaks(fai[b].tolist(), n, 0.4))
        subsets = list(itertools.combinations(defined, m))
        exact = sum(len(near.intersection(s)) / m for s in subsets) / len(subsets)
        assert closed[b].item() == pytest.approx(exact, abs=1e-12)
        assert mc[b].item() == pytest.approx(exact, abs=0.01)
    assert 0 < closed.min() and closed.max() < 1  # a non-trivial case


# ---------------------------------------------------------------- aggregation over problems
def test_couplings_table_means_skips_and_lift():
    stats = {"fai_follows_waad": {"observed": [0.5, 0.7, NAN, 0.9], "random": [0.25, 0.35, 0.3, 0.45]},
             "entropy_at_waad_peaks": {"observed": torch.tensor([0.4, 0.6]), "random": np.array([0.2, NAN])}}
    table = couplings_table(stats, n_boot=500, seed=1)
    assert list(table) == ["entropy_at_waad_peaks", "fai_follows_waad"]  # paper order
    row = table["fai_follows_waad"]
    assert (row["n"], row["n_skipped"]) == (3, 1)
    assert row["observed"] == pytest.approx(0.7) and row["random"] == pytest.approx(0.35)
    assert row["lift"] == pytest.approx(1.0)
    assert row["lift_ci"][0] == pytest.approx(1.0) and row["lift_ci"][1] == pytest.approx(1.0)  # obs = 2 * random
    assert table["entropy_at_waad_peaks"]["n"] == 1 and table["entropy_at_waad_peaks"]["observed"] == pytest.approx(0.4)
    # a list of per-batch dicts is concatenated
    parts = [{"fai_follows_waad": {"observed": [0.5, 0.7], "random": [0.25, 0.35]}},
             {"fai_follows_waad": {"observed": [NAN, 0.9], "random": [0.3, 0.45]}}]
    assert couplings_table(parts, n_boot=500, seed=1)["fai_follows_waad"] == row


def test_bootstrap_contains_estimate_and_shrinks():
    rng = np.random.default_rng(0)

    def sample(n):
        rnd = rng.uniform(0.2, 0.4, n)
        return {"fai_follows_waad": {"observed": rnd * 1.4 + rng.normal(0, 0.05, n), "random": rnd}}

    small, large = couplings_table(sample(20)), couplings_table(sample(500))
    for table in (small, large):
        row = table["fai_follows_waad"]
        for key in ("observed", "random", "lift"):
            lo, hi = row[f"{key}_ci"]
            assert lo < row[key] < hi, key
    for key in ("observed", "random", "lift"):
        width = lambda t: t["fai_follows_waad"][f"{key}_ci"][1] - t["fai_follows_waad"][f"{key}_ci"][0]  # noqa: E731
        assert width(large) < 0.5 * width(small), key
    assert large["fai_follows_waad"]["lift_ci"][0] < 0.4 < large["fai_follows_waad"]["lift_ci"][1]
    # same seed, same intervals; another seed, other intervals
    data = sample(30)
    assert couplings_table(data, seed=3) == couplings_table(data, seed=3)
    assert couplings_table(data, seed=3) != couplings_table(data, seed=4)


def test_markdown_report():
    waad, fai, fai_recv, entropy, mask, _ = random_series(1, B=12, T=40)
    stats = response_couplings(waad, fai, mask, entropy=entropy, fai_receiver=fai_recv)
    table = couplings_table(stats, n_boot=200)
    md = couplings_markdown(table, {"model": "tiny", "data": "synthetic", "n": 12, "seed": 0,
                                    "command": "python -m attnrhythm couplings"})
    for text in ("- model: tiny", "- command: python -m attnrhythm couplings", "| coupling | random (95% CI)",
                 "0.2386 / 0.3608 / +51.97%", "22.41% / 60.84% / +171.49%", "36.87% / 52.53% / +42.47%",
                 "entropy at WAAD peaks", "bootstrap resamples"):
        assert text in md, text
    assert sum(line.startswith("|") for line in md.splitlines()) == 2 + 3  # header, rule, one row per coupling
    assert set(PAPER_TABLE2) == set(table)
