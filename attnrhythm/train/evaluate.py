"""`attnrhythm eval`: pass@1, avg@k and pass@k of a model on the test split of a task.

    attnrhythm eval --model runs/coupled --task countdown-easy --n 512 --samples 1 --out eval.json

samples=1 is greedy unless a temperature is given (the paper's pass@1); samples=k > 1 samples k
completions per problem at --temperature (default 1.0, the paper's sampling temperature) and
reports avg@k (mean accuracy over all k samples, the paper's AIME metric) and pass@k (share of
problems with at least one correct sample).  A completion is *correct* when the task's reward is
1.0 (Countdown also pays 0.1 for a well-formed wrong answer: that is in `reward`, not accuracy).

Generation is batched with left padding; the JSON result (written atomically) holds the settings,
the metrics and every problem's scores and completions.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from attnrhythm import generation, io, log
from attnrhythm.errors import UserError, check_device, check_fields
from attnrhythm.io import option
from attnrhythm.tasks import check_verifier_errors, get_task, score_completions, task_help
from attnrhythm.train.config import last_checkpoint

logger = log.get_logger(__name__)


def generate(model, tokenizer, prompts: list, samples: int = 1, temperature: float | None = None,
             max_new_tokens: int = 256, batch_size: int = 32, seed: int = 0,
             progress: bool = False) -> tuple[list[list[str]], list[list[int]]]:
    """``samples`` completions per prompt (texts, token counts incl. a final eos), batched.

    Greedy when temperature is None or 0 (then samples must be 1); otherwise pure temperature
    sampling (nothing truncated, as GRPO rollouts sample), each completion from its own
    generator seeded by the seed, the prompt and the sample's index (``generation.row_seed``):
    the same completions whatever the batch size.
    """
    greedy = not temperature
    if greedy and samples > 1:
        raise UserError("greedy decoding gives the same completion k times: give a temperature for samples > 1")
    stops = generation.stop_token_ids(model, tokenizer)
    encoded = [generation.encode_prompt(tokenizer, p) for p in prompts]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(samples)]
    texts = [[""] * samples for _ in prompts]
    lengths = [[0] * samples for _ in prompts]
    bar = tqdm(total=len(jobs), unit="completion", desc="eval", disable=not progress)
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            seeds = [generation.row_seed(seed, f"{generation.prompt_text(tokenizer, prompts[i])}|{j}") for i, j in chunk]
            rows = generation.generate(model, [encoded[i] for i, _ in chunk], [max_new_tokens] * len(chunk), stops,
                                       temperature=temperature or 0.0, seeds=seeds)
            for (i, j), row in zip(chunk, rows):
                texts[i][j] = tokenizer.decode(row, skip_special_tokens=True)
                lengths[i][j] = len(row)
            bar.update(len(chunk))
    finally:
        bar.close()
    return texts, lengths


def summarize(scores: list[list[float]], lengths: list[list[int]] | None = None,
              max_new_tokens: int | None = None) -> dict:
    """Metrics of per-problem score lists (all of the same length k)."""
    k = len(scores[0]) if scores else 1
    flat = [s for row in scores for s in row]
    correct = [[s >= 1.0 for s in row] for row in scores]
    accuracy = sum(map(sum, correct)) / max(1, len(flat))
    metrics = {"accuracy": accuracy, "reward": sum(flat) / max(1, len(flat)),
               "format": sum(s > 0 for s in flat) / max(1, len(flat))}
    if k == 1:
        metrics["pass@1"] = accuracy
    else:
        metrics[f"avg@{k}"] = accuracy
        metrics[f"pass@{k}"] = sum(any(row) for row in correct) / max(1, len(correct))
    if lengths:
        flat_len = [n for row in lengths for n in row]
        metrics["mean_tokens"] = sum(flat_len) / len(flat_len)
        if max_new_tokens:  # hit the limit without an eos
            metrics["truncated"] = sum(n >= max_new_tokens for n in flat_len) / len(flat_len)
    return metrics


def evaluate(model, tokenizer, task, n: int = 512, samples: int = 1, temperature: float | None = None,
             max_new_tokens: int = 256, batch_size: int = 32, seed: int = 0, template: str = "base",
             split: str = "test", progress: bool = False, rows: list[dict] | None = None) -> dict:
    """Evaluate on ``n`` problems of the task's ``split`` (test by default).

    ``task`` is a Task or a task name.  The same ``seed`` draws the problems and seeds sampling,
    so two models evaluated with the same arguments see the same problems; ``rows`` are those
    problems when the caller loaded them already.  Returns
    ``{"settings": ..., "metrics": ..., "problems": [{task fields, "scores", "completions"}]}``.
    """
    if samples < 1 or (n is not None and n < 1):
        raise UserError(f"samples and n must be >= 1, got samples={samples}, n={n}")
    if samples > 1 and not temperature:
        temperature = 1.0  # avg@k needs sampling; 1.0 is the paper's sampling temperature
    task = get_task(task, template) if isinstance(task, str) else task
    rows = task.load(split, n, seed) if rows is None else rows
    t0 = time.time()
    texts, lengths = generate(model, tokenizer, [r["prompt"] for r in rows], samples, temperature,
                              max_new_tokens, batch_size, seed, progress)
    scores, errors = [], []
    for completions, row in zip(texts, rows):
        rewards, failed = score_completions(task, completions, [row] * len(completions))
        scores.append(rewards)
        errors += failed
    check_verifier_errors(task.name, errors, sum(map(len, texts)))
    settings = {"task": task.name, "template": template, "split": split, "n": len(rows), "samples": samples,
                "temperature": temperature, "greedy": not temperature, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "seed": seed}
    problems = [{**{k: v for k, v in row.items() if k != "prompt"}, "scores": s, "completions": c}
                for row, s, c in zip(rows, scores, texts)]
    return {"settings": settings, "metrics": summarize(scores, lengths, max_new_tokens),
            "verifier_errors": len(errors), "seconds": time.time() - t0, "problems": problems}


# ----------------------------------------------------------------------------- command line
def resolve_model_dir(path: str) -> str:
    """A run folder without a saved model at its top -> its latest complete checkpoint-N folder."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        return last_checkpoint(path) or path
    return path


