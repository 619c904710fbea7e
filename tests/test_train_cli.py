"""`attnrhythm train` end to end on a tiny random Llama: config resolution, metrics.jsonl,
checkpoint rotation, SIGKILL + --resume (bitwise the same as an uninterrupted run), and a
2-process torchrun (gloo) launch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("trl")
from attnrhythm.errors import UserError  # noqa: E402
from attnrhythm.train import run as train_run  # noqa: E402
from attnrhythm.train.config import TrainConfig, load_yaml, to_grpo_config  # noqa: E402

REWARD = '''
def id_reward(prompts, completions, completion_ids, **kwargs):
    return [float(sum(ids) % 5) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model folder, a reward module with spread (a random model never solves Countdown,
    so the task reward alone would make every update zero) and the subprocess environment."""
    try:  # tests/ is on sys.path under pytest's default import mode; a package layout otherwise
        from test_trainer import build_tiny_model
    except ImportError:
        from tests.test_trainer import build_tiny_model

    root = tmp_path_factory.mktemp("train-cli")
    model = build_tiny_model(root / "tiny")
    (root / "mods").mkdir()
    (root / "mods" / "toyreward.py").write_text(REWARD)
    sys.path.insert(0, str(root / "mods"))  # for the in-process runs
    # one CPU thread here and in every subprocess: the resume test compares weights bit for bit
    # across interpreters, so all of them must reduce in the same order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    environ = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(root / "mods"), os.environ.get("PYTHONPATH", "")]))
    yield {"root": root, "model": model, "env": environ}
    sys.path.remove(str(root / "mods"))
    torch.set_num_threads(threads)


def common(env, steps=4):
    return ["--model", env["model"], "--task", "countdown-easy", "--credit", "coupled", "--num-generations", "2",
            "--per-device-batch", "2", "--steps-per-generation", "2", "--max-completion-length", "16",
            "--device", "cpu", "--save-steps", "2", "--save-total-limit", "1", "--max-steps", str(steps),
            "--head-mode", "fixed", "--head-refresh-steps", "3", "--learning-rate", "0.01",
            "--reward-function", "toyreward:id_reward"]


def train_cmd(*args):
    return [sys.executable, "-m", "attnrhythm.cli", "train", *args]


def steps_of(path):
    return [json.loads(line)["step"] for line in Path(path).read_text().splitlines()]


def parse(*argv):
    """The TrainSettings of `attnrhythm train ARGV`."""
    from attnrhythm.cli import build_parser, settings_from_args
    return settings_from_args(train_run.TrainSettings, build_parser(["train"]).parse_args(["train", *argv]))


def train_main(*argv):
    """`attnrhythm train ARGV` in this process; its exit status."""
    from attnrhythm.cli import main
    return main(["train", *argv])


@pytest.fixture(scope="module")
def full_run(env):
    """The uninterrupted reference run, in process (no second interpreter to start)."""
    out = env["root"] / "A"
    assert train_main(*common(env), "--out", str(out)) == 0
    return out


