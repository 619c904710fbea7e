"""Tasks for the RL experiments: prompts, data rows and verifiers (docs/method.md section 7).

``get_task(name)`` returns a :class:`Task` whose ``load(split, n, seed)`` gives rows (dicts with at
least ``prompt``, a string or chat messages, plus the fields its scorer needs) and whose
``score(completion, row)`` gives the reward of one completion.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from attnrhythm.tasks.choice import choice_prompt, load_choice_jsonl, score_choice, verify_choice
from attnrhythm.tasks.countdown import (
    EASY,
    VARIANTS,
    CountdownInstance,
    countdown_prompt,
    generate_countdown,
    score_countdown,
    solve_countdown,
    verify_countdown,
    verify_countdown_dense,
)
from attnrhythm.tasks.math import extract_boxed, gsm8k_gold, score_math, verify_math
from attnrhythm.errors import UserError, unknown_name

__all__ = [
    "CountdownInstance", "Task", "KNOWN_TASKS", "countdown_prompt", "extract_boxed",
    "generate_countdown", "get_task", "gsm8k_gold", "score_choice", "score_countdown",
    "score_completions", "score_math", "solve_countdown", "verify_choice", "verify_countdown",
    "verify_countdown_dense", "verify_math",
]

# "-dense": the same instances with partial credit for nearness (verify_countdown_dense)
KNOWN_TASKS = (*VARIANTS, *(f"{name}-dense" for name in VARIANTS), "gsm8k",
               "math-jsonl:PATH", "choice-jsonl:PATH")


@dataclass(frozen=True)
class Task:
    """A named task: ``load(split, n, seed) -> rows`` and ``score(completion, row) -> reward``.

    ``score`` is the task's verifier; it may raise when the verifier itself fails, so callers
    score through ``score_completions``, which counts those failures instead of hiding them."""

    name: str
    load: Callable[[str, int | None, int], list[dict]]
    score: Callable[[str, dict], float]


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


def _sample(rows: list, n: int | None, seed: int) -> list:
    """A seeded sample of ``n`` rows (all rows, shuffled, when ``n`` is None)."""
    n = len(rows) if n is None else n
    if n > len(rows):
        raise UserError(f"asked for {n} rows but only {len(rows)} are available")
    return random.Random(seed).sample(rows, n)


def _countdown_task(name: str, template: str, settings: dict, verify=verify_countdown) -> Task:
    def load(split: str, n: int | None, seed: int) -> list[dict]:
        if n is None:
            raise UserError("countdown is generated: give the number of instances n")
        instances = generate_countdown(n, seed, split=split, **settings)
        return [{"prompt": countdown_prompt(inst, template), "numbers": list(inst.numbers),
                 "target": inst.target} for inst in instances]

    def score(completion: str, row: dict) -> float:
        return verify(completion, row["numbers"], row["target"])

    return Task(name, load, score)


def _problem_task(name: str, template: str, source: str | None) -> Task:
    """GSM8K (packaged test problems) or a math JSONL file, with the paper's prompt."""
    from attnrhythm import data  # data imports this package: import lazily to avoid a cycle

    def load(split: str, n: int | None, seed: int) -> list[dict]:
        if source is None:  # packaged GSM8K: only its 100 test problems exist offline
            if split != "test":
                raise UserError("the packaged gsm8k has only a 'test' split; use "
                                 "math-jsonl:PATH or a Hugging Face id through attnrhythm.data")
            problems = data.load_gsm8k()
        else:  # a JSONL file is one split: `split` is not used
            problems = data.load_jsonl_problems(source)
        make = data.chat_messages if template == "chat" else data.paper_prompt
        return [{"prompt": make(p), "id": p.id, "question": p.question, "gold": p.gold}
                for p in _sample(problems, n, seed)]

    return Task(name, load, lambda completion, row: verify_math(completion, row["gold"]))


def _choice_task(name: str, template: str, source: str) -> Task:
    def load(split: str, n: int | None, seed: int) -> list[dict]:
        rows = []
        for row in _sample(load_choice_jsonl(source), n, seed):
            text = choice_prompt(row["question"], row["options"])
            chat = [{"role": "user", "content": text}]
            prompt = chat if template == "chat" else f"User: {text}\nAssistant:"
            rows.append({**row, "prompt": prompt})
        return rows

    return Task(name, load, lambda completion, row: verify_choice(completion, row["gold"]))


def get_task(name: str, template: str = "base") -> Task:
    """The task called ``name`` (one of KNOWN_TASKS); ``template`` is "base" or "chat".

    "base" prompts are plain text for base models; "chat" prompts are message lists for an
    instruct model's chat template.
    """
    if template not in ("base", "chat"):
        raise UserError(f"template must be 'base' or 'chat', not {template!r}")
    countdown = VARIANTS
    if name in countdown:
        return _countdown_task(name, template, countdown[name])
    if name.endswith("-dense") and name.removesuffix("-dense") in countdown:
        return _countdown_task(name, template, countdown[name.removesuffix("-dense")], verify_countdown_dense)
    if name == "gsm8k":
        return _problem_task(name, template, None)
    for prefix, make in (("math-jsonl:", _problem_task), ("choice-jsonl:", _choice_task)):
        if name.startswith(prefix) and len(name) > len(prefix):
            return make(name, template, name[len(prefix):])
    raise unknown_name("task", name, KNOWN_TASKS)
