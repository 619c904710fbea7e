"""Every token-level metric against the float64 loop reference of docs/method.md (conftest.Reference)
on random causal row-stochastic maps, planted patterns with known answers, and edge cases."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import kurtosis as scipy_kurtosis

from attnrhythm.core.config import ANALYSIS_HORIZON, RhythmConfig
from attnrhythm.core.couplings import find_peaks
from attnrhythm.core.heads import classify_heads, heads_to_mask, kurtosis, select_receiver_heads
from attnrhythm.core.metrics import (receiver_kurtosis, receiver_vertical_scores, response_positions, rhythm_from_attentions,
                                rhythm_from_stats)
from attnrhythm.core.stats import accumulate_rows, empty_stats

HORIZONS = [(10, 100), ANALYSIS_HORIZON, (2, 5)]


def random_maps(n_layers, n_heads, length, seed, sharpness=2.5):
    """[L, H, N, N] float64 causal row-stochastic maps with peaky random rows."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_layers, n_heads, length, length, generator=g, dtype=torch.float64) * sharpness
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, -math.inf).softmax(-1)


def stats_from_maps(maps, prompt_lengths, left_pad=False, band_width=101):
    """Padded-batch statistics of several sequences' maps (each [L, H, n, n]) and the response
    mask [B, N]; padding rows and columns carry no attention."""
    n_layers, n_heads = maps[0].shape[:2]
    width = max(m.shape[-1] for m in maps)
    valid = torch.zeros(len(maps), width, dtype=torch.bool)
    response = torch.zeros_like(valid)
    padded = torch.zeros(len(maps), n_layers, n_heads, width, width, dtype=torch.float64)
    for b, (m, p) in enumerate(zip(maps, prompt_lengths)):
        n = m.shape[-1]
        o = width - n if left_pad else 0
        padded[b, :, :, o:o + n, o:o + n] = m
        valid[b, o:o + n] = True
        response[b, o + p:o + n] = True
    stats = empty_stats(list(range(n_layers)), len(maps), n_heads, width, band_width, valid, dtype=torch.float64)
    for slot in range(n_layers):
        accumulate_rows(stats, slot, padded[:, slot], 0, 0)
    return stats, response


def assert_series(actual, expected, tol=1e-10):
    actual = [float(v) for v in actual]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert math.isnan(a) == math.isnan(e), (actual, expected)
        if not math.isnan(e):
            assert a == pytest.approx(e, rel=tol, abs=tol)


def check_against_reference(result, ref_out):
    expected = torch.tensor(ref_out["head_distance"], dtype=torch.float64)
    assert torch.allclose(result.head_distance.double(), expected, rtol=1e-10)
    assert sorted(map(tuple, result.local_heads)) == ref_out["local"]
    assert sorted(map(tuple, result.global_heads)) == ref_out["global_"]
    assert_series(result.waad, ref_out["waad"])
    assert_series(result.delta, ref_out["delta"])
    assert_series(result.fai, ref_out["fai"])
    if "fai_receiver" in ref_out:
        assert_series(result.fai_receiver, ref_out["fai_receiver"])


# ---------------------------------------------------------------- against the loop reference
@pytest.mark.parametrize("horizon", HORIZONS)
@pytest.mark.parametrize("window", [10, 3])
def test_rhythm_from_attentions_matches_reference(ref, horizon, window):
    maps = random_maps(2, 4, 28, seed=window + horizon[0])
    receivers = [(0, 1), (1, 3), (1, 0)]
    config = RhythmConfig(window=window, fai_horizon=horizon)
    result = rhythm_from_attentions(maps, 9, config, receiver_heads=receivers)
    check_against_reference(result, ref.rhythm(maps.numpy(), 9, window, horizon, receivers=receivers))
    assert sorted(map(tuple, result.receiver_heads)) == sorted(receivers)


