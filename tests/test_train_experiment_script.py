"""scripts/train_experiment.sh's orchestration, with nothing trained: a fake `attnrhythm` first on
PATH logs every call and makes the files the real command would make (train fails once for one
run), and the real script runs four times on one OUT: a comparison with a failed run, its rerun,
FINAL=1, and FINAL=1 again.  The assertions read the fake's call log and the files left behind.

The script puts the directory of $PYTHON first on PATH (to find the project's `attnrhythm`), so
$PYTHON here is a wrapper next to the fake that execs this interpreter."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import attnrhythm

ROOT = Path(__file__).resolve().parents[1]
CREDITS, SEEDS = ("none", "random"), (0, 1)
RUNS = [f"{credit}-s{seed}" for seed in SEEDS for credit in CREDITS]
FAILING = "none-s0"  # the first run launched: its train fails at once, before the others end
SEP = "\x1f"

FAKE = r"""#!/usr/bin/env bash
# Fake attnrhythm: log argv, then make what the real subcommand makes at --out.
set -euo pipefail
line=$(printf '%s\x1f' "$@")
printf '%s\n' "$line" >> "$FAKE_LOG"
out=
prev=
for arg in "$@"; do [[ $prev == --out ]] && out=$arg; prev=$arg; done
case $1 in
  sft) mkdir -p "$out"; echo '{"model_type": "llama"}' > "$out/config.json" ;;
  train)
    marker=$FAKE_STATE/failed-$(basename "$out")
    if [[ $(basename "$out") == "${FAIL_RUN:-}" && ! -e $marker ]]; then
      touch "$marker"; echo "fake train failure" >&2; exit 1
    fi
    mkdir -p "$out/checkpoint-1"
    echo "optimizer" > "$out/checkpoint-1/optimizer.pt"
    printf 'credit: x\nseed: 0\n' > "$out/config.yaml" ;;
  eval) sleep "${FAKE_EVAL_SECONDS:-0}"; mkdir -p "$(dirname "$out")"; echo '{"problems": [], "pass1": 0.5}' > "$out" ;;
  compare) mkdir -p "$out"; echo "| results |" > "$out/results.md" ;;
  plot) mkdir -p "$(dirname "$out")"; echo "png" > "$out" ;;
  *) echo "fake attnrhythm: unexpected subcommand $1" >&2; exit 2 ;;
esac
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _head(code_dir: str) -> str:
    return subprocess.run(["git", "-C", code_dir, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _environment(tmp: Path, **settings) -> dict:
    """The script's environment: the fake and a $PYTHON wrapper first on PATH, OUT=tmp/exp."""
    bin_dir, state = tmp / "bin", tmp / "state"
    bin_dir.mkdir()
    state.mkdir()
    _executable(bin_dir / "attnrhythm", FAKE)
    _executable(bin_dir / "python", f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
            "OUT": str(tmp / "exp"), "JOBS": "2", "THREADS": "1", "PRESET": "cpu", "STEPS": "3", "EVAL_N": "8",
            "AVG_K": "4", "FAKE_STATE": str(state), **settings}


def _run_script(env: dict, log: Path):
    """(exit code, output, calls): each call is the fake's argv."""
    log.touch()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "train_experiment.sh")],
                          env={**env, "FAKE_LOG": str(log)}, capture_output=True, text=True, timeout=120)
    calls = [line.split(SEP)[:-1] for line in log.read_text().splitlines()]
    return done.returncode, done.stdout + done.stderr, calls


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """Runs the script four times on one OUT; returns OUT, each invocation's (exit code, output,
    calls) and the HEAD commits of attnrhythm's code before and after."""
    tmp = tmp_path_factory.mktemp("train_experiment")
    env = _environment(tmp, CREDITS=" ".join(CREDITS), SEEDS=" ".join(map(str, SEEDS)), FAIL_RUN=FAILING)
    code_dir = os.path.dirname(os.path.dirname(attnrhythm.__file__))
    heads = {_head(code_dir)}
    invocations = {name: _run_script({**env, **extra}, tmp / f"calls-{name}.log")
                   for name, extra in (("failing", {}), ("rerun", {}), ("final", {"FINAL": "1"}),
                                       ("final-again", {"FINAL": "1"}))}
    heads.add(_head(code_dir))
    return tmp / "exp", invocations, heads


def _option(call, flag):
    return call[call.index(flag) + 1]


def _values(call, flag):
    """The values after `flag` up to the next --option."""
    start = call.index(flag) + 1
    end = next((i for i in range(start, len(call)) if call[i].startswith("--")), len(call))
    return call[start:end]


def _of(calls, command):
    return [c for c in calls if c[0] == command]


