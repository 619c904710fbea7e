"""Math answers: ``\\boxed{}`` extraction and math-verify scoring (docs/method.md section 7), and
the tasks that use them (``gsm8k``, ``math-jsonl:PATH``).

Reference scoring: keep the text after the last ``</think>``, take the last brace-balanced
``\\boxed{...}``, and compare it with the gold answer by ``math_verify.verify(gold, pred)`` (gold
first: verify is not symmetric) under a time limit.  Reward 1.0 when equivalent, else 0.0.

Time limits: math-verify's own timeouts use ``signal.alarm``, which only works in the main
thread.  There we pass ``timeout_s``; elsewhere (reward workers in threads) we pass ``None`` and
rely on bounded inputs instead: only the last MAX_TAIL characters are scanned, boxed answers
longer than MAX_ANSWER_CHARS score 0, and predictions that look explosive for sympy (towers of
powers, huge exponents or factorials, see :func:`_explosive`) score 0 unless they equal the gold
text verbatim.  The guard applies in every thread so scores do not depend on the caller.
"""
from __future__ import annotations

import re
import threading

from attnrhythm import data, log
from attnrhythm.errors import UserError
from attnrhythm.tasks.base import Task, TaskEntry, sample_rows

logger = log.get_logger(__name__)

MAX_TAIL = 20_000
"""Only the last MAX_TAIL characters of a completion are scanned (bounds time on huge inputs)."""
MAX_ANSWER_CHARS = 300
"""A boxed answer longer than this is not a final answer; it scores 0."""
DEFAULT_TIMEOUT_S = 5
"""Seconds per math-verify parse / comparison in the main thread (math-verify's default)."""

_BOXED = "\\boxed"
_THINK_CLOSE = "</think>"
# Patterns only ever run on <= MAX_ANSWER_CHARS characters, so their cost is bounded.
_EXPONENT = re.compile(r"(?:\^|\*\*)\s*(\{[^{}]*\}?|\([^()]*\)?|[\w.]+)")
_RISKY_IN_EXPONENT = re.compile(r"\^|\*|!|\\cdot|\\times|\d{6,}")
_COMBINATORIAL = re.compile(r"!|binom|choose")
_RISKY_WITH_COMBINATORIAL = re.compile(r"\d{3,}|\^|\*|\\cdot|\\times")


def _after_think(text: str) -> str:
    """Text after the last ``</think>`` (the whole text when there is none), last MAX_TAIL chars."""
    cut = text.rfind(_THINK_CLOSE)
    if cut >= 0:
        text = text[cut + len(_THINK_CLOSE) :]
    return text[-MAX_TAIL:]


def _matching_braces(text: str) -> dict[int, int]:
    """Map each ``{`` position to its matching ``}`` in one left-to-right pass (stack).

    Unmatched ``}`` are ignored and unmatched ``{`` are absent from the map.
    """
    match: dict[int, int] = {}
    stack: list[int] = []
    for i, c in enumerate(text):
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            match[stack.pop()] = i
    return match