@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("horizon", [(10, 100), ANALYSIS_HORIZON])
def test_rhythm_from_stats_padded_batch_matches_reference(ref, left_pad, horizon):
    lengths, prompts = [30, 17, 24], [6, 4, 23]  # the last response is one token long
    maps = [random_maps(3, 3, n, seed=10 + n) for n in lengths]
    config = RhythmConfig(fai_horizon=horizon)
    stats, response = stats_from_maps(maps, prompts, left_pad)
    stats.entropy = torch.rand(stats.valid.shape, dtype=torch.float64)
    receivers = heads_to_mask([(0, 0), (2, 1)], 3, 3)
    result = rhythm_from_stats(stats, response, config, receiver_heads=receivers)
    for b, (m, p) in enumerate(zip(maps, prompts)):
        one = result[b]
        check_against_reference(one, ref.rhythm(m.numpy(), p, config.window, horizon, receivers=[(0, 0), (2, 1)]))
        assert torch.equal(one.entropy, stats.entropy[b][response[b]])


def test_receiver_scores_kurtosis_and_selection_match_reference(ref):
    lengths, prompts = [26, 19, 33], [5, 8, 3]
    maps = [random_maps(2, 5, n, seed=40 + n, sharpness=3.0) for n in lengths]
    stats, response = stats_from_maps(maps, prompts, left_pad=True)
    positions, mask = response_positions(response)
    scores = receiver_vertical_scores(stats, positions, mask, gap=4)
    for b, (m, p) in enumerate(zip(maps, prompts)):
        for l in range(2):
            for h in range(5):
                assert_series(scores[b, l, h][mask[b]], ref.vertical_scores(m[l, h].numpy(), p, 4))
    kurt = receiver_kurtosis(stats, response, gap=4)
    assert kurt.dtype == torch.float64 and kurt.shape == (3, 2, 5)
    expected = [ref.receiver_kurtosis(m.numpy(), p, 4) for m, p in zip(maps, prompts)]
    assert torch.allclose(kurt, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, equal_nan=True)
    chosen = select_receiver_heads(kurt, 4)
    assert sorted(map(tuple, chosen.nonzero().tolist())) == ref.receivers(expected, 4)


def test_kurtosis_is_scipy_with_nan_omitted():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, generator=g, dtype=torch.float64) ** 3
    x[1, ::7] = math.nan
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[2, 30:] = False
    ours = kurtosis(x, mask)
    for row in range(4):
        kept = x[row][mask[row] & ~torch.isnan(x[row])].numpy()
        assert ours[row].item() == pytest.approx(scipy_kurtosis(kept), rel=1e-12)
    assert math.isnan(kurtosis(torch.tensor([[1.0, 1.0, 1.0]]), torch.ones(1, 3, dtype=torch.bool)).item())
    assert math.isnan(kurtosis(torch.tensor([[2.0]]), torch.ones(1, 1, dtype=torch.bool)).item())


def test_classification_tie_rule(ref):
    # all equal: the lowest count in layer-major order are local, the last count global
    local, global_ = classify_heads(torch.zeros(2, 5), fraction=0.3)
    assert local.nonzero().tolist() == [[0, 0], [0, 1], [0, 2]]
    assert global_.nonzero().tolist() == [[1, 2], [1, 3], [1, 4]]
    # integer distances with many ties, batched, against the sorted-tuple reference
    g = torch.Generator().manual_seed(3)
    d = torch.randint(0, 3, (6, 3, 4), generator=g).double()
    local, global_ = classify_heads(d, 0.3)
    for b in range(6):
        exp_local, exp_global = ref.classify(d[b].tolist(), 0.3)
        assert sorted(map(tuple, local[b].nonzero().tolist())) == exp_local
        assert sorted(map(tuple, global_[b].nonzero().tolist())) == exp_global
    # at least one head each, even for a tiny head count
    local, global_ = classify_heads(torch.tensor([[3.0, 1.0]]), 0.3)
    assert local.tolist() == [[False, True]] and global_.tolist() == [[True, False]]


