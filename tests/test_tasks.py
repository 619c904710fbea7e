"""Tests of the task verifiers: safe evaluator, Countdown, math and choice scoring."""
from __future__ import annotations

import threading
import time
from fractions import Fraction

import pytest

from attnrhythm.tasks import (
    KNOWN_TASKS,
    TASKS,
    Task,
    TaskEntry,
    check_verifier_errors,
    CountdownInstance,
    countdown_prompt,
    extract_boxed,
    generate_countdown,
    get_task,
    score_choice,
    score_completions,
    score_countdown,
    score_math,
    solve_countdown,
)
from attnrhythm.data import gsm8k_gold
from attnrhythm.tasks.choice import choice_prompt, extract_choice_letter, load_choice_jsonl
from attnrhythm.errors import UserError
from attnrhythm.tasks.countdown import EASY, split_of
from attnrhythm.tasks.safe_eval import InvalidExpression, evaluate, numbers_in, try_evaluate

MEGABYTE = "x" * 1_000_000
ADVERSARIAL = [
    "9" * 10000,
    "(" * 100000,
    ")" * 100000,
    "__import__('os').system('x')",
    "2**10**10",
    "2^10^10",
    "{" * 50000 + "}" * 10,
    MEGABYTE,
    "<answer>" * 100000,
    "</answer>" * 100000,
    "\\boxed{" * 100000,
]


def fast(fn, *args, limit: float = 2.0):
    """Call ``fn`` and assert it returns within ``limit`` seconds (a bound on pathological cost)."""
    start = time.perf_counter()
    result = fn(*args)
    assert time.perf_counter() - start < limit, f"{fn.__name__} took too long"
    return result


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


# --- Countdown ----------------------------------------------------------------------------------

def test_generator_deterministic_and_bounded():
    a = generate_countdown(50, seed=3)
    assert a == generate_countdown(50, seed=3)
    assert a != generate_countdown(50, seed=4)
    assert len(set(a)) == 50
    for inst in a:
        assert len(inst.numbers) in (3, 4)
        assert all(1 <= x <= 99 for x in inst.numbers)
        assert 10 <= inst.target <= 100


def test_generator_splits_disjoint():
    key = lambda inst: (tuple(sorted(inst.numbers)), inst.target)  # noqa: E731
    train = {key(i) for i in generate_countdown(1000, seed=0, split="train")}
    test = {key(i) for i in generate_countdown(150, seed=0, split="test")}
    test |= {key(i) for i in generate_countdown(150, seed=1, split="test")}
    assert train and test and not train & test
    # the small easy space is where a broken split would collide most
    easy_train = {key(i) for i in generate_countdown(1000, seed=0, split="train", **EASY)}
    easy_test = {key(i) for i in generate_countdown(150, seed=0, split="test", **EASY)}
    assert not easy_train & easy_test
    with pytest.raises(ValueError):
        generate_countdown(5, seed=0, split="validation")


def test_generated_instances_are_solved_and_scored():
    instances = generate_countdown(100, seed=7) + generate_countdown(30, seed=7, split="test")
    instances += generate_countdown(50, seed=7, **EASY)
    for inst in instances:
        expr = solve_countdown(inst.numbers, inst.target)
        assert expr is not None, inst
        assert sorted(numbers_in(expr)) == sorted(inst.numbers)
        assert evaluate(expr) == inst.target
        completion = f"<think>...</think><answer>{expr}</answer>"
        assert score_countdown(completion, inst.numbers, inst.target) == 1.0


def test_easy_setting():
    for inst in generate_countdown(100, seed=0, **EASY):
        assert len(inst.numbers) == 3 and max(inst.numbers) <= 20 and 1 <= inst.target <= 100


