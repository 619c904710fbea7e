"""Nothing lost, nothing silent (issue 16): every command, tried with bad input as a new user
would, answers in one line with exit 2 before any model loads, and changes no file it did not
create.  Table-driven: one table per category (output folders and files, numbers and names,
YAML configs, files that cannot be read, empty results), each row a command line.

Every row runs the real command line in this process (``attnrhythm.cli.main``) inside a folder
of prepared inputs (``world``); the whole folder is compared byte for byte before and after.
Loading a model fails the test: a refusal must come first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnrhythm import io
from attnrhythm.cli import COMMANDS, main

PROBLEMS = [{"question": f"Tom has {i} apples and buys 2 more. How many apples does he have?", "answer": str(i + 2)}
            for i in range(10)]
ROLLOUTS = [{"step": s, "credit": "coupled", "tokens": ["a", "b", "c"], "gamma": [1.0, 1.5, 0.5],
             "sets": ["", "anchor", "local"], "advantage": 0.5} for s in (1, 2)]


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in data) if isinstance(data, list) else json.dumps(data))


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A working folder with what a user has lying around: notes, an analysis, a finished train
    run, runs to plot, data files good and bad.  The commands run inside it (default --out too)."""
    files = {
        "notes/notes.txt": "my notes, not to be lost\n",
        "file.txt": "a file, not a folder\n",
        "analysis/metrics.jsonl": [{"id": f"q{i}", "response": "x" * 2000} for i in range(10)],
        "analysis/run.json": {"status": "complete"},
        "analysis/" + io.MARKER: {"commands": ["analyze"]},
        "done/config.yaml": "credit: coupled\nseed: 0\nmax_steps: 4\n",
        "done/metrics.jsonl": [{"step": s, "reward": 0.1 * s, "accuracy": 0.05 * s} for s in range(1, 5)],
        "done/train_summary.json": {"step": 4},
        "done/model.safetensors": b"weights",
        "done/eval.json": {"model": "done", "model_path": "done", "settings": {}, "metrics": {"accuracy": 0.3},
                           "problems": [{"scores": [1.0]}]},
        "done/" + io.MARKER: {"commands": ["train"]},
        "empty/.keep": "",
        "cv/rollouts.jsonl": ROLLOUTS,
        "cv_bad/rollouts.jsonl": [dict(ROLLOUTS[0], gamma=[1.0, 1.5])],
        "problems.jsonl": PROBLEMS,
        "latin.jsonl": json.dumps({"question": "Combien coûte un café?", "answer": "2"}).encode("utf-8")
        .replace("\\u00fb".encode(), b"\xfb").replace("\\u00e9".encode(), b"\xe9") + b"\n",
        "broken.jsonl": json.dumps(PROBLEMS[0]) + "\n" + '{"question": "cut' + "\n" + json.dumps(PROBLEMS[1]) + "\n",
        "cut_model/config.json": {"model_type": "llama"},
        "cut_model/model.safetensors": (1000).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [4], "da',
        "foreign.json": {"mine": True},
        "foreign.png": b"\x89PNG\r\n\x1a\n not a figure of ours",
        "page.html": "<html>my page</html>",
        "folder.png/inside.txt": "a folder named like a figure",
    }
    for name, data in files.items():
        _write(tmp_path / name, data)
    (tmp_path / "empty" / ".keep").unlink()
    for name, config in {"bf16_no": {"bf16": "no"}, "steps_float": {"max_steps": 1.5},
                         "batch_float": {"per_device_batch": 2.5}, "trl_int": {"trl": 5}, "model_null": {"model": None},
                         "steps_list": {"max_steps": [1]}, "q_list": {"q": [0.4]}, "typo": {"learning_rte": 1e-5},
                         "rhythm_int": {"rhythm": 5}}.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "latin.yaml").write_bytes(b"task: caf\xe9\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")
    monkeypatch.setattr("attnrhythm.models.load_model", refuse)
    return tmp_path


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


def refused(argv: list[str], message: str, capsys, root: Path) -> str:
    """Run ``attnrhythm ARGV``: exit 2, one line naming ``message``, nothing changed under root."""
    before = snapshot(root)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses an argument by exiting
        code = exit_.code
    assert code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"attnrhythm {argv[0]}: error: ") and message in lines[0], lines[0]
    assert snapshot(root) == before, "a refused command changed files"
    return lines[0]


