"""Tests of the task verifiers and registry: safe evaluator, math and choice scoring (Countdown:
test_countdown.py)."""
from __future__ import annotations

import threading
from fractions import Fraction

import pytest

from attnrhythm.tasks import (
    KNOWN_TASKS,
    TASKS,
    Task,
    TaskEntry,
    check_verifier_errors,
    extract_boxed,
    get_task,
    score_choice,
    score_completions,
    score_math,
    solve_countdown,
)
from attnrhythm.data import gsm8k_gold
from attnrhythm.tasks.choice import choice_prompt, extract_choice_letter, load_choice_jsonl
from attnrhythm.errors import UserError
from attnrhythm.tasks.safe_eval import InvalidExpression, evaluate, numbers_in, try_evaluate
from conftest import ADVERSARIAL, fast



# --- safe evaluator -----------------------------------------------------------------------------

@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("10 - 4 - 3", 3),  # left associative
    ("2 * 3 + 4 * 5", 26),
    ("8 / 4 / 2", 1),
    ("-3 + 5", 2),
    ("--3", 3),
    ("-(2 + 3) * 2", -10),
    ("4 * -2", -8),
    ("1 / 3 + 1 / 6", Fraction(1, 2)),
    ("(1 + 2) / 3", 1),
    ("7 / 2", Fraction(7, 2)),
    ("0.5 + 0.25", Fraction(3, 4)),
    (" ( ( 6 ) ) ", 6),
])
def test_evaluate_hand_checked(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr", [
    "1 / 0", "5 / (3 - 3)", "2 ** 3", "2 ^ 3", "2 3", "(1 + 2", "1 + 2)", "", "   ", "+3",
    "1 +", "3 * * 4", "1.", "abc", "__import__('os')", "1e5", "()", "2(3)",
    "(" * 21 + "1" + ")" * 21,  # deeper than MAX_DEPTH
    "-" * 25 + "1",
    "1" * 13,  # a literal above MAX_ABS
    "999999 * 999999 * 999999",  # an intermediate above MAX_ABS
    "1 + " * 60 + "1",  # longer than MAX_LENGTH
])
def test_evaluate_rejects(expr):
    with pytest.raises(InvalidExpression):
        evaluate(expr)
    assert try_evaluate(expr) is None


def test_evaluate_bounds_are_inclusive_enough():
    assert evaluate("(" * 20 + "1" + ")" * 20) == 1
    assert evaluate("1000000 * 1000000") == 10**12


def test_numbers_in():
    assert numbers_in("(44 - 19) + 35") == [44, 19, 35]
    assert numbers_in("-3 * 07") == [3, 7]
    with pytest.raises(InvalidExpression):
        numbers_in("1.5 + 2")
    with pytest.raises(InvalidExpression):
        numbers_in("1 + x")


# --- math ---------------------------------------------------------------------------------------

def test_extract_boxed():
    assert extract_boxed("so \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{1} and \\boxed{2}") == "2"
    assert extract_boxed("<think>\\boxed{1}</think>answer \\boxed{2}") == "2"
    assert extract_boxed("<think>\\boxed{1}</think> no box") is None
    assert extract_boxed("\\boxed{3} then \\boxed{4") == "3"  # an unclosed box is skipped
    assert extract_boxed("\\boxed 7.") == "7."
    assert extract_boxed("\\boxed{2} \\boxed {3") == "2"
    assert extract_boxed("x}}} \\boxed{a{b}c} {{") == "a{b}c"
    assert extract_boxed("nothing here") is None


@pytest.mark.parametrize("completion, gold, expected", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("The answer is \\boxed{18}.", "18", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("no box, 4", "4", 0.0),
    ("<think>maybe \\boxed{4}</think> so \\boxed{5}", "4", 0.0),
    ("<think>maybe \\boxed{5}</think> so \\boxed{4}", "4", 1.0),
    ("\\boxed{4} but wait \\boxed{3}", "4", 0.0),
])
def test_score_math(completion, gold, expected):
    assert score_math(completion, gold) == expected


@pytest.mark.parametrize("payload", ADVERSARIAL + [
    "\\boxed{2^{10^{10}}}", "\\boxed{9^{9^{9^{9}}}}", "\\boxed{10^{999*9999}}", "\\boxed{(10^{7})!}",
    "\\boxed{" + "9" * 10000 + "}", "\\boxed{__import__('os').system('x')}", "\\boxed{\\frac{1}{2}",
])
def test_score_math_adversarial(payload):
    assert fast(score_math, payload, "4") == 0.0
    assert fast(score_math, payload + "\\boxed{4}", "4") == 1.0


