"""Everything a `train` run needs, as one dataclass that round-trips through YAML.

Resolution order (later wins): dataclass defaults (the paper's settings) < the preset (``cpu``,
``gpu`` or ``paper``; by default ``gpu`` with a CUDA device, else ``cpu``) < ``DIR/config.yaml``
of a resumed run < ``--config run.yaml`` < command-line flags.  The resolved config is written to
``DIR/config.yaml`` and can be passed back with ``--config``.

Defaults follow the paper (docs/method.md sections 4 and 6) and are set explicitly even where they
equal TRL 1.16's own, so that a TRL upgrade that moves a default does not move our runs.  Where
TRL's default differs, ``to_grpo_config`` says so next to the value (see docs/training.md).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields

from attnrhythm import io, log
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.credit import CREDIT_NAMES, get_credit
from attnrhythm.errors import MissingInput, UserError, check_device_name, check_fields, closest
from attnrhythm.io import option
from attnrhythm.tasks import task_help

_RHYTHM_FIELDS = {f.name for f in fields(RhythmConfig)}
RHYTHM_FLAGS = ("selection", "q", "amp", "k", "alpha", "sign", "head_mode")
"""The RhythmConfig fields `train` takes as flags (any of them can be set in the YAML)."""


# Sizes of a run.  'paper' is the dataclass defaults (the paper's settings); 'cpu' fits a 2-core
# machine and trains the task a SmolLM2-135M warm start measurably learns there (countdown-pairs,
# docs/training/results.md); 'gpu' fits one GPU.  A preset sits between the defaults and everything else:
# a --config file and flags override it.
PRESETS: dict[str, dict] = {
    "paper": {},
    "cpu": dict(task="countdown-pairs", num_generations=8, per_device_batch=8, steps_per_generation=4,
                max_completion_length=128, learning_rate=1e-5, temperature=1.0, max_steps=32,
                gradient_checkpointing=False, save_steps=16, save_total_limit=1, device="cpu"),
    "gpu": dict(task="countdown-easy", num_generations=8, per_device_batch=32, steps_per_generation=8,
                max_completion_length=256, learning_rate=1e-5, temperature=1.0, max_steps=160,
                gradient_checkpointing=False, save_steps=40, save_total_limit=1, bf16=True),
}


def default_preset() -> str:
    import torch
    return "gpu" if torch.cuda.is_available() else "cpu"


def _device(name: str, value) -> None:
    check_device_name(name, value, auto=True)


@dataclass
class TrainConfig:
    """Every field's docstring is its `train --help` text; ``__post_init__`` checks them all
    (types, bounds, names), so a flag, a YAML file and a Python caller meet the same checks."""

    preset: str | None = option(None, choices=tuple(PRESETS))
    """Run sizes: cpu, gpu (one GPU) or paper (PRESETS; none: gpu with CUDA, else cpu)."""

    # what to train on
    model: str = "smollm2-135m"
    """Embedded name (smollm2-135m), local model folder or hub id."""
    task: str = option("countdown", f"A task of the registry attnrhythm.tasks.TASKS: {task_help()}.")
    template: str = option("base", choices=("base", "chat"))
    """Prompt template of the task: 'base' (plain text) or 'chat' (messages for an instruct model)."""
    train_size: int | None = option(None, at_least=1)
    """Training prompts; none = as many as max_steps consumes, at most 20,000 (the paper's Countdown set)."""
    out: str = "runs/train"
    """Run folder (config.yaml, metrics.jsonl, checkpoints, the trained model)."""
    reward_function: str | None = None
    """'module:function', a TRL reward function used instead of the task's scorer (shaping experiments, tests)."""

    # credit (docs/method.md section 4)
    credit: str = option("coupled", choices=CREDIT_NAMES)
    """Credit strategy (none = plain GRPO)."""
    rhythm: RhythmConfig = field(default_factory=RhythmConfig, metadata=dict(flags=RHYTHM_FLAGS))
    """q, amp, k, alpha, sign, selection, head_mode, layers, window, fai_horizon, ..."""
    head_refresh_steps: int = option(50, at_least=1)
    """head_mode='fixed': re-classify the heads on the current rollout batch every K optimizer steps."""
    capture_batch_size: int | None = option(None, at_least=1)
    """Sequences per attention pass chunk; none = per_device_batch (as TRL's own log-prob pass)."""
    capture_with_none: bool = False
    """Run the attention pass also for credit 'none' (to log head groups and its cost; gamma stays 1)."""
    zero_equal_groups: bool = True
    """Advantage exactly 0 for groups whose rewards are all equal (TRL's float32 mean leaves ~1e-4
    residues that Adam turns into full steps); off = stock TRL arithmetic."""
    kl_to_start: bool = False
    """Log the KL of the policy to the starting model per rollout batch (one more model in memory)."""
    rollout_samples: int = option(2, at_least=0)
    """Completions per rollout batch written to DIR/rollouts.jsonl for `attnrhythm credit-view`."""
    one_pass: bool = True
    """Take the attention statistics inside TRL's own log-prob pass when TRL runs one (no extra
    forward); off, or when TRL skips that pass: a separate attention pass."""

    # GRPO and optimisation: the paper's settings (docs/method.md section 6)
    num_generations: int = option(8, at_least=2)
    """Completions per prompt (G; GRPO compares the completions of a group)."""
    per_device_batch: int = option(8, at_least=1)
    """Completions per optimizer micro-batch and device."""
    steps_per_generation: int = option(16, at_least=1)
    """Optimizer steps per rollout batch (paper: 512 responses / micro-batch 32 = 16)."""
    num_iterations: int = option(1, at_least=1)
    """Optimizer passes over each rollout batch (TRL's num_iterations)."""
    max_completion_length: int = option(1024, at_least=1)
    """Tokens per completion at most."""
    learning_rate: float = option(1e-6, above=0)
    """AdamW learning rate (paper: 1e-6)."""
    lr_scheduler_type: str = "constant"
    """Learning-rate schedule (transformers' names)."""
    warmup_steps: int = option(0, at_least=0)
    """Optimizer steps of linear learning-rate warm-up."""
    loss_type: str = "grpo"
    """TRL's loss_type (grpo: 1/|o| per response, as the paper)."""
    beta: float = option(0.0, at_least=0)
    """KL coefficient (paper: 0)."""
    epsilon: float = option(0.2, at_least=0)
    """PPO clipping range."""
    temperature: float = option(1.0, above=0)
    """Sampling temperature of the rollouts (paper: 1.0)."""
    scale_rewards: str = "group"
    """TRL's scale_rewards: group, batch or none."""
    max_grad_norm: float = option(1.0, above=0)
    """Gradient clipping norm."""
    max_steps: int = option(8000, at_least=1)
    """Optimizer steps (TRL's unit): 500 rollout batches x 16, the paper's 4B run."""
    seed: int = option(0, at_least=0)
    """Seed of data, sampling and credit."""

    # machine
    device: str = option("auto", check=_device)
    """auto (cuda when available), cpu or cuda."""
    model_dtype: str = option("float32", choices=("float32", "bfloat16", "float16"))
    """Dtype of the trained weights; mixed precision is `bf16`."""
    bf16: bool | None = None
    """bf16 autocast; none = on when the device is a CUDA GPU with bf16 support."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (less memory, slower)."""
    use_vllm: bool = False
    """Generate with vLLM (TRL's use_vllm; mode etc. via YAML trl:)."""

    # warm start, logging, checkpoints
    sft_warmup_steps: int = option(0, at_least=0)
    """Steps of supervised warm start on solver solutions first (Countdown tasks)."""
    sft_learning_rate: float = option(5e-5, above=0)
    """Learning rate of that warm start."""
    logging_steps: int = option(1, at_least=1)
    """Optimizer steps between log lines."""
    save_steps: int = option(100, at_least=0)
    """Optimizer steps between checkpoints (transformers also saves at max_steps); 0 = no checkpoints."""
    save_total_limit: int | None = option(2, at_least=1)
    """Checkpoints kept (older ones are deleted); none = all."""
    trl: dict = option({}, cli=False)
    """Any other GRPOConfig field, passed through verbatim (e.g. vllm_mode, epsilon_high, report_to)."""

    def __post_init__(self) -> None:
        if isinstance(self.rhythm, dict):
            check_fields(RhythmConfig, self.rhythm)  # a YAML list where a number goes: one line, not a TypeError
            self.rhythm = RhythmConfig.from_dict(self.rhythm)
        if isinstance(self.preset, str) and self.preset not in PRESETS:
            hint = closest(self.preset, list(PRESETS))
            raise UserError(f"preset must be one of {', '.join(PRESETS)}; got {self.preset!r}"
                            + (f" (did you mean {hint!r}?)" if hint else ""))
        if isinstance(self.credit, str):
            get_credit(self.credit)  # an unknown name is a UserError naming the closest one
        check_fields(self)
        clash = set(self.trl) & ({f.name for f in fields(self)} | set(_MANAGED))
        if clash:
            raise UserError(f"trl: {sorted(clash)} are set by TrainConfig fields; set them there instead")

    # ------------------------------------------------------------------ dict / YAML
    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rhythm"] = self.rhythm.to_dict()
        d["trl"] = dict(self.trl)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls().update(d)

    @classmethod
    def from_layers(cls, *layers: dict) -> "TrainConfig":
        """defaults < the preset (named by the last layer that names one, else the machine's) <
        ``layers`` in order."""
        preset = next((layer["preset"] for layer in reversed(layers) if layer.get("preset")), None) or default_preset()
        config = cls(preset=preset)  # validates the name before it indexes PRESETS
        config = config.update(PRESETS[preset])
        for layer in layers:
            config = config.update(layer)
        return config

    def update(self, changes: dict) -> "TrainConfig":
        """A new config with ``changes``; RhythmConfig fields may be given at the top level
        (``q: 0.2``) or under ``rhythm:``.  Unknown names are an error (typos must not be ignored)."""
        mine = {f.name for f in fields(self)}
        unknown = set(changes) - mine - _RHYTHM_FIELDS
        if unknown:
            known = sorted(mine | _RHYTHM_FIELDS)
            hints = [f"{name!r} (did you mean {closest(name, known)!r}?)" if closest(name, known) else repr(name)
                     for name in sorted(unknown)]
            raise UserError(f"unknown config fields: {', '.join(hints)}; known: {', '.join(known)}")
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        rhythm = self.rhythm.to_dict()
        nested = changes.get("rhythm") or {}
        if not isinstance(nested, dict):
            raise UserError(f"rhythm must be a mapping of RhythmConfig fields, got {nested!r}")
        for key, value in {**nested, **{k: v for k, v in changes.items() if k in _RHYTHM_FIELDS}}.items():
            rhythm[key] = _coerce(key, rhythm.get(key), value)
        d.update({k: _coerce(k, d[k], v) for k, v in changes.items() if k in mine and k != "rhythm"})
        check_fields(RhythmConfig, rhythm)
        d["rhythm"] = RhythmConfig.from_dict(rhythm)
        return TrainConfig(**d)


def _coerce(name: str, current, value):
    """YAML reads ``1e-5`` (no dot) as a string: turn strings into the field's number type."""
    if isinstance(value, str) and isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            return type(current)(float(value)) if isinstance(current, float) else int(value)
        except ValueError:
            raise UserError(f"config field {name!r} must be a number, got {value!r}") from None
    return value


def load_function(spec: str):
    """'package.module:function' -> the function."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"reward_function must look like 'module:function', got {spec!r}")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except ModuleNotFoundError as err:
        if err.name != module.split(".")[0] and err.name != module:
            raise  # the module exists but its own import is broken: a bug to see in full
        raise UserError(f"reward_function {spec!r}: no module {module!r} on the Python path") from None
    if found is None:
        raise UserError(f"reward_function {spec!r}: {module} has no {name!r}")
    return found


def load_yaml(path) -> dict:
    """The mapping of a YAML config file; a missing, unreadable or bad file is a UserError."""
    import yaml

    if not os.path.exists(path):
        raise MissingInput(f"config file {path} does not exist")
    if os.path.isdir(path):
        raise UserError(f"config file {path} is a folder; name a YAML file")
    try:
        data = yaml.safe_load(io.read_text(path)) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]} "
                        f"({' '.join(str(err).split()[1:])[:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config fields, got {type(data).__name__}")
    return data


def save_yaml(config: TrainConfig, path) -> None:
    """Write atomically: a killed run never leaves half a config behind."""
    io.write_yaml(path, config.to_dict(), header="# attnrhythm train: the full resolved config (pass back with --config)\n")


# GRPOConfig fields that TrainConfig sets itself (so `trl:` must not)
_MANAGED = ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "use_cpu",
            "top_entropy_quantile", "entropy_coef", "logging_strategy", "save_strategy")


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def to_grpo_config(config: TrainConfig, **extra):
    """The TRL GRPOConfig of a run.  Comments mark where TRL 1.16's default differs."""
    from trl import GRPOConfig

    config = resolved(config)
    device = config.device
    kwargs = dict(
        output_dir=config.out,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch,
        gradient_accumulation_steps=1,  # one micro-batch per optimizer step, as the paper
        steps_per_generation=config.steps_per_generation,  # TRL: = gradient_accumulation_steps (1)
        num_iterations=config.num_iterations,
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,  # TRL: 512
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,  # TRL/transformers: linear decay to 0
        warmup_steps=config.warmup_steps,
        loss_type=config.loss_type,  # TRL: "dapo" (token-level normalisation); paper: 1/|o| per response
        beta=config.beta,
        epsilon=config.epsilon,
        temperature=config.temperature,
        scale_rewards=config.scale_rewards,
        max_grad_norm=config.max_grad_norm,
        top_entropy_quantile=1.0,  # the Wang et al. baseline is our credit 'high-entropy-selection'
        entropy_coef=0.0,  # no entropy term
        seed=config.seed,
        use_cpu=device == "cpu",
        bf16=config.bf16,  # TRL: True whenever fp16 is off, also on CPU
        gradient_checkpointing=config.gradient_checkpointing,
        use_vllm=config.use_vllm,
        logging_strategy="steps",
        logging_steps=config.logging_steps,  # TRL: 10
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(1, config.save_steps),
        save_total_limit=config.save_total_limit,
        report_to="none",
    )
    kwargs.update(config.trl)
    kwargs.update(extra)
    return GRPOConfig(**kwargs)


def resolved(config: TrainConfig, world_size: int = 1) -> TrainConfig:
    """The config with every 'auto' made concrete (device, bf16, train_size), as written to
    DIR/config.yaml: a resumed run, even with a larger --max-steps, sees the same data and precision."""
    import torch

    device = resolve_device(config.device)
    bf16 = config.bf16
    if bf16 is None:  # bf16 autocast on a GPU that has it; TRL's default (always True) is slow on CPU
        bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return config.update({"device": device, "bf16": bool(bf16), "train_size": train_size(config, world_size)})


def train_size(config: TrainConfig, world_size: int = 1) -> int:
    """Rows a run consumes: prompts per optimizer step x steps (at least 64, at most 20,000)."""
    if config.train_size is not None:
        return config.train_size
    prompts = -(-config.per_device_batch * world_size * config.max_steps // config.num_generations)
    return int(min(20_000, max(64, prompts)))


# ------------------------------------------------------------------ run folders
def last_checkpoint(out: str, set_aside: bool = False) -> str | None:
    """The newest complete checkpoint-N of run folder ``out`` (None: there is none).
    trainer_state.json is written last, so a checkpoint without it was cut by a kill: it is never
    chosen; a run about to resume (``set_aside``) renames it aside (never loaded, never rotated)."""
    if not os.path.isdir(out):
        return None
    found = []
    for name in os.listdir(out):
        step = re.fullmatch(r"checkpoint-(\d+)", name)
        if step and os.path.isdir(os.path.join(out, name)):
            if os.path.exists(os.path.join(out, name, "trainer_state.json")):
                found.append((int(step.group(1)), os.path.join(out, name)))
            elif set_aside and log.is_main_process():
                os.replace(os.path.join(out, name), os.path.join(out, name + ".incomplete"))
    return max(found)[1] if found else None


def run_name(run_dir: str) -> str:
    """The credit strategy of DIR/config.yaml (top-level ``credit``), else the folder name."""
    try:
        credit = load_yaml(os.path.join(run_dir, "config.yaml")).get("credit")
    except UserError:  # no config.yaml, or not one of ours: the folder names the run
        credit = None
    if isinstance(credit, dict):  # an early format: {strategy: ...}
        credit = credit.get("strategy")
    return str(credit) if isinstance(credit, str) and credit else os.path.basename(os.path.normpath(run_dir))


__all__ = ["PRESETS", "TrainConfig", "default_preset", "last_checkpoint", "load_function", "load_yaml", "resolve_device", "resolved",
           "run_name", "save_yaml", "to_grpo_config", "train_size"]