def test_run_writes_config_metrics_checkpoints(full_run):
    out = full_run
    config = TrainConfig.from_dict(load_yaml(out / "config.yaml"))  # the resolved config loads back
    assert config.credit == "coupled" and config.rhythm.head_mode == "fixed" and config.max_steps == 4
    assert config.device == "cpu" and config.bf16 is False and config.train_size == 64  # 'auto's resolved
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first = records[0]
    for key in ("loss", "reward", "rhythm/gamma_mean", "rhythm/share_amplified", "rhythm/set_anchor",
                "rhythm/set_intro", "rhythm/attention_s", "rhythm/attention_share", "step_time"):
        assert key in first, key
    assert first["head_groups"]["mode"] == "fixed" and first["head_groups"]["local"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # rotation (limit 1)
    assert (out / "model.safetensors").exists() and (out / "train_summary.json").exists()
    state = json.loads((out / "checkpoint-4" / "rhythm_state.json").read_text())
    # calibrated at step 0; K=3 means the rollout at step 2 reuses them, so a resume from
    # checkpoint-2 must restore them from rhythm_state.json to match this run bit for bit
    assert state["heads"] is not None and state["heads_step"] == 0


def test_sigkill_then_resume_loses_nothing(full_run, env):
    reference = full_run
    out = env["root"] / "B"
    log = env["root"] / "B.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(train_cmd(*common(env), "--out", str(out)), env=env["env"],
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 200
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model.safetensors").exists(), "killed too late: the run had finished"
    assert "2/4" in log.read_text()  # the progress bar
    assert train_main("--out", str(out), "--resume") == 0
    assert steps_of(out / "metrics.jsonl") == [1, 2, 3, 4]  # no duplicate, no missing step
    from safetensors.torch import load_file
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    losses = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(out) == losses(reference) and any(abs(x) > 1e-4 for x in losses(out))


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_cpu_processes(env):
    out = env["root"] / "D"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "attnrhythm.cli", "train",
           *common(env, steps=2), "--out", str(out)]
    proc = subprocess.run(cmd, env=env["env"], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # messages come from rank 0 only (one line, not one per process)
    assert proc.stderr.count("finished at step 2/2") == 1, proc.stderr[-3000:]
    assert steps_of(out / "metrics.jsonl") == [1, 2]  # written once, by rank 0
    assert (out / "model.safetensors").exists()


# ---------------------------------------------------------------------- config resolution, in process
def test_flags_override_yaml_and_rhythm_fields_route(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text(yaml.safe_dump({"credit": "local", "q": 0.2, "rhythm": {"amp": 2.0, "k": 2},
                                   "max_steps": 9, "out": str(tmp_path / "o"), "trl": {"epsilon_high": 0.28}}))
    config, checkpoint = train_run.resolve(parse("--config", str(yml), "--q", "0.6", "--credit", "global"))
    assert checkpoint is None
    assert config.credit == "global" and config.max_steps == 9  # flag beats YAML; YAML beats default
    assert (config.rhythm.q, config.rhythm.amp, config.rhythm.k) == (0.6, 2.0, 2)
    assert config.out == str(tmp_path / "o") and config.trl == {"epsilon_high": 0.28}


def test_yaml_numbers_written_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads 1e-5 as the string '1e-5'; AdamW would crash on it much later
    yml = tmp_path / "run.yaml"
    yml.write_text("learning_rate: 1e-5\nq: 2e-1\nout: " + str(tmp_path / "o") + "\n")
    config, _ = train_run.resolve(parse("--config", str(yml)))
    assert config.learning_rate == 1e-5 and isinstance(config.learning_rate, float)
    assert config.rhythm.q == 0.2
    with pytest.raises(ValueError, match="must be a number"):
        TrainConfig().update({"learning_rate": "fast"})


def test_config_errors_are_loud(tmp_path):
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig().update({"learning_rte": 1e-5})
    with pytest.raises(ValueError, match="set by TrainConfig"):
        TrainConfig(trl={"learning_rate": 1e-5})
    with pytest.raises(ValueError, match="credit"):
        TrainConfig(credit="anchor")
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="--resume"):
        train_run.resolve(parse("--out", str(tmp_path)))


def test_paper_defaults_reach_grpo_config(tmp_path):
    args = to_grpo_config(TrainConfig(out=str(tmp_path), device="cpu"))
    assert args.loss_type == "grpo" and args.beta == 0.0 and args.temperature == 1.0
    assert args.learning_rate == 1e-6 and args.entropy_coef == 0.0 and args.top_entropy_quantile == 1.0
    assert args.steps_per_generation == 16 and args.gradient_accumulation_steps == 1 and args.num_iterations == 1
    assert args.epsilon == 0.2 and args.scale_rewards == "group" and args.lr_scheduler_type.value == "constant"
    assert args.max_completion_length == 1024 and args.logging_steps == 1 and args.bf16 is False
    assert args.save_strategy.value == "steps"
    assert to_grpo_config(TrainConfig(out=str(tmp_path), device="cpu", save_steps=0)).save_strategy.value == "no"


def test_incomplete_checkpoint_is_set_aside_and_never_chosen(tmp_path):
    from attnrhythm.train.config import last_checkpoint
    from attnrhythm.train.evaluate import resolve_model_dir

    for step, complete in ((2, True), (4, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "config.json").write_text("{}")  # the model is saved before the state
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    # eval picks what a resume picks, and changes nothing
    assert resolve_model_dir(str(tmp_path)) == str(tmp_path / "checkpoint-2") and (tmp_path / "checkpoint-4").is_dir()
    assert last_checkpoint(str(tmp_path), set_aside=True) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-4.incomplete").is_dir()


def test_sft_warmup_calls_warm_start(env, tmp_path, monkeypatch):
    calls = {}

    def fake_warm_start(model, tokenizer, rows, steps, lr, seed, task):
        calls.update(steps=steps, n=len(rows), lr=lr, seed=seed, task=task)
        return {"losses": [1.0], "n_examples": len(rows), "seconds": 0.0}

    import attnrhythm.train.sft as sft
    monkeypatch.setattr(sft, "warm_start", fake_warm_start)
    config = TrainConfig(model=env["model"], task="countdown-easy", out=str(tmp_path), device="cpu", train_size=16,
                         sft_warmup_steps=3, num_generations=2, per_device_batch=2, steps_per_generation=2)
    train_run.build_trainer(config)
    assert calls == {"steps": 3, "n": 16, "lr": 5e-5, "seed": 0, "task": "countdown-easy"}  # the task picks the targets
    assert json.loads((tmp_path / "sft_warmup.json").read_text())["final_loss"] == 1.0
