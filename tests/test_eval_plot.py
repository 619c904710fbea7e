"""Warm start, evaluation and plotting: running_peak against a hand loop, a PNG from two fake
runs, evaluate() on a tiny random Llama (SmolLM2 tokenizer) with a hand-made task, and a warm
start whose loss must fall."""
import json
import math
import os

import pytest
import torch

from attnrhythm.train.plot import plot_runs, running_peak
from attnrhythm.tasks import Task, get_task, score_countdown
from attnrhythm.tasks.countdown import split_of
from attnrhythm.train.evaluate import evaluate, summarize
from attnrhythm.train.sft import solution_completion, sft_examples, sft_loss, warm_start


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
