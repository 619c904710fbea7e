"""A short supervised warm start on Countdown solutions written by our own solver.

Why: zero-shot SmolLM2-135M barely plays Countdown (2 of 24 samples at temperature 1.0 used the
answer tags, none correct), so most GRPO groups would be all-zero reward and teach nothing.  A few
dozen supervised steps on solver-written completions teach the TinyZero format

    <think> 12 + 5 = 17, 17 * 3 = 51. 51 equals the target. </think>
    <answer> (12 + 5) * 3 </answer><eos>

(the base-style prompt already ends with the opening ``<think>``, so the target continues from
there), which makes the RL experiment learnable at this scale.  The variant chooses the target's
style (``VARIANTS[...]["completion"]``): countdown-worked writes a short search first
(:func:`worked_completion`).  Only train-split instances are accepted: the test and final splits
stay unseen.

Plain torch loop (AdamW, fixed seed, fixed data order): simple and deterministic.  Run once and
save the folder that every RL run starts from:

    attnrhythm sft --model smollm2-135m --task countdown-easy --out runs/warm
"""
from __future__ import annotations

import ast
import math
import operator
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import torch

from attnrhythm import io, log
from attnrhythm.errors import UserError, check_fields
from attnrhythm.io import option
from attnrhythm.generation import prompt_text
from attnrhythm.tasks import get_task, solve_countdown
from attnrhythm.tasks.countdown import COMPLETION_KEY, VARIANTS, split_of

logger = log.get_logger(__name__)

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


# ----------------------------------------------------------------------------- targets
def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _steps(expr: str) -> tuple[list[str], Fraction]:
    """The solver's expression as one 'a op b = c' step per operation, innermost first.

    ``ast.parse`` only parses (nothing is executed), and the text comes from our own solver.
    """
    def walk(node) -> Fraction:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        a, b = walk(node.left), walk(node.right)
        op = _OPS[type(node.op)]
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        steps.append(f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(value)}")
        return value

    steps: list[str] = []
    value = walk(ast.parse(expr, mode="eval").body)
    return steps, value


def _solution(expr: str, target: int) -> str:
    """The solver's ``expr`` as steps, the closing ``</think>`` and the answer block."""
    steps, value = _steps(expr)
    assert value == target, (expr, value, target)  # the solver is exact: a mismatch is a bug
    return f"{', '.join(steps)}. {_fmt(value)} equals the target. </think>\n<answer> {expr} </answer>"


def solution_completion(numbers, target: int) -> str | None:
    """The completion that follows the prompt's opening ``<think>``, or None if unsolvable."""
    expr = solve_countdown(list(numbers), target)
    return None if expr is None else " " + _solution(expr, target)


WORKED_ATTEMPTS = 3
"""**Decision**: failed attempts before the solution in a worked completion (each ~30 SmolLM2
tokens: digits are single tokens).  With 3, the completions of 500 countdown-worked train
instances are 124 / 146 / 166 tokens with eos (min / median / max; 4 attempts: 146 / 172 /
196; the plain solution: 43 / 49 / 57), measured by
``python scripts/warm_start_lengths.py countdown-worked 500``: the FAI horizon [10, 100] then
reaches the answer from the search before it."""


def _whole_steps(x: int, y: int) -> list[tuple[str, int]]:
    """('x op y = v', v) for every operation whose result v is a positive integer, in exact
    Fractions: + and * in the given order, - and / in whichever order stays positive and whole."""
    out = []
    for op, apply in _ARITHMETIC.items():
        for a, b in dict.fromkeys([(x, y)] if op in "+*" else [(x, y), (y, x)]):
            value = apply(Fraction(a), Fraction(b))
            if value > 0 and value.denominator == 1:
                out.append((f"{a} {op} {b} = {value}", int(value)))
    return out


def _misses(pool: tuple[int, ...], target: int, done: tuple[str, ...] = ()) -> list[str]:
    """Every way to combine ``pool`` pair by pair (the new value first) that never reaches
    ``target``: 'Try a + b = v, v * c = w, too high.' (exponential: for 3 or 4 numbers)."""
    if len(pool) == 1:
        return [f"Try {', '.join(done)}, {'too high' if pool[0] > target else 'too low'}."] if done else []
    out = []
    for i in range(len(pool)):
        for j in range(i + 1, len(pool)):
            rest = tuple(pool[k] for k in range(len(pool)) if k not in (i, j))
            for text, value in _whole_steps(pool[i], pool[j]):
                if value != target:  # an attempt never passes through the target
                    out += _misses((value, *rest), target, (*done, text))
    return out


