"""Stages of a benchmark run, each under a time limit, and a report rewritten after every row
(``benchmarks/fused_gpu_check.py``)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time


class StageTimeout(Exception):
    pass


_deadline = [float("inf")]  # of the stage in flight (perf_counter seconds)


def check_deadline(error: Exception | None = None) -> None:
    """Raise StageTimeout once the stage's time is up (also for an error that wraps one: the
    Triton interpreter re-raises what its kernels meet as InterpreterError)."""
    if isinstance(error, StageTimeout) or time.perf_counter() >= _deadline[0]:
        raise StageTimeout("over its time limit") from error


@contextlib.contextmanager
def time_limit(seconds: float):
    """StageTimeout in this (main) thread after ``seconds`` (Python code runs between kernel
    launches), raised again every half second: one raised inside a ``__del__`` is ignored."""
    def expire(signum, frame):
        raise StageTimeout(f"over its limit of {seconds:.3g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    _deadline[0] = time.perf_counter() + seconds
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _deadline[0] = float("inf")


class Report:
    """Rows written to ``DIR/fused_gpu_check.txt`` (one line each) and ``.json``, rewritten after
    every row (atomic replace); thread-safe for the watchdog."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "fused_gpu_check")
        self.rows: list = []
        self.lock = threading.Lock()

    def __call__(self, item) -> None:
        with self.lock:
            self.rows.append(item)
            text = item if isinstance(item, str) else json.dumps(item, default=str)
            print(text, flush=True)
            for suffix, body in ((".txt", "\n".join(r if isinstance(r, str) else json.dumps(r, default=str)
                                                     for r in self.rows) + "\n"),
                                 (".json", json.dumps(self.rows, indent=1, default=str))):
                with open(self.path + suffix + ".tmp", "w") as f:
                    f.write(body)
                os.replace(self.path + suffix + ".tmp", self.path + suffix)
