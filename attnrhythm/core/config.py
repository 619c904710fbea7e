"""Every constant of the method (docs/method.md), as one dataclass.

Defaults follow the paper's v2; the v1 settings stay reachable through the fields
(``fai_horizon=(10, 50)``, ``sign="positive"``).  Fields marked *Decision* are this
project's documented choices where the paper is silent.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, Sequence

from attnrhythm.errors import UserError

LayerSpec = str | Sequence[int]


@dataclass(frozen=True)
class RhythmConfig:
    window: int = 10
    """WAAD window W: distances are capped at W (docs/method.md section 3)."""
    fai_horizon: tuple[int, int | None] = (10, 100)
    """FAI rows T(s) = {t: s+lo <= t <= s+hi}; hi=None means 'to the end of the response'
    with lo=1 giving the analysis horizon s < t <= N-1."""
    head_fraction: float = 0.3
    """Share of the sampled heads in the local and in the global set (at least one each)."""
    layers: LayerSpec = "middle"
    """'middle' (5 evenly spaced layers from floor(L/3) to floor(2L/3)), 'bottom', 'top', 'all',
    or an explicit list of layer indices."""
    n_layers_sampled: int = 5
    head_mode: Literal["per_sequence", "fixed"] = "per_sequence"
    """*Decision*: heads are classified per sequence; 'fixed' reuses sets from a calibration batch."""
    q: float = 0.4
    """TopQ share of response tokens selected by a credit strategy."""
    amp: float = 1.5
    """gamma_amp: the coefficient given to selected tokens."""
    k: int = 3
    """Neighbourhood before an anchor searched for its preplan (intro) token, k in {1,2,3}."""
    alpha: float = 0.5
    """*Decision*: share of the amplification moved from a dominated anchor to its intro token."""
    sign: Literal["both", "positive", "negative"] = "both"
    """Which advantage signs gamma applies to (v2: both; v1: positive)."""
    selection: Literal["top", "bottom"] = "top"
    """'bottom' selects the lowest q share instead (the bottom-k ablation)."""
    receiver_gap: int = 4
    """Vertical scores ignore rows closer than this to the column (Bogdan et al. 2025)."""
    n_receiver_heads: int = 20
    receiver_layers: Literal["all", "sampled"] = "all"
    """Where receiver heads are ranked: every layer, as the paper does (**Decision**, the default:
    vertical scores need only column statistics, one capture of all layers), or only the sampled
    ``layers`` (the analysis's earlier, cheaper choice)."""
    peak_q: float = 0.4
    """*Decision*: a peak is a local maximum that also lies in the top peak_q of its series."""
    coupling_k: int = 3
    """An FAI peak 'follows' a WAAD peak when it lies at it or within this many tokens after."""
    entropy_temperature: float = 1.0
    high_entropy_share: float = 0.2
    """Wang et al. 2025 baseline: keep the policy gradient on the top 20% entropy tokens only."""

    def __post_init__(self) -> None:
        lo, hi = self.fai_horizon
        if self.receiver_layers not in ("all", "sampled"):
            raise UserError(f"receiver_layers must be 'all' or 'sampled', got {self.receiver_layers!r}")
        if self.window < 1:
            raise UserError(f"window must be >= 1, got {self.window}")
        if lo < 1 or (hi is not None and hi < lo):
            raise UserError(f"fai_horizon must be (lo >= 1, hi >= lo or None), got {self.fai_horizon}")
        if not 0 < self.head_fraction <= 0.5:
            raise UserError(f"head_fraction must be in (0, 0.5], got {self.head_fraction}")
        if not 0 < self.q <= 1:
            raise UserError(f"q must be in (0, 1], got {self.q}")
        if self.k < 1:
            raise UserError(f"k must be >= 1, got {self.k}")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.sign not in ("both", "positive", "negative"):
            raise UserError(f"sign must be 'both', 'positive' or 'negative', got {self.sign!r}")
        if self.selection not in ("top", "bottom"):
            raise UserError(f"selection must be 'top' or 'bottom', got {self.selection!r}")

    @property
    def band_width(self) -> int:
        """Diagonals A[t, t-o], o = 0..band_width-1, that capture must keep for this config."""
        lo, hi = self.fai_horizon
        return max(self.window, self.receiver_gap, (hi if hi is not None else lo) + 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fai_horizon"] = list(self.fai_horizon)
        if not isinstance(self.layers, str):
            d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RhythmConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"unknown RhythmConfig fields {sorted(unknown)}; known: {sorted(names)}")
        d = dict(d)
        if "fai_horizon" in d:
            d["fai_horizon"] = tuple(d["fai_horizon"])
        if "layers" in d and not isinstance(d["layers"], str):
            d["layers"] = tuple(d["layers"])
        return cls(**d)

    def replace(self, **changes) -> "RhythmConfig":
        return replace(self, **changes)


ANALYSIS_HORIZON = (1, None)
"""The paper appendix's analysis horizon: every later row of the response."""


def select_layers(spec: LayerSpec, n_layers: int, n_sampled: int = 5) -> list[int]:
    """Layer indices for a spec.  'middle' = n_sampled evenly spaced layers from floor(L/3)
    to floor(2L/3) inclusive (docs/method.md section 1); 'bottom'/'top' the same over the other
    thirds; 'all' every layer; a list is validated and returned sorted."""
    if isinstance(spec, str):
        thirds = {
            "bottom": (0, n_layers // 3),
            "middle": (n_layers // 3, (2 * n_layers) // 3),
            "top": ((2 * n_layers) // 3, n_layers - 1),
        }
        if spec == "all":
            return list(range(n_layers))
        if spec not in thirds:
            raise UserError(f"layers must be 'middle', 'bottom', 'top', 'all' or a list of ints, got {spec!r}")
        lo, hi = thirds[spec]
        if hi - lo + 1 <= n_sampled:
            return list(range(lo, hi + 1))
        # evenly spaced, both ends included, rounded to the nearest layer
        return sorted({round(lo + i * (hi - lo) / (n_sampled - 1)) for i in range(n_sampled)})
    layers = sorted(set(int(x) for x in spec))
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise UserError(f"layer indices {bad or '[]'} are out of range for a model with {n_layers} layers")
    return layers


def parse_layers(text: str) -> LayerSpec:
    """A --layers value: 'middle', 'bottom', 'top', 'all' or a comma list of layer indices."""
    if text in ("middle", "bottom", "top", "all"):
        return text
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--layers must be middle, bottom, top, all or a comma list of ints, got {text!r}") from None


def parse_horizon(text: str) -> tuple[int, int | None]:
    """A --fai-horizon value: 'analysis' (to the end), 'rl' (10, 100), 'v1' (10, 50) or 'LO,HI'
    ('LO,' = to the end)."""
    named = {"analysis": ANALYSIS_HORIZON, "rl": (10, 100), "v1": (10, 50)}
    if text in named:
        return named[text]
    lo, _, hi = text.partition(",")
    try:
        return int(lo), (int(hi) if hi.strip() else None)
    except ValueError:
        raise UserError(f"--fai-horizon must be analysis, rl, v1 or LO,HI (LO, = to the end), got {text!r}") from None
