"""Logging of the package: one ``attnrhythm`` logger tree, messages on stderr, and under torchrun
or accelerate only the process of rank 0 speaks (``RANK``/``LOCAL_RANK``), so N processes do not
print every line N times.  A command's answer (a table, a summary) goes to stdout through
``emit``, also from rank 0 only.  Progress bars (tqdm) are separate and unchanged."""
from __future__ import annotations

import logging
import os
import sys

LOGGER = "attnrhythm"


def rank() -> int:
    """This process's global rank (0 when not launched by torchrun/accelerate)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    return rank() == 0


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or record.levelno >= logging.ERROR  # errors of any rank are shown


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def emit(text: str) -> None:
    """Print a command's answer on stdout (rank 0 only)."""
    if is_main_process():
        print(text, flush=True)


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (``get_logger(__name__)``)."""
    return logging.getLogger(name if name.startswith(LOGGER) else f"{LOGGER}.{name}")


def setup(level: int = logging.INFO) -> None:
    """Send the package's messages to stderr as plain lines (idempotent; the CLI calls it)."""
    root = logging.getLogger(LOGGER)
    root.setLevel(level)
    if not any(getattr(h, "_attnrhythm", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RankZero())
        handler._attnrhythm = True
        root.addHandler(handler)
