"""Rhythm drift over training: how the head groups and the rhythm series of the rollouts move.

Pure functions over a :class:`~attnrhythm.core.metrics.RhythmResult` of one capture chunk; the
trainer sums them over a rollout batch (and over processes) and logs, per rollout batch:

* ``rhythm/jaccard_local``, ``rhythm/jaccard_global``: overlap of this batch's local / global head
  sets (classified on the batch-mean head distance) with the first batch's sets;
* ``rhythm/waad_mean``, ``rhythm/fai_mean``: token means over the batch's responses;
* ``rhythm/waad_peak_density``, ``rhythm/fai_peak_density``: share of response tokens that are
  peaks (``couplings.find_peaks``: local maxima in the top q);
* the gamma set shares (``rhythm/set_*``) come from the credit itself.
"""
from __future__ import annotations

import torch
from torch import Tensor

from attnrhythm.core.couplings import find_peaks
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.metrics import heads_from_distance

SERIES_KEYS = ("tokens", "waad_sum", "fai_sum", "fai_defined", "waad_peaks", "fai_peaks")


def series_sums(waad: Tensor, fai: Tensor, mask: Tensor, q: float) -> dict[str, float]:
    """Sums behind the batch means and peak densities.

    waad, fai: [B, T] float (FAI NaN where undefined); mask: [B, T] bool (real response tokens).
    """
    mask = mask.bool()
    fai_defined = mask & ~torch.isnan(fai)
    return {
        "tokens": float(mask.sum()),
        "waad_sum": float(torch.where(mask, waad, torch.zeros_like(waad)).sum()),
        "fai_sum": float(torch.where(fai_defined, fai, torch.zeros_like(fai)).sum()),
        "fai_defined": float(fai_defined.sum()),
        "waad_peaks": float(find_peaks(waad, mask, q).sum()),
        "fai_peaks": float(find_peaks(fai, fai_defined, q).sum()),
    }


def head_sets(mean_distance: Tensor, layers: list[int], config: RhythmConfig) -> tuple[set, set]:
    """(local, global) sets of (model layer, head) from a [L, H] mean head distance."""
    heads = heads_from_distance(torch.nan_to_num(mean_distance.float(), nan=0.0), config)
    as_set = lambda m: {(layers[int(l)], int(h)) for l, h in m.nonzero().tolist()}  # noqa: E731
    return as_set(heads.local), as_set(heads.global_)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def drift_metrics(sums: dict[str, float], local: set, global_: set, first_local: set, first_global: set) -> dict:
    """The logged drift values of one rollout batch from its summed series and head sets."""
    tokens = max(1.0, sums["tokens"])
    return {
        "rhythm/jaccard_local": jaccard(local, first_local),
        "rhythm/jaccard_global": jaccard(global_, first_global),
        "rhythm/waad_mean": sums["waad_sum"] / tokens,
        "rhythm/fai_mean": sums["fai_sum"] / max(1.0, sums["fai_defined"]),
        "rhythm/waad_peak_density": sums["waad_peaks"] / tokens,
        "rhythm/fai_peak_density": sums["fai_peaks"] / max(1.0, sums["fai_defined"]),
    }


__all__ = ["SERIES_KEYS", "drift_metrics", "head_sets", "jaccard", "series_sums"]
