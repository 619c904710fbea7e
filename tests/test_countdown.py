"""Tests of the Countdown tasks: generator and splits, every variant's setting, solver, prompt and
TinyZero's reward (plain and dense), on hand-checked and adversarial completions."""
from __future__ import annotations

import pytest

from attnrhythm.errors import UserError
from attnrhythm.tasks import CountdownInstance, countdown_prompt, generate_countdown, get_task, score_countdown, solve_countdown
from attnrhythm.tasks.countdown import EASY, split_of
from attnrhythm.tasks.safe_eval import evaluate, numbers_in
from conftest import ADVERSARIAL, fast

# --- generator, settings, solver, prompt ----------------------------------------------------------------------------------

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


def test_pairs_worked_setting_is_countdown_pairs_with_a_worked_warm_start():
    """countdown-pairs-worked: countdown-pairs' rows on every split (the same dev and final sets),
    and warm-start targets that try failed operations before the one that reaches the target."""
    from attnrhythm.train.sft import worked_completion

    task, pairs = get_task("countdown-pairs-worked"), get_task("countdown-pairs")
    assert task.splits == pairs.splits
    for split, n in (("train", 300), ("test", 256), ("final", 285)):
        assert task.load(split, n, 3) == pairs.load(split, n, 3)
    for row in task.load("train", 50, 1234):
        text = worked_completion(row["numbers"], row["target"])
        assert text.count(" Try ") >= 1 and "Found: " in text
        assert score_countdown(text, row["numbers"], row["target"]) == 1.0


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