def test_pairs_setting_holds_the_held_out_set_it_is_evaluated_on():
    """countdown-pairs: two numbers up to 50, targets 1..100, solvable, disjoint splits, and the
    whole test space (298 instances) leaves room for the 256 held-out problems eval draws."""
    task = get_task("countdown-pairs")
    test, train = task.load("test", 256, 0), task.load("train", 2000, 1234)
    key = lambda row: (tuple(sorted(row["numbers"])), row["target"])  # noqa: E731
    assert len({key(r) for r in test}) == 256 and not {key(r) for r in test} & {key(r) for r in train}
    for row in test[:50] + train[:50]:
        assert len(row["numbers"]) == 2 and max(row["numbers"]) <= 50 and 1 <= row["target"] <= 100
        expr = solve_countdown(row["numbers"], row["target"])
        assert task.score(f"<answer>{expr}</answer>", row) == 1.0
    with pytest.raises(UserError, match="could only generate 298 of 400"):
        task.load("test", 400, 0)
    assert get_task("countdown-pairs-dense").score("<answer>1 + 2</answer>", dict(numbers=[1, 2], target=4)) > 0.1


def test_worked_setting_keeps_test_and_final_apart_from_train():
    """countdown-worked: EASY's instances, a held-out final split disjoint from train and test,
    a test (dev) split that is countdown-easy's, and a generator that never sees the warm start's
    completion key (loading would raise on an unknown argument)."""
    task = get_task("countdown-worked")
    assert task.splits == ("train", "test", "final") and get_task("countdown-worked-dense").splits == task.splits
    rows = {"train": task.load("train", 1500, 1234), "test": task.load("test", 256, 0), "final": task.load("final", 256, 0)}
    keys = {split: {(tuple(sorted(r["numbers"])), r["target"]) for r in found} for split, found in rows.items()}
    assert all(len(keys[split]) == len(rows[split]) for split in rows)
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["final"] and not keys["test"] & keys["final"]
    for split, found in rows.items():
        for row in found:
            assert len(row["numbers"]) == 3 and max(row["numbers"]) <= 20 and 1 <= row["target"] <= 100
            assert split_of(row["numbers"], row["target"], 0.1) == split
    assert rows["test"] == get_task("countdown-easy").load("test", 256, 0)
    # the final instances are train instances of countdown-easy (no final split there): new to this task only
    assert all(split_of(r["numbers"], r["target"]) == "train" for r in rows["final"])
    with pytest.raises(UserError, match="split must be one of train, test"):
        get_task("countdown-easy").load("final", 1, 0)


