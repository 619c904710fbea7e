"""`attnrhythm train`: GRPO with rhythm credit on a task, from the command line.

    attnrhythm train --model smollm2-135m --task countdown --credit coupled --max-steps 200 --out runs/coupled
    attnrhythm train --config run.yaml --out runs/x          # YAML for everything else; flags override it
    attnrhythm train --out runs/coupled --resume             # continue a killed run from its last checkpoint
    attnrhythm train --config run.yaml --dry-run             # resolve and check it: no weights, no training, no files

Writes DIR/config.yaml (the full resolved config), DIR/metrics.jsonl (one line per logging
step), DIR/checkpoint-N (rotated, save_total_limit) and finally the trained model in DIR.
Multi-GPU: launch the same command with ``accelerate launch`` or ``torchrun`` (docs/training.md).
"""
from __future__ import annotations

import dataclasses
import os
import re

from attnrhythm import io, log
from attnrhythm.core.credit import CREDIT_NAMES
from attnrhythm.errors import MissingInput, UserError
from attnrhythm.tasks import task_help
from attnrhythm.train.config import TrainConfig, load_yaml, resolve_device, resolved, save_yaml, to_grpo_config

logger = log.get_logger(__name__)

# (flag, TrainConfig field, type, choices, help); the defaults shown come from TrainConfig
FLAGS = [
    ("--preset", "preset", str, ("cpu", "gpu", "paper"), "run sizes: cpu, gpu (one GPU) or the paper's "
     "(none: gpu with CUDA, else cpu)"),
    ("--model", "model", str, None, "embedded name (smollm2-135m), local model folder or hub id"),
    ("--task", "task", str, None, task_help()),
    ("--template", "template", str, ("base", "chat"), "prompt template: plain text or chat messages"),
    ("--out", "out", str, None, "run folder"),
    ("--credit", "credit", str, CREDIT_NAMES, "credit strategy (none = plain GRPO)"),
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
    ("--temperature", "temperature", float, None, "sampling temperature of the rollouts (paper: 1.0)"),
    ("--max-steps", "max_steps", int, None, "optimizer steps"),
    ("--train-size", "train_size", int, None, "training prompts (none: what max-steps consumes)"),
    ("--seed", "seed", int, None, "seed of data, sampling and credit"),
    ("--reward-function", "reward_function", str, None, "module:function, a TRL reward function replacing the task's"),
    ("--device", "device", str, None, "auto, cpu or cuda"),
    ("--use-vllm", "use_vllm", bool, None, "generate with vLLM (TRL's use_vllm; mode etc. via YAML trl:)"),
    ("--sft-warmup-steps", "sft_warmup_steps", int, None, "supervised warm start on solver solutions first"),
    ("--logging-steps", "logging_steps", int, None, "optimizer steps between log lines"),
    ("--save-steps", "save_steps", int, None, "optimizer steps between checkpoints"),
    ("--save-total-limit", "save_total_limit", int, None, "checkpoints kept (older ones are deleted)"),
]


def _default(name: str):
    """What a bare `train` uses on this machine (the machine's preset over the defaults)."""
    config = TrainConfig.from_layers()
    return getattr(config, name) if hasattr(config, name) else getattr(config.rhythm, name)


def _train_settings():
    """The `train` command's settings: --config, --resume and one override per FLAGS row; every
    override defaults to None (not given: the YAML or TrainConfig decides), its help shows the
    value a bare `train` uses."""
    specs = [("config", str | None, dataclasses.field(default=None, metadata=dict(
                 help="YAML with any TrainConfig field (flags given here override it)"))),
             ("resume", bool, dataclasses.field(default=False, metadata=dict(
                 help="continue the --out run from its last complete checkpoint (its config.yaml is the base)"))),
             ("dry_run", bool, dataclasses.field(default=False, metadata=dict(
                 help="resolve the config and print its rollout arithmetic and checks (model shape when its "
                      "config.json is at hand); loads no weights, trains nothing, writes nothing; exit 2 on a "
                      "failed check"))),
             ("accelerate_config", str | None, dataclasses.field(default=None, metadata=dict(
                 help="with --dry-run: the accelerate config the run will be launched with (its num_processes "
                      "and mixed precision are checked; else WORLD_SIZE or 1 process)")))]
    for _, name, kind, choices, help_text in FLAGS:
        specs.append((name, kind | None, dataclasses.field(default=None, metadata=dict(
            help=help_text, choices=choices, shown_default=_default(name)))))
    return dataclasses.make_dataclass("TrainSettings", specs)


SETTINGS = TrainSettings = _train_settings()


def _is_main() -> bool:
    return log.is_main_process()


