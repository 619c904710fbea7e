"""Token credit for RL: the gamma coefficients of docs/method.md section 4 and the baselines.

Pure, batched functions: no model, no I/O.  Per-token series are ``[B, T]`` tensors of
response tokens (left-aligned, position j = j-th response token) with a bool ``mask``
``[B, T]`` (True on real tokens), or ``[T]`` for one response (``mask=None``: every position
is valid).  Every gamma returned here is detached, float, and exactly 1.0 on padding.

    T_loc  = TopQ(delta, q)             local-chunk credit   (preplan tokens)
    T_glob = TopQ(FAI, q)               global-anchor credit (anchor tokens)
    coupled: anchors dominated by a preplan token just before them hand part of their
             amplification to that token (see ``coupled_sets``).

The registry ``CREDITS`` holds each strategy's one implementation: ``credit_gamma`` /
``credit_sets`` give a per-token strategy's gamma (and sets) on one chunk, ``shape_advantages``
turns a rollout batch's gamma into advantages and applies a batch-level strategy's ``keep``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.topq import SELECTIONS, defined_positions, top_q_count, top_q_mask  # noqa: F401 (re-exported)
from attnrhythm.errors import unknown_name


def _gamma_from_set(selected: Tensor, amp: float, dtype: torch.dtype) -> Tensor:
    return 1.0 + (amp - 1.0) * selected.to(dtype)


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
    """The sets behind coupled rhythm credit (docs/method.md section 4, strategy 3).

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


@dataclass(frozen=True)
class CreditStrategy:
    """One credit strategy of the registry ``CREDITS``.

    ``select(r, mask, config, entropy, generator)`` is the per-token credit of one capture chunk:
    (gamma, sets), a float64 gamma like ``r.waad`` (1 on padding) and the named bool token sets
    behind it (logged by the trainer as ``rhythm/set_<name>``).  ``needs_entropy``: capture must
    compute token entropy.  ``keep(entropy, mask, config)`` makes it a batch-level credit: the bool
    ``[B, C]`` tokens of the whole rollout batch that keep their policy gradient (every other
    token's advantage becomes 0; logged as ``rhythm/set_kept``); None for a per-token credit.
    ``shape_advantages`` applies both, so the trainer never asks which kind a strategy is.
    """

    name: str
    description: str
    select: Callable
    needs_entropy: bool = False
    keep: Callable | None = None


def _entropy_of(r, entropy):
    entropy = entropy if entropy is not None else getattr(r, "entropy", None)
    if entropy is None:
        raise ValueError("strategy 'entropy' needs token entropy: pass entropy=... or give r an .entropy")
    return entropy


def _scaled(name: str, score):
    """A strategy that amplifies TopQ(score(r, entropy), q)."""
    def select(r, mask, c, entropy, generator):
        chosen = top_q_mask(score(r, entropy).detach(), mask, c.q, c.selection)
        return _gamma_from_set(chosen, c.amp, torch.float64), {name: chosen}
    return select


def _none(r, mask, c, entropy, generator):
    return torch.ones_like(mask, dtype=torch.float64), {}


def _random(r, mask, c, entropy, generator):
    """TopQ over a uniform random score (``generator=None``: torch's global RNG)."""
    device = generator.device if generator is not None else mask.device
    score = torch.rand(mask.shape, generator=generator, device=device, dtype=torch.float64).to(mask.device)
    chosen = top_q_mask(score, mask, c.q, c.selection)
    return _gamma_from_set(chosen, c.amp, torch.float64), {"random": chosen}


def _coupled(r, mask, c, entropy, generator):
    """``gamma_t = 1 + (amp-1) [t in T_glob \\ D] + (1-alpha)(amp-1) [t in D] + alpha (amp-1) [t in I(D)]``:
    terms add where sets overlap (an intro token that is also a non-dominated anchor gets both)."""
    s = coupled_sets(r.waad, r.fai, r.delta, mask, c.q, c.k, c.selection)
    gain = c.amp - 1.0
    gamma = (1.0 + gain * (s["anchor"] & ~s["dominated"]).double()
             + (1 - c.alpha) * gain * s["dominated"].double() + c.alpha * gain * s["intro"].double())
    return gamma, {n: s[n] for n in ("local", "anchor", "dominated", "intro")}


def _high_entropy_share(entropy, mask, c):
    return high_entropy_selection_mask(entropy, mask, c.high_entropy_share)


