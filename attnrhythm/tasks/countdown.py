"""Countdown (TinyZero, Pan et al. 2025): instances, exact solver, prompts, reward and the tasks.

The model gets 3 or 4 integers and a target and must write an arithmetic expression that uses
every given number exactly once with + - * / and parentheses (docs/method.md section 7).  The reward
follows TinyZero's ``compute_score``: no ``<answer>`` block -> 0.0; an answer block whose numbers
are not exactly the given multiset, or whose expression is invalid or misses the target -> 0.1
(format credit); the expression equals the target within 1e-5 -> 1.0.  Unlike the reference the
expression is never ``eval``-ed: :mod:`attnrhythm.tasks.safe_eval` evaluates it.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from attnrhythm import log
from attnrhythm.errors import UserError
from attnrhythm.tasks.base import Task, TaskEntry
from attnrhythm.tasks.safe_eval import InvalidExpression, evaluate, numbers_in

logger = log.get_logger(__name__)

FORMAT_SCORE = 0.1
"""TinyZero's credit for a well-formed answer block that is wrong."""
TEST_FRACTION = 0.1
"""**Decision**: share of the instance space (by hash) that belongs to the test split."""
DEFAULT_TARGET_RANGE = (10, 100)
"""**Decision**: targets 10..100 inclusive, the range of the TinyZero Countdown-Tasks-3to4 data
(drawn from Stream-of-Search); configurable."""
EASY = {"n_numbers": 3, "max_number": 20, "target_range": (1, 100)}
"""Settings small enough for a ~135M model to learn (the "countdown-easy" task)."""
PAIRS = {"n_numbers": 2, "max_number": 50, "target_range": (1, 100), "final_fraction": 0.1}
"""**Decision** (task option "countdown-pairs"): two numbers up to 50, one operation to choose.
The smallest Countdown a ~135M model can learn from on a 2-core CPU within an hour: its warm
start solves part of it, so most GRPO groups carry a signal (docs/training/results.md).  Its
instance space (~3,000) is small, so a tenth of it (hash bucket [0.1, 0.2), taken from train) is
the ``final`` split: a test set that no decision about the recipe has looked at; the ``test``
split is the dev set (docs/training/results.md)."""
COMPLETION_KEY = "completion"
"""The VARIANTS key that is not a ``generate_countdown`` argument: the warm start's target style."""
WORKED = {**EASY, "final_fraction": 0.1, COMPLETION_KEY: "worked"}
"""**Decision** (task option "countdown-worked"): EASY's instances (3 numbers up to 20, targets
1..100) with a held-out final split as PAIRS has, and a warm start that writes a short search
before the solution (``completion``: ``train.sft.worked_completion``).  Why: countdown-pairs
responses average ~36 tokens, so with the FAI horizon [10, 100] (docs/method.md section 3) the
last 10 tokens, where the answer sits, can never be anchors and rhythm credit has almost nothing to
redistribute.  The worked warm start writes three failed attempts with honest verdicts before the
solution, 124-166 tokens (median 146; ``train.sft.WORKED_ATTEMPTS``), so the horizon covers the
reasoning; RL still scores only the last ``<answer>`` block.  Its ``test`` split (the dev set) is
countdown-easy's, instance for instance (same generator and hash); its ``final`` split (hash
bucket [0.1, 0.2)) is new."""
WORKED_SMALL = {**WORKED, "max_number": 10}
"""**Decision** (task option "countdown-worked-small"): WORKED with numbers up to 10.  Why: the
countdown-worked warm start solves 12.1% of its dev set, below the 30-60% a GRPO comparison wants,
and half of its failures state a solution with a false step (docs/training.md, "Warm start");
numbers up to 10 keep products within the targets.  Measured: it solves 8.2%, no better.  Its
instance space is small (~2,900: test 300, final 305, train 2,310), like countdown-pairs'."""
PAIRS_WORKED = {**PAIRS, COMPLETION_KEY: "worked"}
"""**Decision** (task option "countdown-pairs-worked"): countdown-pairs' instances and splits (the
same dev and final sets) with the worked warm start: up to three failed operations before the one
that reaches the target (56-101 tokens).  Why: the three-number worked variants' warm starts solve
8-12%; this one solves 47.7% (docs/training.md, "Warm start")."""
VARIANTS = {"countdown": {}, "countdown-easy": EASY, "countdown-pairs": PAIRS, "countdown-worked": WORKED,
            "countdown-worked-small": WORKED_SMALL, "countdown-pairs-worked": PAIRS_WORKED}
