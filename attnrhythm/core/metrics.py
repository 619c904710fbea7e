"""Token-level rhythm metrics from attention statistics (docs/method.md section 3).

Pure, batched tensor functions.  Shapes: B sequences, L sampled layers, H query heads,
N padded length, W band width, T response tokens (left-aligned, with a mask).

Everything is linear in A, so a metric of the head-averaged map is the average of the per-head
metric: head sets are applied as weights [B, L, H] before the anti-diagonal reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.heads import HeadSets, classify_heads, head_distance, heads_to_mask, kurtosis, mask_to_heads
from attnrhythm.core.stats import AttentionStats, accumulate_rows, empty_stats


@dataclass
class RhythmResult:
    """Metrics of a batch of responses ([B, T] series, ``mask`` marks real tokens) or, from
    :func:`rhythm_from_attentions` and indexing, of one response ([T] series).

    ``local_heads``/``global_heads``/``receiver_heads`` hold (layer slot, head) pairs, the slot
    indexing ``layers`` (the model's layer indices); batched results hold one list per sequence.
    """

    waad: Tensor
    fai: Tensor
    delta: Tensor
    mask: Tensor
    head_distance: Tensor
    local_heads: list
    global_heads: list
    layers: list[int]
    fai_receiver: Tensor | None = None
    entropy: Tensor | None = None
    receiver_heads: list | None = None
    positions: Tensor | None = None

    def __len__(self) -> int:
        return self.waad.shape[0] if self.waad.dim() == 2 else 1

    def __getitem__(self, i: int) -> "RhythmResult":
        """Response i of a batch, trimmed to its own length."""
        if self.waad.dim() != 2:
            raise TypeError("indexing needs a batched RhythmResult")
        n = int(self.mask[i].sum())
        cut = lambda x: None if x is None else x[i, :n]  # noqa: E731
        return RhythmResult(
            waad=cut(self.waad), fai=cut(self.fai), delta=cut(self.delta), mask=cut(self.mask),
            head_distance=self.head_distance[i], local_heads=self.local_heads[i],
            global_heads=self.global_heads[i], layers=self.layers, fai_receiver=cut(self.fai_receiver),
            entropy=cut(self.entropy), receiver_heads=self.receiver_heads, positions=cut(self.positions))


def response_positions(response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """[B, N] bool -> (positions [B, T] long, mask [B, T] bool): the padded-frame positions of
    each sequence's response tokens, left-aligned; T = the longest response."""
    counts = response_mask.sum(-1)
    width = max(1, int(counts.max())) if counts.numel() else 1
    order = torch.sort((~response_mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    mask = torch.arange(width, device=response_mask.device)[None] < counts[:, None]
    return torch.where(mask, order, torch.zeros_like(order)), mask


def capped_distance(band: Tensor, window: int, row_mass: Tensor | None = None) -> Tensor:
    """Per-row sum_s A[t,s] * min(t-s, W) from the band.  band: [..., N, W'] with W' >= W.
    Returns [..., N].  The mass further than W-1 back is (row mass) - (band mass), each at
    distance W; ``row_mass`` [..., N] is 1 when None (rows of a model with attention sinks sum
    to less than 1 over positions, and the sink's share is no distance at all)."""
    if band.shape[-1] < window:
        raise ValueError(f"band width {band.shape[-1]} < window {window}; capture with this config")
    near = band[..., :window]
    offsets = torch.arange(window, device=band.device, dtype=band.dtype)
    total = 1.0 if row_mass is None else row_mass
    return (near * offsets).sum(-1) + window * (total - near.sum(-1)).clamp(min=0)


def future_column_sums(band: Tensor, col_sum: Tensor, valid: Tensor, lo: int, hi: int | None) -> tuple[Tensor, Tensor]:
    """sum_{t in T(s)} A[t,s] and |T(s)| for T(s) = {valid t : s+lo <= t <= s+hi} (hi=None: no
    upper end).  band: [B, ..., N, W]; col_sum: [B, ..., N]; valid: [B, N].
    Returns (sums [B, ..., N], counts [B, N])."""
    width = band.shape[-1]
    length = band.shape[-2]
    if hi is not None and hi >= width:
        raise ValueError(f"FAI horizon end {hi} needs band width > {hi}, captured {width}; capture with this config")
    if hi is None and lo > width:
        raise ValueError(f"FAI horizon start {lo} needs band width >= {lo}, captured {width}")
    # diagonal o read at column s is band[s + o, o]
    padded = torch.nn.functional.pad(band, (0, 0, 0, width))
    diagonal = lambda o: padded[..., o:o + length, o]  # noqa: E731
    if hi is None:
        sums = col_sum.clone()
        for o in range(lo):
            sums = sums - diagonal(o)
    else:
        sums = torch.zeros_like(col_sum)
        for o in range(lo, hi + 1):
            sums = sums + diagonal(o)
    cumulative = torch.nn.functional.pad(valid.long().cumsum(-1), (1, 0))  # [B, N+1]
    s = torch.arange(length, device=band.device)
    first = (s + lo).clamp(max=length)
    last = (s + hi + 1).clamp(max=length) if hi is not None else torch.full_like(s, length)
    counts = (cumulative[:, last] - cumulative[:, first]).clamp(min=0)
    return sums, counts


def _weighted(x: Tensor, weights: Tensor) -> Tensor:
    """Average over (L, H) with weights [B, L, H]: x [B, L, H, ...] -> [B, ...]."""
    w = weights.to(x.dtype)
    w = w / w.sum((1, 2), keepdim=True)
    return (x * w.view(*w.shape, *([1] * (x.dim() - 3)))).sum((1, 2))


def fai_series(stats: AttentionStats, weights: Tensor, positions: Tensor, mask: Tensor,
               horizon: tuple[int, int | None]) -> Tensor:
    """FAI of response tokens over the heads weighted by ``weights`` [B, L, H]: [B, T], NaN
    where T(s) is empty or at padding."""
    band = _weighted(stats.band, weights)
    col = _weighted(stats.col_sum, weights)
    sums, counts = future_column_sums(band[:, None], col[:, None], stats.valid, *horizon)
    fai = sums[:, 0] / counts.clamp(min=1)
    fai = torch.where(counts > 0, fai, torch.full_like(fai, math.nan))
    out = fai.gather(-1, positions)
    return torch.where(mask, out, torch.full_like(out, math.nan))


def waad_series(stats: AttentionStats, weights: Tensor, positions: Tensor, mask: Tensor, window: int) -> Tensor:
    """WAAD of response tokens over the heads weighted by ``weights`` [B, L, H]: [B, T]."""
    row_mass = None if stats.row_mass is None else _weighted(stats.row_mass, weights)
    waad = capped_distance(_weighted(stats.band, weights), window, row_mass)
    return waad.gather(-1, positions) * mask


def waad_delta(waad: Tensor, mask: Tensor) -> Tensor:
    """|WAAD[t] - WAAD[t+1]|; 0 at each response's last token and at padding.  [B, T]."""
    delta = torch.zeros_like(waad)
    delta[:, :-1] = (waad[:, :-1] - waad[:, 1:]).abs()
    return delta * (mask & torch.nn.functional.pad(mask[:, 1:], (0, 1)))


def per_head_future_mean(stats: AttentionStats, positions: Tensor, mask: Tensor, lo: int, hi: int | None) -> Tensor:
    """Per head, the mean of A[t, s] over valid rows t in s+lo .. s+hi (hi None: to the end) of
    each response position s: [B, L, H, T], NaN where no such row exists or at padding."""
    sums, counts = future_column_sums(stats.band, stats.col_sum, stats.valid, lo, hi)
    scores = sums / counts[:, None, None].clamp(min=1)
    scores = torch.where(counts[:, None, None] > 0, scores, torch.full_like(scores, math.nan))
    batch, n_layers, n_heads, _ = scores.shape
    out = scores.gather(-1, positions[:, None, None].expand(batch, n_layers, n_heads, -1))
    return torch.where(mask[:, None, None], out, torch.full_like(out, math.nan))


def receiver_vertical_scores(stats: AttentionStats, positions: Tensor, mask: Tensor, gap: int = 4) -> Tensor:
    """Per-head vertical score of each response position: mean of A[t,s] over valid rows
    t >= s + gap.  Returns [B, L, H, T], NaN where no such row exists."""
    return per_head_future_mean(stats, positions, mask, gap, None)


def per_head_fai(stats: AttentionStats, positions: Tensor, mask: Tensor, horizon) -> Tensor:
    """FAI of every single head: [B, L, H, T], NaN where T(s) is empty or at padding.  FAI is
    linear in A with per-position counts shared by all heads, so the FAI of a head set's mean
    map is the mean of these over the set (how the analysis forms ``fai_receiver`` after
    calibrating the receiver heads on a whole run)."""
    return per_head_future_mean(stats, positions, mask, *horizon)


def fai_row_counts(stats: AttentionStats, positions: Tensor, mask: Tensor, horizon) -> Tensor:
    """How many valid rows stand behind each response position's FAI: [B, T] int64 (0 at padding)."""
    _, counts = future_column_sums(stats.band[:, :1, :1], stats.col_sum[:, :1, :1], stats.valid, *horizon)
    return torch.where(mask, counts.gather(-1, positions), torch.zeros_like(positions))


def receiver_kurtosis(stats: AttentionStats, response_mask: Tensor, gap: int = 4) -> Tensor:
    """Per-response, per-head kurtosis of the vertical scores: [B, L, H] float64."""
    positions, mask = response_positions(response_mask)
    scores = receiver_vertical_scores(stats, positions, mask, gap)
    return kurtosis(scores, mask[:, None, None])


def calibration_distance(stats: AttentionStats, response_mask: Tensor) -> Tensor:
    """Each head's mean distance over a calibration batch: [L, H] (0 where no response defines it).
    Processes that calibrate together average these before ``heads_from_distance``."""
    return torch.nan_to_num(torch.nanmean(head_distance(stats.row_distance, response_mask), dim=0), nan=0.0)


def heads_from_distance(distance: Tensor, config: RhythmConfig) -> HeadSets:
    """Local and global head sets of a [L, H] mean distance (on the CPU)."""
    local, global_ = classify_heads(distance, config.head_fraction)
    return HeadSets(local.cpu(), global_.cpu())


def calibrate_heads(stats: AttentionStats, response_mask: Tensor, config: RhythmConfig) -> HeadSets:
    """Head sets for ``head_mode="fixed"``: classify the mean distance over a calibration batch."""
    return heads_from_distance(calibration_distance(stats, response_mask), config)


def rhythm_from_stats(stats: AttentionStats, response_mask: Tensor, config: RhythmConfig | None = None, *,
                      heads: HeadSets | None = None, receiver_heads=None) -> RhythmResult:
    """All token-level metrics of a batch of responses.

    response_mask: [B, N] bool, True at response tokens (any padding side).  ``heads`` fixes the
    local/global sets (else per sequence, or as ``config.head_mode`` demands); ``receiver_heads``
    ([L, H] bool mask or (slot, head) pairs) adds ``fai_receiver``.
    """
    config = config or RhythmConfig()
    if config.head_mode == "fixed" and heads is None:
        raise ValueError("head_mode='fixed' needs heads=calibrate_heads(...) from a calibration batch")
    response_mask = response_mask.bool() & stats.valid
    positions, mask = response_positions(response_mask)
    distance = head_distance(stats.row_distance, response_mask)
    batch, n_layers, n_heads = distance.shape
    if heads is None:
        local, global_ = classify_heads(torch.nan_to_num(distance, nan=0.0), config.head_fraction)
    else:
        local = heads.local.to(distance.device).expand(batch, -1, -1)
        global_ = heads.global_.to(distance.device).expand(batch, -1, -1)
    waad = waad_series(stats, local, positions, mask, config.window)
    result = RhythmResult(
        waad=waad,
        fai=fai_series(stats, global_, positions, mask, config.fai_horizon),
        delta=waad_delta(waad, mask),
        mask=mask,
        head_distance=distance,
        local_heads=[mask_to_heads(m) for m in local.cpu()],
        global_heads=[mask_to_heads(m) for m in global_.cpu()],
        layers=list(stats.layers),
        positions=positions,
    )
    if stats.entropy is not None:
        result.entropy = torch.where(mask, stats.entropy.gather(-1, positions), torch.zeros_like(waad))
    if receiver_heads is not None:
        if not isinstance(receiver_heads, Tensor):
            receiver_heads = heads_to_mask(receiver_heads, n_layers, n_heads)
        weights = receiver_heads.to(distance.device).expand(batch, -1, -1)
        result.fai_receiver = fai_series(stats, weights, positions, mask, config.fai_horizon)
        result.receiver_heads = mask_to_heads(receiver_heads.cpu())
    return result


def rhythm_from_attentions(attn: Tensor, response_start: int, config: RhythmConfig | None = None, *,
                           receiver_heads=None) -> RhythmResult:
    """Metrics of one sequence from its full causal maps.

    attn: [L, H, N, N] row-stochastic causal maps of the chosen layers; response tokens are
    positions ``response_start .. N-1``.  Returns a single-response :class:`RhythmResult`
    ([N - P] series; head pairs index ``attn``'s first two dimensions).
    """
    config = config or RhythmConfig()
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be [L, H, N, N], got shape {tuple(attn.shape)}")
    n_layers, n_heads, length, _ = attn.shape
    if not 0 <= response_start < length:
        raise ValueError(f"response_start {response_start} must lie in [0, {length}): the response is empty")
    valid = torch.ones(1, length, dtype=torch.bool, device=attn.device)
    dtype = torch.float64 if attn.dtype == torch.float64 else torch.float32
    stats = empty_stats(list(range(n_layers)), 1, n_heads, length, config.band_width, valid, attn.device, dtype)
    for slot in range(n_layers):
        accumulate_rows(stats, slot, attn[slot][None].to(dtype), 0, 0)
    response_mask = torch.arange(length, device=attn.device)[None] >= response_start
    return rhythm_from_stats(stats, response_mask, config, receiver_heads=receiver_heads)[0]

