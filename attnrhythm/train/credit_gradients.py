"""`attnrhythm credit-gradients`: why credits differ (or do not), on one shared rollout batch.

A credit changes training only through the advantages it hands TRL.  This command draws rollout
batches once, with plain GRPO's generation, rewards and group advantages, then gives the *same*
completions to every credit: the trainer's own gamma (``RhythmGRPOTrainer._gamma``, the separate
attention pass) and ``core.credit.shape_advantages``, then TRL's own loss and its gradient.  Per
credit it reports:

* ``cosine``: of the credit's policy gradient with plain GRPO's (1 = the same update direction);
* ``norm_ratio``: |g_credit| / |g_none|;
* ``tokens_reweighted``: the share of valid completion tokens whose gamma is not 1;
* ``tokens_kept``: for a batch-level credit (high-entropy-selection), the share that keeps a
  policy gradient;
* ``advantage_mass``: sum over valid tokens of |A shaped| / the same sum for plain GRPO.

    attnrhythm credit-gradients --config runs/r1/none-s0/config.yaml --model runs/r1/warm \\
        --batches 2 --out docs/training/credit_gradients

Cost: one generation per batch, then one forward and backward per credit and batch.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from attnrhythm import io, log
from attnrhythm.core.credit import CREDIT_NAMES, get_credit, shape_advantages
from attnrhythm.errors import UserError
from attnrhythm.io import option

logger = log.get_logger(__name__)


def policy_gradient(trainer, inputs: dict, chunk: int = 8) -> torch.Tensor:
    """The flat gradient of TRL's loss (``trainer.compute_loss``) on one rollout batch, taken in
    chunks of ``chunk`` rows weighted by their share of the rows (memory: a rollout batch of 32
    at once needs ~12 GB on SmolLM2-135M): TRL's 'grpo' loss is a mean over sequences, so the sum
    is the whole batch's gradient."""
    model = trainer.model
    if not hasattr(trainer, "current_gradient_accumulation_steps"):  # set by Trainer's loop, which is not running
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    rows = inputs["completion_ids"].size(0)
    if trainer.args.loss_type != "grpo":  # other losses normalise over the batch's tokens: no chunks
        chunk = rows
    model.zero_grad(set_to_none=True)
    for start in range(0, rows, chunk):
        part = {k: v[start:start + chunk] if torch.is_tensor(v) and v.dim() and v.size(0) == rows else v
                for k, v in inputs.items()}
        (trainer.compute_loss(model, part) * (part["completion_ids"].size(0) / rows)).backward()
    grad = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return grad.double()


