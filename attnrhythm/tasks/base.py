"""What every task shares: the ``Task`` a name resolves to, the registry entry that builds it, and
the one policy for a verifier that raises.

A task file (``countdown.py``, ``math.py``, ``choice.py``) defines its prompts, rows and verifier and
a ``TaskEntry`` per name; ``attnrhythm.tasks.TASKS`` lists the entries (docs/architecture.md).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from attnrhythm import log
from attnrhythm.errors import UserError

logger = log.get_logger(__name__)

PATH_SUFFIX = ":PATH"
"""A registry name ending in ``:PATH`` takes a file: ``math-jsonl:PATH`` matches ``math-jsonl:a.jsonl``."""


@dataclass(frozen=True)
class Task:
    """A named task: ``load(split, n, seed) -> rows`` and ``score(completion, row) -> reward``.

    ``score`` is the task's verifier; it may raise when the verifier itself fails, so callers
    score through ``score_completions``, which counts those failures instead of hiding them."""

    name: str
    load: Callable[[str, int | None, int], list[dict]]
    score: Callable[[str, dict], float]
    data_file: str | None = None
    """The file the rows come from (``math-jsonl:PATH``, ``choice-jsonl:PATH``); None for generated
    or packaged rows."""
    splits: tuple[str, ...] | None = None
    """The splits ``load`` serves; None = any name (a data file is one split)."""


@dataclass(frozen=True)
class TaskEntry:
    """One entry of the registry ``attnrhythm.tasks.TASKS``.

    ``name`` is what users write (one ending in ``:PATH`` takes a file path after the colon);
    ``build(name, template, path)`` returns the Task, with ``template`` "base" or "chat" and
    ``path`` the file (None for a name without ``:PATH``)."""

    name: str
    description: str
    build: Callable[[str, str, str | None], Task]

    @property
    def prefix(self) -> str | None:
        """``"math-jsonl:"`` of ``"math-jsonl:PATH"``; None for a name that takes no file."""
        return self.name[: -len("PATH")] if self.name.endswith(PATH_SUFFIX) else None


def score_completions(task: Task, completions: list[str], rows: list[dict]) -> tuple[list[float], list[str]]:
    """(rewards, errors): the task's reward of each completion, 0.0 where the verifier raised,
    and one ``"ExceptionType: message"`` per completion whose verifier raised."""
    rewards, errors = [], []
    for completion, row in zip(completions, rows):
        try:
            rewards.append(float(task.score(completion, row)))
        except Exception as err:  # counted and reported by the caller, never silent
            rewards.append(0.0)
            errors.append(f"{type(err).__name__}: {err}")
    return rewards, errors


def check_verifier_errors(task_name: str, errors: list[str], total: int, scope: str = "") -> None:
    """The policy of every caller that scores (train, eval): completions whose verifier raised
    score 0 and are logged; when it raised on every one of ``total`` completions the caller stops
    (RuntimeError), because all-zero rewards would be silent garbage.  ``scope`` names the
    completions in the messages (" of the batch")."""
    if not errors:
        return
    logger.warning(f"the {task_name} verifier failed on {len(errors)} of {total} completions{scope} "
                   f"(scored 0); first: {errors[0]}")
    if len(errors) >= total:
        raise RuntimeError(f"the {task_name} verifier failed on every completion{scope} ({len(errors)}); "
                           f"first error: {errors[0]}")


def sample_rows(rows: list, n: int | None, seed: int) -> list:
    """A seeded sample of ``n`` rows (all rows, shuffled, when ``n`` is None)."""
    n = len(rows) if n is None else n
    if n > len(rows):
        raise UserError(f"asked for {n} rows but only {len(rows)} are available")
    return random.Random(seed).sample(rows, n)
