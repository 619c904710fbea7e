"""`attnrhythm train`: GRPO with rhythm credit on a task, from the command line.

    attnrhythm train --model smollm2-135m --task countdown --credit coupled --max-steps 200 --out runs/coupled
    attnrhythm train --config run.yaml --out runs/x          # YAML for everything else; flags override it
    attnrhythm train --out runs/coupled --resume             # continue a killed run from its last checkpoint

Writes DIR/config.yaml (the full resolved config), DIR/metrics.jsonl (one line per logging
step), DIR/checkpoint-N (rotated, save_total_limit) and finally the trained model in DIR.
Multi-GPU: launch the same command with ``accelerate launch`` or ``torchrun`` (docs/training.md).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from attnrhythm.train.config import CREDITS, TrainConfig, load_yaml, resolve_device, resolved, save_yaml, to_grpo_config

# (flag, TrainConfig field, type, choices, help)
FLAGS = [
    ("--model", "model", str, None, "embedded name (smollm2-135m), local folder or hub id"),
    ("--task", "task", str, None, "countdown, countdown-easy, gsm8k, math-jsonl:PATH, choice-jsonl:PATH"),
    ("--template", "template", str, ("base", "chat"), "prompt template: plain text or chat messages"),
    ("--out", "out", str, None, "run folder"),
    ("--credit", "credit", str, CREDITS, "credit strategy (none = plain GRPO)"),
    ("--selection", "selection", str, ("top", "bottom"), "TopQ or the bottom-q ablation"),
    ("--q", "q", float, None, "share of response tokens selected (paper: 0.4)"),
    ("--amp", "amp", float, None, "gamma_amp of selected tokens (paper: 1.5)"),
    ("--k", "k", int, None, "coupled: neighbourhood searched for an anchor's intro token"),
    ("--alpha", "alpha", float, None, "coupled: share moved from a dominated anchor to its intro token"),
    ("--sign", "sign", str, ("both", "positive", "negative"), "advantage signs gamma applies to"),
    ("--head-mode", "head_mode", str, ("per_sequence", "fixed"), "head sets per sequence or from a calibration batch"),
    ("--head-refresh-steps", "head_refresh_steps", int, None, "fixed head mode: re-calibrate every K steps"),
    ("--num-generations", "num_generations", int, None, "completions per prompt (G)"),
    ("--per-device-batch", "per_device_batch", int, None, "completions per optimizer micro-batch and device"),
    ("--steps-per-generation", "steps_per_generation", int, None, "optimizer steps per rollout batch (paper: 16)"),
    ("--max-completion-length", "max_completion_length", int, None, "tokens per completion"),
    ("--learning-rate", "learning_rate", float, None, "AdamW learning rate (paper: 1e-6)"),
    ("--max-steps", "max_steps", int, None, "optimizer steps"),
    ("--train-size", "train_size", int, None, "training prompts (default: what max-steps consumes)"),
    ("--seed", "seed", int, None, "seed of data, sampling and credit"),
    ("--reward-function", "reward_function", str, None, "module:function, a TRL reward function replacing the task's"),
    ("--device", "device", str, None, "auto, cpu or cuda"),
    ("--use-vllm", "use_vllm", bool, None, "generate with vLLM (TRL's use_vllm; mode etc. via YAML trl:)"),
    ("--sft-warmup-steps", "sft_warmup_steps", int, None, "supervised warm start on solver solutions first"),
    ("--logging-steps", "logging_steps", int, None, "optimizer steps between log lines"),
    ("--save-steps", "save_steps", int, None, "optimizer steps between checkpoints"),
    ("--save-total-limit", "save_total_limit", int, None, "checkpoints kept (older ones are deleted)"),
]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML with any TrainConfig field (flags given here override it)")
    p.add_argument("--resume", action="store_true",
                   help="continue DIR's run from its last complete checkpoint (its config.yaml is the base)")
    for flag, name, kind, choices, help_text in FLAGS:
        if kind is bool:
            p.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=help_text)
        else:  # default None: only flags actually given override the YAML
            p.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def last_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint of DIR.  trainer_state.json is written last, so a folder
    without it was cut by a kill; it is renamed aside (never loaded, never rotated)."""
    if not os.path.isdir(out):
        return None
    found = []
    for name in os.listdir(out):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isdir(os.path.join(out, name)):
            if os.path.exists(os.path.join(out, name, "trainer_state.json")):
                found.append((int(m.group(1)), os.path.join(out, name)))
            elif _is_main():
                os.replace(os.path.join(out, name), os.path.join(out, name + ".incomplete"))
    return max(found)[1] if found else None


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, str | None]:
    """(config, checkpoint to resume from): defaults < DIR/config.yaml (--resume) < --config < flags."""
    flags = {name: getattr(args, name) for _, name, *_ in FLAGS if getattr(args, name, None) is not None}
    from_yaml = load_yaml(args.config) if getattr(args, "config", None) else {}
    out = flags.get("out") or from_yaml.get("out") or TrainConfig().out
    config, checkpoint = TrainConfig(), None
    if getattr(args, "resume", False):
        saved = os.path.join(out, "config.yaml")
        if os.path.exists(saved):
            config = config.update(load_yaml(saved))
        checkpoint = last_checkpoint(out)
    elif last_checkpoint(out) is not None:
        raise SystemExit(f"{out} already holds checkpoints: pass --resume to continue that run, or choose another --out")
    return config.update(from_yaml).update(flags), checkpoint