def last_checkpoint(out: str, set_aside: bool = True) -> str | None:
    """The newest complete checkpoint of DIR.  trainer_state.json is written last, so a folder
    without it was cut by a kill; it is renamed aside (never loaded, never rotated) unless
    ``set_aside`` is False (a dry run changes nothing)."""
    if not os.path.isdir(out):
        return None
    found = []
    for name in os.listdir(out):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        if m and os.path.isdir(os.path.join(out, name)):
            if os.path.exists(os.path.join(out, name, "trainer_state.json")):
                found.append((int(m.group(1)), os.path.join(out, name)))
            elif set_aside and _is_main():
                os.replace(os.path.join(out, name), os.path.join(out, name + ".incomplete"))
    return max(found)[1] if found else None


def resolve(args) -> tuple[TrainConfig, str | None]:
    """(config, checkpoint to resume from): defaults < preset < DIR/config.yaml (--resume) < --config
    < flags.
    ``args``: a TrainSettings (or any object with its attributes); with ``dry_run`` set, nothing on
    disk is changed."""
    flags = {name: getattr(args, name) for _, name, *_ in FLAGS if getattr(args, name, None) is not None}
    from_yaml = load_yaml(args.config) if getattr(args, "config", None) else {}
    out = flags.get("out") or from_yaml.get("out") or TrainConfig().out
    set_aside = not getattr(args, "dry_run", False)
    saved, checkpoint = {}, None
    if getattr(args, "resume", False):
        path = os.path.join(out, "config.yaml")
        if os.path.exists(path):
            saved = load_yaml(path)
        checkpoint = last_checkpoint(out, set_aside)
    elif last_checkpoint(out, set_aside) is not None:
        raise UserError(f"{out} already holds checkpoints: pass --resume to continue that run, or choose another --out")
    return TrainConfig.from_layers(saved, from_yaml, flags), checkpoint


def validate(config: TrainConfig) -> None:
    """Everything a run needs that can be checked without loading a model: the task, the model
    name or folder, the reward function.  Raises UserError before anything is written."""
    from attnrhythm.models import check_model
    from attnrhythm.tasks import get_task

    get_task(config.task, config.template)
    check_model(config.model)
    if config.reward_function is not None:
        load_function(config.reward_function)


def task_reward(task):
    """TRL reward function of a task; also logs accuracy (share of full-credit completions) and
    ``reward/errors`` (completions whose verifier raised; they score 0).  When the verifier fails
    on every completion of a batch the run stops: training on all-zero rewards would be silent
    garbage."""
    def task_reward(prompts, completions, log_metric=None, **columns):
        from attnrhythm.tasks import check_verifier_errors, score_completions

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rows = [{k: v[i] for k, v in columns.items() if isinstance(v, list) and len(v) == len(completions)}
                for i in range(len(completions))]
        rewards, errors = score_completions(task, texts, rows)
        check_verifier_errors(task.name, errors, len(texts), " of the batch")
        if log_metric is not None:
            log_metric("accuracy", sum(r >= 1.0 for r in rewards) / max(1, len(rewards)))
            log_metric("reward/errors", float(len(errors)))
        return rewards
    return task_reward


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


def _warm_start(model, tokenizer, rows, config: TrainConfig) -> None:
    from attnrhythm.train.sft import warm_start

    device = resolve_device(config.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    result = warm_start(model.to(device), tokenizer, rows, steps=config.sft_warmup_steps,
                        lr=config.sft_learning_rate, seed=config.seed)
    if _is_main():
        io.write_json(os.path.join(config.out, "sft_warmup.json"),
                      {k: v for k, v in result.items() if k != "losses"} | {"final_loss": result["losses"][-1]})
    logger.info(f"warm start: {config.sft_warmup_steps} steps, final loss {result['losses'][-1]:.4f}")


def build_trainer(config: TrainConfig, resuming: bool = False):
    """The RhythmGRPOTrainer of a config, with metrics.jsonl logging and the compact progress bar."""
    from datasets import Dataset
    from transformers import ProgressCallback

    from attnrhythm.models import load_model
    from attnrhythm.tasks import get_task
    from attnrhythm.train.callbacks import CompactProgress, MetricsJsonl
    from attnrhythm.train.trainer import CreditConfig, RhythmGRPOTrainer

    task = get_task(config.task, config.template)
    rows = task.load("train", config.train_size, config.seed)
    # the GRPOConfig first: creating it registers the launcher's DeepSpeed config, so that
    # from_pretrained below sees ZeRO-3 (zero3_init_flag) and loads each rank's shard only,
    # instead of the whole model on every rank (``args`` must stay referenced until then:
    # transformers holds the DeepSpeed config by weak reference only)
    args = to_grpo_config(config)
    model, tokenizer = load_model(config.model, dtype=config.model_dtype, device="cpu")
    if config.sft_warmup_steps and not resuming:  # a resumed run's checkpoint already holds the warm start
        _warm_start(model, tokenizer, rows, config)
    credit = CreditConfig.of(config)
    reward = task_reward(task) if config.reward_function is None else load_function(config.reward_function)
    trainer = RhythmGRPOTrainer(model=model, reward_funcs=[reward], args=args,
                                train_dataset=Dataset.from_list(rows), processing_class=tokenizer, credit=credit)
    trainer.add_callback(MetricsJsonl(os.path.join(config.out, "metrics.jsonl"), trainer.pop_log_extras))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress())
    return trainer