def test_first_invocation_warm_start_runs_and_evaluations(experiment):
    """The failing invocation (its compare comes with the rerun, below)."""
    out, invocations, heads = experiment
    calls = invocations["failing"][2]
    sft = _of(calls, "sft")
    assert len(sft) == 1 and _option(sft[0], "--out") == str(out / "warm")
    assert (out / "warm" / "config.json").is_file()

    evals = _of(calls, "eval")
    greedy = [c for c in evals if _option(c, "--samples") == "1"]
    sampled = [c for c in evals if _option(c, "--samples") == "4"]
    assert len(greedy) + len(sampled) == len(evals)
    assert all(_option(c, "--temperature") == "1.0" for c in sampled)
    assert all("--temperature" not in c for c in greedy)
    assert all(_option(c, "--split") == "test" for c in evals)
    finished = [r for r in RUNS if r != FAILING]
    expected_dirs = ["warm"] + finished
    assert sorted(_option(c, "--out") for c in greedy) == sorted(str(out / d / "eval.json") for d in expected_dirs)
    assert sorted(_option(c, "--out") for c in sampled) == sorted(str(out / d / "eval_avg4.json") for d in expected_dirs)
    assert all(_option(c, "--model") == str(out / Path(_option(c, "--out")).parent.name) for c in evals)

    trains = _of(calls, "train")
    assert sorted((_option(c, "--credit"), _option(c, "--seed")) for c in trains) == \
        sorted((credit, str(seed)) for credit in CREDITS for seed in SEEDS)
    for c in trains:
        assert _option(c, "--model") == str(out / "warm") and _option(c, "--preset") == "cpu"
        assert _option(c, "--out") == str(out / f"{_option(c, '--credit')}-s{_option(c, '--seed')}")
        assert _option(c, "--max-steps") == "3"

    for run in finished:
        folder = out / run
        assert (folder / "eval.json").is_file() and (folder / "eval_avg4.json").is_file()
        assert (folder / "config.yaml").is_file()
        assert not list(folder.glob("checkpoint-*")), f"{run}: checkpoint folders are kept"
        commit = (folder / "commit.txt").read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit), commit
        assert commit.split("+")[0] in heads


def test_a_failed_run_fails_the_script_and_a_rerun_trains_only_it(experiment):
    out, invocations, _ = experiment
    code, output, calls = invocations["failing"]
    assert code != 0, output
    assert f"FAILED: {out / FAILING}" in output
    assert not _of(calls, "compare") and not _of(calls, "plot")

    code, output, calls = invocations["rerun"]
    assert code == 0, output
    assert not _of(calls, "sft")
    trains = _of(calls, "train")
    assert [_option(c, "--out") for c in trains] == [str(out / FAILING)]
    assert sorted(_option(c, "--out") for c in _of(calls, "eval")) == \
        sorted(str(out / FAILING / f) for f in ("eval.json", "eval_avg4.json"))
    assert not list((out / FAILING).glob("checkpoint-*"))
    assert (out / FAILING / "commit.txt").is_file()

    compare = _of(calls, "compare")
    assert len(compare) == 1
    assert _option(compare[0], "--start") == str(out / "warm")
    assert _values(compare[0], "--test-sets") == ["dev=eval.json", "dev-avg4=eval_avg4.json"]
    assert _option(compare[0], "--out") == str(out)
    assert _values(compare[0], "--start") == [str(out / "warm")] + [str(out / r) for r in RUNS]
    assert (out / "results.md").is_file()
    plots = _of(calls, "plot")
    assert len(plots) == 2 and all(set(map(str, (out / r for r in RUNS))) <= set(c) for c in plots)


def test_final_split_is_scored_once(experiment):
    out, invocations, _ = experiment
    code, output, calls = invocations["final"]
    assert code == 0, output
    assert not _of(calls, "sft") and not _of(calls, "train") and not _of(calls, "plot")
    evals = _of(calls, "eval")
    assert all(_option(c, "--split") == "final" for c in evals)  # greedy, and avg@4 as on the dev set
    assert sorted((_option(c, "--out"), _option(c, "--samples")) for c in evals) == \
        sorted((str(out / d / name), samples) for d in ["warm"] + RUNS
               for name, samples in (("eval_final.json", "1"), ("eval_final_avg4.json", "4")))
    for d in ["warm"] + RUNS:
        assert (out / d / "eval_final.json").is_file() and (out / d / "eval_final_avg4.json").is_file()
    compare = _of(calls, "compare")
    assert len(compare) == 1
    assert _option(compare[0], "--start") == str(out / "warm")
    assert _values(compare[0], "--start") == [str(out / "warm")] + [str(out / r) for r in RUNS]
    assert _values(compare[0], "--test-sets") == ["dev=eval.json", "dev-avg4=eval_avg4.json", "final=eval_final.json",
                                                  "final-avg4=eval_final_avg4.json"]
    assert _option(compare[0], "--out") == str(out / "final")
    assert (out / "final" / "results.md").is_file()

    code, output, calls = invocations["final-again"]
    assert code == 0, output
    assert [c[0] for c in calls] == ["compare"]


