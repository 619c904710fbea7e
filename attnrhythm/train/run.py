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

import os
from dataclasses import dataclass

from attnrhythm import io, log
from attnrhythm.errors import MissingInput, UserError, check_device
from attnrhythm.io import option
from attnrhythm.train.config import (TrainConfig, last_checkpoint, load_function, load_yaml, resolve_device, resolved,
                                     save_yaml, to_grpo_config)
from attnrhythm.train.dry_run import dry_run, plan_line

logger = log.get_logger(__name__)


@dataclass
class TrainSettings:
    """What `attnrhythm train` is asked: a config (defaults < preset < DIR/config.yaml with --resume
    < --config YAML < ``flags``) and what to do with it."""

    config: str | None = option(None, "YAML with any TrainConfig field (flags given here override it)")
    resume: bool = option(False, "continue the --out run from its last complete checkpoint (its config.yaml is the base)")
    dry_run: bool = option(False, "resolve the config and print its rollout arithmetic and checks (model shape when "
                           "its config.json is at hand); loads no weights, trains nothing, writes nothing; exit 2 on "
                           "a failed check")
    accelerate_config: str | None = option(None, "with --dry-run: the accelerate config the run will be launched with "
                                           "(its num_processes and mixed precision are checked; else WORLD_SIZE or 1 "
                                           "process)")
    flags: dict = option({}, "TrainConfig fields given on the command line", flags_of=TrainConfig,
                         shown=TrainConfig.from_layers)
    """{field: value} of the TrainConfig (and RhythmConfig) fields given as flags; a flag's help
    shows what a bare `train` uses on this machine (the machine's preset over the defaults)."""

    @property
    def out(self) -> str:
        """The run folder: --out, else the --config file's, else the default."""
        return (self.flags.get("out") or (load_yaml(self.config).get("out") if self.config else None)
                or TrainConfig().out)


SETTINGS = TrainSettings


def resolve(settings: TrainSettings) -> tuple[TrainConfig, str | None]:
    """(config, checkpoint to resume from), refusing a folder that holds a run without --resume
    and a finished run that has no checkpoint to continue from.  With ``dry_run`` set, nothing
    on disk is changed."""
    out = settings.out
    from_yaml = load_yaml(settings.config) if settings.config else {}
    saved, checkpoint = {}, None
    if settings.resume:
        if os.path.exists(os.path.join(out, "config.yaml")):
            saved = load_yaml(os.path.join(out, "config.yaml"))
        checkpoint = last_checkpoint(out, set_aside=not settings.dry_run)
    held = io.folder_entries(out)
    if log.is_main_process() and held and not settings.resume:  # other ranks follow rank 0, which decides
        raise UserError(f"{out} already holds a train run ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); "
                        "pass --resume to continue it, or choose another --out")
    if settings.resume and checkpoint is None and os.path.exists(os.path.join(out, "train_summary.json")):
        raise UserError(f"{out} holds a finished run without a checkpoint to continue from; choose another --out")
    return TrainConfig.from_layers(saved, from_yaml, settings.flags), checkpoint


def validate(config: TrainConfig) -> None:
    """What `train --dry-run` checks, as an error before anything is written or loaded (warnings
    are logged); what is missing on this machine is an error too: this run needs it now."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    report = dry_run(config, world_size=world, source="run", here=True)
    for warning in report.warnings:
        logger.warning(f"warning: {warning}")
    if report.errors:
        more = f" (and {len(report.errors) - 1} more: `attnrhythm train --dry-run` lists them)" \
            if len(report.errors) > 1 else ""
        raise UserError(report.errors[0] + more)


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


def _warm_start(model, tokenizer, rows, config: TrainConfig) -> None:
    from attnrhythm.train.sft import warm_start

    device = resolve_device(config.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    result = warm_start(model.to(device), tokenizer, rows, steps=config.sft_warmup_steps,
                        lr=config.sft_learning_rate, seed=config.seed, task=config.task)
    if log.is_main_process():
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


def train(config: TrainConfig, checkpoint: str | None = None):
    """Validate, then run (or resume) ``config``; returns the trainer."""
    from attnrhythm.train.callbacks import truncate_metrics

    if checkpoint is not None and not os.path.exists(os.path.join(checkpoint, "trainer_state.json")):
        raise MissingInput(f"checkpoint {checkpoint} does not exist or is incomplete (no trainer_state.json)")
    validate(config)
    if config.device != "auto":
        check_device("device", config.device)  # here, not in the config: a dry run may check it elsewhere
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = resolved(config, world)
    logger.info(plan_line(config, world))
    config_path = os.path.join(config.out, "config.yaml")
    fresh = not os.path.exists(config_path)
    os.makedirs(config.out, exist_ok=True)
    if log.is_main_process():
        save_yaml(config, config_path)
        # a fresh run starts an empty file; a resumed one keeps exactly the steps its checkpoint has
        step = io.read_json(os.path.join(checkpoint, "trainer_state.json"))["global_step"] if checkpoint else 0
        truncate_metrics(os.path.join(config.out, "metrics.jsonl"), step)
        if checkpoint:
            logger.info(f"resuming from {checkpoint} (step {step})")
    try:
        trainer = build_trainer(config, resuming=checkpoint is not None)
    except BaseException:
        if fresh and log.is_main_process():  # a run that never started leaves no config.yaml to mistake for one
            os.remove(config_path)
        raise
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(config.out)  # the final model next to its config: `attnrhythm eval --model DIR`
    logger.info(f"finished at step {trainer.state.global_step}/{config.max_steps}; model and metrics.jsonl in {config.out}")
    return trainer


def command(settings: TrainSettings, command_line: str | None = None) -> int:
    """`attnrhythm train`: settings -> resolved, checked config -> run (or, with --dry-run, the
    report of the run: nothing loaded, trained or written)."""
    config, checkpoint = resolve(settings)
    if settings.dry_run:
        resume = (checkpoint or False) if settings.resume else None
        result = dry_run(config, accelerate_config=settings.accelerate_config, resume=resume,
                         source=settings.config or "flags and defaults")
        log.emit(result.text)
        if result.errors:
            more = f" (and {len(result.errors) - 1} more, listed above)" if len(result.errors) > 1 else ""
            raise UserError(f"dry run: {result.errors[0]}{more}")
        return 0
    if settings.accelerate_config:
        raise UserError("--accelerate-config is read by --dry-run only; pass it to `accelerate launch --config_file`")
    if settings.resume and checkpoint is None:
        logger.warning(f"--resume: no complete checkpoint in {config.out}"
                       + ("" if os.path.isdir(config.out) else " (the folder does not exist)") + ": starting from step 0")
    train(config, checkpoint)
    return 0
