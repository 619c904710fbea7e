"""attnrhythm: the preplan-and-anchor rhythm of LLM reasoning, visible and trainable.

The public API below keeps its names; the layout behind it is drawn in docs/architecture.md."""
from attnrhythm.capture import attention_maps, capture_statistics
from attnrhythm.core.config import RhythmConfig, select_layers
from attnrhythm.core.credit import credit_gamma
from attnrhythm.core.heads import HeadSets, classify_heads
from attnrhythm.core.metrics import RhythmResult, calibrate_heads, receiver_kurtosis, rhythm_from_attentions, rhythm_from_stats
from attnrhythm.core.stats import AttentionStats

__version__ = "0.1.0"

__all__ = [
    "AttentionStats", "HeadSets", "RhythmConfig", "RhythmResult", "attention_maps", "calibrate_heads",
    "capture_statistics", "classify_heads", "credit_gamma", "receiver_kurtosis", "rhythm_from_attentions",
    "rhythm_from_stats", "select_layers",
]