# Rough seconds per generated completion token of a whole rollout batch (generation, reward, the
# attention pass and its optimizer steps), measured with SmolLM2-135M: CPU, 2 shared cores: one
# rollout batch of 32 x 128 tokens took 3.5-5 minutes; H200, bf16: 256 x 128 in about 25 s.
_SECONDS_PER_TOKEN = {"cpu": 0.06, "cuda": 0.0008}


def run_plan(config: TrainConfig, world_size: int = 1) -> str:
    """One line: preset, rollout arithmetic and a rough time estimate (for a 135M model)."""
    per_rollout = config.per_device_batch * world_size * config.steps_per_generation
    rollouts = -(-config.max_steps // config.steps_per_generation)
    device = "cpu" if config.device == "cpu" else "cuda"
    seconds = rollouts * per_rollout * config.max_completion_length * _SECONDS_PER_TOKEN[device] / world_size
    return (f"preset {config.preset}: {rollouts} rollout batch(es) of {per_rollout} completions "
            f"({per_rollout // config.num_generations} prompts x {config.num_generations}), up to "
            f"{config.max_completion_length} tokens, {config.max_steps} optimizer steps, lr {config.learning_rate:g}, "
            f"credit {config.credit}; rough time for a 135M model on {device}: "
            f"{max(1, round(seconds / 60))} min (larger models take longer)")


def train(config: TrainConfig, checkpoint: str | None = None):
    """Validate, then run (or resume) ``config``; returns the trainer."""
    from attnrhythm.train.callbacks import truncate_metrics

    validate(config)
    if checkpoint is not None and not os.path.exists(os.path.join(checkpoint, "trainer_state.json")):
        raise MissingInput(f"checkpoint {checkpoint} does not exist or is incomplete (no trainer_state.json)")
    config = resolved(config, int(os.environ.get("WORLD_SIZE", "1")))
    logger.info(run_plan(config, int(os.environ.get("WORLD_SIZE", "1"))))
    config_path = os.path.join(config.out, "config.yaml")
    fresh = not os.path.exists(config_path)
    os.makedirs(config.out, exist_ok=True)
    if _is_main():
        save_yaml(config, config_path)
        # a fresh run starts an empty file; a resumed one keeps exactly the steps its checkpoint has
        step = io.read_json(os.path.join(checkpoint, "trainer_state.json"))["global_step"] if checkpoint else 0
        truncate_metrics(os.path.join(config.out, "metrics.jsonl"), step)
        if checkpoint:
            logger.info(f"resuming from {checkpoint} (step {step})")
    try:
        trainer = build_trainer(config, resuming=checkpoint is not None)
    except BaseException:
        if fresh and _is_main():  # a run that never started leaves no config.yaml to mistake for one
            os.remove(config_path)
        raise
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.out)  # the final model next to its config: `attnrhythm eval --model DIR`
    logger.info(f"finished at step {trainer.state.global_step}/{config.max_steps}; model and metrics.jsonl in {config.out}")
    return trainer


def command(settings, command_line: str | None = None) -> int:
    """`attnrhythm train`: settings (TrainSettings) -> resolved, validated config -> run (or, with
    --dry-run, the report of the run: nothing loaded, trained or written)."""
    config, checkpoint = resolve(settings)
    if getattr(settings, "dry_run", False):
        return dry_run_command(config, checkpoint, settings)
    if getattr(settings, "accelerate_config", None):
        raise UserError("--accelerate-config is read by --dry-run only; pass it to `accelerate launch --config_file`")
    validate(config)  # before a folder, a config.yaml or a model exists
    if settings.resume and checkpoint is None:
        logger.warning(f"--resume: no complete checkpoint in {config.out}"
                       + ("" if os.path.isdir(config.out) else " (the folder does not exist)") + ": starting from step 0")
    train(config, checkpoint)
    return 0


def dry_run_command(config: TrainConfig, checkpoint: str | None, settings) -> int:
    """`train --dry-run`: print the report (stdout); a failed check is a UserError (exit 2)."""
    from attnrhythm.train.dry_run import dry_run

    resume = (checkpoint or False) if getattr(settings, "resume", False) else None
    result = dry_run(config, accelerate_config=getattr(settings, "accelerate_config", None), resume=resume,
                     source=getattr(settings, "config", None) or "flags and defaults")
    log.emit(result.text)
    if result.errors:
        more = f" (and {len(result.errors) - 1} more, listed above)" if len(result.errors) > 1 else ""
        raise UserError(f"dry run: {result.errors[0]}{more}")
    return 0