def test_a_run_that_fails_while_a_finished_run_is_scored_is_not_missed(tmp_path):
    """The failed train ends while a finished run gets its new avg@4 score in the foreground, so
    no job is running when the script waits for the runs: it must still see the failure."""
    env = _environment(tmp_path, CREDITS="none random", SEEDS="0", FAIL_RUN="none-s0", FAKE_EVAL_SECONDS="0.5")
    out = tmp_path / "exp"
    for name, files in (("warm", ("config.json", "eval.json", "eval_avg4.json")),
                        ("random-s0", ("config.yaml", "eval.json"))):
        (out / name).mkdir(parents=True)
        for file in files:
            (out / name / file).write_text("{}")
    code, output, calls = _run_script(env, tmp_path / "calls.log")
    assert code != 0, output
    assert sorted(c[0] for c in calls) == ["eval", "train"]
    assert _option(_of(calls, "eval")[0], "--out") == str(out / "random-s0" / "eval_avg4.json")
    assert _option(_of(calls, "train")[0], "--out") == str(out / "none-s0")
    assert "rerun this command to retry it" in output


@pytest.mark.parametrize("task, greedy_tokens, sampled_tokens", [("countdown-pairs", "128", "64"),
                                                                  ("countdown-worked", "192", "192"),
                                                                  ("countdown-worked-small", "192", "192"),
                                                                  ("countdown-pairs-worked", "128", "128")])
def test_evaluation_token_budget_follows_the_task(tmp_path, task, greedy_tokens, sampled_tokens):
    """countdown-worked's warm-start completions run up to 166 tokens, countdown-pairs-worked's up
    to 101: the default budgets of the short tasks would cut their answers off and score them 0."""
    env = _environment(tmp_path, TASK=task, CREDITS="none", SEEDS="0", JOBS="1")
    code, output, calls = _run_script(env, tmp_path / "calls.log")
    assert code == 0, output
    evals = _of(calls, "eval")
    assert evals and all(_option(c, "--task") == task for c in evals)
    assert {_option(c, "--max-new-tokens") for c in evals if _option(c, "--samples") == "1"} == {greedy_tokens}
    assert {_option(c, "--max-new-tokens") for c in evals if _option(c, "--samples") == "4"} == {sampled_tokens}


def test_with_save_steps_a_killed_run_resumes_from_its_checkpoint(tmp_path):
    """SAVE_STEPS=N: every run checkpoints, and a run killed after a checkpoint (its folder holds
    checkpoint-*, no eval.json) resumes with --resume, its folder kept; a run with no checkpoint
    starts afresh; without SAVE_STEPS the same folder is cleared and trained again."""
    env = _environment(tmp_path, CREDITS="none random", SEEDS="0", SAVE_STEPS="2")
    out = tmp_path / "exp"
    killed = out / "none-s0"
    (killed / "checkpoint-2").mkdir(parents=True)
    (killed / "before-the-kill").write_text("kept")
    (out / "none-s0.log").write_text("first part of the log\n")
    code, output, calls = _run_script(env, tmp_path / "calls.log")
    assert code == 0, output
    trains = {_option(c, "--out"): c for c in _of(calls, "train")}
    assert set(trains) == {str(killed), str(out / "random-s0")}
    assert "--resume" in trains[str(killed)] and "--resume" not in trains[str(out / "random-s0")]
    assert all(_option(c, "--save-steps") == "2" for c in trains.values())
    assert (killed / "before-the-kill").is_file() and (killed / "eval.json").is_file()
    assert (out / "none-s0.log").read_text().startswith("first part of the log\n")  # appended to
    assert f"{killed} (log: {killed}.log, code" in output and "resumed" in output

    (tmp_path / "again").mkdir()
    env = _environment(tmp_path / "again", CREDITS="none", SEEDS="0")
    out = tmp_path / "again" / "exp"
    (out / "none-s0" / "checkpoint-2").mkdir(parents=True)
    (out / "none-s0" / "before-the-kill").write_text("cleared")
    code, output, calls = _run_script(env, tmp_path / "again" / "calls.log")
    assert code == 0, output
    (train,) = _of(calls, "train")
    assert "--resume" not in train and _option(train, "--save-steps") == "0"
    assert not (out / "none-s0" / "before-the-kill").exists()
