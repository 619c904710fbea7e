"""Token credit for RL: the gamma coefficients of METHOD.md section 4 and the baselines.

Pure, batched functions: no model, no I/O.  Per-token series are ``[B, T]`` tensors of
response tokens (left-aligned, position j = j-th response token) with a bool ``mask``
``[B, T]`` (True on real tokens), or ``[T]`` for one response (``mask=None``: every position
is valid).  Every gamma returned here is detached, float, and exactly 1.0 on padding.

    T_loc  = TopQ(delta, q)             local-chunk credit   (preplan tokens)
    T_glob = TopQ(FAI, q)               global-anchor credit (anchor tokens)
    coupled: anchors dominated by a preplan token just before them hand part of their
             amplification to that token (see ``coupled_sets``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import RhythmConfig

STRATEGIES = ("none", "random", "entropy", "local", "global", "coupled")
SELECTIONS = ("top", "bottom")
_CEIL_EPS = 1e-9  # q * n = 7.000000000000001 for q=0.07, n=100 must still select 7 tokens


def defined_positions(score: Tensor, mask: Tensor | None) -> Tensor:
    """Positions that are real tokens and carry a defined (non-NaN) score."""
    defined = ~torch.isnan(score) if score.is_floating_point() else torch.ones_like(score, dtype=torch.bool)
    return defined if mask is None else defined & mask.to(torch.bool)


def top_q_count(n: Tensor, q: float) -> Tensor:
    """ceil(q * n) as int64, robust to float round-off (``n``: any shape of counts)."""
    return torch.ceil(q * n.to(torch.float64) - _CEIL_EPS).clamp(min=0).to(torch.int64)


def top_q_mask(score: Tensor, mask: Tensor | None, q: float, selection: str = "top") -> Tensor:
    """TopQ(score, q) of METHOD.md section 4.

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
        raise ValueError(f"selection must be 'top' or 'bottom', got {selection!r}")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    valid = defined_positions(score, mask)
    filled = torch.where(valid, score, torch.zeros_like(score))  # placeholder value, filtered below
    # a stable sort keeps equal scores in position order, so the earlier position ranks first
    order = torch.sort(filled, dim=-1, descending=selection == "top", stable=True).indices
    valid_sorted = valid.gather(-1, order)
    m = top_q_count(valid.sum(-1), q)
    rank = valid_sorted.cumsum(-1)  # rank among valid tokens, 1-based
    chosen_sorted = valid_sorted & (rank <= m.unsqueeze(-1))
    return torch.zeros_like(valid).scatter(-1, order, chosen_sorted)


def _gamma_from_set(selected: Tensor, amp: float, dtype: torch.dtype) -> Tensor:
    return 1.0 + (amp - 1.0) * selected.to(dtype)


def local_chunk_gamma(delta: Tensor, mask: Tensor | None, q: float = 0.4, amp: float = 1.5,
                      selection: str = "top") -> Tensor:
    """Local-chunk credit: ``gamma = 1 + (amp-1) [t in TopQ(delta, q)]``.

    Args:
        delta: ``[B, T]`` or ``[T]`` |WAAD[t] - WAAD[t+1]| (last real token 0: it counts as a
            token with delta 0; pass NaN there to exclude it).
        mask: bool like ``delta`` or None.
    Returns:
        float gamma like ``delta`` (1.0 on padding).
    """
    dtype = delta.dtype if delta.is_floating_point() else torch.float32
    return _gamma_from_set(top_q_mask(delta.detach(), mask, q, selection), amp, dtype)


def global_anchor_gamma(fai: Tensor, mask: Tensor | None, q: float = 0.4, amp: float = 1.5,
                        selection: str = "top") -> Tensor:
    """Global-anchor credit: ``gamma = 1 + (amp-1) [t in TopQ(FAI, q)]`` (NaN FAI never selected).

    Shapes as ``local_chunk_gamma``.
    """
    return _gamma_from_set(top_q_mask(fai.detach(), mask, q, selection), amp, fai.dtype)


