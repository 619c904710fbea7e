"""`attnrhythm train --dry-run` (attnrhythm.train.dry_run): config resolution, rollout arithmetic,
one-line checks, model shape from config.json, the paper configs, nothing written.

Every config is built here; model shapes come from config.json files written into tmp folders
(nothing about Qwen3 is in dry_run.py).  No weights, no network (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from attnrhythm.errors import UserError
from attnrhythm.train.dry_run import dry_run

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "examples" / "paper").glob("*.yaml"))
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
ZERO3 = ROOT / "examples" / "accelerate" / "zero3.yaml"

# shapes as published in the models' config.json files (written to tmp folders by the tests)
QWEN3_4B = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, hidden_size=2560, intermediate_size=9728, vocab_size=151936,
                tie_word_embeddings=True, max_position_embeddings=32768, attention_bias=False)
QWEN3_8B = dict(QWEN3_4B, num_hidden_layers=36, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)

PAPER = dict(preset="paper", model="Qwen/Qwen3-4B-Base", task="countdown", credit="coupled", num_generations=8,
             per_device_batch=4, steps_per_generation=16, max_steps=8000, max_completion_length=1024,
             learning_rate=1e-6, temperature=1.0, train_size=20000, device="cuda", use_vllm=True,
             trl={"vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def report(config, **kwargs) -> str:
    return dry_run(config, **kwargs).text


def model_dir(tmp_path, shape, name="model"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(shape))
    return str(folder)


def dense_params(c):
    """Independent count: embeddings (+ head), q/k/v/o, gated MLP, 2 norms per layer, final norm
    (Qwen3's per-head q/k norms, 2 x head_dim weights per layer, are left out by design)."""
    h, hd = c["hidden_size"], c["head_dim"]
    attn = h * c["num_attention_heads"] * hd * 2 + h * c["num_key_value_heads"] * hd * 2
    layer = attn + 3 * h * c["intermediate_size"] + 2 * h
    return c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + c["num_hidden_layers"] * layer + h


def test_paper_arithmetic_on_eight_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    result = dry_run(PAPER)
    v = result.values
    assert result.ok, result.text
    assert (v["world_size"], v["micro_batch"], v["completions_per_rollout"], v["prompts_per_rollout"]) == (8, 32, 512, 64)
    assert (v["optimizer_steps_per_rollout"], v["rollout_batches"]) == (16, 500)
    assert (v["total_completions"], v["prompts_needed"], v["train_size"]) == (256_000, 32_000, 20_000)
    assert v["preset"] == "paper"
    text = result.text
    assert "preset       paper" in text and "world size 8 (env WORLD_SIZE)" in text
    assert "4 per device x 8 = 32 completions per optimizer step" in text
    assert "512 / 8 generations = 64 prompts per rollout batch" in text
    assert "max_steps 8000 / 16 = 500" in text and "256,000" in text and "1.60 epochs" in text
    assert "shape              unknown here" in text  # a hub id that is not cached here (offline)
    assert [w for w in result.warnings if not w.startswith("model: ")] == []


def test_world_size_from_accelerate_config_and_precedence(tmp_path, monkeypatch):
    acc = tmp_path / "acc.yaml"
    acc.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "num_processes": 2}))
    assert dry_run(PAPER, accelerate_config=str(acc)).values["completions_per_rollout"] == 128
    monkeypatch.setenv("WORLD_SIZE", "4")  # a launched process knows better than the yaml
    assert dry_run(PAPER, accelerate_config=str(acc)).values["world_size"] == 4
    assert dry_run(PAPER, world_size=1).values["world_size"] == 1
    monkeypatch.delenv("WORLD_SIZE")
    assert "assumed: 1 process; set WORLD_SIZE or pass --accelerate-config" in report(PAPER)


def test_not_divisible_is_one_error_line():
    result = dry_run(dict(PAPER, per_device_batch=3, steps_per_generation=3, max_steps=9), world_size=1)
    assert not result.ok
    errors = [e for e in result.errors if "divisible" in e]
    assert errors == ["rollout batch of 9 completions (3 x 1 x 3) is not divisible by num_generations 8"]
    assert "\n" not in errors[0] and "error: rollout batch of 9" in result.text


