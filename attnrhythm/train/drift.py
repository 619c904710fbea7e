"""Rhythm drift over training: how the head groups and the rhythm series of the rollouts move.

``RolloutSummary`` sums what the trainer logs of one rollout batch over its capture chunks (each a
:class:`~attnrhythm.core.metrics.RhythmResult`); the trainer sums it over processes and logs, per
rollout batch:

* ``rhythm/jaccard_local``, ``rhythm/jaccard_global``: overlap of this batch's local / global head
  sets (classified on the batch-mean head distance) with the first batch's sets;
* ``rhythm/waad_mean``, ``rhythm/fai_mean``: token means over the batch's responses;
* ``rhythm/waad_peak_density``, ``rhythm/fai_peak_density``: share of response tokens that are
  peaks (``couplings.find_peaks``: local maxima in the top q);
* the gamma set shares (``rhythm/set_*``) come from the credit itself.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.couplings import find_peaks
from attnrhythm.core.metrics import heads_from_distance
from attnrhythm.core.textstats import jaccard
from attnrhythm.generation import token_strings

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


@dataclass
class RolloutSummary:
    """What the trainer logs of one rollout batch (this process), summed over its capture chunks."""

    one_pass: bool = False
    """The statistics came from TRL's own log-prob pass (no separate attention pass)."""
    sets: Counter = field(default_factory=Counter)
    """Real tokens in each named credit set (``rhythm/set_<name>``)."""
    local_heads: Counter = field(default_factory=Counter)
    """(model layer, head) -> sequences whose local group holds that head."""
    global_heads: Counter = field(default_factory=Counter)
    distance: Tensor = field(default_factory=lambda: torch.zeros(2))
    """Sum over sequences of the mean head distance of the (local, global) group."""
    n_seq: int = 0
    series: Counter = field(default_factory=Counter)
    """``series_sums`` summed over chunks."""
    distance_sum: Tensor | None = None
    """[L, H] head distance summed over sequences (NaN counted as 0); None before the first chunk."""
    layers: list[int] | None = None
    samples: list[dict] = field(default_factory=list)
    """Completions token by token for DIR/rollouts.jsonl (the credit view)."""

    def add(self, r, sets: dict[str, Tensor], peak_q: float) -> None:
        """Count one capture chunk: its rhythm result ``r`` and the credit sets chosen on it."""
        for name, chosen in sets.items():
            self.sets[name] += int((chosen & r.mask).sum())
        self.series.update(series_sums(r.waad, r.fai, r.mask, peak_q))
        d_sum = torch.nan_to_num(r.head_distance.float().cpu(), nan=0.0).sum(0)
        self.distance_sum = d_sum if self.distance_sum is None else self.distance_sum + d_sum
        self.layers = list(r.layers)
        for b in range(r.mask.shape[0]):
            local, global_ = r.local_heads[b], r.global_heads[b]
            self.local_heads.update((r.layers[l], h) for l, h in local)
            self.global_heads.update((r.layers[l], h) for l, h in global_)
            d = r.head_distance[b].float().cpu()
            self.distance += torch.tensor([d[tuple(zip(*local))].mean() if local else math.nan,
                                           d[tuple(zip(*global_))].mean() if global_ else math.nan])
            self.n_seq += 1

    def top_heads(self, n: int = 8) -> dict[str, list]:
        """The ``n`` most frequent heads of each group as [layer, head, share of sequences]."""
        n_seq = max(1, self.n_seq)
        top = lambda c: [[layer, head, round(k / n_seq, 4)] for (layer, head), k in c.most_common(n)]  # noqa: E731
        return {"local": top(self.local_heads), "global": top(self.global_heads)}


def rollout_rows(tokenizer, r, sets: dict[str, Tensor], gamma: Tensor, completion_ids: Tensor, advantages: Tensor,
                 offset: int, limit: int) -> list[dict]:
    """The first ``limit`` completions of a capture chunk token by token, as DIR/rollouts.jsonl
    rows for `attnrhythm credit-view`: tokens (whole characters: ``generation.token_strings``),
    gamma, the credit sets each token is in, WAAD, FAI and the completion's advantage.

    r: the chunk's RhythmResult; gamma [b, C], completion_ids [b, C], advantages [b]: the chunk's
    rows; offset: prompt width P (response token j of row b sits at column positions[b, j] - P)."""
    rows = []
    for b in range(min(limit, r.mask.shape[0])):
        n = int(r.mask[b].sum())
        cols = (r.positions[b, :n] - offset).tolist()
        rows.append({
            "tokens": token_strings(tokenizer, completion_ids[b, cols].tolist()),
            "gamma": [round(float(gamma[b, c]), 4) for c in cols],
            "sets": ["+".join(name for name, chosen in sets.items() if chosen[b, j]) for j in range(n)],
            "waad": [round(float(x), 4) for x in r.waad[b, :n]],
            "fai": [None if x != x else round(float(x), 6) for x in r.fai[b, :n].tolist()],
            "advantage": float(advantages[b]),
        })
    return rows


__all__ = ["SERIES_KEYS", "RolloutSummary", "drift_metrics", "head_sets", "jaccard", "rollout_rows", "series_sums"]