def masked_median(x: Tensor, valid: Tensor) -> Tensor:
    """True median of ``x[..., valid]`` per row (mean of the two middle values for even n,
    as ``numpy.median``, not torch's lower median).  ``[B, T] -> [B]``; NaN for an empty row."""
    n = valid.sum(-1)
    ordered = torch.sort(torch.where(valid, x, torch.full_like(x, math.inf)), dim=-1).values
    lo = ((n - 1).clamp(min=0) // 2).unsqueeze(-1)
    hi = (n // 2).clamp(max=x.shape[-1] - 1).unsqueeze(-1)
    med = 0.5 * (ordered.gather(-1, lo) + ordered.gather(-1, hi)).squeeze(-1)
    return torch.where(n > 0, med, torch.full_like(med, math.nan))


def coupled_sets(waad: Tensor, fai: Tensor, delta: Tensor, mask: Tensor | None, q: float = 0.4,
                 k: int = 3, selection: str = "top") -> dict[str, Tensor]:
    """The sets behind coupled rhythm credit (METHOD.md section 4, strategy 3).

    An anchor t in T_glob is dominated (t in D) when ``WAAD[t] <= tau_waad`` and
    ``max_{u in t-k..t-1} delta[u] >= tau_delta``; its intro token is the argmax of delta over
    that window (ties: the later position).  The window is clipped at the first response token
    (an anchor at position 0 has an empty window and is never dominated) and ignores padding.

    * ``tau_waad`` = true median of WAAD over the response's valid tokens (``masked_median``).
    * ``tau_delta`` = smallest delta inside T_loc (+inf when T_loc is empty: nothing dominated).
      With ``selection="bottom"`` T_loc and T_glob are both bottom-q sets, so tau_delta becomes the
      smallest delta of the response; the rule itself is unchanged.

    Args:
        waad, fai, delta: ``[B, T]`` or ``[T]`` float series; mask: bool like them or None.
        q, k, selection: as ``RhythmConfig``.
    Returns:
        dict of bool masks like ``waad``: ``local`` (T_loc), ``anchor`` (T_glob),
        ``dominated`` (D), ``intro`` (I(D)); and per-row ``tau_waad``, ``tau_delta`` (float64).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    squeeze = waad.dim() == 1
    if squeeze:
        waad, fai, delta = waad[None], fai[None], delta[None]
        mask = None if mask is None else mask[None]
    # float64 so that the median/threshold comparisons are exact for float32 inputs
    waad, fai, delta = (x.detach().to(torch.float64) for x in (waad, fai, delta))
    real = torch.ones_like(waad, dtype=torch.bool) if mask is None else mask.to(torch.bool)

    local = top_q_mask(delta, real, q, selection)
    anchor = top_q_mask(fai, real, q, selection)
    tau_waad = masked_median(waad, defined_positions(waad, real))
    tau_delta = torch.where(local, delta, torch.full_like(delta, math.inf)).amin(-1)

    # window[..., j] = delta at u = t-1-j (j = 0..k-1): the first column is the LATER position,
    # and max(-1) returns the first maximum, which gives the "later position wins" tie rule.
    n_pos = delta.shape[1]
    usable = torch.where(defined_positions(delta, real), delta, torch.full_like(delta, -math.inf))
    padded = F.pad(usable, (k, 0), value=-math.inf)  # -inf before the first response token
    window = torch.stack([padded[:, k - 1 - j: k - 1 - j + n_pos] for j in range(k)], dim=-1)  # [B, T, k]
    best, best_j = window.max(-1)
    dominated = (anchor & (waad <= tau_waad.unsqueeze(-1))
                 & (best >= tau_delta.unsqueeze(-1)) & (best > -math.inf))
    intro_pos = (torch.arange(waad.shape[1], device=waad.device) - 1 - best_j).clamp(min=0)
    hits = torch.zeros_like(waad, dtype=torch.int64).scatter_add(1, intro_pos, dominated.to(torch.int64))
    intro = hits > 0  # a token introducing several anchors is counted once

    out = dict(local=local, anchor=anchor, dominated=dominated, intro=intro,
               tau_waad=tau_waad, tau_delta=tau_delta)
    if squeeze:
        out = {name: v[0] for name, v in out.items()}
    return out


def coupled_gamma(waad: Tensor, fai: Tensor, delta: Tensor, mask: Tensor | None, q: float = 0.4,
                  amp: float = 1.5, k: int = 3, alpha: float = 0.5, selection: str = "top") -> Tensor:
    """Coupled rhythm credit::

        gamma_t = 1 + (amp-1) [t in T_glob \\ D] + (1-alpha)(amp-1) [t in D] + alpha (amp-1) [t in I(D)]

    Terms add where sets overlap (an intro token that is also a non-dominated anchor gets both).
    Shapes as ``coupled_sets``; returns float gamma like ``waad`` (1.0 on padding).
    """
    s = coupled_sets(waad, fai, delta, mask, q, k, selection)
    gain = amp - 1.0
    gamma = (1.0 + gain * (s["anchor"] & ~s["dominated"]).double()
             + (1 - alpha) * gain * s["dominated"].double() + alpha * gain * s["intro"].double())
    return gamma.to(waad.dtype if waad.is_floating_point() else torch.float32)


def random_gamma(mask: Tensor, q: float = 0.4, amp: float = 1.5, generator: torch.Generator | None = None,
                 selection: str = "top") -> Tensor:
    """Random credit: TopQ over a uniform random score.  ``mask``: bool ``[B, T]`` or ``[T]``.

    ``generator=None`` draws from torch's global RNG (reproducible under ``torch.manual_seed``).
    """
    device = generator.device if generator is not None else mask.device
    score = torch.rand(mask.shape, generator=generator, device=device, dtype=torch.float64).to(mask.device)
    return _gamma_from_set(top_q_mask(score, mask, q, selection), amp, torch.float32)


def entropy_gamma(entropy: Tensor, mask: Tensor | None, q: float = 0.4, amp: float = 1.5,
                  selection: str = "top") -> Tensor:
    """High-entropy credit: ``gamma = 1 + (amp-1) [t in TopQ(H, q)]``.  Shapes as ``local_chunk_gamma``."""
    return _gamma_from_set(top_q_mask(entropy.detach(), mask, q, selection), amp, entropy.dtype)


def credit_gamma(r, strategy: str, config: RhythmConfig, entropy: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """gamma for one credit strategy, shaped like ``r.waad``.

    Args:
        r: any object with ``.waad``, ``.fai``, ``.delta`` (``[B, T]`` or ``[T]``) and optionally
            ``.mask`` (bool, None = all real) and ``.entropy``.
        strategy: one of ``STRATEGIES``; ``"none"`` is plain GRPO (all ones).
        config: supplies ``q``, ``amp``, ``k``, ``alpha``, ``selection`` (``"bottom"`` turns every
            TopQ of the strategy into a bottom-q selection).
        entropy: token entropy like ``r.waad`` for ``"entropy"`` (falls back to ``r.entropy``).
        generator: RNG of ``"random"``.
    Returns:
        detached float gamma like ``r.waad``; exactly 1.0 on padding.
    """
    waad = r.waad
    mask = getattr(r, "mask", None)
    if mask is None:
        mask = torch.ones_like(waad, dtype=torch.bool)
    q, amp, sel = config.q, config.amp, config.selection
    with torch.no_grad():
        if strategy == "none":
            gamma = torch.ones_like(waad, dtype=torch.float32)
        elif strategy == "random":
            gamma = random_gamma(mask, q, amp, generator, sel)
        elif strategy == "entropy":
            entropy = entropy if entropy is not None else getattr(r, "entropy", None)
            if entropy is None:
                raise ValueError("strategy 'entropy' needs token entropy: pass entropy=... or give r an .entropy")
            gamma = entropy_gamma(entropy, mask, q, amp, sel)
        elif strategy == "local":
            gamma = local_chunk_gamma(r.delta, mask, q, amp, sel)
        elif strategy == "global":
            gamma = global_anchor_gamma(r.fai, mask, q, amp, sel)
        elif strategy == "coupled":
            gamma = coupled_gamma(waad, r.fai, r.delta, mask, q, amp, config.k, config.alpha, sel)
        else:
            raise ValueError(f"unknown credit strategy {strategy!r}; expected one of {STRATEGIES}")
    out_dtype = waad.dtype if waad.is_floating_point() else torch.float32
    return gamma.to(out_dtype).detach()


def apply_sign(advantages: Tensor, gamma: Tensor, sign: str = "both") -> Tensor:
    """Per-token advantages ``A_i * gamma_t`` where the sign mode allows, else ``A_i``.

    Args:
        advantages: ``[B]`` GRPO advantages (or a 0-d tensor with a ``[T]`` gamma).
        gamma: ``[B, T]`` (or ``[T]``).
        sign: ``"both"`` (v2 default), ``"positive"`` (only A_i >= 0, v1), ``"negative"`` (only A_i < 0).
    Returns:
        ``[B, T]`` (or ``[T]``) shaped advantages.
    """
    if sign not in ("both", "positive", "negative"):
        raise ValueError(f"sign must be 'both', 'positive' or 'negative', got {sign!r}")
    a = advantages.unsqueeze(-1)
    if sign == "both":
        allowed = torch.ones_like(a, dtype=torch.bool)
    else:
        allowed = a >= 0 if sign == "positive" else a < 0
    return a * torch.where(allowed, gamma.to(a.dtype), torch.ones_like(gamma, dtype=a.dtype))


def high_entropy_selection_mask(entropy: Tensor, mask: Tensor | None, share: float = 0.2,
                                per: str = "batch") -> Tensor:
    """Wang et al. 2025 baseline: the tokens that keep their policy gradient.

    Selects the ``ceil(share * n)`` highest-entropy tokens (ties: earlier position; for
    ``per="batch"`` the order is row-major, i.e. earlier response then earlier position).
    ``per="batch"`` (default, as the original paper, which thresholds entropy over the whole
    batch) ranks all valid tokens of the batch together, n = valid tokens of the batch;
    ``per="response"`` ranks each row on its own.  The paper keeps tokens above the batch's
    entropy percentile; the count rule here is the same up to ties at the threshold.

    Args:
        entropy: ``[B, T]`` or ``[T]``; mask: bool like it or None.
    Returns:
        bool like ``entropy``.
    """
    if per == "response":
        return top_q_mask(entropy.detach(), mask, share)
    if per != "batch":
        raise ValueError(f"per must be 'batch' or 'response', got {per!r}")
    flat_mask = None if mask is None else mask.reshape(1, -1)
    return top_q_mask(entropy.detach().reshape(1, -1), flat_mask, share).reshape(entropy.shape)


def gamma_statistics(gamma: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Logging summary over real tokens: ``mean``, ``share_amplified`` (gamma > 1),
    ``share_reduced`` (gamma < 1), ``max``, ``min``, ``n_tokens``.  NaN values when no token."""
    valid = torch.ones_like(gamma, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    g = gamma.detach()[valid].to(torch.float64)
    if g.numel() == 0:
        nan = float("nan")
        return dict(mean=nan, share_amplified=nan, share_reduced=nan, max=nan, min=nan, n_tokens=0)
    return dict(mean=g.mean().item(), share_amplified=(g > 1).double().mean().item(),
                share_reduced=(g < 1).double().mean().item(), max=g.max().item(), min=g.min().item(),
                n_tokens=int(g.numel()))
