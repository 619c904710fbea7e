"""Tests of the scripts behind docs/training/: publishing runs, the operation breakdown, and the
same-training check that proves a refactor changed no training result."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pairs_operations_breakdown_counts_each_needed_operation(tmp_path):
    """scripts/pairs_operations.py (docs/training/results.md): the operations that reach a target,
    and per-operation solved counts from an eval file (shares of correct samples)."""
    ops = load("pairs_operations")
    assert ops.operations([3, 5], 8) == "+" and ops.operations([5, 3], 2) == "-"
    assert ops.operations([2, 2], 4) == "+*" and ops.operations([3, 12], 4) == "/" and ops.operations([3, 12], 5) == "?"
    evaluation = {"problems": [{"numbers": [3, 5], "target": 8, "scores": [1.0, 0.1]},
                               {"numbers": [4, 9], "target": 13, "scores": [1.0, 1.0]},
                               {"numbers": [9, 4], "target": 5, "scores": [0.0, 0.1]}]}
    file = tmp_path / "eval.json"
    file.write_text(json.dumps(evaluation))
    assert ops.breakdown(str(file)) == {"+": (1.5, 2), "-": (0.0, 1)}


def steps(*losses: float, step_time: float = 1.0) -> str:
    return "".join(json.dumps({"step": i + 1, "loss": loss, "grad_norm": 0.5, "step_time": step_time}) + "\n"
                   for i, loss in enumerate(losses))


def test_same_training_ignores_timing_and_finds_any_changed_value(tmp_path):
    same = load("same_training")
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    a.write_text(steps(0.1, 0.2, 0.3))
    b.write_text(steps(0.1, 0.2, step_time=9.0))          # fewer steps, other timing: the same training
    c.write_text(steps(0.1, 0.2000001))                    # one loss differs in the 7th digit
    assert same.differences(same.read(str(a)), same.read(str(b))) == []
    assert same.differences(same.read(str(a)), same.read(str(c))) == ["step 2 loss: 0.2 != 0.2000001"]


def test_publish_training_keeps_finished_runs_without_completions(tmp_path):
    """Finished runs and the start are copied with their logs and their evaluations stripped of
    the model's text; a run still training (no eval.json) is left out."""
    publish = load("publish_training")
    runs, dest = tmp_path / "runs", tmp_path / "evals"
    evaluation = {"metrics": {"pass@1": 0.5},
                  "problems": [{"numbers": [1, 2], "target": 3, "scores": [1.0], "completions": ["1 + 2"]}]}
    for name, files in {"warm": ["eval.json", "warm_start.json"],
                        "none-s0": ["config.yaml", "commit.txt", "metrics.jsonl", "eval.json", "eval_avg4.json"],
                        "coupled-s0": ["config.yaml", "metrics.jsonl"]}.items():   # still training
        (runs / name).mkdir(parents=True)
        for file in files:
            (runs / name / file).write_text(json.dumps(evaluation) if file.startswith("eval") else file)
    (runs / "none-s0" / "model.safetensors").write_text("weights")
    written = publish.publish(str(runs), str(dest))
    assert sorted(Path(p).relative_to(dest).as_posix() for p in written) == [
        "none-s0/commit.txt", "none-s0/config.yaml", "none-s0/eval.json", "none-s0/eval_avg4.json",
        "none-s0/metrics.jsonl", "warm/eval.json", "warm/warm_start.json"]
    kept = json.loads((dest / "none-s0" / "eval.json").read_text())
    assert kept["problems"] == [{"numbers": [1, 2], "target": 3, "scores": [1.0]}]
    assert kept["metrics"] == evaluation["metrics"]
    assert not (dest / "coupled-s0").exists()


def test_training_pages_hold_the_scripts_tables():
    """The README's training tables, results.md's table beside the paper's Table 3 and its
    operation table are what the scripts print from the published files (so a refresh cannot
    leave a number stale: the evaluations, summary.json and the pages agree)."""
    root = SCRIPTS.parent
    page = (root / "docs" / "training" / "results.md").read_text()
    summary = json.loads((root / "docs" / "training" / "summary.json").read_text())
    tables = load("training_tables")
    assert tables.table(summary) in page
    assert tables.readme(summary) in (root / "README.md").read_text()
    evals = [str(p) for p in sorted((root / "docs" / "training" / "evals").glob("*/eval.json"))]
    assert load("pairs_operations").table(evals) in page


def test_worked_failures_sorts_each_failed_sample_into_one_kind(tmp_path):
    """scripts/worked_failures.py (docs/training.md, "Warm start"): the first kind that applies,
    steps checked in exact Fractions, and a count per evaluation file."""
    worked = load("worked_failures")
    kind = worked.failure_kind
    assert kind(" Target 4 from 7, 20, 17. Found: 7 * 17 = 119", [7, 20, 17], 4) == "no answer"
    assert kind("Found: 7 + 2 = 9 </think>\n<answer> 7 + 2 </answer>", [7, 20, 17], 4) == "wrong numbers"
    assert kind("<answer> 7 + (20 </answer>", [7, 20, 17], 4) == "wrong numbers"
    slip = "Try 20 - 17 = 4, too low. Found: 7 * 17 = 119, 119 - 20 = 44. 44 equals the target. </think>\n<answer> 7 * 17 - 20 </answer>"
    assert kind(slip, [7, 20, 17], 4) == "false step"  # 119 - 20 is 99; the false step in the attempts is not counted
    claim = "Found: 7 * 17 = 119, 119 - 20 = 99. 99 equals the target. </think>\n<answer> 7 * 17 - 20 </answer>"
    assert kind(claim, [7, 20, 17], 4) == "false claim"
    assert kind("Found: 1 / 3 = 1/3, 1/3 + 2 = 7/3. </think><answer> 1 / 3 + 2 </answer>", [1, 2, 3], 4) == "other"
    evaluation = {"problems": [{"numbers": [7, 20, 17], "target": 4, "scores": [0.1, 0.0], "completions": [slip, "no"]},
                               {"numbers": [1, 2, 3], "target": 6, "scores": [1.0], "completions": ["<answer> 1 + 2 + 3 </answer>"]}]}
    file = tmp_path / "eval.json"
    file.write_text(json.dumps(evaluation))
    assert worked.failures(str(file)) == (3, 1, {"no answer": 1, "wrong numbers": 0, "false step": 1, "false claim": 0, "other": 0})
    assert f"| {file} | 3 | 1 | 1 | 0 | 1 | 0 | 0 |" in worked.table([str(file)])


def test_worked_failure_table_in_training_md_is_the_scripts_output_on_the_committed_evaluations(monkeypatch):
    """docs/training.md's warm-start failure table is what the script prints on the files it names."""
    root = SCRIPTS.parent
    text = (root / "docs/training.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| docs/training/worked/")]
    paths = [line.split(" | ")[0].removeprefix("| ") for line in rows]
    assert len(paths) >= 2 and all((root / p).is_file() for p in paths)
    monkeypatch.chdir(root)  # the table names the files as the command in the docs does
    assert load("worked_failures").table(paths).splitlines()[2:] == rows