# ------------------------------------------------------------------ output folders and files
OUTPUTS = [
    # folder commands: a file, a folder of someone else's files, another command's folder, a path under a file
    (["analyze", "--out", "file.txt"], "file.txt is a file"),
    (["analyze", "--out", "notes"], "notes is not empty (notes.txt) and was not written by `attnrhythm analyze`"),
    (["analyze", "--out", "done"], "done holds the output of `attnrhythm train`"),
    (["analyze", "--out", "file.txt/sub"], "file.txt is a file, so file.txt/sub cannot be a folder"),
    (["perturb", "--out", "notes"], "was not written by `attnrhythm perturb`"),
    (["perturb", "--out", "file.txt"], "file.txt is a file"),
    (["reproduce", "--out", "done"], "done holds the output of `attnrhythm train`"),
    (["reproduce", "--out", "notes"], "was not written by `attnrhythm reproduce`"),
    (["train", "--out", "analysis"], "analysis holds the output of `attnrhythm analyze`"),
    (["train", "--out", "notes"], "was not written by `attnrhythm train`"),
    (["train", "--out", "file.txt"], "file.txt is a file"),
    (["train", "--out", "done", "--seed", "1"], "done already holds a train run"),  # a finished run, no --resume
    (["train", "--out", "done", "--resume"], "done holds a finished run without a checkpoint"),
    (["train", "--out", "analysis", "--dry-run"], "analysis holds the output of `attnrhythm analyze`"),
    (["sft", "--out", "analysis"], "analysis holds the output of `attnrhythm analyze`"),
    (["sft", "--out", "notes"], "was not written by `attnrhythm sft`"),
    (["sft", "--out", "file.txt"], "file.txt is a file"),
    # file commands: a folder, someone else's file, a format the command does not write
    (["eval", "--out", "notes"], "`attnrhythm eval` writes .json files"),
    (["eval", "--out", "file.txt/e.json"], "file.txt is a file"),
    (["eval", "--out", "foreign.json"], "foreign.json exists and was not written by `attnrhythm eval`"),
    (["plot", "done", "--out", "foreign.png"], "foreign.png exists and was not written by `attnrhythm plot`"),
    (["plot", "done", "--out", "x.txt"], "`attnrhythm plot` writes .png or .pdf or .svg files"),
    (["plot", "done", "--out", "folder.png"], "folder.png is a folder"),
    (["credit-view", "cv", "--out", "page.html"], "page.html exists and was not written by `attnrhythm credit-view`"),
    (["credit-view", "cv", "--out", "cv"], "`attnrhythm credit-view` writes .html or .htm files"),
    (["compare", "--start", "done/eval.json", "done", "--out", "file.txt"], "file.txt is a file"),
]