def worked_completion(numbers, target: int, attempts: int = WORKED_ATTEMPTS) -> str | None:
    """A short search, then :func:`solution_completion`'s solution; None if unsolvable.

    `` Target 27 from 12, 5, 3. Try 12 * 3 = 36, 36 - 5 = 31, too high. Try 12 - 5 = 7, 7 + 3 =
    10, too low. Try 12 - 5 = 7, 7 * 3 = 21, too low. Found: 5 * 3 = 15, 12 + 15 = 27. 27 equals
    the target. </think>\n<answer> 12 + 5 * 3 </answer>``: ``attempts`` combinations (fewer when
    fewer exist) that never pass through the target, every intermediate a positive integer, each
    with its verdict.  Which ones is a seeded draw from the instance's numbers (sorted) and
    target, so the same instance always gets the same trace, in any process.
    """
    expr = solve_countdown(list(numbers), target)
    if expr is None:
        return None
    misses = list(dict.fromkeys(_misses(tuple(int(x) for x in numbers), target)))
    rng = random.Random(f"worked:{sorted(numbers)}->{target}")  # str seeds are not salted
    tries = "".join(f" {text}" for text in rng.sample(misses, min(attempts, len(misses))))
    return f" Target {target} from {', '.join(str(x) for x in numbers)}.{tries} Found: {_solution(expr, target)}"


COMPLETIONS = {"solution": solution_completion, "worked": worked_completion}
"""How a variant's warm start writes its targets (``VARIANTS[...]["completion"]``)."""


def _variant(task: str) -> dict:
    """The VARIANTS entry of ``task`` ("-dense" ignored: it changes the reward, not the targets)."""
    name = task.removesuffix("-dense")
    if name not in VARIANTS:
        raise UserError(f"the warm start writes Countdown solutions: the task must be one of {', '.join(VARIANTS)} "
                        f"(or one of them with -dense), not {task!r}")
    return VARIANTS[name]


def _check_train_split(row: dict, final_fraction: float) -> None:
    # the split is a pure function of the instance (a hash); re-derive it so a test (or final)
    # instance can never leak into the warm start, whatever the caller passed
    split = split_of(row["numbers"], row["target"], final_fraction)
    if split != "train":
        raise UserError(f"warm start got a {split}-split instance {row['numbers']} -> {row['target']}")