def format_table(results: list[dict]) -> str:
    """One row per result: model, task, n, samples and every metric."""
    keys = []
    for r in results:
        keys += [k for k in r["metrics"] if k not in keys]
    head = ["model", "task", "n", "k"] + keys
    rows = [[str(r.get("model", "")), r["settings"]["task"], str(r["settings"]["n"]), str(r["settings"]["samples"])]
            + [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


@dataclass
class EvalSettings:
    """Everything an `eval` run needs."""

    model: str = option("smollm2-135m", "embedded name (smollm2-135m), model folder, run folder (its latest "
                        "checkpoint) or hub id")
    task: str = option("countdown", task_help())
    template: str = option("base", "prompt template: plain text or chat messages", choices=("base", "chat"))
    n: int = option(512, "test problems (the paper's Countdown test set: 512)", at_least=1)
    samples: int = option(1, "completions per problem: 1 = pass@1, k = avg@k and pass@k", at_least=1)
    temperature: float | None = option(None, "sampling temperature (none: greedy for --samples 1, 1.0 for "
                                       "--samples > 1; 0: greedy)", at_least=0)
    max_new_tokens: int = option(256, "tokens per completion at most", at_least=1)
    batch_size: int = option(32, "completions generated together", at_least=1)
    seed: int = option(0, "draws the test problems and seeds sampling", at_least=0)
    split: str = option("test", "which split to draw from (final: countdown-pairs' held-out final test set)",
                        choices=("test", "final", "train"))
    dtype: str = option("auto", "auto (bfloat16 on a GPU, else float32), float32, bfloat16",
                        choices=("auto", "float32", "bfloat16", "float16"))
    device: str | None = option(None, "cuda or cpu (none: cuda when available)", check=check_device)
    step: int | None = option(None, "training step of this model, recorded for `plot`", at_least=0)
    out: str | None = option(None, "write the JSON result here (e.g. RUN_DIR/eval.json)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_fields(self)
        if self.samples > 1 and self.temperature == 0:
            raise UserError(f"--samples {self.samples} with --temperature 0: greedy decoding gives the same completion "
                            "every time; give a temperature above 0 or --samples 1")


SETTINGS = EvalSettings


def run_evaluation(settings: EvalSettings) -> dict:
    """`attnrhythm eval` from Python: checks the task, the model and the numbers before loading
    the model; returns (and with ``out`` writes) the result."""
    from attnrhythm import models

    settings.validate()
    task = get_task(settings.task, settings.template)
    rows = task.load(settings.split, settings.n, settings.seed)  # a missing data file fails here, not later
    path = resolve_model_dir(settings.model)
    models.check_model(path)
    model, tokenizer = models.load_model(path, dtype=settings.dtype, device=settings.device)
    result = evaluate(model, tokenizer, task, n=settings.n, samples=settings.samples,
                      temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                      batch_size=settings.batch_size, seed=settings.seed, template=settings.template,
                      split=settings.split, progress=True, rows=rows)
    result = {"model": settings.model, "model_path": path, "step": settings.step, **result}
    if settings.out:
        io.write_json(settings.out, result)
    return result


def command(settings: EvalSettings, command_line: str | None = None) -> int:
    result = run_evaluation(settings)
    log.emit(format_table([result]))
    logger.info(f"{result['seconds']:.0f}s" + (f"; wrote {settings.out}" if settings.out else ""))
    return 0