def test_score_math_in_a_thread():
    """math-verify's signal timeout fails outside the main thread; ours must not."""
    results: list[float] = []
    cases = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{3}", "4"), ("\\boxed{2^{10^{10}}}", "4")]
    worker = threading.Thread(target=lambda: results.extend(score_math(c, g) for c, g in cases))
    worker.start()
    worker.join(timeout=30)
    assert results == [1.0, 0.0, 0.0]


def test_gsm8k_gold():
    assert gsm8k_gold("She has 3 + 4 = <<3+4=7>>7.\n#### 7\n") == "7"
    assert gsm8k_gold("... #### 1,234") == "1234"
    assert gsm8k_gold("#### -5") == "-5"
    assert gsm8k_gold("  (1,2) ") == "(1,2)"  # bare answers keep their commas


# --- choice -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, letter", [
    ("\\boxed{A}", "A"), ("\\boxed{(B)}", "B"), ("\\boxed{C.}", "C"), ("\\boxed{\\text{D}}", "D"),
    ("\\boxed{J}", "J"), ("\\boxed{$E$}", "E"), ("\\boxed{F) the option}", "F"), ("\\boxed{b}", "B"),
    ("\\boxed{K}", None), ("\\boxed{a cat}", None), ("\\boxed{AB}", None), ("A", None),
    ("<think>\\boxed{A}</think> \\boxed{C}", "C"), ("\\boxed{A} then \\boxed{B}", "B"),
])
def test_extract_choice_letter(text, letter):
    assert extract_choice_letter(text) == letter


def test_score_choice():
    assert score_choice("I pick \\boxed{(C)}", "C") == 1.0
    assert score_choice("I pick \\boxed{C}", "(c)") == 1.0
    assert score_choice("I pick \\boxed{B}", "C") == 0.0
    assert score_choice("I pick C", "C") == 0.0
    for payload in ADVERSARIAL:
        assert fast(score_choice, payload, "A") == 0.0


def test_choice_prompt():
    prompt = choice_prompt("What is 2 + 2?", ["3", "4", "5"])
    assert "Options:\nA. 3\nB. 4\nC. 5\n" in prompt
    assert "(A-C)" in prompt and "\\boxed{}" in prompt
    with pytest.raises(ValueError):
        choice_prompt("q", ["only one"])
    with pytest.raises(ValueError):
        choice_prompt("q", [str(i) for i in range(11)])


def test_load_choice_jsonl_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "2+2?", "options": ["3", "4"], "answer": "B"}\n\n')
    assert load_choice_jsonl(good)[0]["gold"] == "B"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "2+2?", "options": ["3", "4"], "answer": "B"}\n'
                   '{"question": "2+2?", "options": ["3", "4"], "answer": "C"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_choice_jsonl(bad)


# --- registry -----------------------------------------------------------------------------------

def test_get_task_countdown_rows_score():
    task = get_task("countdown-easy")
    rows = task.load("train", 5, 0)
    assert len(rows) == 5 and rows == task.load("train", 5, 0)
    for row in rows:
        assert row["prompt"].endswith("<think>")
        expr = solve_countdown(row["numbers"], row["target"])
        assert task.score(f"<answer>{expr}</answer>", row) == 1.0
        assert task.score("no answer", row) == 0.0
    chat_rows = get_task("countdown", template="chat").load("test", 3, 0)
    assert chat_rows[0]["prompt"][0]["role"] == "user"


def test_get_task_gsm8k_and_files(tmp_path):
    rows = get_task("gsm8k").load("test", 3, 0)
    assert len(rows) == 3 and rows[0]["prompt"].startswith("System: Please reason step by step")
    assert get_task("gsm8k").score(f"\\boxed{{{rows[0]['gold']}}}", rows[0]) == 1.0
    with pytest.raises(ValueError):
        get_task("gsm8k").load("train", 3, 0)
    math_file = tmp_path / "m.jsonl"
    math_file.write_text('{"problem": "Compute 1/2 + 0.", "answer": "\\\\frac{1}{2}"}\n')
    row = get_task(f"math-jsonl:{math_file}").load("test", 1, 0)[0]
    assert get_task(f"math-jsonl:{math_file}").score("\\boxed{0.5}", row) == 1.0
    choice_file = tmp_path / "c.jsonl"
    choice_file.write_text('{"question": "2+2?", "options": ["3", "4"], "answer": "B"}\n')
    task = get_task(f"choice-jsonl:{choice_file}", template="chat")
    row = task.load("test", 1, 0)[0]
    assert row["prompt"][0]["content"].startswith("2+2?")
    assert task.score("\\boxed{B}", row) == 1.0 and task.score("\\boxed{A}", row) == 0.0


