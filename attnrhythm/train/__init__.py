"""GRPO with rhythm credit on TRL (docs/method.md sections 4 and 6).

``trainer`` holds the GRPOTrainer subclass (``drift`` sums what a rollout batch logs,
``callbacks`` write it), ``config`` the run config, ``run`` the `train` command; ``sft`` (warm
start), ``evaluate`` (the `eval` command), ``compare``, ``plot`` and ``rhythm_views`` (curves,
drift, the credit view) sit beside them.  Imports are lazy so that ``attnrhythm.train.sft`` does not pull in TRL.
"""
from __future__ import annotations

_EXPORTS = {
    "RhythmGRPOTrainer": "attnrhythm.train.trainer",
    "CreditConfig": "attnrhythm.train.trainer",
    "MetricsJsonl": "attnrhythm.train.callbacks",
    "TrainConfig": "attnrhythm.train.config",
    "to_grpo_config": "attnrhythm.train.config",
    "build_trainer": "attnrhythm.train.run",
    "train": "attnrhythm.train.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'attnrhythm.train' has no attribute {name!r}")