# ---------------------------------------------------------------- planted patterns
def planted_maps(length=60, prompt=5, chunk=6, anchor=17):
    """2 layers x 4 heads.  Heads 0-1 (local): inside a chunk a row attends to the previous
    token; a row that starts a chunk looks back uniformly over everything (a preplan token).
    Heads 2-3 (global): half of every later row's attention goes to ``anchor``, the rest is
    uniform.  Returns (maps, chunk starts in response coordinates)."""
    maps = torch.zeros(2, 4, length, length, dtype=torch.float64)
    starts = [s for s in range(prompt, length) if (s - prompt) % chunk == 0]
    for t in range(length):
        sawtooth = torch.zeros(length, dtype=torch.float64)
        if t in starts or t == 0:
            sawtooth[:t + 1] = 1.0 / (t + 1)
        else:
            sawtooth[t - 1] = 1.0
        stripes = torch.zeros(length, dtype=torch.float64)
        stripes[:t + 1] = 1.0 / (t + 1)
        if t > anchor:
            stripes = 0.5 * stripes
            stripes[anchor] += 0.5
        maps[:, 0, t] = maps[:, 1, t] = sawtooth
        maps[:, 2, t] = maps[:, 3, t] = stripes
    return maps, [s - prompt for s in starts]


def test_sawtooth_gives_waad_peaks_at_chunk_starts():
    maps, starts = planted_maps()
    result = rhythm_from_attentions(maps, 5, RhythmConfig())
    assert {h for _, h in result.local_heads} <= {0, 1}
    peaks = find_peaks(result.waad, None, q=0.4).nonzero().flatten().tolist()
    assert peaks == starts


@pytest.mark.parametrize("horizon", [(10, 100), ANALYSIS_HORIZON])
def test_planted_anchor_has_top_fai(horizon):
    maps, _ = planted_maps(anchor=17)
    result = rhythm_from_attentions(maps, 5, RhythmConfig(fai_horizon=horizon))
    assert {h for _, h in result.global_heads} <= {2, 3}
    assert int(torch.nan_to_num(result.fai, nan=-1).argmax()) == 17 - 5


# ---------------------------------------------------------------- edge cases
def test_one_token_response():
    maps = random_maps(2, 4, 12, seed=1)
    for horizon in [(10, 100), ANALYSIS_HORIZON]:
        result = rhythm_from_attentions(maps, 11, RhythmConfig(fai_horizon=horizon))
        assert result.waad.shape == (1,) and torch.isfinite(result.waad).all()
        assert result.delta.tolist() == [0.0]
        assert math.isnan(result.fai.item())  # no later row: FAI undefined


def test_response_shorter_than_window(ref):
    """WAAD stays defined (distances into the prompt are capped at W); with the RL horizon
    (10, 100) no row lies 10 tokens after any response token, so FAI is NaN everywhere."""
    maps = random_maps(2, 4, 15, seed=2)
    result = rhythm_from_attentions(maps, 12, RhythmConfig(fai_horizon=(10, 100)))
    assert_series(result.waad, ref.waad(ref.mean_map(maps.numpy(), sorted(map(tuple, result.local_heads))), 12, 10))
    assert torch.isnan(result.fai).all()
    result = rhythm_from_attentions(maps, 12, RhythmConfig(fai_horizon=ANALYSIS_HORIZON))
    assert torch.isfinite(result.fai[:-1]).all() and math.isnan(result.fai[-1].item())


def test_empty_response():
    maps = random_maps(1, 4, 8, seed=3)
    with pytest.raises(ValueError, match="empty"):
        rhythm_from_attentions(maps, 8)
    # in a batch, a sequence without response rows gets empty series (and NaN distances)
    stats, response = stats_from_maps([maps, random_maps(1, 4, 10, seed=4)], [8, 3])
    result = rhythm_from_stats(stats, response, RhythmConfig())
    assert result[0].waad.numel() == 0 and result[0].fai.numel() == 0
    assert torch.isnan(result[0].head_distance).all()
    assert result[1].waad.numel() == 7


def test_numpy_reference_is_not_trivially_equal():
    """Guard: the random maps really are row-stochastic, causal and far from uniform."""
    maps = random_maps(1, 2, 20, seed=5)
    assert torch.allclose(maps.sum(-1), torch.ones(1, 2, 20, dtype=torch.float64))
    assert (maps.triu(1) == 0).all()
    assert float(np.max(maps[0, 0, -1].numpy())) > 3.0 / 20
