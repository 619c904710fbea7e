"""Paired scores: two evaluations of the same problems, scored the same way, and their difference.

An evaluation is an ``attnrhythm eval`` result (``train.evaluate``): its settings and, per
problem, the scores of its samples.  Differences are *paired* by problem (:func:`aligned`); the
interval of one model's gain resamples problems (:func:`paired_gain`), that of a credit over seeds
resamples seeds and problems (:func:`two_level`), and a family of p-values is corrected by Holm's
method (:func:`holm`).  ``attnrhythm compare`` (``train.compare``) builds its tables on these.
"""
from __future__ import annotations

import json

import numpy as np

from attnrhythm.core.bootstrap import clustered_replicates, percentile_interval, resample_indices, two_sided_p
from attnrhythm.errors import UserError

N_BOOT = 10_000


def problem_key(problem: dict) -> str:
    """Identity of a test problem inside an eval.json (everything but the model's output)."""
    return json.dumps({k: v for k, v in problem.items() if k not in ("scores", "completions")}, sort_keys=True)


def correct_by_problem(evaluation: dict) -> dict[str, float]:
    """Problem key -> share of correct samples (0/1 for greedy pass@1)."""
    return {problem_key(p): sum(s >= 1.0 for s in p["scores"]) / len(p["scores"]) for p in evaluation["problems"]}


def aligned(*evaluations: dict) -> np.ndarray:
    """[E, P] correct shares of ``evaluations`` on their common problems (sorted by key); a
    comparison of different problem sets is refused rather than silently mismatched."""
    scores = [correct_by_problem(e) for e in evaluations]
    for other in scores[1:]:
        if set(other) != set(scores[0]):
            raise UserError(f"the evaluations hold different problems ({len(set(other) ^ set(scores[0]))} differ): "
                            "evaluate all of them with the same --task, --split, --n and --seed")
    keys = sorted(scores[0])
    return np.array([[s[k] for k in keys] for s in scores], dtype=np.float64)


def two_level(diffs: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of a [S seeds, P problems] array of paired differences with a two-level interval
    (``core.bootstrap.clustered_replicates``, problems crossed with seeds: every drawn seed is
    scored on the same drawn problems) and its two-sided bootstrap p-value.  With one seed this
    is the bootstrap over problems."""
    boots = clustered_replicates(diffs, n_boot=n_boot, seed=seed, shared_items=True)
    low, high = percentile_interval(boots, level)
    return {"mean": float(np.mean(diffs)), "ci_low": low, "ci_high": high, "p": two_sided_p(boots)}


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values of a family {name: p} (monotone, capped at 1)."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[name]))
        adjusted[name] = running
    return adjusted


def paired_gain(start: dict | list[dict], end: dict | list[dict], n_boot: int = N_BOOT, seed: int = 0,
                level: float = 0.95) -> dict:
    """Scores of two evaluations on the same problems, their difference and its bootstrap
    interval over problems.  Either side may be a list of evaluations (seeds): each problem's
    score is then their mean, and the interval, still over problems only, is that of the
    seed-averaged difference (use :func:`two_level` to resample seeds as well)."""
    starts = start if isinstance(start, list) else [start]
    ends = end if isinstance(end, list) else [end]
    scores = aligned(*starts, *ends)
    x, y = scores[:len(starts)].mean(0), scores[len(starts):].mean(0)
    diff = y - x
    low, high = percentile_interval(diff[resample_indices(len(diff), n_boot, seed)].mean(1), level)
    return {"n_test": len(diff), "pass1_start": float(x.mean()), "pass1_end": float(y.mean()),
            "gain": float(diff.mean()), "ci_low": low, "ci_high": high,
            "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum())}


SCORING_IGNORED = ("batch_size",)
"""Evaluation settings that do not change a score (generation gives the same completions whatever
the batch size: ``train.evaluate.generate_completions``)."""


def scoring(evaluation: dict) -> dict:
    """The settings that define an evaluation's score (task, split, n, samples, temperature, ...)."""
    return {k: v for k, v in (evaluation.get("settings") or {}).items() if k not in SCORING_IGNORED}


def score_name(evaluation: dict) -> str:
    """"greedy pass@1" or "avg@4 at temperature 1", from the evaluation's own settings."""
    settings = evaluation.get("settings") or {}
    if not settings:
        return "score of the evaluation files"
    if settings.get("greedy") or not settings.get("temperature"):
        return "greedy pass@1"
    k = settings.get("samples", 1)
    return f"avg@{k} at temperature {settings['temperature']:g}"


def same_scoring(start: dict, evaluations: dict[str, dict], test_set: str) -> None:
    """Refuse a test set whose files were scored differently (another split, number of samples,
    temperature or token budget): their differences would not be gains."""
    want = scoring(start)
    for path, evaluation in evaluations.items():
        got = scoring(evaluation)
        if got != want:
            keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise UserError(f"{test_set}: {path} was scored with other settings than the start "
                            f"({', '.join(f'{k}: {got.get(k)} vs {want.get(k)}' for k in keys)}): "
                            "evaluate every model of a test set with the same command")
