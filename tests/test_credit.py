"""credit.py against float64 pure-Python loop re-implementations of docs/method.md section 4,
plus hand-checked examples.  Every strategy is reached through the registry (``credit_gamma``),
its one implementation."""
import math
import statistics
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.credit import (CREDITS, STRATEGIES, apply_sign, coupled_sets, credit_gamma, credit_sets,
                                    gamma_statistics, high_entropy_selection_mask, masked_median, shape_advantages,
                                    top_q_mask)

NAN = math.nan


def gamma_of(strategy, mask=None, *, waad=None, fai=None, delta=None, entropy=None, **config):
    """The registry's gamma for series given one by one (``[T]`` with mask None, or ``[B, T]``);
    ``config``: RhythmConfig fields (q, amp, k, alpha, selection).  Shaped and typed like the
    first series given."""
    like = next(x for x in (waad, fai, delta, entropy) if x is not None)
    r = SimpleNamespace(waad=torch.zeros_like(like) if waad is None else waad, fai=fai, delta=delta, mask=mask)
    return credit_gamma(r, strategy, RhythmConfig(**config), entropy=entropy)


def coupled_gamma(waad, fai, delta, mask, q=0.4, amp=1.5, k=3, alpha=0.5, selection="top"):
    return gamma_of("coupled", mask, waad=waad, fai=fai, delta=delta, q=q, amp=amp, k=k, alpha=alpha,
                    selection=selection)


# ---------------------------------------------------------------- reference loops (docs/method.md text)
def ref_top_q(score, n_real, q, selection="top"):
    """Indices of TopQ over score[:n_real] (a list of floats, NaN undefined)."""
    cand = [t for t in range(n_real) if not math.isnan(score[t])]
    m = math.ceil(Fraction(str(q)) * len(cand))
    sign = -1 if selection == "top" else 1
    cand.sort(key=lambda t: (sign * score[t], t))
    return set(cand[:m])


def ref_coupled(waad, fai, delta, n_real, q, amp, k, alpha, selection="top"):
    T_loc = ref_top_q(delta, n_real, q, selection)
    T_glob = ref_top_q(fai, n_real, q, selection)
    tau_waad = statistics.median(waad[:n_real]) if n_real else NAN
    tau_delta = min((delta[u] for u in T_loc), default=math.inf)
    D, I = set(), set()
    for t in T_glob:
        window = list(range(max(0, t - k), t))
        if not window:
            continue
        best = max(delta[u] for u in window)
        if waad[t] <= tau_waad and best >= tau_delta:
            D.add(t)
            I.add(max(u for u in window if delta[u] == best))  # ties: the later position
    gain = amp - 1
    gamma = [1.0] * len(waad)
    for t in range(n_real):
        gamma[t] = (1 + gain * (t in T_glob and t not in D) + (1 - alpha) * gain * (t in D)
                    + alpha * gain * (t in I))
    return gamma, dict(local=T_loc, anchor=T_glob, dominated=D, intro=I)


def as_set(row_mask):
    return {t for t, v in enumerate(row_mask.tolist()) if v}