def test_get_task_unknown():
    with pytest.raises(ValueError) as info:
        get_task("nope")
    assert all(name in str(info.value) for name in KNOWN_TASKS)


def test_every_registered_name_resolves_and_describes_itself(tmp_path):
    math_file = tmp_path / "m.jsonl"
    math_file.write_text('{"problem": "Compute 1/2 + 0.", "answer": "\\\\frac{1}{2}"}\n')
    choice_file = tmp_path / "c.jsonl"
    choice_file.write_text('{"question": "2+2?", "options": ["3", "4"], "answer": "B"}\n')
    files = {"math-jsonl:PATH": math_file, "choice-jsonl:PATH": choice_file}
    assert list(TASKS) == list(KNOWN_TASKS) and "countdown-pairs-dense" in TASKS and "gsm8k" in TASKS
    for name, entry in TASKS.items():
        assert entry.description
        written = name.replace("PATH", str(files[name])) if name in files else name
        task = get_task(written)
        assert task.name == written and task.data_file == (str(files[name]) if name in files else None)
        split = task.splits[-1] if task.splits else "whatever"
        assert len(task.load(split, 1, 0)) == 1, name
    assert get_task("countdown-pairs").splits == ("train", "test", "final")
    assert get_task("countdown").splits == ("train", "test") and get_task("gsm8k").splits == ("test",)
    with pytest.raises(UserError, match="unknown task"):
        get_task("math-jsonl:")  # a file task needs its path


def test_a_new_task_is_one_registry_entry(monkeypatch):
    from attnrhythm import tasks

    def build(name, template, path):
        return Task(name, lambda split, n, seed: [{"prompt": f"say {i}", "said": str(i)} for i in range(n)],
                    lambda completion, row: float(completion.strip() == row["said"]))

    monkeypatch.setitem(tasks.TASKS, "echo", TaskEntry("echo", "repeat the number", build))
    task = get_task("echo")
    rows = task.load("train", 2, 0)
    assert score_completions(task, ["0", "7"], rows) == ([1.0, 0.0], [])
    assert "echo" in tasks.task_help()
    with pytest.raises(UserError, match="echo"):
        get_task("ecko")  # the unknown-name message reads the registry too


def test_train_and_eval_help_list_the_registry(capsys):
    from attnrhythm.cli import main

    for command in ("train", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines after hyphens too
        assert all(name in shown for name in KNOWN_TASKS), command


def test_verifier_errors_policy_logs_some_and_stops_on_all(caplog):
    check_verifier_errors("toy", [], 3)  # nothing failed: nothing said
    assert not caplog.records
    check_verifier_errors("toy", ["KeyError: 'x'"], 3, " of the batch")
    assert "failed on 1 of 3 completions of the batch (scored 0); first: KeyError" in caplog.text
    with pytest.raises(RuntimeError, match="every completion of the batch"):
        check_verifier_errors("toy", ["KeyError: 'x'"] * 3, 3, " of the batch")


def test_analysis_counts_verifier_errors_as_eval_does(tiny_model, tokenizer, monkeypatch, caplog):
    """A verifier bug during analysis scores 0 and is reported; a verifier that fails on every
    response stops the analysis instead of reporting an accuracy of 0."""
    pytest.importorskip("math_verify")
    from attnrhythm.data import Problem
    from attnrhythm.studies import analyze as analysis

    problems = [Problem(f"q{i}", f"Tom has {i} apples and buys {i + 2} more. How many apples?", "#### 1", "1")
                for i in range(3)]
    calls = []

    def flaky(completion, row):
        calls.append(completion)
        if len(calls) == 2:
            raise KeyError("the verifier is broken")
        return 0.0

    monkeypatch.setattr(analysis, "MATH_ANSWER", Task("math", lambda *a: [], flaky))
    records = list(analysis.analyze(tiny_model, tokenizer, problems, max_new_tokens=4, batch_size=2))
    assert [r["correct"] for r in records] == [0.0, 0.0, 0.0] and len(calls) == 3
    assert "failed on 1 of 3 completions" in caplog.text and "KeyError" in caplog.text

    def broken(completion, row):
        raise KeyError("the verifier is broken")

    monkeypatch.setattr(analysis, "MATH_ANSWER", Task("math", lambda *a: [], broken))
    with pytest.raises(RuntimeError, match="every completion"):
        list(analysis.analyze(tiny_model, tokenizer, problems, max_new_tokens=4, batch_size=2))