def task_reward(task):
    """TRL reward function of a task; also logs accuracy (share of full-credit completions)."""
    def task_reward(prompts, completions, log_metric=None, **columns):
        rewards = []
        for i, completion in enumerate(completions):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            row = {k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
            rewards.append(float(task.score(text, row)))
        if log_metric is not None:
            log_metric("accuracy", sum(r >= 1.0 for r in rewards) / max(1, len(rewards)))
        return rewards
    return task_reward


def load_function(spec: str):
    """'package.module:function' -> the function."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"reward_function must look like 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _warm_start(model, tokenizer, rows, config: TrainConfig) -> None:
    try:
        from attnrhythm.train.sft import warm_start
    except ImportError as err:
        raise SystemExit(f"--sft-warmup-steps needs attnrhythm.train.sft.warm_start, which is not available ({err})")
    device = resolve_device(config.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    result = warm_start(model.to(device), tokenizer, rows, steps=config.sft_warmup_steps,
                        lr=config.sft_learning_rate, seed=config.seed)
    if _is_main():
        with open(os.path.join(config.out, "sft_warmup.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k != "losses"} | {"final_loss": result["losses"][-1]}, f)
        print(f"warm start: {config.sft_warmup_steps} steps, final loss {result['losses'][-1]:.4f}", flush=True)


def build_trainer(config: TrainConfig, resuming: bool = False):
    """The RhythmGRPOTrainer of a config, with metrics.jsonl logging and the compact progress bar."""
    from datasets import Dataset
    from transformers import ProgressCallback

    from attnrhythm.models import load_model
    from attnrhythm.tasks import get_task
    from attnrhythm.train.trainer import CompactProgress, CreditConfig, MetricsJsonl, RhythmGRPOTrainer

    task = get_task(config.task, config.template)
    rows = task.load("train", config.train_size, config.seed)
    model, tokenizer = load_model(config.model, dtype=config.model_dtype, device="cpu")
    if config.sft_warmup_steps and not resuming:  # a resumed run's checkpoint already holds the warm start
        _warm_start(model, tokenizer, rows, config)
    credit = CreditConfig(strategy=config.credit, rhythm=config.rhythm, head_refresh_steps=config.head_refresh_steps,
                          capture_batch_size=config.capture_batch_size, capture_with_none=config.capture_with_none)
    reward = task_reward(task) if config.reward_function is None else load_function(config.reward_function)
    trainer = RhythmGRPOTrainer(model=model, reward_funcs=[reward], args=to_grpo_config(config),
                                train_dataset=Dataset.from_list(rows), processing_class=tokenizer, credit=credit)
    trainer.add_callback(MetricsJsonl(os.path.join(config.out, "metrics.jsonl"), trainer.pop_log_extras))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress())
    return trainer


def train(config: TrainConfig, checkpoint: str | None = None):
    from attnrhythm.train.trainer import truncate_metrics

    config = resolved(config, int(os.environ.get("WORLD_SIZE", "1")))
    os.makedirs(config.out, exist_ok=True)
    if _is_main():
        save_yaml(config, os.path.join(config.out, "config.yaml"))
        # a fresh run starts an empty file; a resumed one keeps exactly the steps its checkpoint has
        step = json.load(open(os.path.join(checkpoint, "trainer_state.json")))["global_step"] if checkpoint else 0
        truncate_metrics(os.path.join(config.out, "metrics.jsonl"), step)
        if checkpoint:
            print(f"resuming from {checkpoint} (step {step})", flush=True)
    trainer = build_trainer(config, resuming=checkpoint is not None)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.out)  # the final model next to its config: `attnrhythm eval --model DIR`
    print(f"finished at step {trainer.state.global_step}/{config.max_steps} (rank {os.environ.get('RANK', '0')} "
          f"of {os.environ.get('WORLD_SIZE', '1')}); model and metrics.jsonl in {config.out}", flush=True)
    return trainer


def run(args: argparse.Namespace) -> int:
    config, checkpoint = resolve(args)
    if getattr(args, "resume", False) and checkpoint is None and _is_main():
        print(f"no complete checkpoint in {config.out}: starting from step 0", file=sys.stderr)
    train(config, checkpoint)
    return 0