def test_worked_small_setting_has_numbers_up_to_10_and_its_own_splits():
    """countdown-worked-small: countdown-worked's generator with numbers up to 10; its three splits
    are disjoint, and its dev split holds 300 instances (a request for more names the limit)."""
    task = get_task("countdown-worked-small")
    assert task.splits == ("train", "test", "final")
    rows = {"train": task.load("train", 2000, 1234), "test": task.load("test", 256, 0), "final": task.load("final", 256, 0)}
    keys = {split: {(tuple(sorted(r["numbers"])), r["target"]) for r in found} for split, found in rows.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["final"] and not keys["test"] & keys["final"]
    for split, found in rows.items():
        for row in found:
            assert len(row["numbers"]) == 3 and max(row["numbers"]) <= 10 and 1 <= row["target"] <= 100
            assert split_of(row["numbers"], row["target"], 0.1) == split
            assert evaluate(solve_countdown(row["numbers"], row["target"])) == row["target"]
    with pytest.raises(UserError, match="could only generate 300 of 400"):
        task.load("test", 400, 0)


def test_solver():
    expr = solve_countdown([3, 3, 8, 8], 24)  # needs a fractional intermediate: 8 / (3 - 8/3)
    assert expr is not None and evaluate(expr) == 24
    assert solve_countdown([1, 1, 1], 100) is None
    assert solve_countdown([5], 5) == "5"


def test_countdown_prompt_text():
    inst = CountdownInstance((44, 19, 35), 98)
    prompt = countdown_prompt(inst)
    assert prompt.startswith("A conversation between User and Assistant.")
    assert "User: Using the numbers [44, 19, 35], create an equation that equals 98." in prompt
    assert prompt.endswith("<answer> (1 + 2) / 3 </answer>.\nAssistant: Let me solve this step by step.\n<think>")
    chat = countdown_prompt(inst, "chat")
    assert chat[0]["role"] == "user" and chat[0]["content"].startswith("Using the numbers [44, 19, 35]")
    assert "Assistant" not in chat[0]["content"]


NUMS, TARGET = [44, 19, 35], 98


@pytest.mark.parametrize("completion, expected", [
    ("<answer>44 + 19 + 35</answer>", 1.0),
    ("<answer> 35 + 44 + 19 </answer>", 1.0),
    ("<answer>44 + 19 - 35</answer>", 0.1),  # right numbers, wrong value
    ("<answer>44 + 19 + 35 + 0</answer>", 0.1),  # an extra number
    ("<answer>44 + 54</answer>", 0.1),  # wrong multiset, right value
    ("<answer>44 + 19 + 35.0</answer>", 0.1),  # decimal literal
    ("<answer>44 + 19 + 35 = 98</answer>", 0.1),  # '=' is not part of the grammar
    ("<answer>44 + 19 + 35 / 0</answer>", 0.1),
    ("44 + 19 + 35", 0.0),  # no answer block
    ("<answer>44 + 19 + 35", 0.0),  # unclosed block
    ("<answer>1</answer> then <answer>44 + 19 + 35</answer>", 1.0),  # the last block counts
    ("<answer>44 + 19 + 35</answer> then <answer>1</answer>", 0.1),
    ("<answer>44 + 19 + 35</answer> then <answer>1", 1.0),  # an unclosed block is not a block
    ("<answer></answer>", 0.1),
])
def test_score_countdown_cases(completion, expected):
    assert score_countdown(completion, NUMS, TARGET) == expected


def test_score_countdown_duplicates_are_a_multiset():
    assert score_countdown("<answer>5 * 5 - 1</answer>", [5, 5, 1], 24) == 1.0
    assert score_countdown("<answer>5 * 5 - 1</answer>", [5, 1, 1], 24) == 0.1


@pytest.mark.parametrize("payload", ADVERSARIAL)
def test_score_countdown_adversarial(payload):
    assert fast(score_countdown, payload, NUMS, TARGET) == 0.0
    assert fast(score_countdown, f"<answer>{payload}</answer>", NUMS, TARGET) == 0.1
    assert fast(score_countdown, f"{payload}<answer>1 + 2</answer>", [1, 2], 3) == 1.0


def test_score_countdown_never_raises_on_odd_types():
    assert score_countdown(None, NUMS, TARGET) == 0.0  # type: ignore[arg-type]
    assert score_countdown("<answer>1</answer>", ["a"], TARGET) == 0.1  # type: ignore[list-item]


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


def test_never_raising_scores_log_what_they_swallow(caplog):
    assert score_countdown("<answer>1</answer>", ["a"], TARGET) == 0.1  # type: ignore[list-item]
    assert "countdown verifier raised ValueError" in caplog.text


def test_dense_countdown_reward_orders_by_nearness_and_keeps_exact_and_format():
    from attnrhythm.tasks import get_task
    from attnrhythm.tasks.countdown import verify_countdown_dense

    wrap = lambda e: f"<think>t</think><answer>{e}</answer>"  # noqa: E731
    nums, target = [3, 5, 7], 22
    assert verify_countdown_dense(wrap("3*5+7"), nums, target) == 1.0
    near = verify_countdown_dense(wrap("3+5*7"), nums, target)      # 38: 16 away
    nearer = verify_countdown_dense(wrap("3*7-5"), nums, target)    # 16: 6 away
    assert 0.1 < near < nearer < 0.5
    assert nearer == pytest.approx(0.1 + 0.4 * (1 - 6 / 22))
    assert verify_countdown_dense(wrap("3*5*7"), nums, target) == 0.1  # 105: farther than the target itself
    assert verify_countdown_dense(wrap("3+5"), nums, target) == 0.1    # wrong multiset: format only
    assert verify_countdown_dense("no answer", nums, target) == 0.0
    dense, plain = get_task("countdown-easy-dense"), get_task("countdown-easy")
    row = plain.load("test", 5, 0)[0]
    assert dense.load("test", 5, 0)[0] == row  # same instances, only the reward differs


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
