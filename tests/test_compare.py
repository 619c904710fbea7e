"""`attnrhythm compare`: paired gains against a hand computation, seeds pooled per problem,
mismatched problem sets refused, and the results files the README quotes."""
import json

import numpy as np
import pytest
import yaml

from attnrhythm.cli import main
from attnrhythm.errors import UserError
from attnrhythm.train.compare import paired_gain, problem_key

# in the order paired_gain resamples them (sorted by problem key), so the hand bootstrap draws the same problems
PROBLEMS = sorted(({"numbers": [i, i + 1], "target": 2 * i + 1} for i in range(40)), key=problem_key)


def evaluation(correct, problems=PROBLEMS):
    return {"problems": [dict(p, scores=[1.0 if c else 0.1], completions=["..."]) for p, c in zip(problems, correct)]}


def hand_gain(start, ends, n_boot=10_000, seed=0):
    """The same statistic written out: per-problem seed means, differences, resampled problems."""
    x = np.array(start, dtype=np.float64)
    y = np.array(ends, dtype=np.float64).mean(0)
    d = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(1)
    return d.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5)


def test_paired_gain_matches_the_hand_computation_and_pools_seeds():
    rng = np.random.default_rng(3)
    start = rng.random(40) < 0.4
    end_a, end_b = rng.random(40) < 0.6, rng.random(40) < 0.5
    got = paired_gain(evaluation(start), evaluation(end_a))
    gain, low, high = hand_gain(start, [end_a])
    assert got["gain"] == pytest.approx(gain) and got["ci_low"] == pytest.approx(low) and got["ci_high"] == pytest.approx(high)
    assert got["n_test"] == 40 and got["wins"] == int((end_a & ~start).sum()) and got["losses"] == int((start & ~end_a).sum())
    pooled = paired_gain(evaluation(start), [evaluation(end_a), evaluation(end_b)])
    gain, low, high = hand_gain(start, [end_a, end_b])
    assert pooled["gain"] == pytest.approx(gain) and pooled["ci_low"] == pytest.approx(low)
    assert pooled["ci_high"] == pytest.approx(high) and low < gain < high
    assert pooled["pass1_end"] == pytest.approx((end_a.mean() + end_b.mean()) / 2)


def test_different_problem_sets_are_refused():
    other = [dict(p, target=p["target"] + 1) for p in PROBLEMS]
    with pytest.raises(UserError, match="different problems"):
        paired_gain(evaluation([True] * 40), evaluation([True] * 40, other))


def test_compare_writes_results_with_seeds_pooled(tmp_path):
    rng = np.random.default_rng(5)
    start = tmp_path / "start.json"
    start.write_text(json.dumps(evaluation(rng.random(40) < 0.3)))
    runs = []
    for credit, seed in (("none", 0), ("none", 1), ("coupled", 0)):
        run = tmp_path / f"{credit}-s{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(dict(credit=credit, seed=seed, task="countdown-pairs",
                                                             learning_rate=1e-5, max_steps=32, device="cpu")))
        (run / "eval.json").write_text(json.dumps(evaluation(rng.random(40) < 0.6)))
        runs.append(str(run))
    assert main(["compare", "--start", str(start), *runs, "--out", str(tmp_path / "out"), "--device", "test box"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    required = {"credit", "seed", "n_test", "pass1_start", "pass1_end", "gain", "ci_low", "ci_high", "steps", "device", "command"}
    assert len(results) == 3 and all(required <= set(r) for r in results)
    assert [r["device"] for r in results] == ["test box"] * 3
    table = (tmp_path / "out" / "results.md").read_text()
    none_row = next(line for line in table.splitlines() if "| none |" in line)
    pooled = paired_gain(json.loads(start.read_text()), [json.loads((tmp_path / f"none-s{s}" / "eval.json").read_text())
                                                        for s in (0, 1)])
    assert f"{100 * pooled['gain']:+.1f} [{100 * pooled['ci_low']:+.1f}, {100 * pooled['ci_high']:+.1f}]" in none_row
    coupled_row = next(line for line in table.splitlines() if "| coupled |" in line)
    none_ends = [json.loads((tmp_path / f"none-s{s}" / "eval.json").read_text()) for s in (0, 1)]
    versus = paired_gain(none_ends, json.loads((tmp_path / "coupled-s0" / "eval.json").read_text()))
    x = np.mean([[p["scores"][0] >= 1 for p in e["problems"]] for e in none_ends], 0)
    y = np.array([p["scores"][0] >= 1 for p in json.loads((tmp_path / "coupled-s0" / "eval.json").read_text())["problems"]])
    assert versus["gain"] == pytest.approx((y - x).mean())
    # one seed: no pooled cell; the difference from none's seed-averaged end
    assert coupled_row.endswith(f"|  | {100 * versus['gain']:+.1f} [{100 * versus['ci_low']:+.1f}, {100 * versus['ci_high']:+.1f}] |")
    assert none_row.endswith("|  |")
    assert main(["compare", "--start", str(start), *runs, "--out", str(tmp_path / "vs"), "--versus", "coupled"]) == 0
    table = (tmp_path / "vs" / "results.md").read_text()
    assert "end minus `coupled`'s end" in table
    back = paired_gain(json.loads((tmp_path / "coupled-s0" / "eval.json").read_text()), none_ends)
    assert next(line for line in table.splitlines() if "| none |" in line).endswith(
        f"| {100 * back['gain']:+.1f} [{100 * back['ci_low']:+.1f}, {100 * back['ci_high']:+.1f}] |")
    assert main(["compare", "--start", str(tmp_path / "missing.json"), *runs]) == 2


def test_committed_results_follow_the_schema_and_the_kept_evaluations_reproduce_them():
    """docs/training/results.json holds the fields the README promises, and every run whose
    evaluation is kept in docs/training/evals/ gives back its row when compared again."""
    from pathlib import Path
    docs = Path(__file__).resolve().parents[1] / "docs" / "training"
    rows = json.loads((docs / "results.json").read_text())
    for row in rows:
        for field in ("credit", "seed", "n_test", "pass1_start", "pass1_end", "gain", "ci_low", "ci_high", "steps",
                      "device", "command"):
            assert field in row, (row["run"], field)
        assert row["ci_low"] <= row["gain"] <= row["ci_high"]
        assert row["gain"] == pytest.approx(row["pass1_end"] - row["pass1_start"])
    start = json.loads((docs / "evals" / "warm.json").read_text())
    kept = sorted(p for p in (docs / "evals").glob("*.json") if p.stem != "warm")
    assert kept
    for path in kept:
        row = next(r for r in rows if r["run"] == path.stem and r["task"] == start["settings"]["task"])
        again = paired_gain(start, json.loads(path.read_text()))
        for field in ("n_test", "pass1_start", "pass1_end", "gain", "ci_low", "ci_high", "wins", "losses"):
            assert again[field] == pytest.approx(row[field]), (path.stem, field)
