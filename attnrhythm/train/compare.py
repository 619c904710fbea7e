"""The credit comparison: held-out pass@1 before and after training, with paired intervals.

Every run of a comparison is evaluated on the same test problems as its starting model (same
task, ``n`` and seed), so the gain of a run is a *paired* difference: the 95% interval comes from
resampling problems (percentile bootstrap), which removes the problem-difficulty variance that
two independent accuracies would carry.

    attnrhythm compare --start runs/exp/warm/eval.json runs/exp/none-s0 runs/exp/coupled-s0 \
        --out docs/training

writes ``results.json`` (one object per run: credit, seed, n_test, pass1_start, pass1_end, gain,
ci_low, ci_high, steps, device, command) and ``results.md`` (the paper's Table 3 shape).
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass

import numpy as np

from attnrhythm import io, log
from attnrhythm.errors import MissingInput, UserError
from attnrhythm.io import option


def problem_key(problem: dict) -> str:
    """Identity of a test problem inside an eval.json (everything but the model's output)."""
    return json.dumps({k: v for k, v in problem.items() if k not in ("scores", "completions")}, sort_keys=True)


def correct_by_problem(evaluation: dict) -> dict[str, float]:
    """Problem key -> share of correct samples (0/1 for greedy pass@1)."""
    return {problem_key(p): sum(s >= 1.0 for s in p["scores"]) / len(p["scores"]) for p in evaluation["problems"]}


def paired_gain(start: dict | list[dict], end: dict | list[dict], n_boot: int = 10_000, seed: int = 0,
                level: float = 0.95) -> dict:
    """Accuracy of two evaluations on the same problems, their difference and its bootstrap interval.

    ``start`` and ``end`` are eval.json dicts; they must hold the same problems (a comparison of
    different problem sets is refused rather than silently mismatched).  Either may be a list
    (one credit's runs with different seeds): each problem's score is then the mean over them,
    and the interval, still over problems, is that of the seed-averaged difference."""
    starts = [correct_by_problem(e) for e in (start if isinstance(start, list) else [start])]
    ends = [correct_by_problem(e) for e in (end if isinstance(end, list) else [end])]
    a = starts[0]
    for b in starts[1:] + ends:
        if set(a) != set(b):
            raise UserError(f"the two evaluations hold different problems ({len(set(a) ^ set(b))} differ): "
                            "evaluate both with the same --task, --n and --seed")
    keys = sorted(a)
    x = np.array([[b[k] for k in keys] for b in starts]).mean(0)
    y = np.array([[b[k] for k in keys] for b in ends]).mean(0)
    diff = y - x
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    boots = diff[idx].mean(1)
    tail = (1 - level) / 2 * 100
    return {"n_test": len(keys), "pass1_start": float(x.mean()), "pass1_end": float(y.mean()),
            "gain": float(diff.mean()), "ci_low": float(np.percentile(boots, tail)),
            "ci_high": float(np.percentile(boots, 100 - tail)),
            "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum())}


def run_entry(run_dir: str, start: dict, device: str = "", command: str = "") -> dict:
    """One results.json object for a finished run folder (config.yaml + eval.json)."""
    import yaml

    for name in ("config.yaml", "eval.json"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise MissingInput(f"{run_dir} has no {name}: train it (`attnrhythm train`) and evaluate it "
                               f"(`attnrhythm eval --out {run_dir}/eval.json`) first")
    with open(os.path.join(run_dir, "config.yaml")) as f:
        config = yaml.safe_load(f)
    end = io.read_json(os.path.join(run_dir, "eval.json"))
    return {"run": os.path.basename(os.path.normpath(run_dir)), "credit": config["credit"], "seed": config["seed"],
            "task": config["task"], "learning_rate": config["learning_rate"],
            **paired_gain(start, end), "steps": config["max_steps"], "device": device or config.get("device", ""),
            "command": command}


def recipe(entry: dict) -> tuple:
    """What makes runs comparable seeds of one another: training task, learning rate, credit."""
    return entry.get("task", ""), entry.get("learning_rate", ""), entry["credit"]


def table(entries: list[dict], pooled: dict[tuple, dict] | None = None, versus: dict[tuple, dict] | None = None,
          baseline: str = "none") -> str:
    """Markdown: one row per recipe (training task, learning rate) and credit (seeds averaged),
    the gain with its interval per seed, (``pooled``, from :func:`pooled_gains`) the
    seed-averaged gain with its interval and (``versus``) the difference from the ``baseline``
    credit (plain GRPO by default)."""
    by_credit: dict[tuple, list[dict]] = {}
    for e in entries:
        by_credit.setdefault(recipe(e), []).append(e)
    pooled, versus = pooled or {}, versus or {}
    cell = lambda g: f"{100 * g['gain']:+.1f} [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]" if g else ""  # noqa: E731
    lines = ["| training task | lr | credit | seeds | pass@1 start | pass@1 end | gain (95% paired CI per seed) "
             f"| gain over seeds (95% CI) | end minus `{baseline}`'s end (95% CI) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, runs in by_credit.items():
        task, lr, credit = key
        gains = "; ".join(cell(r) for r in runs)
        lines.append(f"| {task} | {lr:g} | {credit} | {len(runs)} | {100 * statistics.mean(r['pass1_start'] for r in runs):.1f}% "
                     f"| {100 * statistics.mean(r['pass1_end'] for r in runs):.1f}% | {gains} | {cell(pooled.get(key))} "
                     f"| {cell(versus.get(key))} |")
    n = {e["n_test"] for e in entries}
    lines.append(f"\npass@1 is greedy, on {', '.join(map(str, sorted(n)))} held-out test problems; the interval is a "
                 "95% percentile bootstrap over problems of the paired difference (end - start).")
    return "\n".join(lines) + "\n"


@dataclass
class CompareSettings:
    """What `compare` reads and writes."""

    start: str = option("", "eval.json of the starting model (the same --task, --n and --seed as the runs')")
    runs: list[str] = option([], "run folders, each with config.yaml and eval.json", positional=True, metavar="DIR")
    device: str = option("", "machine the runs used (written into each entry)")
    run_command: str = option("", "the command that produced the runs (written into each entry)")
    out: str = option("runs/compare", "folder for results.json and results.md")
    versus: str = option("none", "the credit every other credit's end is compared with, problem by problem")


SETTINGS = CompareSettings


def command(settings: CompareSettings, command_line: str | None = None) -> int:
    """`attnrhythm compare`: paired gains of every run over the start -> results.json/results.md."""
    if not settings.start or not os.path.exists(settings.start):
        raise MissingInput(f"--start {settings.start or '(not given)'}: no such eval.json")
    start = io.read_json(settings.start)
    entries = [run_entry(r, start, settings.device, settings.run_command) for r in settings.runs]
    pooled, versus = pooled_gains(start, settings.runs, entries, settings.versus)
    text = table(entries, pooled, versus, settings.versus)
    os.makedirs(settings.out, exist_ok=True)
    io.write_json(os.path.join(settings.out, "results.json"), entries)
    io.write_text(os.path.join(settings.out, "results.md"), text)
    log.emit(text + f"wrote {settings.out}/results.json and results.md")
    return 0


def pooled_gains(start: dict, runs: list[str], entries: list[dict],
                 baseline: str = "none") -> tuple[dict[tuple, dict], dict[tuple, dict]]:
    """({recipe: paired_gain over its seeds} for every recipe with more than one run,
    {recipe: its seed-averaged end minus the same task and lr's ``baseline`` credit's end}, paired
    by problem)."""
    groups: dict[tuple, list[dict]] = {}
    for run, entry in zip(runs, entries):
        groups.setdefault(recipe(entry), []).append(io.read_json(os.path.join(run, "eval.json")))
    pooled = {key: paired_gain(start, evals) for key, evals in groups.items() if len(evals) > 1}
    versus = {key: paired_gain(groups[key[:2] + (baseline,)], evals) for key, evals in groups.items()
              if key[2] != baseline and key[:2] + (baseline,) in groups}
    return pooled, versus