@pytest.mark.parametrize("argv, message", OUTPUTS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_an_output_that_is_not_the_commands_own_is_refused(argv, message, world, capsys):
    refused(argv, message, capsys, world)


def test_a_second_process_on_the_same_folder_is_refused_with_its_pid(world, capsys):
    """Two analyses into one folder at once: the second is refused, naming the first's pid."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from attnrhythm.cli import COMMANDS\n"
                               "with COMMANDS['analyze'].output.claim('busy'):\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              cwd=world, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(["analyze", "--out", "busy", "--data", "problems.jsonl", "--n", "10"],
                       f"busy is being written by attnrhythm analyze (pid {holder.pid})", capsys, world)
        assert "wait for it to end or stop it" in line
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock is free again (the kernel releases it), and the folder is ours to resume
    with COMMANDS["analyze"].output.claim(world / "busy"):
        pass


def test_a_claim_that_wrote_nothing_leaves_nothing(world, capsys):
    """A command refused after its folder was claimed (here: a missing data file) takes back the
    folder it created, and its marker from a folder that was empty."""
    refused(["analyze", "--data", "nosuch.jsonl", "--n", "10", "--out", "fresh/sub"], "does not exist", capsys, world)
    assert not (world / "fresh").exists()
    refused(["eval", "--model", "cut_model", "--task", "countdown-easy", "--n", "1", "--out", "fresh/e.json"],
            "damaged weights file", capsys, world)
    refused(["sft", "--model", "no-such-model", "--out", "empty"], "unknown model", capsys, world)
    assert list((world / "empty").iterdir()) == []


def test_outputs_of_the_same_command_are_replaced_and_the_experiment_script_pattern_holds(world, capsys):
    """A command's own figure, page or folder is its to replace; the script's layout (eval.json
    inside a train or sft folder, compare into the experiment folder, plot over an older
    matplotlib figure) is accepted."""
    for _ in range(2):
        assert main(["plot", "done", "--metric", "reward", "--out", "out/curves.png"]) == 0
        assert main(["credit-view", "cv", "--out", "out/view.html"]) == 0
    capsys.readouterr()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure().savefig(world / "old.png")  # drawn before figures were signed: matplotlib's own tag
    COMMANDS["plot"].output.check(world / "old.png")
    COMMANDS["eval"].output.check(world / "done" / "eval.json")  # replacing its own eval.json
    COMMANDS["compare"].output.check(world)  # a folder with other things in it: compare writes two files
    COMMANDS["train"].output.check(world / "done")  # a train folder (then the run decides: --resume)
    legacy = world / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text("credit: none\n")  # a run from before markers
    COMMANDS["train"].output.check(legacy)


# ------------------------------------------------------------------ numbers, names, devices
VALUES = [
    (["train", "--max-steps", "-5"], "max_steps must be at least 1, got -5"),
    (["train", "--num-generations", "0"], "num_generations must be at least 2, got 0"),
    (["train", "--learning-rate", "-1"], "learning_rate must be greater than 0, got -1.0"),
    (["train", "--per-device-batch", "0"], "per_device_batch must be at least 1"),
    (["train", "--temperature", "0"], "temperature must be greater than 0"),
    (["train", "--device", "tpu"], "device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["train", "--q", "1.5"], "q must be in (0, 1]"),
    (["train", "--dry-run", "--max-steps", "0"], "max_steps must be at least 1"),
    (["train", "--max-steps", "abc"], "argument --max-steps: invalid int value: 'abc'"),
    (["eval", "--max-new-tokens", "0"], "max_new_tokens must be at least 1, got 0"),
    (["eval", "--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["eval", "--samples", "0"], "samples must be at least 1"),
    (["eval", "--temperature", "-1"], "temperature must be at least 0"),
    (["eval", "--samples", "4", "--temperature", "0"], "greedy decoding gives the same completion"),
    (["eval", "--device", "tpu"], "device must be cpu, cuda, cuda:N or mps"),
    (["eval", "--n", "0"], "n must be at least 1"),
    (["analyze", "--temperature", "-1"], "temperature must be at least 0, got -1.0"),
    (["analyze", "--device", "tpu"], "device must be cpu, cuda, cuda:N or mps, got 'tpu'"),
    (["analyze", "--batch-size", "0"], "batch_size must be at least 1"),
    (["analyze", "--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
    (["analyze", "--data", "problems.jsonl", "--n", "10", "--figure-response", "nope"],
     "--figure-response 'nope' is not a problem of this run"),
    (["analyze", "--n", "abc"], "argument --n: invalid int value: 'abc'"),
    (["perturb", "--k", "0"], "k must be at least 1"),
    (["perturb", "--threads", "0"], "threads must be at least 1"),
    (["perturb", "--device", "gpu"], "device must be cpu, cuda, cuda:N or mps"),
    (["reproduce", "--temperature", "-0.5"], "temperature must be at least 0"),
    (["reproduce", "--n", "0"], "--n must be at least 1"),
    (["sft", "--steps", "0"], "steps must be at least 1"),
    (["sft", "--lr", "-1"], "lr must be greater than 0"),
    (["sft", "--task", "gsm8k"], "argument --task: invalid choice: 'gsm8k'"),
    (["plot", "done", "--alpha", "0"], "alpha must be greater than 0"),
    (["plot", "done", "--alpha", "2"], "alpha must be at most 1"),
    (["credit-view", "cv", "cv_bad"], "credit-view takes one run folder, got 2"),
]


@pytest.mark.parametrize("argv, message", VALUES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_impossible_values_are_refused_before_anything_loads(argv, message, world, capsys):
    refused(argv, message, capsys, world)


# ------------------------------------------------------------------ YAML configs (train and its dry run alike)
CONFIGS = [
    ("bf16_no", "bf16 must be true or false (or none), got 'no'"),
    ("steps_float", "max_steps must be a whole number, got 1.5"),
    ("batch_float", "per_device_batch must be a whole number, got 2.5"),
    ("trl_int", "trl must be a mapping, got 5"),
    ("model_null", "model must be a string, got None"),
    ("steps_list", "max_steps must be a whole number, got [1]"),
    ("q_list", "q must be a number, got [0.4]"),
    ("rhythm_int", "rhythm must be a mapping of RhythmConfig fields, got 5"),
    ("typo", "did you mean 'learning_rate'"),
    ("latin", "latin.yaml: not UTF-8 text (byte 9: b'\\xe9'); save it as UTF-8"),
]


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("name, message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_a_bad_yaml_config_is_one_line_in_a_run_and_in_its_dry_run(name, message, dry, world, capsys):
    refused(["train", "--config", f"{name}.yaml", "--out", "run"] + ["--dry-run"] * dry, message, capsys, world)


# ------------------------------------------------------------------ files that cannot be read
FILES = [
    (["analyze", "--data", "latin.jsonl", "--n", "10"], "latin.jsonl: not UTF-8 text (byte 24: b'\\xfb')"),
    (["perturb", "--data", "latin.jsonl", "--n", "10"], "latin.jsonl: not UTF-8 text"),
    (["reproduce", "--data", "latin.jsonl", "--n", "10"], "latin.jsonl: not UTF-8 text"),
    (["eval", "--task", "math-jsonl:latin.jsonl", "--n", "1"], "latin.jsonl: not UTF-8 text"),
    (["train", "--task", "math-jsonl:latin.jsonl", "--train-size", "1"], "latin.jsonl: not UTF-8 text"),
    (["train", "--dry-run", "--task", "math-jsonl:latin.jsonl", "--train-size", "1"], "latin.jsonl: not UTF-8 text"),
    (["analyze", "--data", "broken.jsonl", "--n", "10"], "broken.jsonl:2: not valid JSON"),
    (["train", "--dry-run", "--task", "math-jsonl:broken.jsonl", "--train-size", "2"], "broken.jsonl:2: not valid JSON"),
    (["eval", "--model", "cut_model", "--task", "countdown-easy", "--n", "1"], "cut_model/model.safetensors: damaged"),
    (["train", "--model", "cut_model"], "cut_model/model.safetensors: damaged weights file"),
    (["plot", "done", "--out", "notes/notes.txt/x.png"], "notes/notes.txt is a file"),
    (["compare", "--start", "foreign.json", "done", "--out", "cmp"], "foreign.json is not an `attnrhythm eval` result"),
]


@pytest.mark.parametrize("argv, message", FILES, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_a_file_that_cannot_be_used_is_named_in_one_line(argv, message, world, capsys):
    refused(argv, message, capsys, world)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(world, capsys):
    (world / "ro").mkdir()
    (world / "ro").chmod(0o555)
    try:
        refused(["plot", "done", "--out", "ro/x.png"], "ro/.x.png.lock: permission denied", capsys, world)
    finally:
        (world / "ro").chmod(0o755)


# ------------------------------------------------------------------ empty results are errors
EMPTY = [
    (["plot", "empty"], "empty has no metrics.jsonl or eval*.json to draw"),
    (["plot", "done", "--metric", "rewrd"], "no run has 'rewrd'; the runs have: accuracy, reward"),
    (["plot", "--rhythm", "done"], "none of done logged rhythm drift"),
    (["plot", "no_such_folder"], "not a folder: no_such_folder"),
    (["credit-view", "cv", "--steps", "999"], "has no rollouts at step 999; logged steps: 1, 2"),
    (["credit-view", "empty"], "empty has no rollouts.jsonl"),
    (["credit-view", "cv_bad"], "cv_bad/rollouts.jsonl:1: not a rollout of `attnrhythm train` (gamma"),
]


@pytest.mark.parametrize("argv, message", EMPTY, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_nothing_to_show_is_an_error_not_an_empty_page(argv, message, world, capsys):
    refused(argv, message, capsys, world)


# ------------------------------------------------------------------ sft: nothing deleted that it did not create
def test_sft_writes_its_own_folder_and_replaces_only_its_own_staging(tmp_path, monkeypatch, capsys):
    """The warm start used to delete --out whatever it held.  Now: a folder of its own (the marker
    names sft) is refreshed, a staging folder a killed sft left is replaced, anything else refused."""
    from conftest import byte_tokenizer, tiny_llama

    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained("tiny")
    byte_tokenizer().save_pretrained("tiny")
    argv = ["sft", "--model", "tiny", "--task", "countdown-easy", "--n", "8", "--steps", "1", "--batch-size", "2",
            "--out", "warm"]
    assert main(argv) == 0
    assert {"config.json", "model.safetensors", "warm_start.json", io.MARKER} <= set(os.listdir("warm"))
    assert io.written_by("warm") == ["sft"] and not Path("warm/.partial").exists()
    first = Path("warm/warm_start.json").read_bytes()
    _write(tmp_path / "warm" / ".partial" / io.MARKER, {"commands": ["sft"]})  # left by a killed sft
    assert main(argv[:-1] + ["warm"]) == 0 and not Path("warm/.partial").exists()
    assert Path("warm/warm_start.json").read_bytes() != first  # seconds differ: written again
    _write(tmp_path / "warm" / ".partial" / "mine.txt", "not sft's")  # a staging folder it did not make
    capsys.readouterr()
    monkeypatch.setattr("attnrhythm.models.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    refused(argv, "warm/.partial was not made by `attnrhythm sft`", capsys, tmp_path)
