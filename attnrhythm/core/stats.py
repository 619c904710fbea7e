"""Attention *statistics*: what every rhythm metric needs, in memory linear in N.

Both capture backends reduce causal attention rows to the same three quantities per
(sequence, sampled layer, query head):

* ``row_distance[t] = sum_s A[t,s] * (t - s)``   -> head classification (docs/method.md section 2)
* ``band[t, o]     = A[t, t - o]`` for o < band_width -> WAAD (capped distance) and the FAI
  horizon, read along anti-diagonals
* ``col_sum[s]     = sum_{t >= s, t valid} A[t, s]`` -> FAI to the end and receiver scores
* ``row_mass[t]    = sum_s A[t, s]``   -> only for models with attention sinks (GPT-OSS), whose
  probabilities over positions sum to less than 1: the sink is not a position and enters no
  statistic, and WAAD's capped distance needs the row's mass to leave it out too.  None for
  every other model (rows sum to 1), so their numbers do not move.

The eager backend feeds whole maps to :func:`accumulate_rows`; the streaming backend feeds it
blocks of rows.  Rows of padding tokens contribute nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AttentionStats:
    """Per-head statistics of one batch.

    Shapes (B sequences, L sampled layers, H query heads, N padded length, W band width):
    ``row_distance`` [B, L, H, N], ``band`` [B, L, H, N, W], ``col_sum`` [B, L, H, N],
    ``valid`` [B, N] bool (real tokens), ``entropy`` [B, N] (entropy of the distribution that
    produced token t, NaN at a sequence's first token) or None, ``row_mass`` [B, L, H, N] (the
    row's attention over positions: 1 on real rows unless the model has attention sinks, 0 on
    padding; None = 1 on every real row: kept only for models with attention sinks).  All float32.
    ``layers`` are the model's layer indices behind dimension L.
    """

    layers: list[int]
    row_distance: Tensor
    band: Tensor
    col_sum: Tensor
    valid: Tensor
    entropy: Tensor | None = None
    row_mass: Tensor | None = None

    @property
    def band_width(self) -> int:
        return self.band.shape[-1]

    def subset(self, layers: list[int]) -> "AttentionStats":
        """The statistics of ``layers`` (model layer indices, all of them in ``self.layers``)."""
        slots = [self.layers.index(layer) for layer in layers]
        pick = lambda x: None if x is None else x[:, slots]  # noqa: E731
        return AttentionStats(list(layers), pick(self.row_distance), pick(self.band), pick(self.col_sum),
                              self.valid, self.entropy, pick(self.row_mass))

    def to(self, device) -> "AttentionStats":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return AttentionStats(self.layers, move(self.row_distance), move(self.band), move(self.col_sum),
                              move(self.valid), move(self.entropy), move(self.row_mass))


def empty_stats(layers: list[int], batch: int, heads: int, length: int, band_width: int,
                valid: Tensor, device=None, dtype=torch.float32, row_mass: bool = False) -> AttentionStats:
    """Zeroed statistics; ``row_mass``: also keep each row's mass over positions (attention sinks)."""
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    n_layers = len(layers)
    return AttentionStats(
        layers=list(layers),
        row_distance=z(batch, n_layers, heads, length),
        band=z(batch, n_layers, heads, length, band_width),
        col_sum=z(batch, n_layers, heads, length),
        valid=valid.to(device=device, dtype=torch.bool),
        row_mass=z(batch, n_layers, heads, length) if row_mass else None,
    )


def accumulate_rows(stats: AttentionStats, slot: int, probs: Tensor, row_start: int, key_start: int = 0) -> None:
    """Add one block of attention rows to ``stats`` (in place).

    probs: [B, H, b, K] float32 attention (row-stochastic, or summing to less than 1 where a
    sink took part of the row) of rows ``row_start .. row_start+b-1``
    over keys ``key_start .. key_start+K-1`` (keys outside that range have zero weight, as in a
    causal or sliding-window layer).  ``slot`` indexes the sampled layer.
    """
    batch, heads, n_rows, n_keys = probs.shape
    device = probs.device
    rows = torch.arange(row_start, row_start + n_rows, device=device)
    keys = torch.arange(key_start, key_start + n_keys, device=device)
    row_valid = stats.valid[:, row_start:row_start + n_rows].to(probs.dtype)  # [B, b]

    # distances t - s, computed directly (not t - sum A*s) to avoid cancellation at large t
    distance = (rows[:, None] - keys[None, :]).clamp(min=0).to(probs.dtype)  # [b, K]
    row_distance = torch.einsum("bhts,ts->bht", probs, distance) * row_valid[:, None, :]
    stats.row_distance[:, slot, :, row_start:row_start + n_rows] = row_distance
    if stats.row_mass is not None:
        stats.row_mass[:, slot, :, row_start:row_start + n_rows] = probs.sum(-1) * row_valid[:, None, :]

    width = stats.band.shape[-1]
    offsets = torch.arange(width, device=device)
    key_index = rows[:, None] - offsets[None, :] - key_start  # [b, W]
    inside = (key_index >= 0) & (key_index < n_keys)
    gathered = probs.gather(-1, key_index.clamp(0, n_keys - 1).expand(batch, heads, n_rows, width))
    band = gathered * inside.to(probs.dtype) * row_valid[:, None, :, None]
    stats.band[:, slot, :, row_start:row_start + n_rows] = band

    # column sums over valid rows; causal zeros above the diagonal make 't >= s' implicit
    stats.col_sum[:, slot, :, key_start:key_start + n_keys] += torch.einsum("bhtk,bt->bhk", probs, row_valid)