def random_batch(seed, B=5, T=19, levels=4, n_nan_tail=3):
    """Left-aligned batch with padding, coarse values (many ties) and NaN FAI at each tail."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = T, 1
    mask = torch.arange(T)[None] < lengths[:, None]
    waad = torch.randint(0, levels, (B, T), generator=g).float() * 0.5 * mask
    delta = torch.zeros(B, T)
    delta[:, :-1] = (waad[:, :-1] - waad[:, 1:]).abs()
    last = (lengths - 1).clamp(min=0)
    delta[torch.arange(B), last] = 0.0
    delta = delta * mask
    fai = torch.randint(0, levels, (B, T), generator=g).float() / levels
    tail = torch.arange(T)[None] >= (lengths[:, None] - n_nan_tail)
    fai[tail | ~mask] = NAN
    entropy = torch.rand(B, T, generator=g).round(decimals=1)
    return waad, fai, delta, entropy, mask, lengths


SEEDS = range(8)


# ---------------------------------------------------------------- TopQ
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("q", [0.07, 0.2, 0.4, 0.6, 1.0])
@pytest.mark.parametrize("selection", ["top", "bottom"])
def test_top_q_matches_reference(seed, q, selection):
    _, fai, _, _, mask, lengths = random_batch(seed, T=23)
    got = top_q_mask(fai, mask, q, selection)
    for b, n in enumerate(lengths.tolist()):
        assert as_set(got[b]) == ref_top_q(fai[b].double().tolist(), n, q, selection)
    assert not (got & ~mask).any()


def test_top_q_ties_go_to_earlier_position_and_counts():
    score = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, NAN, 1.0, 1.0]])
    assert as_set(top_q_mask(score, None, 0.3)[0]) == {1, 2, 4}  # ceil(0.3 * 7) = 3
    assert as_set(top_q_mask(score, None, 0.2)[0]) == {1, 2}
    assert as_set(top_q_mask(score, None, 0.2, "bottom")[0]) == {0, 6}
    assert top_q_mask(score, None, 1.0).sum() == 7  # NaN is never selected
    # float guard: 0.07 * 100 = 7.000000000000001 must select 7, not 8
    assert top_q_mask(torch.arange(100.0), None, 0.07).sum() == 7
    assert top_q_mask(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool), 0.4).sum() == 0
    with pytest.raises(ValueError):
        top_q_mask(score, None, 0.4, "middle")


def test_masked_median_is_the_true_median():
    x = torch.tensor([[4.0, 1.0, 3.0, 2.0, 99.0], [5.0, 1.0, 3.0, 0.0, 0.0]])
    valid = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert masked_median(x, valid).tolist() == [2.5, 3.0]


# ---------------------------------------------------------------- coupled credit: hand examples
# Example A (length 8, k=3, q=0.4 -> T_loc 4 tokens, T_glob ceil(0.4*6) = 3 tokens):
#   waad  = 2 2 9 1 1 8 3 3              median 2.5 -> low WAAD at 0, 1, 3, 4
#   delta = 0 7 8 0 7 5 0 0              T_loc = {2, 1, 4, 5}, tau_delta = 5
#   fai   = .5 .1 .2 .5 .5 .5 nan nan    T_glob = {0, 3, 4} (four-way tie at .5, earlier wins)
#   anchor 0: empty window -> not dominated (gamma 1.5)
#   anchor 3: window {0,1,2} max delta 8 at 2 -> D, intro 2; anchor 4: window {1,2,3} -> D, intro 2
#   intro 2 is shared, counted once: gamma 1 + 0.5*0.5 = 1.25; dominated anchors 1 + 0.5*0.5 = 1.25
WAAD_A = [2.0, 2, 9, 1, 1, 8, 3, 3]
FAI_A = [0.5, 0.1, 0.2, 0.5, 0.5, 0.5, NAN, NAN]


def deltas(waad):
    return [abs(a - b) for a, b in zip(waad, waad[1:])] + [0.0]


def test_hand_example_a():
    waad, fai, delta = torch.tensor(WAAD_A), torch.tensor(FAI_A), torch.tensor(deltas(WAAD_A))
    assert delta.tolist() == [0, 7, 8, 0, 7, 5, 0, 0]
    s = coupled_sets(waad, fai, delta, None)
    assert (as_set(s["local"]), as_set(s["anchor"]), as_set(s["dominated"]), as_set(s["intro"])) == \
        ({1, 2, 4, 5}, {0, 3, 4}, {3, 4}, {2})
    assert s["tau_waad"].item() == 2.5 and s["tau_delta"].item() == 5
    assert coupled_gamma(waad, fai, delta, None).tolist() == [1.5, 1, 1.25, 1.25, 1.25, 1, 1, 1]
    # k=1: anchor 4's window is {3} with delta 0 < 5 -> a plain anchor again
    assert coupled_gamma(waad, fai, delta, None, k=1).tolist() == [1.5, 1, 1.25, 1.25, 1.5, 1, 1, 1]
    # alpha=1 moves the whole amplification to the intro token
    assert coupled_gamma(waad, fai, delta, None, alpha=1.0).tolist() == [1.5, 1, 1.5, 1, 1, 1, 1, 1]
    # bottom ablation: T_loc = {0,3,6,7} (tau_delta 0), T_glob = {1, 2, 0}; anchor 1 (WAAD 2) is
    # dominated with intro 0, which is also a plain anchor -> 1 + 0.5 + 0.25
    assert coupled_gamma(waad, fai, delta, None, selection="bottom").tolist() == [1.75, 1.25, 1.5, 1, 1, 1, 1, 1]
    assert gamma_of("local", delta=delta).tolist() == [1, 1.5, 1.5, 1, 1.5, 1.5, 1, 1]
    assert gamma_of("global", fai=fai).tolist() == [1.5, 1, 1, 1.5, 1.5, 1, 1, 1]


def test_hand_example_b_intro_tie_goes_later_and_terms_add():
    # waad 2 2 10 2 1 9 3 3 (median 2.5), delta 0 8 8 1 8 6 0 0 -> T_loc {1,2,4,5}, tau_delta 6
    # fai top 3: 2 (0.7), then 0 and 3 (tie at .5) -> anchor 3 dominated, window {0,1,2} has delta 8
    # at 1 and 2 -> intro = 2 (later); 2 is also a non-dominated anchor (WAAD 10): 1 + .5 + .25
    waad = torch.tensor([2.0, 2, 10, 2, 1, 9, 3, 3])
    fai = torch.tensor([0.5, 0.1, 0.7, 0.5, 0.5, 0.5, NAN, NAN])
    delta = torch.tensor(deltas(waad.tolist()))
    assert coupled_gamma(waad, fai, delta, None).tolist() == [1.5, 1, 1.75, 1.25, 1, 1, 1, 1]


def test_hand_example_batched_with_padding():
    waad = torch.zeros(2, 11)
    fai = torch.full((2, 11), NAN)
    delta = torch.zeros(2, 11)
    waad[1, :8], fai[1, :8], delta[1, :8] = torch.tensor(WAAD_A), torch.tensor(FAI_A), torch.tensor(deltas(WAAD_A))
    waad[0, :3], fai[0, :3], delta[0, :3] = torch.tensor([1.0, 3, 2]), torch.tensor([0.2, NAN, NAN]), torch.tensor([2.0, 1, 0])
    mask = torch.arange(11)[None] < torch.tensor([[3], [8]])
    gamma = coupled_gamma(waad, fai, delta, mask)
    assert gamma[1].tolist() == [1.5, 1, 1.25, 1.25, 1.25, 1, 1, 1, 1, 1, 1]
    assert gamma[0].tolist() == [1.5] + [1.0] * 10  # the only defined FAI is at position 0


# ---------------------------------------------------------------- coupled credit: random vs loop
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k,q,alpha,selection", [(3, 0.4, 0.5, "top"), (1, 0.2, 0.3, "top"),
                                                 (2, 0.6, 1.0, "top"), (3, 0.4, 0.5, "bottom")])
def test_coupled_matches_reference(seed, k, q, alpha, selection):
    waad, fai, delta, _, mask, lengths = random_batch(seed, T=21, levels=3)
    amp = 1.7
    gamma = coupled_gamma(waad, fai, delta, mask, q, amp, k, alpha, selection)
    sets = coupled_sets(waad, fai, delta, mask, q, k, selection)
    n_dominated = 0
    for b, n in enumerate(lengths.tolist()):
        ref_g, ref_s = ref_coupled(waad[b].double().tolist(), fai[b].double().tolist(),
                                   delta[b].double().tolist(), n, q, amp, k, alpha, selection)
        assert gamma[b].tolist() == pytest.approx(ref_g, abs=1e-6)
        for name, ref_set in ref_s.items():
            assert as_set(sets[name][b]) == ref_set, name
        n_dominated += len(ref_s["dominated"])
    assert gamma.dtype == waad.dtype and (gamma[~mask] == 1).all()
    if selection == "top" and k == 3:
        assert n_dominated > 0  # the random cases do exercise the dominated branch


def test_continuous_values_match_reference():
    g = torch.Generator().manual_seed(123)
    waad = torch.rand(6, 40, generator=g, dtype=torch.float64)
    delta = torch.rand(6, 40, generator=g, dtype=torch.float64)
    fai = torch.rand(6, 40, generator=g, dtype=torch.float64)
    mask = torch.arange(40)[None] < torch.tensor([[40], [39], [12], [2], [30], [7]])
    gamma = coupled_gamma(waad, fai, delta, mask)
    assert gamma.dtype == torch.float64
    for b in range(6):
        n = int(mask[b].sum())
        ref, _ = ref_coupled(waad[b].tolist(), fai[b].tolist(), delta[b].tolist(), n, 0.4, 1.5, 3, 0.5)
        assert gamma[b].tolist() == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_local_global_entropy_match_reference(seed):
    waad, fai, delta, entropy, mask, lengths = random_batch(seed)
    for selection in ("top", "bottom"):
        loc = gamma_of("local", mask, delta=delta, selection=selection)
        glo = gamma_of("global", mask, fai=fai, selection=selection)
        ent = gamma_of("entropy", mask, entropy=entropy, selection=selection)
        for b, n in enumerate(lengths.tolist()):
            for gamma, series in ((loc, delta), (glo, fai), (ent, entropy)):
                chosen = ref_top_q(series[b].double().tolist(), n, 0.4, selection)
                assert gamma[b].tolist() == [1.5 if t in chosen else 1.0 for t in range(waad.shape[1])]


# ---------------------------------------------------------------- credit_gamma dispatcher
def test_credit_gamma_dispatch():
    waad, fai, delta, entropy, mask, lengths = random_batch(3)
    r = SimpleNamespace(waad=waad, fai=fai, delta=delta, mask=mask)
    cfg = RhythmConfig(q=0.4, amp=1.5, k=2, alpha=0.25)
    assert (credit_gamma(r, "none", cfg) == 1).all()
    for selection in ("top", "bottom"):
        gamma = credit_gamma(r, "coupled", cfg.replace(selection=selection))
        for b, n in enumerate(lengths.tolist()):
            ref, _ = ref_coupled(waad[b].double().tolist(), fai[b].double().tolist(), delta[b].double().tolist(),
                                 n, 0.4, 1.5, 2, 0.25, selection)
            assert gamma[b].tolist() == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ValueError, match="entropy"):
        credit_gamma(r, "entropy", cfg)
    with pytest.raises(ValueError, match="unknown credit strategy"):
        credit_gamma(r, "anchors", cfg)
    # entropy falls back to r.entropy; a 1-D response without mask works
    passed = credit_gamma(r, "entropy", cfg, entropy=entropy)
    r.entropy = entropy
    assert torch.equal(credit_gamma(r, "entropy", cfg), passed)
    one = SimpleNamespace(waad=waad[0], fai=fai[0], delta=delta[0])
    assert torch.equal(credit_gamma(one, "coupled", cfg), credit_gamma(r, "coupled", cfg)[0])  # row 0 is full length
    # the sets behind the gamma are the ones coupled_sets defines
    _, sets = credit_sets(r, "coupled", cfg)
    ref = coupled_sets(waad, fai, delta, mask, 0.4, 2)
    assert all(torch.equal(sets[n], ref[n]) for n in ("local", "anchor", "dominated", "intro"))


def test_random_credit_is_seeded_and_sized():
    mask = torch.arange(30)[None] < torch.tensor([[30], [11], [0]])
    r = SimpleNamespace(waad=torch.zeros(3, 30), fai=None, delta=None, mask=mask)
    cfg = RhythmConfig(q=0.4, amp=2.0)
    a = credit_gamma(r, "random", cfg, generator=torch.Generator().manual_seed(7))
    b = credit_gamma(r, "random", cfg, generator=torch.Generator().manual_seed(7))
    c = credit_gamma(r, "random", cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a == 2.0).sum(-1).tolist() == [12, 5, 0]
    assert (a[~mask] == 1).all()
    assert (gamma_of("random", mask, waad=torch.zeros(3, 30), q=1.0, amp=2.0)[mask] == 2.0).all()  # global RNG


# ---------------------------------------------------------------- signs, baselines, logging
def test_apply_sign():
    adv = torch.tensor([1.0, -2.0, 0.0])
    gamma = torch.tensor([[1.5, 1.0], [1.5, 1.25], [2.0, 2.0]])
    assert apply_sign(adv, gamma, "both").tolist() == [[1.5, 1.0], [-3.0, -2.5], [0.0, 0.0]]
    assert apply_sign(adv, gamma, "positive").tolist() == [[1.5, 1.0], [-2.0, -2.0], [0.0, 0.0]]
    assert apply_sign(adv, gamma, "negative").tolist() == [[1.0, 1.0], [-3.0, -2.5], [0.0, 0.0]]
    assert apply_sign(torch.tensor(-1.0), torch.tensor([2.0, 1.0]), "positive").tolist() == [-1.0, -1.0]
    with pytest.raises(ValueError):
        apply_sign(adv, gamma, "all")


@pytest.mark.parametrize("seed", SEEDS)
def test_high_entropy_selection(seed):
    _, _, _, entropy, mask, lengths = random_batch(seed, B=4, T=25)
    per_batch = high_entropy_selection_mask(entropy, mask, 0.2)
    flat = [(e, b, t) for b in range(4) for t, e in enumerate(entropy[b].double().tolist()) if mask[b, t]]
    m = math.ceil(Fraction("0.2") * len(flat))
    expect = {(b, t) for _, b, t in sorted(flat, key=lambda x: (-x[0], x[1], x[2]))[:m]}
    assert {(b, t) for b in range(4) for t in as_set(per_batch[b])} == expect
    per_resp = high_entropy_selection_mask(entropy, mask, 0.2, per="response")
    for b, n in enumerate(lengths.tolist()):
        assert as_set(per_resp[b]) == ref_top_q(entropy[b].double().tolist(), n, 0.2)


def test_shape_advantages_is_apply_sign_and_for_a_batch_level_credit_its_kept_tokens():
    _, _, _, entropy, mask, _ = random_batch(5, B=4, T=25)
    advantages = torch.tensor([1.0, -2.0, 0.5, -0.25])
    gamma = torch.where(mask, 1.5, 1.0)
    cfg = RhythmConfig(sign="positive")
    for name in STRATEGIES:
        shaped, sets = shape_advantages(name, advantages, gamma, mask, cfg, entropy)
        assert torch.equal(shaped, apply_sign(advantages, gamma, "positive")) and sets == {}
    assert [n for n in CREDITS if n not in STRATEGIES] == ["high-entropy-selection"]
    shaped, sets = shape_advantages("high-entropy-selection", advantages, torch.ones_like(gamma), mask, cfg, entropy)
    kept = high_entropy_selection_mask(entropy, mask, cfg.high_entropy_share)
    assert torch.equal(sets["kept"], kept) and 0 < int(kept.sum()) == math.ceil(0.2 * int(mask.sum()))
    assert torch.equal(shaped, torch.where(kept, advantages[:, None], 0.0))


def test_gamma_statistics():
    gamma = torch.tensor([[1.5, 1.0, 0.75, 9.0], [1.25, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    s = gamma_statistics(gamma, mask)
    assert s["mean"] == pytest.approx((1.5 + 1 + 0.75 + 1.25 + 1) / 5)
    assert s["share_amplified"] == pytest.approx(2 / 5) and s["share_reduced"] == pytest.approx(1 / 5)
    assert s["max"] == 1.5 and s["min"] == 0.75 and s["n_tokens"] == 5
    assert math.isnan(gamma_statistics(gamma, torch.zeros_like(mask))["mean"])