_STRATEGIES = [
    CreditStrategy("none", "plain GRPO: every token keeps its advantage", _none),
    CreditStrategy("random", "a random q share of tokens gets gamma_amp (control)", _random),
    CreditStrategy("entropy", "the q share of highest-entropy tokens gets gamma_amp (control)",
                   _scaled("entropy", lambda r, e: _entropy_of(r, e)), needs_entropy=True),
    CreditStrategy("local", "local-chunk credit: TopQ of |WAAD[t] - WAAD[t+1]| (preplan tokens)",
                   _scaled("local", lambda r, e: r.delta)),
    CreditStrategy("global", "global-anchor credit: TopQ of FAI (anchor tokens)", _scaled("global", lambda r, e: r.fai)),
    CreditStrategy("coupled", "coupled rhythm credit: anchors dominated by a preplan token share their credit with it",
                   _coupled),
    CreditStrategy("high-entropy-selection", "Wang et al. 2025: only the top entropy share of the batch keeps its "
                   "policy gradient", _none, needs_entropy=True, keep=_high_entropy_share),
]
CREDITS: dict[str, CreditStrategy] = {s.name: s for s in _STRATEGIES}
"""The registry: the only list of credit strategy names (train config, trainer and CLI read it).
A new strategy is one ``CreditStrategy`` added here."""
CREDIT_NAMES = tuple(CREDITS)
STRATEGIES = tuple(n for n, s in CREDITS.items() if s.keep is None)
"""The per-token strategies (``credit_gamma`` is all of their credit)."""


def get_credit(name: str) -> CreditStrategy:
    """The registered strategy ``name`` (a UserError with the closest name otherwise)."""
    if name not in CREDITS:
        raise unknown_name("credit strategy", name, CREDIT_NAMES)
    return CREDITS[name]


def credit_sets(r, strategy: str, config: RhythmConfig, entropy: Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(gamma, named token sets) of one strategy; arguments as ``credit_gamma``."""
    mask = getattr(r, "mask", None)
    if mask is None:
        mask = torch.ones_like(r.waad, dtype=torch.bool)
    with torch.no_grad():
        gamma, sets = get_credit(strategy).select(r, mask, config, entropy, generator)
    out_dtype = r.waad.dtype if r.waad.is_floating_point() else torch.float32
    return gamma.to(out_dtype).detach(), sets


def credit_gamma(r, strategy: str, config: RhythmConfig, entropy: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """gamma for one credit strategy, shaped like ``r.waad``.

    Args:
        r: any object with ``.waad``, ``.fai``, ``.delta`` (``[B, T]`` or ``[T]``) and optionally
            ``.mask`` (bool, None = all real) and ``.entropy``.
        strategy: a name of ``CREDITS``; ``"none"`` is plain GRPO (all ones).
        config: supplies ``q``, ``amp``, ``k``, ``alpha``, ``selection`` (``"bottom"`` turns every
            TopQ of the strategy into a bottom-q selection).
        entropy: token entropy like ``r.waad`` for ``"entropy"`` (falls back to ``r.entropy``).
        generator: RNG of ``"random"``.
    Returns:
        detached float gamma like ``r.waad``; exactly 1.0 on padding.
    """
    return credit_sets(r, strategy, config, entropy, generator)[0]


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


def shape_advantages(strategy: str, advantages: Tensor, gamma: Tensor, mask: Tensor, config: RhythmConfig,
                     entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The per-token advantages of one rollout batch and the batch-level token sets behind them.

    ``A_i * gamma_t`` where the sign mode allows (``apply_sign``); a batch-level strategy (``keep``)
    then zeroes every token outside the ones it keeps over the whole batch, returned as the set
    ``kept``.

    Args:
        advantages: ``[B]``; gamma, mask (bool), entropy (NaN where not captured): ``[B, C]``.
    Returns:
        (``[B, C]`` advantages in ``advantages.dtype``, ``{}`` or ``{"kept": bool [B, C]}``).
    """
    shaped = apply_sign(advantages, gamma, config.sign)
    keep = get_credit(strategy).keep
    if keep is None:
        return shaped.to(advantages.dtype), {}
    kept = keep(entropy, mask, config)
    return (shaped * kept.to(shaped.dtype)).to(advantages.dtype), {"kept": kept}


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


def gamma_sums(gamma: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Additive counts over real tokens (sum, n_tokens, n_amplified, n_reduced): what processes
    add up before ``gamma_statistics_from_sums`` divides."""
    valid = torch.ones_like(gamma, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    g = gamma.detach()[valid].to(torch.float64)
    return dict(sum=g.sum().item(), n_tokens=float(g.numel()), n_amplified=(g > 1).sum().item(),
                n_reduced=(g < 1).sum().item())


def gamma_statistics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """mean, share_amplified, share_reduced of (possibly summed) ``gamma_sums``; NaN without tokens."""
    n = sums["n_tokens"]
    if n == 0:
        return dict(mean=math.nan, share_amplified=math.nan, share_reduced=math.nan)
    return dict(mean=sums["sum"] / n, share_amplified=sums["n_amplified"] / n, share_reduced=sums["n_reduced"] / n)


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
