"""`attnrhythm compare`: paired gains and the two-level (seeds x problems) bootstrap against hand
computations, Holm's correction, same-seed pairing against plain GRPO, mismatched problem sets
refused, and the results files the README quotes recomputed from the kept evaluations."""
import json

import numpy as np
import pytest
import yaml

from attnrhythm.cli import main
from attnrhythm.errors import UserError
from attnrhythm.train.compare import verdict
from attnrhythm.train.paired import holm, paired_gain, problem_key, two_level

# in the order paired_gain resamples them (sorted by problem key), so the hand bootstrap draws the same problems
PROBLEMS = sorted(({"numbers": [i, i + 1], "target": 2 * i + 1} for i in range(40)), key=problem_key)


GREEDY = {"task": "countdown-pairs", "split": "test", "n": 40, "samples": 1, "temperature": None, "greedy": True,
          "max_new_tokens": 128, "batch_size": 32, "seed": 0}


def evaluation(correct, problems=PROBLEMS, **settings):
    return {"settings": {**GREEDY, **settings},
            "problems": [dict(p, scores=[1.0 if c else 0.1], completions=["..."]) for p, c in zip(problems, correct)]}


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


def hand_two_level(diffs, n_boot=10_000, seed=0):
    """Resample by resample with np.ix_: seeds drawn for every resample first, then one set of
    problems per resample (problems crossed with seeds), as core.bootstrap.clustered_replicates draws them."""
    rng = np.random.default_rng(seed)
    s, p = diffs.shape
    rows, cols = rng.integers(0, s, size=(n_boot, s)), rng.integers(0, p, size=(n_boot, 1, p))
    means = np.array([diffs[np.ix_(rows[b], cols[b, 0])].mean() for b in range(n_boot)])
    return diffs.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5), min(1, 2 * min((means <= 0).mean(), (means >= 0).mean()))


def test_two_level_bootstrap_matches_the_hand_loop_and_widens_with_seed_spread():
    rng = np.random.default_rng(7)
    diffs = (rng.random((4, 30)) < 0.55).astype(float) - (rng.random((4, 30)) < 0.45)
    got = two_level(diffs, n_boot=3000)
    mean, low, high, p = hand_two_level(diffs, n_boot=3000)
    assert got["mean"] == pytest.approx(mean) and got["ci_low"] == pytest.approx(low)
    assert got["ci_high"] == pytest.approx(high) and got["p"] == pytest.approx(p)
    # seeds that disagree (one seed's gain reversed) widen the interval beyond the problems-only one
    spread = diffs.copy()
    spread[0] = -np.abs(spread[0]) - 0.5
    spread[1:] = np.abs(spread[1:])
    problems_only = two_level(spread.mean(0, keepdims=True))
    assert two_level(spread)["ci_low"] < problems_only["ci_low"]
    # a constant difference per seed: the interval lies within the seeds' range
    constant = np.repeat(np.array([[0.1], [0.2], [0.3]]), 20, axis=1)
    c = two_level(constant)
    assert 0.1 - 1e-12 <= c["ci_low"] <= c["ci_high"] <= 0.3 + 1e-12 and c["p"] == 0.0


def test_holm_adjusts_in_order_and_stays_monotone():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert holm({"a": 0.5, "b": 0.6}) == pytest.approx({"a": 1.0, "b": 1.0})
    assert holm({"a": 0.2}) == {"a": 0.2}


def write_run(tmp_path, credit, seed, correct, final=None, commit="abc123"):
    run = tmp_path / f"{credit}-s{seed}"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(dict(
        credit=credit, seed=seed, task="countdown-pairs", learning_rate=1e-5, max_steps=16, device="cpu",
        num_generations=8, per_device_batch=32, steps_per_generation=1, max_completion_length=64, beta=0.0)))
    (run / "eval.json").write_text(json.dumps(evaluation(correct)))
    if final is not None:
        (run / "eval_final.json").write_text(json.dumps(evaluation(final)))
    (run / "commit.txt").write_text(commit + "\n")
    return str(run)