"""Every generated Countdown variant by task name; "-dense" on any of them adds nearness credit.
Each entry holds ``generate_countdown`` arguments, plus optionally ``completion``: how the warm
start (``train.sft``) writes its targets ("solution" when absent)."""
MAX_SOLVER_NUMBERS = 6

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_BASE_PREFIX = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer.\nUser: "
)
_BASE_SUFFIX = "\nAssistant: Let me solve this step by step.\n<think>"


@dataclass(frozen=True)
class CountdownInstance:
    """One puzzle: reach ``target`` using each of ``numbers`` exactly once."""

    numbers: tuple[int, ...]
    target: int


SPLITS = ("train", "test", "final")


def split_of(numbers: Sequence[int], target: int, final_fraction: float = 0.0) -> str:
    """'test', 'final' or 'train', a pure function of the instance (order of numbers ignored).

    Hashing the canonical instance keeps the splits disjoint whatever seeds or sizes are used:
    bucket < TEST_FRACTION is test, the next ``final_fraction`` is final (none by default), the
    rest train.
    """
    key = f"{sorted(numbers)}->{target}".encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64
    if bucket < TEST_FRACTION:
        return "test"
    return "final" if bucket < TEST_FRACTION + final_fraction else "train"


def _random_target(numbers: list[int], rng: random.Random) -> int | None:
    """Combine ``numbers`` in a random order with random operations.

    Every intermediate result is a positive integer (subtraction only when positive, division
    only when exact), like the hand-played game; returns the final value, or None when no
    operation keeps a pair positive and integral.
    """
    pool = list(numbers)
    while len(pool) > 1:
        a, b = (pool.pop(rng.randrange(len(pool))) for _ in range(2))
        options = [a + b, a * b]
        if a != b:
            options.append(abs(a - b))
        big, small = max(a, b), min(a, b)
        if big % small == 0:
            options.append(big // small)
        pool.append(rng.choice(options))
    return pool[0] if pool[0] > 0 else None


def generate_countdown(
    n: int,
    seed: int,
    n_numbers: int | tuple[int, ...] = (3, 4),
    max_number: int = 99,
    target_range: tuple[int, int] = DEFAULT_TARGET_RANGE,
    split: str = "train",
    min_number: int = 1,
    final_fraction: float = 0.0,
) -> list[CountdownInstance]:
    """``n`` distinct, solvable instances of ``split``, deterministic in ``seed``.

    Numbers are drawn uniformly from ``min_number..max_number`` (TinyZero: 1..99); the count is
    drawn from ``n_numbers`` when it is a tuple.  The target is the result of a random
    combination (:func:`_random_target`), kept when it lies in ``target_range`` (inclusive).
    An instance belongs to the split its hash decides (:func:`split_of`), so train, test and
    final never share an instance.  Raises ValueError when the space is too small to give ``n``.
    """
    if split not in SPLITS or (split == "final" and not final_fraction):
        known = SPLITS if final_fraction else SPLITS[:2]
        raise UserError(f"split must be one of {', '.join(known)} for this task, not {split!r}")
    counts = (n_numbers,) if isinstance(n_numbers, int) else tuple(n_numbers)
    lo, hi = target_range
    rng = random.Random(f"countdown:{seed}:{split}")
    seen: set[tuple[tuple[int, ...], int]] = set()
    out: list[CountdownInstance] = []
    for _ in range(200 * n + 10_000):  # bounded: small spaces fail loudly instead of looping
        if len(out) == n:
            break
        numbers = [rng.randint(min_number, max_number) for _ in range(rng.choice(counts))]
        target = _random_target(numbers, rng)
        if target is None or not lo <= target <= hi:
            continue
        key = (tuple(sorted(numbers)), target)
        if key in seen or split_of(numbers, target, final_fraction) != split:
            continue
        seen.add(key)
        out.append(CountdownInstance(tuple(numbers), target))
    if len(out) < n:
        raise UserError(f"could only generate {len(out)} of {n} distinct {split} instances: this variant's "
                        f"{split} split is smaller; ask for {len(out)} or fewer")
    return out


def solve_countdown(numbers: Sequence[int], target: int) -> str | None:
    """An expression using every number exactly once that equals ``target``, or None.

    Exhaustive search over all pairings, orders, operations and hence parenthesisations, in exact
    Fraction arithmetic (intermediates may be negative or fractional).  Failed multisets are
    memoised.  At most MAX_SOLVER_NUMBERS numbers (the search is exponential).
    """
    if not 1 <= len(numbers) <= MAX_SOLVER_NUMBERS:
        raise UserError(f"solve_countdown takes 1..{MAX_SOLVER_NUMBERS} numbers")
    goal = Fraction(target)
    failed: set[tuple[Fraction, ...]] = set()

    def search(pool: list[tuple[Fraction, str]]) -> str | None:
        if len(pool) == 1:
            return pool[0][1] if pool[0][0] == goal else None
        key = tuple(sorted(v for v, _ in pool))
        if key in failed:
            return None
        for i in range(len(pool)):
            for j in range(len(pool)):
                if i == j:
                    continue
                (a, ea), (b, eb) = pool[i], pool[j]
                rest = [pool[k] for k in range(len(pool)) if k not in (i, j)]
                candidates = [(a - b, f"{ea} - ({eb})" if " " in eb else f"{ea} - {eb}")]
                if b != 0:
                    candidates.append((a / b, f"{_wrap(ea)} / {_wrap(eb)}"))
                if i < j:  # + and * commute: one order is enough
                    candidates += [(a + b, f"{ea} + {eb}"), (a * b, f"{_wrap(ea)} * {_wrap(eb)}")]
                for value, expr in candidates:
                    found = search(rest + [(value, expr)])
                    if found is not None:
                        return found
        failed.add(key)
        return None

    return search([(Fraction(x), str(x)) for x in numbers])


def _wrap(expr: str) -> str:
    """Parenthesise a compound sub-expression (one that contains a space)."""
    return f"({expr})" if " " in expr else expr


def countdown_prompt(inst: CountdownInstance, template: str = "base") -> str | list[dict]:
    """TinyZero's prompt for ``inst``.

    "base": the plain User/Assistant conversation with the assistant turn pre-filled up to an
    opening ``<think>``.  "chat": ``[{"role": "user", "content": ...}]`` holding the same request,
    for an instruct model's chat template (no pre-filled assistant part).
    """
    request = (
        f"Using the numbers {list(inst.numbers)}, create an equation that equals {inst.target}. "
        "You can use basic arithmetic operations (+, -, *, /) and each number can only be used "
        "once. Show your work in <think> </think> tags. And return the final answer in "
        "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
    )
    if template == "base":
        return _BASE_PREFIX + request + _BASE_SUFFIX
    if template == "chat":
        return [{"role": "user", "content": request}]
    raise UserError(f"template must be 'base' or 'chat', not {template!r}")


def last_answer(completion: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` block, or None.

    Two ``rfind`` calls: linear time on any input, no regex backtracking.
    """
    end = completion.rfind(_ANSWER_CLOSE)
    if end < 0:
        return None
    start = completion.rfind(_ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return completion[start + len(_ANSWER_OPEN) : end]


def _answer_miss(completion: str, numbers: Sequence[int], target: int) -> float | None:
    """Distance of the last answer's value from the target; None without an answer block, inf for
    a wrong multiset of numbers or an invalid expression."""
    answer = last_answer(completion) if isinstance(completion, str) else None
    if answer is None:
        return None
    try:
        if sorted(numbers_in(answer)) != sorted(int(x) for x in numbers):
            return float("inf")
        return abs(float(evaluate(answer) - Fraction(target)))
    except InvalidExpression:
        return float("inf")


def verify_countdown(completion: str, numbers: Sequence[int], target: int) -> float:
    """TinyZero's Countdown reward (0.0, 0.1 or 1.0) for ``completion``; an exception other than
    an invalid expression is the verifier failing and propagates (the trainer counts it)."""
    miss = _answer_miss(completion, numbers, target)
    if miss is None:
        return 0.0
    return 1.0 if miss < 1e-5 else FORMAT_SCORE


DENSE_SCALE = 0.4


def verify_countdown_dense(completion: str, numbers: Sequence[int], target: int) -> float:
    """The Countdown reward with partial credit for nearness (task option ``-dense``).

    As ``verify_countdown`` (0 without an answer, 0.1 for a wrong multiset or an invalid
    expression, 1.0 for the target), except that a valid expression over exactly the given
    numbers that misses the target earns ``0.1 + 0.4 * max(0, 1 - |value - target| / target)``:
    almost every group of completions then differs in reward, so GRPO gets a signal where the
    paper's 0 / 0.1 / 1 reward gives none (measured in docs/training/results.md).  Exact answers keep 1.0,
    so accuracy (reward >= 1) means the same under both rewards.
    """
    miss = _answer_miss(completion, numbers, target)
    if miss is None:
        return 0.0
    if miss < 1e-5:
        return 1.0
    return FORMAT_SCORE + DENSE_SCALE * max(0.0, 1.0 - miss / max(1, abs(target)))


def score_countdown(completion: str, numbers: Sequence[int], target: int) -> float:
    """``verify_countdown`` that never raises: malformed inputs score as format only (logged; train
    and eval score through ``verify_countdown`` and count verifier errors instead)."""
    try:
        return verify_countdown(completion, numbers, target)
    except Exception as err:
        logger.warning(f"the countdown verifier raised {type(err).__name__}: {err}; scored as format only")
        return FORMAT_SCORE if isinstance(completion, str) and _ANSWER_CLOSE in completion else 0.0


# ----------------------------------------------------------------------------- the registry's entries
def countdown_task(name: str, template: str, path: str | None = None) -> Task:
    """The generated Countdown task ``name`` (a VARIANTS name, "-dense" for nearness credit)."""
    variant = name.removesuffix("-dense")
    settings = {k: v for k, v in VARIANTS[variant].items() if k != COMPLETION_KEY}  # the warm start's, not ours
    verify = verify_countdown_dense if name.endswith("-dense") else verify_countdown

    def load(split: str, n: int | None, seed: int) -> list[dict]:
        if n is None:
            raise UserError("countdown is generated: give the number of instances n")
        instances = generate_countdown(n, seed, split=split, **settings)
        return [{"prompt": countdown_prompt(inst, template), "numbers": list(inst.numbers),
                 "target": inst.target} for inst in instances]

    def score(completion: str, row: dict) -> float:
        return verify(completion, row["numbers"], row["target"])

    splits = SPLITS if settings.get("final_fraction") else tuple(x for x in SPLITS if x != "final")
    return Task(name, load, score, splits=splits)


_ABOUT = {"countdown": "TinyZero's Countdown: 3 or 4 numbers, targets 10..100",
          "countdown-easy": "3 numbers up to 20, targets 1..100 (EASY)",
          "countdown-pairs": "2 numbers up to 50, one operation; a held-out final split (PAIRS)",
          "countdown-worked": "as countdown-easy with a held-out final split; its warm start writes a worked search "
                              "(WORKED)",
          "countdown-worked-small": "as countdown-worked with numbers up to 10 (WORKED_SMALL)",
          "countdown-pairs-worked": "countdown-pairs' instances; its warm start writes failed operations first "
                                    "(PAIRS_WORKED)"}
TASKS = (*(TaskEntry(name, _ABOUT[name], countdown_task) for name in VARIANTS),
         *(TaskEntry(f"{name}-dense", f"{name} with partial credit for nearness", countdown_task) for name in VARIANTS))
"""Every Countdown variant, then each with "-dense" (the order KNOWN_TASKS shows)."""