def test_max_steps_not_a_multiple_is_a_warning():
    result = dry_run(dict(PAPER, max_steps=8010), world_size=8)
    assert result.ok, result.text
    (warning,) = [w for w in result.warnings if not w.startswith("model: ")]
    assert "not a multiple of 16" in warning
    assert "max_steps 8010 / 16 = 500.62 (generates 501)" in result.text
    assert result.values["total_completions"] == 501 * 512


def test_model_shape_from_config_json(tmp_path):
    for shape, name in ((QWEN3_4B, "q4"), (QWEN3_8B, "q8")):
        folder = model_dir(tmp_path, shape, name)
        result = dry_run(dict(PAPER, model=folder), world_size=8)
        assert result.ok, result.text
        s = result.values["shape"]
        assert (s["layers"], s["heads"], s["kv_heads"], s["head_dim"]) == (36, 32, 8, 128)
        assert s["sampled_layers"] == [12, 15, 18, 21, 24]  # 5 evenly spaced, floor(36/3)..floor(72/3)
        assert s["params"] == dense_params(shape)
        assert f"layers             36, heads 32, kv heads 8, head dim 128" in result.text
        assert "sampled layers     [12, 15, 18, 21, 24]" in result.text
    # 4.02B and 8.19B: the published sizes (4.0B / 8.2B)
    assert round(dense_params(QWEN3_4B) / 1e9, 2) == 4.02 and round(dense_params(QWEN3_8B) / 1e9, 2) == 8.19
    assert "~4.02B" in report(dict(PAPER, model=str(tmp_path / "q4")), world_size=8)


def test_sampled_layers_follow_the_layer_count(tmp_path):
    folder = model_dir(tmp_path, dict(QWEN3_4B, num_hidden_layers=30))  # floor(30/3)=10 .. floor(60/3)=20
    assert dry_run(dict(PAPER, model=folder), world_size=8).values["shape"]["sampled_layers"] == [10, 12, 15, 18, 20]
    folder = model_dir(tmp_path, dict(QWEN3_4B, num_hidden_layers=4), "tiny")  # 1..2: fewer than 5 layers
    assert dry_run(dict(PAPER, model=folder), world_size=8).values["shape"]["sampled_layers"] == [1, 2]


def test_completion_longer_than_context_is_one_error_line(tmp_path):
    folder = model_dir(tmp_path, dict(QWEN3_4B, max_position_embeddings=1024))
    result = dry_run(dict(PAPER, model=folder), world_size=8)
    assert not result.ok
    (err,) = result.errors
    assert err.startswith("max_completion_length 1024 + a typical prompt of ") and "exceeds the model's context of 1024" in err
    assert result.values["prompt_tokens"] > 50  # a real Countdown prompt, estimated from its characters


def test_vllm_max_model_length_too_short(tmp_path):
    result = dry_run(dict(PAPER, trl={"vllm_mode": "colocate", "vllm_max_model_length": 1024}), world_size=8)
    assert any(e.startswith("trl.vllm_max_model_length 1024 < prompt + completion") for e in result.errors)


def test_typos_and_bad_names_are_clear(tmp_path):
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        dry_run(dict(PAPER, learning_rte=1e-6))
    with pytest.raises(UserError, match="did you mean 'paper'"):
        dry_run(dict(PAPER, preset="papr"))
    result = dry_run(dict(PAPER, trl={"vllm_mdoe": "colocate"}), world_size=8)
    assert result.errors == ["trl: 'vllm_mdoe' is not a GRPOConfig field (did you mean 'vllm_mode'?)"]
    result = dry_run(dict(PAPER, task="countdwn"), world_size=8)
    assert len(result.errors) == 1 and result.errors[0].startswith("task: unknown task 'countdwn'")
    yml = tmp_path / "bad.yaml"
    yml.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        dry_run(str(yml))
    with pytest.raises(UserError, match="does not exist"):
        dry_run(str(tmp_path / "missing.yaml"))