def test_compare_pairs_seeds_with_plain_grpo_and_scores_both_test_sets(tmp_path):
    rng = np.random.default_rng(5)
    warm = tmp_path / "warm"
    warm.mkdir()
    start, start_final = rng.random(40) < 0.3, rng.random(40) < 0.35
    (warm / "eval.json").write_text(json.dumps(evaluation(start)))
    (warm / "eval_final.json").write_text(json.dumps(evaluation(start_final)))
    ends = {(c, s): (rng.random(40) < 0.6, rng.random(40) < 0.5) for c in ("none", "coupled", "random") for s in (0, 1, 2)}
    del ends[("random", 2)]  # a credit with fewer seeds is paired on the seeds it has
    runs = [write_run(tmp_path, c, s, *v) for (c, s), v in ends.items()]
    out = tmp_path / "out"
    assert main(["compare", "--start", str(warm), *runs, "--test-sets", "dev=eval.json", "final=eval_final.json",
                 "--out", str(out), "--device", "test box"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 * len(runs) and {r["test_set"] for r in rows} == {"dev", "final"}
    assert all(r["commit"] == "abc123" and r["device"] == "test box" for r in rows)
    row = next(r for r in rows if r["run"] == "coupled-s1" and r["test_set"] == "final")
    assert row["evaluation"] == str(tmp_path / "coupled-s1" / "eval_final.json")
    twin = paired_gain(evaluation(ends[("none", 1)][1]), evaluation(ends[("coupled", 1)][1]))
    assert row["versus_gain"] == pytest.approx(twin["gain"]) and row["versus_ci_low"] == pytest.approx(twin["ci_low"])
    summaries = json.loads((out / "summary.json").read_text())
    coupled = next(s for s in summaries if s["credit"] == "coupled" and s["test_set"] == "dev")
    none_dev = np.array([ends[("none", s)][0] for s in (0, 1, 2)], dtype=float)
    coupled_dev = np.array([ends[("coupled", s)][0] for s in (0, 1, 2)], dtype=float)
    order = np.argsort([problem_key(p) for p in evaluation(start)["problems"]])  # compare sorts problems by key
    mean, low, high, p = hand_two_level((coupled_dev - none_dev)[:, order])
    v = coupled["versus"]
    assert v["mean"] == pytest.approx(mean) and v["ci_low"] == pytest.approx(low) and v["ci_high"] == pytest.approx(high)
    assert v["per_seed"] == pytest.approx(list((coupled_dev - none_dev).mean(1)))
    assert v["seeds_better"] == int(((coupled_dev - none_dev).mean(1) > 0).sum())
    mean, low, high, _ = hand_two_level((coupled_dev - start)[:, order])
    assert coupled["gain"]["ci_low"] == pytest.approx(low) and coupled["pass1_end"] == pytest.approx(coupled_dev.mean())
    random_dev = next(s for s in summaries if s["credit"] == "random" and s["test_set"] == "dev")
    assert random_dev["versus"]["seeds"] == [0, 1]
    family = holm({"coupled": v["p"], "random": random_dev["versus"]["p"]})
    assert v["p_holm"] == pytest.approx(family["coupled"])
    table = (out / "results.md").read_text()
    assert "### dev set (40 problems, greedy pass@1)" in table and "### final set (40 problems, greedy pass@1)" in table
    line = next(x for x in table.splitlines() if x.startswith("| coupled | 3 |"))
    assert f"{100 * v['mean']:+.1f} [{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}]" in line
    assert line.endswith(f"| {verdict(v, 3)} |")  # the rule itself: test_verdict_needs_the_interval_and_...
    credits = [x.split(" | ")[0][2:] for x in table.split("### final set")[0].splitlines() if x.startswith("| ") and " | " in x]
    assert credits[1:4] == ["none", "random", "coupled"]  # registry order, whatever order the runs were given in
    # random has two seeds: an interval over two fixed models gets no verdict, whatever it says
    line = next(x for x in table.splitlines() if x.startswith("| random | 2 |"))
    assert line.endswith("| not judged (2 seeds) |") and ", not judged (2 seeds) |" in line


def test_a_test_set_scores_whole_credits(tmp_path, capsys):
    """The final split scores only the credits whose runs are fixed: a credit none of whose runs has
    the file is left out of that test set; one with some seeds missing is refused (keeping the
    seeds that happen to be scored would be choosing seeds)."""
    warm = tmp_path / "warm"
    warm.mkdir()
    for name in ("eval.json", "eval_final.json"):
        (warm / name).write_text(json.dumps(evaluation([True, False] * 20)))
    runs = [write_run(tmp_path, c, s, [s % 2 == 0] * 40, final=None if c == "random" else [True] * 40)
            for c in ("none", "random", "coupled") for s in (0, 1, 2)]
    args = ["compare", "--start", str(warm), *runs, "--test-sets", "dev=eval.json", "final=eval_final.json"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["credit"] for r in rows if r["test_set"] == "final"} == {"none", "coupled"}
    assert {r["credit"] for r in rows if r["test_set"] == "dev"} == {"none", "random", "coupled"}
    assert "no eval_final.json for random" in capsys.readouterr().err
    (tmp_path / "coupled-s1" / "eval_final.json").unlink()
    assert main([*args, "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "final: 1 of the 3 `coupled` runs have no eval_final.json" in err and "coupled-s1" in err
    assert not (tmp_path / "out2").exists()
    # scored with other settings than the start: refused; a batch size changes no score
    (tmp_path / "coupled-s1" / "eval_final.json").write_text(json.dumps(evaluation([True] * 40, batch_size=8)))
    assert main([*args, "--out", str(tmp_path / "out3")]) == 0
    (tmp_path / "coupled-s1" / "eval_final.json").write_text(json.dumps(evaluation([True] * 40, max_new_tokens=64)))
    assert main([*args, "--out", str(tmp_path / "out4")]) == 2
    assert "coupled-s1 was scored with other settings than the start (max_new_tokens: 64 vs 128)" in capsys.readouterr().err


def test_score_names_come_from_the_evaluation_settings():
    from attnrhythm.train.paired import score_name
    assert score_name(evaluation([True])) == "greedy pass@1"
    assert score_name(evaluation([True], samples=4, temperature=1.0, greedy=False)) == "avg@4 at temperature 1"


@pytest.mark.parametrize("args, message", [
    (["--test-sets", "dev"], "NAME=FILE"),
    (["--test-sets", "dev=eval.json", "final=eval_final.json", "--start", "START_FILE"], "folder"),
])
def test_compare_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, message):
    warm = tmp_path / "warm"
    warm.mkdir()
    (warm / "eval.json").write_text(json.dumps(evaluation([True] * 40)))
    run = write_run(tmp_path, "none", 0, [True] * 40)
    args = [str(warm / "eval.json") if a == "START_FILE" else a for a in args]
    start = [] if "--start" in args else ["--start", str(warm)]
    assert main(["compare", *start, run, *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_committed_results_recompute_from_the_kept_evaluations():
    """docs/training/results.json and summary.json hold the fields the README promises, and
    `compare` on the run folders kept in docs/training/evals/ (configs, commits, evaluations
    without completions) gives every row and every summary back; each row names its per-problem
    file there."""
    from pathlib import Path

    from attnrhythm.train.compare import CompareSettings, compare
    docs = Path(__file__).resolve().parents[1] / "docs" / "training"
    rows = json.loads((docs / "results.json").read_text())
    summaries = json.loads((docs / "summary.json").read_text())
    assert rows and summaries
    for row in rows:
        for field in ("credit", "seed", "test_set", "n_test", "pass1_start", "pass1_end", "gain", "ci_low",
                      "ci_high", "steps", "device", "command", "commit", "evaluation"):
            assert field in row, (row["run"], field)
        evaluation = Path(row["evaluation"])
        assert evaluation.parts[:3] == ("docs", "training", "evals") and (docs.parents[1] / evaluation).is_file()
        assert evaluation.parent.name == row["run"]
    files = {r["test_set"]: Path(r["evaluation"]).name for r in rows}  # each row names its file
    assert all(Path(r["evaluation"]).name == files[r["test_set"]] for r in rows)  # one file per test set
    specs = [f"{t}={file}" for t, file in files.items()]
    runs = sorted(str(p) for p in (docs / "evals").iterdir() if (p / "config.yaml").exists())
    again_rows, again_summaries = compare(CompareSettings(start=str(docs / "evals" / "warm"), runs=runs, test_sets=specs))
    key = lambda r: (r["run"], r["test_set"])  # noqa: E731
    again = {key(r): r for r in again_rows}
    assert set(again) == {key(r) for r in rows}
    for row in rows:
        for field in ("n_test", "pass1_start", "pass1_end", "gain", "ci_low", "ci_high", "wins", "losses", "commit"):
            assert again[key(row)][field] == pytest.approx(row[field]), (key(row), field)
    again = {(s["credit"], s["test_set"]): s for s in json.loads(json.dumps(again_summaries))}
    for s in summaries:
        got = again[(s["credit"], s["test_set"])]
        assert got["gain"] == pytest.approx(s["gain"]) and got["end_per_seed"] == pytest.approx(s["end_per_seed"])
        assert ("versus" in got) == ("versus" in s)
        if "versus" in s:
            for field in ("mean", "ci_low", "ci_high", "p", "p_holm", "per_seed"):
                assert got["versus"][field] == pytest.approx(s["versus"][field]), (s["credit"], field)


def test_verdict_needs_the_interval_and_the_family_correction():
    """An interval clear of 0 is one comparison; the credit table makes several, so a verdict also
    needs the Holm-corrected p below 0.05 (R1's coupled on avg@4 with 3 seeds: [+0.1, +1.4], p_holm 0.087)."""
    clear = {"ci_low": 0.001, "ci_high": 0.014, "p": 0.04}
    assert verdict({**clear, "p_holm": 0.087}, 3) == "inconclusive after Holm"
    assert verdict({**clear, "p_holm": 0.04}, 3) == "higher"
    assert verdict({"ci_low": -0.02, "ci_high": -0.01, "p": 0.01, "p_holm": 0.02}, 5) == "lower"
    assert verdict({"ci_low": -0.001, "ci_high": 0.014, "p": 0.06, "p_holm": 0.06}, 5) == "inconclusive"
    assert verdict({**clear, "p_holm": 0.001}, 2) == "not judged (2 seeds)"
