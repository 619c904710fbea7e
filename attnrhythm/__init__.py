"""attnrhythm: the preplan-and-anchor rhythm of LLM reasoning, visible and trainable.

The public API below keeps its names; the layout behind it is drawn in docs/architecture.md."""
from attnrhythm.capture import attention_maps, capture_statistics
from attnrhythm.core.config import RhythmConfig, select_layers
from attnrhythm.core.heads import HeadSets, classify_heads
from attnrhythm.core.metrics import RhythmResult, calibrate_heads, receiver_kurtosis, rhythm_from_attentions, rhythm_from_stats
from attnrhythm.core.stats import AttentionStats

__version__ = "0.1.0"

__all__ = [
    "AttentionStats", "HeadSets", "RhythmConfig", "RhythmResult", "attention_maps", "calibrate_heads",
    "capture_statistics", "classify_heads", "receiver_kurtosis", "rhythm_from_attentions",
    "rhythm_from_stats", "select_layers",
]


# modules that moved (attnrhythm.metrics -> attnrhythm.core.metrics, ...): reachable as attributes
# too, as they were when this package imported them eagerly; each warns once (DeprecationWarning)
_MOVED = ("config", "stats", "heads", "metrics", "credit", "couplings", "textstats", "streaming", "analysis",
          "perturb", "reproduce", "figures", "report", "plot", "greedy")


def __getattr__(name):
    import importlib

    # credit lives in its own module; imported lazily so `import attnrhythm` stays light
    if name in ("credit_gamma",):
        return importlib.import_module("attnrhythm.core.credit").credit_gamma
    if name in _MOVED:
        return importlib.import_module(f"attnrhythm.{name}")
    raise AttributeError(f"module 'attnrhythm' has no attribute {name!r}")