def shaped_advantages(trainer, output: dict, strategy: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(advantages [B, C], gamma [B, C], batch-level sets) of ``strategy`` for the rollout batch
    ``output`` whose ``advantages`` are plain GRPO's [B] (the trainer's own gamma and shaping)."""
    valid = output["completion_mask"].bool()
    advantages = output["advantages"]
    if strategy == "none":
        return advantages[:, None].expand_as(valid).contiguous(), torch.ones(valid.shape), {}
    base = trainer.credit
    trainer.credit = dataclasses.replace(base, strategy=strategy, rollout_samples=0)
    try:
        trainer._pass_capture = None  # the separate attention pass, on the current policy
        gamma, entropy, _ = trainer._gamma(output)
        shaped, sets = shape_advantages(strategy, advantages, gamma, valid, trainer.credit.rhythm, entropy)
    finally:
        trainer.credit = base
    return shaped, gamma, sets


def compare_credits(trainer, output: dict, credits: list[str]) -> list[dict]:
    """One row per credit for one rollout batch (``output`` from plain GRPO's
    ``_generate_and_score_completions`` with its advantages as [B]); see the module docstring."""
    valid = output["completion_mask"].bool()
    n_valid = float(valid.sum())
    reference = None
    base_mass = float((output["advantages"][:, None].abs() * valid).sum())
    rows = []
    for strategy in ["none"] + [c for c in credits if c != "none"]:
        shaped, gamma, sets = shaped_advantages(trainer, output, strategy)
        grad = policy_gradient(trainer, {**output, "advantages": shaped})
        if reference is None:
            reference = grad
        cosine = float(grad @ reference / (grad.norm() * reference.norm())) if grad.norm() > 0 else float("nan")
        rows.append({"credit": strategy,
                     "cosine": cosine,
                     "norm_ratio": float(grad.norm() / reference.norm()) if reference.norm() > 0 else float("nan"),
                     "tokens_reweighted": float(((gamma != 1) & valid).sum()) / n_valid,
                     "tokens_kept": float((sets["kept"] & valid).sum()) / n_valid if "kept" in sets else 1.0,
                     "advantage_mass": float((shaped.abs() * valid).sum()) / base_mass if base_mass else float("nan")})
    return rows


def rollout_batches(trainer, n: int):
    """``n`` rollout batches of plain GRPO from the trainer's own data loader: each is the
    output of ``_generate_and_score_completions`` with the advantages as [B]."""
    loader = iter(trainer.get_train_dataloader())
    trainer.model.train()
    if trainer.args.gradient_checkpointing:  # Trainer.train() would switch it on; it is not running
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
    for _ in range(n):
        output = trainer._generate_and_score_completions(next(loader))
        output["advantages"] = output["advantages"][:, 0].contiguous()  # 'none' broadcast them over columns
        yield output


def mean_rows(batches: list[list[dict]]) -> list[dict]:
    """Per credit, the mean of each number over the batches (a NaN in one batch makes the mean NaN)."""
    out = []
    for rows in zip(*batches):
        keys = [k for k in rows[0] if k != "credit"]
        out.append({"credit": rows[0]["credit"], "batches": len(rows),
                    **{k: sum(r[k] for r in rows) / len(rows) for k in keys}})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| credit | gradient cosine with `none` | gradient norm / `none`'s | tokens with gamma != 1 "
             "| tokens that keep a gradient | advantage mass / `none`'s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['credit']} | {r['cosine']:.3f} | {r['norm_ratio']:.2f} | {100 * r['tokens_reweighted']:.1f}% "
                     f"| {100 * r['tokens_kept']:.1f}% | {r['advantage_mass']:.2f} |")
    return "\n".join(lines) + "\n"


@dataclass
class CreditGradientSettings:
    """What `credit-gradients` measures."""

    config: str = option("", "a train config.yaml (e.g. a run's): model, task, recipe and seed of the rollouts")
    model: str | None = option(None, "the model to draw the rollouts from and differentiate (none: the config's)")
    credits: list[str] = option(list(CREDIT_NAMES), "credits to compare with plain GRPO")
    batches: int = option(1, "rollout batches (the numbers are averaged over them)")
    out: str = option("runs/credit_gradients", "folder for credit_gradients.json and .md")


SETTINGS = CreditGradientSettings


def command(settings: CreditGradientSettings, command_line: str | None = None) -> int:
    from attnrhythm.train.config import TrainConfig, load_yaml
    from attnrhythm.train.run import build_trainer

    if not settings.config:
        raise UserError("--config is required: a train config.yaml that names the recipe")
    if settings.batches < 1:
        raise UserError(f"--batches must be at least 1, got {settings.batches}")
    for name in settings.credits:
        get_credit(name)  # an unknown name is a UserError naming the closest one
    layer = load_yaml(settings.config)
    changes = {"credit": "none", "out": settings.out, "save_steps": 0, "kl_to_start": False, "rollout_samples": 0}
    if settings.model:
        changes["model"] = settings.model
    config = TrainConfig.from_layers(layer, changes)
    os.makedirs(settings.out, exist_ok=True)
    trainer = build_trainer(config)
    batches = [compare_credits(trainer, output, settings.credits)
               for output in rollout_batches(trainer, settings.batches)]
    rows = mean_rows(batches)
    io.write_json(os.path.join(settings.out, "credit_gradients.json"),
                  {"config": settings.config, "model": config.model, "command": command_line, "per_batch": batches,
                   "mean": rows})
    text = table(rows)
    io.write_text(os.path.join(settings.out, "credit_gradients.md"), text)
    log.emit(text + f"wrote {settings.out}/credit_gradients.json and .md")
    return 0
