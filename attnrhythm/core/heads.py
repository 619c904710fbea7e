"""Head groups: local vs global heads (docs/method.md section 2) and receiver heads.

Pure tensor functions over :class:`~attnrhythm.core.stats.AttentionStats` fields; no model, no I/O.
Shapes: B sequences, L sampled layers, H query heads, N padded length, T response tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class HeadSets:
    """Fixed head sets for ``head_mode="fixed"``: bool masks [L, H] over the sampled layers."""

    local: Tensor
    global_: Tensor

    def to_lists(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        return mask_to_heads(self.local), mask_to_heads(self.global_)


def mask_to_heads(mask: Tensor) -> list[tuple[int, int]]:
    """[L, H] bool -> [(layer slot, head), ...] in layer-major order."""
    return [(int(l), int(h)) for l, h in mask.nonzero().tolist()]


def heads_to_mask(heads, n_layers: int, n_heads: int) -> Tensor:
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def head_distance(row_distance: Tensor, response_mask: Tensor) -> Tensor:
    """Mean backward distance d[l,h] over response rows.

    row_distance: [B, L, H, N]; response_mask: [B, N] bool.  Returns [B, L, H]
    (NaN for a sequence without response rows).
    """
    weights = response_mask.to(row_distance.dtype)
    total = torch.einsum("blhn,bn->blh", row_distance, weights)
    return total / weights.sum(-1)[:, None, None]


def classify_heads(distance: Tensor, fraction: float = 0.3) -> tuple[Tensor, Tensor]:
    """Local and global head masks from mean distances.

    distance: [B, L, H] (or [L, H]).  Heads are sorted by distance, ties by layer then head
    (a stable sort of the layer-major flattening); the lowest ``max(1, floor(fraction * L*H))``
    are local, the highest as many global.  Returns two bool masks shaped like ``distance``.
    """
    single = distance.dim() == 2
    d = distance[None] if single else distance
    batch, n_layers, n_heads = d.shape
    n_total = n_layers * n_heads
    count = max(1, math.floor(fraction * n_total))
    if 2 * count > n_total:
        raise ValueError(f"cannot take {count} local and {count} global heads out of {n_total}; lower head_fraction")
    order = torch.sort(d.reshape(batch, n_total), dim=-1, stable=True).indices
    local = torch.zeros(batch, n_total, dtype=torch.bool, device=d.device)
    global_ = torch.zeros_like(local)
    local.scatter_(1, order[:, :count], True)
    global_.scatter_(1, order[:, -count:], True)
    local, global_ = local.view(batch, n_layers, n_heads), global_.view(batch, n_layers, n_heads)
    return (local[0], global_[0]) if single else (local, global_)


def kurtosis(values: Tensor, mask: Tensor) -> Tensor:
    """Fisher kurtosis with the biased estimator over the last dimension, NaN and masked
    entries omitted (``scipy.stats.kurtosis(x[~isnan(x)])``).  values: [..., T], mask: [..., T]
    broadcastable.  Computed in float64; NaN where fewer than 2 values or zero variance."""
    x = values.double()
    keep = mask & ~torch.isnan(x)
    n = keep.sum(-1).double()
    x0 = torch.where(keep, x, torch.zeros_like(x))
    mean = x0.sum(-1) / n
    centred = torch.where(keep, x - mean[..., None], torch.zeros_like(x))
    m2 = (centred ** 2).sum(-1) / n
    m4 = (centred ** 4).sum(-1) / n
    out = m4 / m2 ** 2 - 3.0
    return torch.where((n >= 2) & (m2 > 0), out, torch.full_like(out, float("nan")))


def select_receiver_heads(head_kurtosis: Tensor, count: int = 20) -> Tensor:
    """Receiver heads: the ``count`` heads with the largest kurtosis averaged over the
    calibration responses (NaN omitted).  head_kurtosis: [B, L, H].  Returns a bool mask [L, H];
    ties by layer then head."""
    mean = torch.nanmean(head_kurtosis.double(), dim=0)
    n_layers, n_heads = mean.shape
    flat = torch.nan_to_num(mean.reshape(-1), nan=-math.inf)
    count = min(count, flat.numel())
    order = torch.sort(-flat, stable=True).indices[:count]
    mask = torch.zeros(n_layers * n_heads, dtype=torch.bool)
    mask[order.cpu()] = True
    return mask.view(n_layers, n_heads)
