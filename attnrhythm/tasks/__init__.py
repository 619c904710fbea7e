"""Tasks for the RL experiments: prompts, data rows and verifiers (docs/method.md section 7).

``get_task(name)`` returns a :class:`Task` whose ``load(split, n, seed)`` gives rows (dicts with at
least ``prompt``, a string or chat messages, plus the fields its scorer needs) and whose
``score(completion, row)`` gives the reward of one completion.

``TASKS`` is the registry: the only list of task names (``get_task``, ``KNOWN_TASKS`` and the help
of `train` and `eval` read it).  A new task is one file here that defines its ``TaskEntry``, added
to ``TASKS`` below.
"""
from __future__ import annotations

from attnrhythm.errors import UserError, unknown_name
from attnrhythm.tasks import choice, countdown, math
from attnrhythm.tasks.base import Task, TaskEntry, check_verifier_errors, score_completions
from attnrhythm.tasks.choice import score_choice, verify_choice
from attnrhythm.tasks.countdown import (
    CountdownInstance,
    countdown_prompt,
    generate_countdown,
    score_countdown,
    solve_countdown,
    verify_countdown,
    verify_countdown_dense,
)
from attnrhythm.tasks.math import extract_boxed, score_math, verify_math

__all__ = [
    "CountdownInstance", "KNOWN_TASKS", "TASKS", "Task", "TaskEntry", "check_verifier_errors", "countdown_prompt",
    "extract_boxed", "generate_countdown", "get_task", "score_choice", "score_completions", "score_countdown",
    "score_math", "solve_countdown", "task_help", "verify_choice", "verify_countdown", "verify_countdown_dense",
    "verify_math",
]

TASKS: dict[str, TaskEntry] = {entry.name: entry for entry in (*countdown.TASKS, *math.TASKS, *choice.TASKS)}
"""The registry, by the name users write (``"math-jsonl:PATH"`` for a task that reads a file)."""
KNOWN_TASKS = tuple(TASKS)
TEMPLATES = ("base", "chat")


def task_help() -> str:
    """The task names for ``--help`` and docstrings: ``countdown, countdown-easy, ...``."""
    return ", ".join(TASKS)


def get_task(name: str, template: str = "base") -> Task:
    """The task called ``name`` (one of KNOWN_TASKS, ``PREFIX:PATH`` with a real path for one that
    reads a file); ``template`` is "base" or "chat".

    "base" prompts are plain text for base models; "chat" prompts are message lists for an
    instruct model's chat template.
    """
    if template not in TEMPLATES:
        raise UserError(f"template must be 'base' or 'chat', not {template!r}")
    entry = TASKS.get(name)
    if entry is not None and entry.prefix is None:
        return entry.build(name, template, None)
    for entry in TASKS.values():
        if entry.prefix and name.startswith(entry.prefix) and len(name) > len(entry.prefix):
            return entry.build(name, template, name[len(entry.prefix):])
    raise unknown_name("task", name, TASKS)
