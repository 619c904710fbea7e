"""TopQ: the selection every credit strategy and every peak definition rests on (docs/method.md
section 4).  Shared by ``credit`` (which tokens get gamma_amp) and ``couplings``
(which local maxima count as peaks), so neither depends on the other."""
from __future__ import annotations

import torch
from torch import Tensor

from attnrhythm.errors import UserError

SELECTIONS = ("top", "bottom")
CEIL_EPS = 1e-9
"""q * n = 7.000000000000001 for q=0.07, n=100 must still select 7 tokens."""


def defined_positions(score: Tensor, mask: Tensor | None) -> Tensor:
    """Positions that are real tokens and carry a defined (non-NaN) score."""
    defined = ~torch.isnan(score) if score.is_floating_point() else torch.ones_like(score, dtype=torch.bool)
    return defined if mask is None else defined & mask.to(torch.bool)


def top_q_count(n: Tensor, q: float) -> Tensor:
    """ceil(q * n) as int64, robust to float round-off (``n``: any shape of counts)."""
    return torch.ceil(q * n.to(torch.float64) - CEIL_EPS).clamp(min=0).to(torch.int64)


def top_q_mask(score: Tensor, mask: Tensor | None, q: float, selection: str = "top") -> Tensor:
    """TopQ(score, q) of docs/method.md section 4.

    Args:
        score: ``[B, T]`` or ``[T]`` float; NaN = undefined (never selected).
        mask: bool, same shape, True on real tokens; ``None`` = all real.
        q: share in (0, 1]; each row selects ``ceil(q * n)`` tokens, n = its valid tokens
            with a defined score.
        selection: ``"top"`` (largest scores) or ``"bottom"`` (smallest, the ablation).

    Returns:
        bool, same shape as ``score``.  Ties are broken by the EARLIER position in both modes.
    """
    if selection not in SELECTIONS:
        raise UserError(f"selection must be 'top' or 'bottom', got {selection!r}")
    if not 0 < q <= 1:
        raise UserError(f"q must be in (0, 1], got {q}")
    valid = defined_positions(score, mask)
    filled = torch.where(valid, score, torch.zeros_like(score))  # placeholder value, filtered below
    # a stable sort keeps equal scores in position order, so the earlier position ranks first
    order = torch.sort(filled, dim=-1, descending=selection == "top", stable=True).indices
    valid_sorted = valid.gather(-1, order)
    m = top_q_count(valid.sum(-1), q)
    rank = valid_sorted.cumsum(-1)  # rank among valid tokens, 1-based
    chosen_sorted = valid_sorted & (rank <= m.unsqueeze(-1))
    return torch.zeros_like(valid).scatter(-1, order, chosen_sorted)