def sft_examples(rows: list[dict], tokenizer, task: str = "countdown") -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + eos) for every solvable train row of the Countdown ``task``.

    The task's variant says how the completion is written (COMPLETIONS) and which splits are
    refused (test, and final where it has one).  Prompt and completion are tokenised separately
    and concatenated, exactly as RL sees them: the policy continues from the prompt's token ids.
    Ending in eos teaches the model to stop, which keeps RL rollouts short.
    """
    variant = _variant(task)
    write = COMPLETIONS[variant.get(COMPLETION_KEY, "solution")]
    out = []
    for row in rows:
        _check_train_split(row, variant.get("final_fraction", 0.0))
        completion = write(row["numbers"], row["target"])
        if completion is None:
            continue
        if not isinstance(row["prompt"], str):  # chat template: the assistant turn is not pre-filled
            completion = "<think>" + completion
        p = tokenizer(prompt_text(tokenizer, row["prompt"]), add_special_tokens=not isinstance(row["prompt"], list))
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((p["input_ids"], c))
    if not out:
        raise UserError("no solvable rows for the warm start")
    return out


def _batch(examples, pad_id: int, device) -> dict:
    """Right-padded input ids, mask and labels (-100 on prompt and padding: loss on completions)."""
    n = max(len(p) + len(c) for p, c in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (p, c) in enumerate(examples):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(c)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def sft_loss(model, tokenizer, rows: list[dict], batch_size: int = 8, task: str = "countdown") -> float:
    """Mean per-token completion loss on ``rows`` (for checking that the warm start learns)."""
    examples = sft_examples(rows, tokenizer, task)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = _batch(examples[i : i + batch_size], tokenizer.pad_token_id, device)
        n_tok = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n_tok
        count += n_tok
    model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------- the loop
def warm_start(model, tokenizer, rows: list[dict], steps: int, lr: float = 1e-4, batch_size: int = 8,
               seed: int = 0, log_every: int = 0, task: str = "countdown") -> dict:
    """``steps`` AdamW steps of completion-only cross-entropy on solver solutions of ``rows``.

    ``rows`` are Countdown task rows (``prompt``, ``numbers``, ``target``) of the train split.
    The data order is a seeded shuffle, reshuffled every epoch; the model is trained in place
    and left in eval mode.  ``task`` (a Countdown variant) chooses the targets' style and the
    refused splits (:func:`sft_examples`).  Returns ``{"losses": [per step], "n_examples": int, "seconds": float}``.

    lr 1e-4 (**Decision**): on SmolLM2-135M, batch 8, the completion loss falls from 1.77 to 0.34
    in 6 steps and to ~0.1 by step 30 (format learned, arithmetic still often wrong: room for RL);
    linear warm-up over the first 10% of steps.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = sft_examples(rows, tokenizer, task)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    order: list[int] = []
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        if len(order) < batch_size:  # next epoch: a fresh seeded permutation
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        batch = _batch([examples[i] for i in idx], tokenizer.pad_token_id, device)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            logger.info(f"warm start step {step + 1}/{steps}  loss {losses[-1]:.4f}  {time.time() - t0:.0f}s")
    model.eval()
    return {"losses": losses, "n_examples": len(examples), "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- command
@dataclass
class SftSettings:
    """What `attnrhythm sft` trains and where it saves the warm model."""

    out: str = option("runs/warm", "folder to save the warm model and tokenizer to (new, empty or an earlier warm "
                      "start's)")
    model: str = option("smollm2-135m", "embedded name, local model folder or hub id")
    task: str = option("countdown-easy", "a Countdown variant", choices=tuple(VARIANTS))
    template: str = option("base", "prompt template: plain text or chat messages", choices=("base", "chat"))
    n: int = option(2000, "train-split instances to draw", at_least=1)
    steps: int = option(30, "optimizer steps", at_least=1)
    lr: float = option(1e-4, "AdamW learning rate", above=0)
    batch_size: int = option(8, "examples per step", at_least=1)
    seed: int = option(1234, "data and order seed (differs from RL's prompt seed, so RL mostly sees fresh train "
                       "instances)", at_least=0)

    def __post_init__(self) -> None:
        check_fields(self)


SETTINGS = SftSettings
STAGING = ".partial"
"""Inside the output folder: the model is saved here first and moved into place file by file
(config.json and warm_start.json last), so a killed save never looks like a warm start."""


def _check_staging(out: str) -> Path:
    """STAGING of ``out``: one a killed sft left (its marker names sft) is replaced later,
    anything else there is refused now, before the model loads."""
    staging = Path(out) / STAGING
    if staging.exists() and io.written_by(staging) != ["sft"]:
        raise UserError(f"{staging} was not made by `attnrhythm sft`; move it away or choose another --out")
    return staging


def _save(model, tokenizer, info: dict, out: str) -> None:
    """Save into ``out`` through STAGING (config.json and warm_start.json moved in last)."""
    staging = _check_staging(out)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    io.mark(staging, "sft")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    io.write_json(staging / "warm_start.json", info)
    saved = io.folder_entries(staging)
    last = [name for name in ("config.json", "warm_start.json") if name in saved]
    for name in [n for n in saved if n not in last] + last:
        os.replace(staging / name, Path(out) / name)
    shutil.rmtree(staging)


def run_warm_start(settings: SftSettings) -> dict:
    """Train and save the warm start (checked before the model is loaded); returns its record."""
    from attnrhythm import models

    check_fields(settings)
    task = get_task(settings.task, settings.template)
    models.check_model(settings.model)
    _check_staging(settings.out)
    model, tokenizer = models.load_model(settings.model, dtype="float32")
    rows = task.load("train", settings.n, settings.seed)
    before = sft_loss(model, tokenizer, rows[:32], task=settings.task)
    record = warm_start(model, tokenizer, rows, settings.steps, lr=settings.lr, batch_size=settings.batch_size,
                        seed=settings.seed, log_every=10, task=settings.task)
    after = sft_loss(model, tokenizer, rows[:32], task=settings.task)
    info = {**asdict(settings), "loss_before": before, "loss_after": after, **record}
    _save(model, tokenizer, info, settings.out)
    return info


def command(settings: SftSettings, command_line: str | None = None) -> int:
    info = run_warm_start(settings)
    log.emit(f"warm start: {info['n_examples']} examples, {settings.steps} steps, loss on 32 rows "
             f"{info['loss_before']:.3f} -> {info['loss_after']:.3f}, {info['seconds']:.0f}s; saved {settings.out}")
    return 0 if math.isfinite(info["loss_after"]) else 1


if __name__ == "__main__":  # `python -m attnrhythm.train.sft ...` as before: the same as `attnrhythm sft ...`
    import sys

    from attnrhythm.cli import main

    raise SystemExit(main(["sft", *sys.argv[1:]]))