def test_task_rows_are_loaded_as_the_run_loads_them(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(10)))
    result = dry_run(dict(PAPER, task=f"math-jsonl:{data}", train_size=64), world_size=8)
    assert result.errors == ["task: asked for 64 rows but only 10 are available"]
    ok = dry_run(dict(PAPER, task=f"math-jsonl:{data}", train_size=10), world_size=8)
    assert ok.ok and "training rows      10 loaded" in ok.text
    # a file that is not here is the run machine's business (a warning), unless the run starts here
    missing = dict(PAPER, task="math-jsonl:no/such.jsonl")
    assert "task: no/such.jsonl does not exist" in dry_run(missing, world_size=8).warnings
    assert dry_run(missing, world_size=8, here=True).errors[0] == "task: no/such.jsonl does not exist"
    # what is here is checked as the run checks it: a broken line, a file that is not UTF-8
    broken = tmp_path / "broken.jsonl"
    broken.write_text(data.read_text() + '{"question": "cut\n')
    assert dry_run(dict(PAPER, task=f"math-jsonl:{broken}", train_size=5), world_size=8).errors == [
        f"task: {broken}:11: not valid JSON (Invalid control character at)"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"question": "caf\u00e9?", "answer": "1"}).encode().replace(b"\\u00e9", b"\xe9") + b"\n")
    (err,) = dry_run(dict(PAPER, task=f"math-jsonl:{latin}", train_size=1), world_size=8).errors
    assert err.startswith(f"task: {latin}: not UTF-8 text (byte ") and "save it as UTF-8" in err


def test_yaml_path(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text(yaml.safe_dump(PAPER))
    assert dry_run(str(yml), world_size=8).values["rollout_batches"] == 500


def test_accelerate_bf16_against_run_precision(tmp_path):
    acc = tmp_path / "zero3.yaml"
    acc.write_text(yaml.safe_dump({"distributed_type": "DEEPSPEED", "mixed_precision": "bf16", "num_processes": 2}))
    cpu = dict(PAPER, device="cpu", bf16=None, use_vllm=False, trl={})
    result = dry_run(cpu, accelerate_config=str(acc), env={})
    assert any("sets mixed_precision bf16 but the run resolves bf16 to False" in e for e in result.errors), result.text
    assert any("DS_ACCELERATOR=cpu" in w for w in result.warnings)
    fixed = dry_run(dict(cpu, bf16=True), accelerate_config=str(acc), env={"DS_ACCELERATOR": "cpu"})
    assert fixed.ok and not [w for w in fixed.warnings if not w.startswith("model: ")], fixed.text
    assert dry_run(PAPER, accelerate_config=str(acc), env={}).ok  # cuda + bf16 true: they agree


# ---------------------------------------------------------------------- the command line
def train_main(*argv):
    """`attnrhythm train ARGV` in this process; its exit status."""
    from attnrhythm.cli import main
    return main(["train", *argv])


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_pass_the_dry_run(path, tmp_path, monkeypatch, capsys):
    assert len(PAPER_CONFIGS) == 4
    monkeypatch.chdir(tmp_path)  # the configs' out: runs/paper/... would be created here
    assert train_main("--config", str(path), "--dry-run", "--accelerate-config", str(ZERO3)) == 0
    out = capsys.readouterr().out
    rollouts = 500 if "-4b-" in path.name else 600
    assert "preset       paper" in out and "world size 8 (num_processes of " in out
    assert "4 per device x 8 = 32 completions per optimizer step" in out
    assert "32 x 16 steps_per_generation = 512 completions" in out
    assert "512 / 8 generations = 64 prompts per rollout batch" in out
    assert "optimizer steps    16 per rollout batch" in out
    assert f"max_steps {rollouts * 16} / 16 = {rollouts}\n" in out
    assert f"{rollouts} x 512 = {rollouts * 512:,}" in out
    assert "error:" not in out
    assert list(tmp_path.iterdir()) == []  # nothing written: no run folder, no config.yaml
    monkeypatch.setenv("WORLD_SIZE", "8")  # as under torchrun: the same arithmetic without the yaml
    assert train_main("--config", str(path), "--dry-run") == 0
    assert "32 x 16 steps_per_generation = 512 completions" in capsys.readouterr().out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_pass_the_dry_run_on_the_cpu_preset(path, tmp_path, monkeypatch, capsys):
    """Every examples/recipes file loads on top of `--preset cpu` as its comment says."""
    assert {p.stem for p in RECIPES} >= {"pairs-r1", "worked-r1", "pairs-worked-r1"}
    monkeypatch.chdir(tmp_path)
    assert train_main("--config", str(path), "--preset", "cpu", "--dry-run") == 0
    out = capsys.readouterr().out
    recipe = yaml.safe_load(path.read_text())
    assert f"task         {recipe['task']} (template base)" in out and "preset       cpu" in out
    assert f"max_completion_length {recipe['max_completion_length']}" in out and "error:" not in out
    assert list(tmp_path.iterdir()) == []


def test_dry_run_checks_the_model_shape_and_writes_nothing(tmp_path, monkeypatch, capsys):
    folder = model_dir(tmp_path, QWEN3_8B, "q8")
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)  # incomplete: a real run would rename it aside
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train_main("--config", str(PAPER_CONFIGS[0]), "--model", folder, "--out", str(out), "--resume",
                      "--dry-run") == 0
    text = capsys.readouterr().out
    assert "layers             36, heads 32, kv heads 8, head dim 128, hidden 4096, context 32768" in text
    assert "sampled layers     [12, 15, 18, 21, 24]" in text and "~8.19B" in text
    assert "--resume: no complete checkpoint, starts at step 0" in text
    assert sorted(os.listdir(out)) == ["checkpoint-4"]  # not renamed, no config.yaml


