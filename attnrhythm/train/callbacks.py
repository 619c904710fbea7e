"""Callbacks of a training run: metrics.jsonl (flushed per line, cut back on --resume) and the
compact progress bar.  The trainer (``trainer.py``) produces what they write."""
from __future__ import annotations

import math
import os

from transformers import ProgressCallback, TrainerCallback

from attnrhythm import io


class MetricsJsonl(TrainerCallback):
    """One JSON line per logging step in ``path`` (main process).  Each line is flushed and
    fsynced, so a killed run keeps what it logged; ``truncate_metrics`` cuts a resumed run's
    file back to its checkpoint.  The end-of-training summary goes to train_summary.json."""

    def __init__(self, path: str, extras=None):
        self.path, self.extras = path, extras

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:
            io.write_json(os.path.join(os.path.dirname(self.path), "train_summary.json"),
                          {"step": state.global_step, **logs})
            return
        io.append_jsonl(self.path, [{"step": state.global_step, **logs, **(self.extras() if self.extras else {})}])


def truncate_metrics(path: str, last_step: int) -> int:
    """Keep the records with step <= last_step (atomically; a cut last line is dropped as
    ``io.read_jsonl`` does); returns the count kept."""
    if not os.path.exists(path):
        return 0
    kept = [r for r in io.read_jsonl(path) if isinstance(r, dict) and r.get("step", math.inf) <= last_step]
    io.write_jsonl(path, kept)
    return len(kept)


class CompactProgress(ProgressCallback):
    """TRL's progress bar, with reward/accuracy/loss in the bar instead of a dict printed per step."""

    KEYS = ("loss", "reward", "accuracy", "rhythm/gamma_mean")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k.split("/")[-1]: f"{logs[k]:.3g}" for k in self.KEYS if isinstance(logs.get(k), (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)