def extract_boxed(text: str) -> str | None:
    """Content of the last brace-balanced ``\\boxed{...}`` after the last ``</think>``, or None.

    ``\\boxed 5`` (a space, no braces) is also accepted: the content runs to the next whitespace
    or ``$``.  An unclosed ``\\boxed{`` is skipped in favour of an earlier, complete one.  Linear
    time: one pass matches all braces, one pass lists the ``\\boxed`` occurrences.
    """
    if not isinstance(text, str):
        return None
    text = _after_think(text)
    if _BOXED not in text:
        return None
    match = _matching_braces(text)
    found: str | None = None
    start = text.find(_BOXED)
    while start >= 0:
        i = start + len(_BOXED)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{" and i in match:
            found = text[i + 1 : match[i]]
        elif i > start + len(_BOXED) and i < len(text) and text[i] != "{":  # "\boxed 5"
            j = i
            while j < len(text) and not text[j].isspace() and text[j] != "$":
                j += 1
            found = text[i:j] or found
        start = text.find(_BOXED, start + 1)
    return found.strip() if found is not None else None


def _explosive(answer: str) -> bool:
    """True when sympy could spend unbounded time on ``answer``; such predictions are not sent
    to math-verify.

    Flags an exponent that holds another power, a product, a factorial or a 6+ digit number
    (``2^{10^{10}}``, ``9^9^9``, ``10^{999*9999}``), and a factorial or binomial next to a 3+
    digit number or an operator that can make its argument huge (``(10^6)!``).
    """
    for exponent in _EXPONENT.finditer(answer):
        if _RISKY_IN_EXPONENT.search(exponent.group(1)):
            return True
        # "9^9^9": the exponent token is itself followed by another power
        if answer[exponent.end() :].lstrip().startswith(("^", "**")):
            return True
    return bool(_COMBINATORIAL.search(answer) and _RISKY_WITH_COMBINATORIAL.search(answer))


def _normalize(answer: str) -> str:
    return "".join(answer.split())


def verify_math(completion: str, gold: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the last boxed answer of ``completion`` is equivalent to ``gold``, else 0.0.

    ``gold`` is a short LaTeX or plain answer (``"0.5"``, ``"\\frac{1}{2}"``, ``"18"``); both
    sides are parsed as ``\\boxed{...}`` by math-verify.  ``timeout_s`` applies per parse and per
    comparison in the main thread only (see the module docstring); a timeout scores 0.0.  Any
    other exception is the verifier failing and propagates (the trainer counts it).
    """
    pred = extract_boxed(completion)
    if pred is None or not pred or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    gold = str(gold).strip()
    if _normalize(pred) == _normalize(gold):
        return 1.0  # identical text needs no sympy (and survives the explosive guard)
    if _explosive(pred):
        return 0.0
    from math_verify import parse, verify  # heavy import (sympy): only when scoring

    in_main = threading.current_thread() is threading.main_thread()
    limit = timeout_s if in_main else None
    try:
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=limit)
        pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=limit)
        if not gold_parsed or not pred_parsed:
            return 0.0
        return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=limit) else 0.0
    except BaseException as exc:  # math-verify's TimeoutException derives from BaseException
        if "Timeout" in type(exc).__name__:
            return 0.0
        raise


def score_math(completion: str, gold: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> float:
    """``verify_math`` that never raises: a verifier exception is logged and scores 0.0 (for
    callers that cannot count errors; train and eval score through ``verify_math`` and count them)."""
    try:
        return verify_math(completion, gold, timeout_s)
    except Exception as err:
        logger.warning(f"the math verifier raised {type(err).__name__}: {err}; scored 0")
        return 0.0


# ----------------------------------------------------------------------------- the registry's entries
MATH_ANSWER = Task("math", lambda split, n, seed: [], lambda completion, row: verify_math(completion, row["gold"]))
"""math-verify of a completion against ``row["gold"]``: the verifier of ``gsm8k`` and ``math-jsonl``, and
the one the analyses score their problems with (through ``score_completions``, so errors are counted)."""


def problem_task(name: str, template: str, path: str | None = None) -> Task:
    """GSM8K (``path`` None: the packaged test problems) or a math JSONL file, with the paper's prompt."""
    def load(split: str, n: int | None, seed: int) -> list[dict]:
        if path is None:  # packaged GSM8K: only its 100 test problems exist offline
            if split != "test":
                raise UserError("the packaged gsm8k has only a 'test' split; use "
                                "math-jsonl:PATH or a Hugging Face id through attnrhythm.data")
            problems = data.load_gsm8k()
        else:  # a JSONL file is one split: `split` is not used
            problems = data.load_jsonl_problems(path)
        make = data.chat_messages if template == "chat" else data.paper_prompt
        return [{"prompt": make(p), "id": p.id, "question": p.question, "gold": p.gold}
                for p in sample_rows(problems, n, seed)]

    return Task(name, load, MATH_ANSWER.score, data_file=path, splits=("test",) if path is None else None)


TASKS = (TaskEntry("gsm8k", "the 100 packaged GSM8K test problems (test split only), math-verify reward",
                   problem_task),
         TaskEntry("math-jsonl:PATH", "math problems of a JSONL file (question, answer), math-verify reward",
                   problem_task))