def test_bad_input_is_one_line_each(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    paper = str(PAPER_CONFIGS[0])
    # a rollout batch that is not a whole number of groups
    assert train_main("--config", paper, "--dry-run", "--per-device-batch", "3", "--steps-per-generation", "3") == 2
    assert error_lines(capsys) == ["attnrhythm train: error: dry run: rollout batch of 9 completions (3 x 1 x 3) "
                                   "is not divisible by num_generations 8"]
    # completion longer than the model's context
    short = model_dir(tmp_path, dict(QWEN3_4B, max_position_embeddings=1024), "short")
    assert train_main("--config", paper, "--dry-run", "--model", short) == 2
    (line,) = error_lines(capsys)
    assert "max_completion_length 1024 + a typical prompt of" in line and "exceeds the model's context of 1024" in line
    # a typo in a config key: the closest field named
    typo = tmp_path / "typo.yaml"
    typo.write_text("preset: paper\nlearning_rte: 1.0e-6\n")
    assert train_main("--config", str(typo), "--dry-run") == 2
    (line,) = error_lines(capsys)
    assert "unknown config fields: 'learning_rte' (did you mean 'learning_rate'?)" in line
    # a missing config file
    assert train_main("--config", str(tmp_path / "nope.yaml"), "--dry-run") == 2
    assert error_lines(capsys) == [f"attnrhythm train: error: config file {tmp_path / 'nope.yaml'} does not exist"]
    # the accelerate config forces bf16 while the run resolves it to False (the CPU trap)
    assert train_main("--dry-run", "--preset", "cpu", "--accelerate-config", str(ZERO3)) == 2
    (line,) = error_lines(capsys)
    assert "sets mixed_precision bf16 but the run resolves bf16 to False" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short", "typo.yaml"]  # only what the test wrote


def test_a_missing_checkpoint_is_one_line(tmp_path):
    from attnrhythm.errors import MissingInput
    from attnrhythm.train.config import TrainConfig
    from attnrhythm.train.run import train

    config = TrainConfig(preset="cpu", out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(MissingInput, match="checkpoint .*checkpoint-8 does not exist or is incomplete"):
        train(config, str(tmp_path / "run" / "checkpoint-8"))
    assert not (tmp_path / "run").exists()
