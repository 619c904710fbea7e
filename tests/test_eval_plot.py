"""Warm start, evaluation and plotting: running_peak against a hand loop, a PNG from two fake
runs, evaluate() on a tiny random Llama (SmolLM2 tokenizer) with a hand-made task, a warm start
whose loss must fall, and countdown-worked's worked completions replayed in Fractions."""
import json
import math
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from attnrhythm.train.plot import plot_runs, running_peak
from attnrhythm.errors import UserError
from attnrhythm.tasks import Task, get_task, score_countdown, solve_countdown, verify_countdown
from attnrhythm.tasks.countdown import split_of
from attnrhythm.train.evaluate import evaluate, summarize
from attnrhythm.train.sft import (WORKED_ATTEMPTS, solution_completion, sft_examples, sft_loss, warm_start,
                                  worked_completion)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from attnrhythm.models import embedded_model_dir
    try:
        tok = AutoTokenizer.from_pretrained(embedded_model_dir("smollm2-135m"))
    except (FileNotFoundError, ImportError, OSError) as err:
        pytest.skip(f"SmolLM2 tokenizer not available: {err}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_smol_llama(tokenizer, seed=0):
    """A tiny random Llama whose vocabulary matches the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config).float().eval()


def hand_task():
    """3 problems; the score depends on the completion text, so samples get different scores."""
    rows = [{"prompt": f"User: say something about {w}.\nAssistant:", "id": i} for i, w in enumerate(["cats", "dogs", "owls"])]

    def score(completion, row):
        return (1.0, 0.1, 0.0)[len(completion) % 3]

    return Task("hand", lambda split, n, seed: rows[:n], score)


# ----------------------------------------------------------------------------- running peak
def test_running_peak_matches_hand_loop():
    xs = [0.1, 0.5, 0.2, float("nan"), 0.9, 0.3, 0.3, None, 1.2, 0.0]
    for a in (0.05, 0.3, 1.0):
        ema, expected = None, []
        for x in xs:
            if x is not None and x == x:
                ema = x if ema is None else a * max(x, ema) + (1 - a) * ema
            expected.append(ema)
        got = running_peak(xs, a)
        assert len(got) == len(xs)
        for g, e in zip(got, expected):
            assert math.isclose(g, e, rel_tol=1e-12)
        assert all(g2 >= g1 for g1, g2 in zip(got, got[1:]))  # a running peak never falls
    assert running_peak(xs, 1.0)[-1] == 1.2
    with pytest.raises(ValueError):
        running_peak(xs, 0.0)


# ----------------------------------------------------------------------------- plot
def _fake_run(folder, credit, offset):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(f"credit: {credit}\nseed: 0\n")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in range(1, 21):
            f.write(json.dumps({"step": step, "reward": offset + 0.02 * step, "accuracy": 0.01 * step,
                                "head_groups": {"local": []}}) + "\n")
        f.write('{"step": 21, "rew')  # a line cut by a killed run
    with open(os.path.join(folder, "eval.json"), "w") as f:
        json.dump({"step": None, "metrics": {"accuracy": 0.3 + offset, "pass@1": 0.3 + offset}}, f)


def test_plot_writes_png_from_two_runs(tmp_path, capsys):
    from attnrhythm.cli import main
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    _fake_run(a, "none", 0.0)
    _fake_run(b, "coupled", 0.1)
    out = tmp_path / "fig" / "curves.png"
    assert main(["plot", str(a), str(b), "--metric", "reward", "accuracy", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "coupled" in printed and "none" in printed  # (a metric no run has: tests/test_bad_input.py)
    summary = plot_runs([str(a), str(b)], ["reward", "accuracy"], str(tmp_path / "c.png"), a=0.2)
    assert summary["coupled"]["reward"]["steps"] == 20
    assert math.isclose(summary["coupled"]["reward"]["last"], 0.1 + 0.4)
    assert summary["none"]["accuracy"]["eval"] == [0.3]


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_tiny_llama_hand_task(smol_tokenizer):
    model = tiny_smol_llama(smol_tokenizer)
    task = hand_task()
    k = 4
    res = evaluate(model, smol_tokenizer, task, n=3, samples=k, temperature=1.0, max_new_tokens=8, batch_size=6)
    m = res["metrics"]
    assert all(0.0 <= v <= 1.0 for key, v in m.items() if key != "mean_tokens")
    problems = res["problems"]
    assert len(problems) == 3 and all(len(p["scores"]) == k == len(p["completions"]) for p in problems)
    # the stored scores are the task's scores of the stored completions
    assert all(p["scores"] == [task.score(c, p) for c in p["completions"]] for p in problems)
    flat = [s for p in problems for s in p["scores"]]
    assert math.isclose(m[f"avg@{k}"], sum(s == 1.0 for s in flat) / len(flat))
    assert math.isclose(m["accuracy"], m[f"avg@{k}"])
    assert math.isclose(m["reward"], sum(flat) / len(flat))
    assert math.isclose(m[f"pass@{k}"], sum(any(s == 1.0 for s in p["scores"]) for p in problems) / 3)
    assert m[f"pass@{k}"] >= m[f"avg@{k}"]
    assert 1 <= m["mean_tokens"] <= 8
    # seeded sampling is reproducible; greedy pass@1 is deterministic and gives pass@1 only
    again = evaluate(model, smol_tokenizer, task, n=3, samples=k, temperature=1.0, max_new_tokens=8, batch_size=6)
    assert [p["completions"] for p in again["problems"]] == [p["completions"] for p in problems]
    g1 = evaluate(model, smol_tokenizer, task, n=3, samples=1, max_new_tokens=8, batch_size=2)
    g2 = evaluate(model, smol_tokenizer, task, n=3, samples=1, max_new_tokens=8, batch_size=3)
    assert g1["settings"]["greedy"] and "pass@1" in g1["metrics"] and "avg@1" not in g1["metrics"]
    # left padding: batching must not change greedy completions
    assert [p["completions"] for p in g1["problems"]] == [p["completions"] for p in g2["problems"]]
    assert smol_tokenizer.padding_side == "right"  # restored


def test_summarize_hand_numbers():
    m = summarize([[1.0, 0.1], [0.0, 0.0], [1.0, 1.0]])
    assert m["avg@2"] == 0.5 and m["pass@2"] == 2 / 3 and math.isclose(m["reward"], 3.1 / 6)
    assert math.isclose(m["format"], 4 / 6)


# ----------------------------------------------------------------------------- warm start
def test_warm_start_targets_score_full_credit():
    for name in ("countdown-easy", "countdown"):
        for row in get_task(name).load("train", 40, 7):
            completion = solution_completion(row["numbers"], row["target"])
            assert completion is not None
            text = "<think>" + completion  # the prompt's pre-filled <think> plus the target
            assert text.index("</think>") < text.index("<answer>")
            assert score_countdown(completion, row["numbers"], row["target"]) == 1.0


def test_warm_start_refuses_test_split(smol_tokenizer):
    rows = get_task("countdown-easy").load("test", 2, 0)
    assert all(split_of(r["numbers"], r["target"]) == "test" for r in rows)
    with pytest.raises(ValueError, match="test-split"):
        sft_examples(rows, smol_tokenizer)


def test_warm_start_reduces_loss(smol_tokenizer):
    rows = get_task("countdown-easy").load("train", 8, 3)
    model = tiny_smol_llama(smol_tokenizer, seed=1)
    examples = sft_examples(rows, smol_tokenizer)
    # the loss covers exactly the completion tokens, which end in eos
    assert all(c[-1] == smol_tokenizer.eos_token_id for _, c in examples)
    before = sft_loss(model, smol_tokenizer, rows)
    log = warm_start(model, smol_tokenizer, rows, steps=12, lr=1e-2, batch_size=2, seed=0)
    after = sft_loss(model, smol_tokenizer, rows)
    assert len(log["losses"]) == 12 and log["n_examples"] == 8
    assert after < 0.8 * before, (before, after)
    assert not model.training
    # same seed, same model init -> the same loss curve (deterministic loop)
    twin = tiny_smol_llama(smol_tokenizer, seed=1)
    log2 = warm_start(twin, smol_tokenizer, rows, steps=12, lr=1e-2, batch_size=2, seed=0)
    assert log2["losses"] == pytest.approx(log["losses"], rel=1e-5)


# ----------------------------------------------------------------------------- worked warm start (countdown-worked)
_HEAD = re.compile(r" Target (\d{1,3}) from (\d{1,2}), (\d{1,2}), (\d{1,2})\.")
_NUMBER = r"-?\d{1,12}(?:/\d{1,12})?"
_STEP = re.compile(rf"({_NUMBER}) ([-+*/]) ({_NUMBER}) = ({_NUMBER})")


def _replay(steps_text: str, numbers) -> list[Fraction]:
    """Recompute 'a op b = c, ...' in Fractions, each operand taken from the pool of unused numbers
    and earlier results (so every given number is used exactly once); the values, in order."""
    pool, values = [Fraction(x) for x in numbers], []
    for step in steps_text.split(", "):
        m = _STEP.fullmatch(step)
        assert m, step
        a, op, b, c = Fraction(m[1]), m[2], Fraction(m[3]), Fraction(m[4])
        pool.remove(a)
        pool.remove(b)  # ValueError: an operand that is not available
        assert c == (a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b), step
        pool.append(c)
        values.append(c)
    assert len(pool) == 1, steps_text  # every number used
    return values


def _worked_rows(n=120):
    return [(row["numbers"], row["target"]) for row in get_task("countdown-worked").load("train", n, 5)]


def test_worked_trace_is_true_arithmetic_that_misses_then_solves():
    patterns = set()
    for numbers, target in _worked_rows():
        text = worked_completion(numbers, target)
        head = _HEAD.match(text)
        assert head and [int(x) for x in head.groups()] == [target, *numbers], text
        search, solution = text[head.end():].split(" Found: ")
        tries = search.split(" Try ")
        assert tries[0] == "" and len(tries) - 1 == WORKED_ATTEMPTS and len(set(tries)) == len(tries)
        for attempt in tries[1:]:
            steps_text, verdict = attempt.rsplit(", ", 1)
            values = _replay(steps_text, numbers)
            assert all(v > 0 and v.denominator == 1 and v != target for v in values), attempt
            assert verdict == ("too high." if values[-1] > target else "too low."), attempt
        patterns.add(tuple(re.findall(r" ([-+*/]) ", search)))
        steps_text, rest = solution.split(f". {target} equals the target. </think>\n<answer> ")
        assert _replay(steps_text, numbers)[-1] == target
        assert rest == f"{solve_countdown(numbers, target)} </answer>"
        assert verify_countdown("<think>" + text, numbers, target) == 1.0  # the prompt's <think>, then the target
    assert len(patterns) > 20  # which attempts are drawn differs from instance to instance


def test_worked_trace_is_the_same_in_another_process():
    rows = _worked_rows(20)
    code = ("import json, sys; from attnrhythm.train.sft import worked_completion; "
            "print(json.dumps([worked_completion(n, t) for n, t in json.loads(sys.argv[1])]))")
    env = dict(os.environ, PYTHONHASHSEED="97531")  # a salted hash() would change the draw
    out = subprocess.run([sys.executable, "-c", code, json.dumps(rows)], env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert json.loads(out) == [worked_completion(n, t) for n, t in rows]
    assert worked_completion([3, 3, 8], 24) is None  # unsolvable: no target at all


def test_warm_start_targets_follow_the_variant(smol_tokenizer):
    eos = smol_tokenizer.eos_token_id
    for task, write in (("countdown-easy", solution_completion), ("countdown-pairs-dense", solution_completion),
                        ("countdown-worked", worked_completion), ("countdown-worked-dense", worked_completion)):
        rows = get_task(task).load("train", 4, 2)
        expected = [smol_tokenizer(write(r["numbers"], r["target"]), add_special_tokens=False)["input_ids"] + [eos]
                    for r in rows]
        assert [c for _, c in sft_examples(rows, smol_tokenizer, task)] == expected, task
    # the plain solution keeps its form: the solver's steps, then the answer
    assert solution_completion([12, 5, 3], 51) == (" 12 + 5 = 17, 3 * 17 = 51. 51 equals the target. </think>\n"
                                                   "<answer> 3 * (12 + 5) </answer>")
    for row in get_task("countdown-pairs").load("train", 30, 0):
        expr, target = solve_countdown(row["numbers"], row["target"]), row["target"]
        assert solution_completion(row["numbers"], target) == (f" {expr} = {target}. {target} equals the target. "
                                                               f"</think>\n<answer> {expr} </answer>")


@pytest.mark.parametrize("recipe_name, shortest", [("worked-r1", 100), ("pairs-worked-r1", 50)])
def test_worked_recipes_leave_room_for_the_worked_completions(smol_tokenizer, recipe_name, shortest):
    """examples/recipes/worked-r1.yaml and pairs-worked-r1.yaml: max_completion_length holds every
    warm-start completion (eos included) of 300 train rows of the recipe's task, which run past 100
    (countdown-worked) or 50 tokens (countdown-pairs-worked; issue 15)."""
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / f"examples/recipes/{recipe_name}.yaml").read_text())
    rows = get_task(recipe["task"]).load("train", 300, 1234)
    lengths = [len(c) for _, c in sft_examples(rows, smol_tokenizer, recipe["task"])]
    assert shortest < min(lengths) and max(lengths) < recipe["max_completion_length"], (min(lengths), max(lengths))


def test_worked_warm_start_refuses_test_and_final_rows(smol_tokenizer):
    task = get_task("countdown-worked")
    for split in ("test", "final"):
        with pytest.raises(UserError, match=f"{split}-split"):
            sft_examples(task.load(split, 2, 0), smol_tokenizer, "countdown-worked")
    # countdown-easy has no final split: there the same instances are train rows
    assert len(sft_examples(task.load("final", 2, 0), smol_tokenizer, "countdown-easy")) == 2
    with pytest.raises(UserError, match="must be one of countdown, countdown-easy"):
        sft_examples(task.load("train", 2, 0), smol_tokenizer, "gsm8k")
