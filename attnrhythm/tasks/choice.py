"""Single-choice questions (CrossThink-QA style, docs/method.md section 7): the ``choice-jsonl:PATH`` task.

Options are labelled A..J (4 to 10 in CrossThink-QA); the model reasons and puts the option letter
in ``\\boxed{}``; a response is correct when the extracted letter equals the gold letter.
"""
from __future__ import annotations

import re
from pathlib import Path

from attnrhythm import io, log
from attnrhythm.errors import MissingInput, UserError
from attnrhythm.tasks.base import Task, TaskEntry, sample_rows
from attnrhythm.tasks.math import extract_boxed

logger = log.get_logger(__name__)

LETTERS = "ABCDEFGHIJ"
# Wrappers models put around a letter: \text{A}, \textbf{A}, \mathrm{A}, ...; one level unwrapped.
_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|mathit|textit|operatorname)\s*\{(.*)\}$", re.S)
# "A", "(A)", "A.", "A)", "A:", "(A) the option text", "A. the option text"
_LETTER = re.compile(r"^\(?([A-J])\)?(?:$|[.:)]|\s)")


def extract_choice_letter(text: str) -> str | None:
    """The option letter (A..J) in the last ``\\boxed{}`` of ``text`` (after ``</think>``), or None.

    Accepts ``A``, ``(A)``, ``A.``, ``A)``, ``\\text{A}``, ``$A$`` and a letter followed by the
    option's text.  A lower-case letter counts only when it is the whole content (``\\boxed{b}``),
    so words such as "a cat" are not read as option A.
    """
    content = extract_boxed(text) if isinstance(text, str) else None
    if content is None:
        return None
    content = content.strip().strip("$").strip()
    unwrapped = _WRAPPER.match(content)
    if unwrapped:
        content = unwrapped.group(1).strip()
    if len(content) == 1 and content.upper() in LETTERS:
        return content.upper()
    found = _LETTER.match(content)
    return found.group(1) if found else None


def _normalize_gold(gold_letter: str) -> str | None:
    """The gold letter as an upper-case A..J ("a", "(A)", "A." are accepted)."""
    text = str(gold_letter).strip().strip("().:").strip().upper()
    return text if len(text) == 1 and text in LETTERS else None


def verify_choice(completion: str, gold_letter: str) -> float:
    """1.0 when the boxed letter of ``completion`` equals ``gold_letter``, else 0.0."""
    gold = _normalize_gold(gold_letter)
    return 1.0 if gold is not None and extract_choice_letter(completion) == gold else 0.0


def score_choice(completion: str, gold_letter: str) -> float:
    """``verify_choice`` that never raises: a verifier exception is logged and scores 0.0 (train
    and eval score through ``verify_choice`` and count verifier errors instead)."""
    try:
        return verify_choice(completion, gold_letter)
    except Exception as err:
        logger.warning(f"the choice verifier raised {type(err).__name__}: {err}; scored 0")
        return 0.0


def choice_prompt(question: str, options: list[str]) -> str:
    """The question followed by its options labelled A.., and the request for a boxed letter."""
    if not 2 <= len(options) <= len(LETTERS):
        raise UserError(f"need 2..{len(LETTERS)} options, got {len(options)}")
    listed = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    last = LETTERS[len(options) - 1]
    return (
        f"{question.strip()}\n\nOptions:\n{listed}\n\n"
        f"Please reason step by step, and put the letter of the correct option (A-{last}) "
        "within \\boxed{}, for example \\boxed{A}."
    )


def load_choice_jsonl(path: str | Path) -> list[dict]:
    """Rows ``{"id", "question", "options", "gold"}`` from a JSONL file.

    Each line holds ``question`` (str), ``options`` (list of 2..10 str) and ``answer`` (the gold
    letter, within the options); an optional ``id``.  A bad row raises ValueError naming its line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} does not exist")
    rows = []
    for lineno, record in io.numbered_jsonl(path, interrupted_tail=False):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object")
        question, options = record.get("question"), record.get("options")
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{where}: missing 'question' string")
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise UserError(f"{where}: 'options' must be a list of strings")
        if not 2 <= len(options) <= len(LETTERS):
            raise UserError(f"{where}: need 2..{len(LETTERS)} options, got {len(options)}")
        gold = _normalize_gold(record.get("answer", ""))
        if gold is None or LETTERS.index(gold) >= len(options):
            raise UserError(f"{where}: 'answer' must be one of the option letters")
        rows.append({"id": str(record.get("id", f"{path.stem}-{lineno}")),
                     "question": question, "options": options, "gold": gold})
    return rows


# ----------------------------------------------------------------------------- the registry's entry
def choice_task(name: str, template: str, path: str | None) -> Task:
    """Single-choice questions of the JSONL file ``path`` (a file is one split)."""
    def load(split: str, n: int | None, seed: int) -> list[dict]:
        rows = []
        for row in sample_rows(load_choice_jsonl(path), n, seed):
            text = choice_prompt(row["question"], row["options"])
            chat = [{"role": "user", "content": text}]
            prompt = chat if template == "chat" else f"User: {text}\nAssistant:"
            rows.append({**row, "prompt": prompt})
        return rows

    return Task(name, load, lambda completion, row: verify_choice(completion, row["gold"]), data_file=path)


TASKS = (TaskEntry("choice-jsonl:PATH", "single-choice questions of a JSONL file (question, options, answer), "
                   "boxed-letter reward", choice_task),)
