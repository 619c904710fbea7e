"""The credit comparison: held-out scores before and after training, judged at the seed level.

Every run of a comparison is evaluated on the same test problems as its starting model (same
task, ``n``, split and seed), so every difference is *paired* by problem.  Two kinds of interval:

* per run: a percentile bootstrap over problems (the run is one fixed trained model);
* per credit over seeds: a two-level bootstrap that resamples seeds and, inside the resample,
  problems (:func:`two_level`), so the run-to-run spread of training is part of the interval.
  A credit is compared with plain GRPO (``--versus none``) *seed by seed*: credit seed s minus
  ``none`` seed s, which shared its prompts and its first rollouts.  p-values are two-sided
  bootstrap p-values, Holm-corrected over the credits compared on one test set.

    attnrhythm compare --start runs/exp/warm runs/exp/none-s* runs/exp/coupled-s* \\
        --test-sets dev=eval.json final=eval_final.json --out docs/training

writes ``results.json`` (one object per run and test set), ``summary.json`` (one per recipe,
credit and test set) and ``results.md`` (tables of both).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from attnrhythm import io, log
from attnrhythm.core.credit import CREDIT_NAMES
from attnrhythm.errors import MissingInput, UserError
from attnrhythm.io import option
from attnrhythm.train.paired import aligned, holm, paired_gain, same_scoring, score_name, two_level

logger = log.get_logger(__name__)

RECIPE_FIELDS = ("task", "learning_rate", "num_generations", "per_device_batch", "steps_per_generation",
                 "max_steps", "max_completion_length", "beta")
"""Config fields that make runs seeds of one recipe (the credit and the seed vary within it)."""


# ----------------------------------------------------------------------------- runs -> rows
@dataclass
class Run:
    """A finished run folder: its config, the commit of its code and its evaluations."""

    path: str
    config: dict
    commit: str
    _evaluations: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    @property
    def recipe(self) -> tuple:
        return tuple(self.config.get(f) for f in RECIPE_FIELDS)

    def evaluation(self, file: str) -> dict:
        """The run's evaluation ``file``, read once (rows, summaries and pairings all use it)."""
        if file not in self._evaluations:
            path = os.path.join(self.path, file)
            if not os.path.exists(path):
                raise MissingInput(f"{self.path} has no {file}: evaluate it (`attnrhythm eval --out {path}`) first")
            self._evaluations[file] = read_evaluation(path)
        return self._evaluations[file]


def read_evaluation(path: str) -> dict:
    evaluation = io.read_json(path)
    if not isinstance(evaluation, dict) or not isinstance(evaluation.get("problems"), list) or not all(
            isinstance(p, dict) and isinstance(p.get("scores"), list) and p["scores"] for p in evaluation["problems"]):
        raise UserError(f"{path} is not an `attnrhythm eval` result (it needs problems with scores)")
    return evaluation


def load_run(path: str) -> Run:
    from attnrhythm.train.config import load_yaml

    config_path = os.path.join(path, "config.yaml")
    if not os.path.exists(config_path):
        raise MissingInput(f"{path} has no config.yaml: train it (`attnrhythm train --out {path}`) first")
    config = load_yaml(config_path)  # bad YAML or text that is not UTF-8: one line
    if not isinstance(config, dict) or not {"credit", "seed"} <= set(config):
        raise UserError(f"{config_path} is not an `attnrhythm train` config (it needs credit and seed)")
    commit_path = os.path.join(path, "commit.txt")
    commit = open(commit_path, encoding="utf-8").read().strip() if os.path.exists(commit_path) else ""
    return Run(path, config, commit)


def parse_test_sets(specs: list[str]) -> dict[str, str]:
    """['dev=eval.json', 'final=eval_final.json'] -> {'dev': 'eval.json', 'final': 'eval_final.json'}."""
    out = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise UserError(f"--test-sets takes NAME=FILE pairs (e.g. dev=eval.json), got {spec!r}")
        out[name] = file
    return out


def start_evaluation(start: str, file: str, single: bool) -> dict:
    """The starting model's evaluation: ``start`` is its folder (holding ``file``) or, with a
    single test set, the evaluation file itself."""
    path = os.path.join(start, file) if os.path.isdir(start) else start
    if not os.path.isdir(start) and not single:
        raise UserError("with several --test-sets, --start must be the starting model's folder")
    if not os.path.exists(path):
        raise MissingInput(f"--start: {path} does not exist; evaluate the starting model first")
    return read_evaluation(path)


def run_rows(runs: list[Run], start: dict, file: str, test_set: str, baseline: str, device: str,
             command: str) -> list[dict]:
    """One results.json object per run: its gain over the start and, where the ``baseline``
    credit has a run with the same recipe and seed, its end minus that run's end."""
    evaluations = {r.path: r.evaluation(file) for r in runs}
    base = {(r.recipe, r.config["seed"]): r for r in runs if r.config["credit"] == baseline}
    rows = []
    for run in runs:
        row = {"run": run.name, "credit": run.config["credit"], "seed": run.config["seed"], "test_set": test_set,
               "score": score_name(start),
               **{f: run.config.get(f) for f in RECIPE_FIELDS},
               **paired_gain(start, evaluations[run.path]), "steps": run.config.get("max_steps"),
               "device": device or run.config.get("device", ""), "command": command, "commit": run.commit,
               "evaluation": os.path.join(run.path, file)}  # the per-problem file this row is computed from
        twin = base.get((run.recipe, run.config["seed"]))
        if twin is not None and twin is not run:
            versus = paired_gain(evaluations[twin.path], evaluations[run.path])
            row.update(versus=baseline, versus_gain=versus["gain"], versus_ci_low=versus["ci_low"],
                       versus_ci_high=versus["ci_high"])
        rows.append(row)
    return rows


def credit_summaries(runs: list[Run], start: dict, file: str, test_set: str, baseline: str) -> list[dict]:
    """One summary per recipe and credit: mean end score over seeds, the gain over the start and
    the same-seed difference from ``baseline``, each with a two-level interval over seeds and
    problems, how many seeds were above 0, and Holm-corrected p-values over the credits."""
    groups: dict[tuple, dict[int, Run]] = {}
    for run in runs:
        seeds = groups.setdefault((run.recipe, run.config["credit"]), {})
        if run.config["seed"] in seeds:
            raise UserError(f"{run.path} and {seeds[run.config['seed']].path} are the same credit, recipe and seed")
        seeds[run.config["seed"]] = run
    summaries = []
    for (recipe, credit), by_seed in groups.items():
        seeds = sorted(by_seed)
        scores = aligned(start, *(by_seed[s].evaluation(file) for s in seeds))
        gain = two_level(scores[1:] - scores[0])
        summary = {"recipe": dict(zip(RECIPE_FIELDS, recipe)), "credit": credit, "test_set": test_set,
                   "seeds": seeds, "score": score_name(start), "n_test": scores.shape[1], "pass1_start": float(scores[0].mean()),
                   "pass1_end": float(scores[1:].mean()), "end_per_seed": [float(x) for x in scores[1:].mean(1)],
                   "gain": gain, "seeds_above_start": int((scores[1:].mean(1) > scores[0].mean()).sum()),
                   "commits": sorted({by_seed[s].commit for s in seeds})}
        base = groups.get((recipe, baseline))
        shared = [s for s in seeds if base and s in base]
        if credit != baseline and shared:
            ends = aligned(*(by_seed[s].evaluation(file) for s in shared), *(base[s].evaluation(file) for s in shared))
            diffs = ends[:len(shared)] - ends[len(shared):]
            per_seed = diffs.mean(1)
            summary["versus"] = {"credit": baseline, "seeds": shared, "per_seed": [float(x) for x in per_seed],
                                 **two_level(diffs), "seeds_better": int((per_seed > 0).sum()),
                                 "seeds_worse": int((per_seed < 0).sum())}
        summaries.append(summary)
    for key in ("gain", "versus"):  # Holm over the credits of one recipe (on this test set)
        families: dict[str, dict[str, dict]] = {}
        for s in summaries:
            if key in s:
                families.setdefault(json.dumps(s["recipe"], sort_keys=True), {})[s["credit"]] = s[key]
        for family in families.values():
            for credit, adjusted in holm({c: stat["p"] for c, stat in family.items()}).items():
                family[credit]["p_holm"] = adjusted
    return summaries


MIN_SEEDS = 3
"""**Decision**: a credit line gets a verdict only with at least this many seeds.  With fewer, its
interval resamples problems of one or two fixed models and cannot see the seed-to-seed spread
that reversed the earlier recipe's gain (docs/training/results.md)."""


ALPHA = 0.05
"""The level of the 95% intervals, and the bar for a Holm-corrected p-value."""


def verdict(stat: dict, n_seeds: int) -> str:
    """Words for a two-level interval over ``n_seeds`` seeds: a difference whose interval touches 0
    is inconclusive; fewer than MIN_SEEDS seeds are not judged, whatever the interval.  An interval
    clear of 0 is one comparison's evidence; the table makes one per credit, so "higher" or "lower"
    also needs the Holm-corrected p-value below ALPHA, and says "inconclusive after Holm" when only
    the uncorrected interval clears 0."""
    if n_seeds < MIN_SEEDS:
        return f"not judged ({n_seeds} seed{'s' if n_seeds > 1 else ''})"
    if stat["ci_low"] <= 0 <= stat["ci_high"]:
        return "inconclusive"
    if stat.get("p_holm", stat["p"]) >= ALPHA:
        return "inconclusive after Holm"
    return "higher" if stat["ci_low"] > 0 else "lower"


# ----------------------------------------------------------------------------- tables
def points(x: float) -> str:
    return f"{100 * x:+.1f}"


def interval_text(stat: dict, mean_key: str = "mean") -> str:
    """"+1.2 [+0.3, +2.1]": a difference and its interval, in points."""
    return f"{points(stat[mean_key])} [{points(stat['ci_low'])}, {points(stat['ci_high'])}]"


def judged(stat: dict, n_seeds: int) -> str:
    """An interval with its verdict, as the credit lines (and the README's tables) print it."""
    return f"{interval_text(stat)}, {verdict(stat, n_seeds)}"


def recipe_title(recipe: dict) -> str:
    per_step = recipe.get("per_device_batch")
    return (f"{recipe.get('task')}, lr {recipe.get('learning_rate'):g}, {per_step} completions "
            f"({per_step // max(1, recipe.get('num_generations') or 1)} prompts x {recipe.get('num_generations')}) per "
            f"optimizer step, {recipe.get('steps_per_generation')} step(s) per rollout batch, "
            f"{recipe.get('max_steps')} steps, completions <= {recipe.get('max_completion_length')} tokens"
            + (f", beta {recipe['beta']:g}" if recipe.get("beta") else ""))


def table(rows: list[dict], summaries: list[dict], baseline: str = "none") -> str:
    """Markdown: per test set and recipe, one line per credit over its seeds, then one per run."""
    lines = []
    for test_set in dict.fromkeys(s["test_set"] for s in summaries):
        for recipe in dict.fromkeys(json.dumps(s["recipe"], sort_keys=True) for s in summaries):
            group = [s for s in summaries if s["test_set"] == test_set and json.dumps(s["recipe"], sort_keys=True) == recipe]
            if not group:
                continue
            n = group[0]["n_test"]
            lines += [f"### {test_set} set ({n} problems, {group[0]['score']}): {recipe_title(group[0]['recipe'])}", "",
                      f"| credit | seeds | start | mean end | gain over start (95% CI, seeds x problems) "
                      f"| seeds above start | end minus `{baseline}`'s, same seed, per seed | minus `{baseline}` "
                      "(95% CI, seeds x problems) | seeds better / worse | p (Holm) | verdict |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for s in group:
                v = s.get("versus")
                lines.append(
                    f"| {s['credit']} | {len(s['seeds'])} | {100 * s['pass1_start']:.1f}% | {100 * s['pass1_end']:.1f}% "
                    f"| {judged(s['gain'], len(s['seeds']))} | {s['seeds_above_start']} of {len(s['seeds'])} "
                    + (f"| {'; '.join(points(x) for x in v['per_seed'])} | {interval_text(v)} | {v['seeds_better']} / {v['seeds_worse']} "
                       f"| {v['p_holm']:.3f} | {verdict(v, len(v['seeds']))} |" if v else "|  |  |  |  |  |"))
            lines += ["", f"Per run ({test_set} set): gain over the start and end minus `{baseline}`'s end with the "
                      "same seed, 95% bootstrap over problems (the run is one fixed model).", "",
                      "| run | end | gain over start | wins / losses | minus `" + baseline + "`, same seed | commit |",
                      "|---|---|---|---|---|---|"]
            for r in rows:
                if r["test_set"] != test_set or json.dumps({f: r.get(f) for f in RECIPE_FIELDS}, sort_keys=True) != recipe:
                    continue
                versus = (f"{points(r['versus_gain'])} [{points(r['versus_ci_low'])}, {points(r['versus_ci_high'])}]"
                          if "versus_gain" in r else "")
                lines.append(f"| {r['run']} | {100 * r['pass1_end']:.1f}% | {interval_text(r, 'gain')} | {r['wins']} / {r['losses']} "
                             f"| {versus} | {r['commit'][:10]} |")
            lines.append("")
    lines.append("Scores: each set's heading names its score, read from its evaluation files: greedy pass@1, or "
                 "avg@k, the mean accuracy of k samples at temperature T. The credit lines resample seeds and, within them, problems (two-level "
                 "bootstrap, 10,000 resamples); p is the two-sided bootstrap p-value, Holm-corrected over the "
                 "credits of one test set; a verdict is 'higher' or 'lower' only when the whole interval is and the "
                 f"Holm-corrected p is below {ALPHA:g} ('inconclusive after Holm' when only the interval clears 0), "
                 f"and is given only with {MIN_SEEDS} seeds or more.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command
@dataclass
class CompareSettings:
    """What `compare` reads and writes."""

    start: str = option("", "the starting model's folder (holding the evaluation files), or with one test set its "
                        "evaluation file")
    runs: list[str] = option([], "run folders, each with config.yaml and the evaluation files", positional=True,
                             metavar="DIR")
    test_sets: list[str] = option(["dev=eval.json"], "NAME=FILE: the evaluation file of every run (and the start) "
                                  "for each test set, e.g. dev=eval.json final=eval_final.json")
    device: str = option("", "machine the runs used (written into each entry)")
    run_command: str = option("", "the command that produced the runs (written into each entry)")
    out: str = option("runs/compare", "folder for results.json, summary.json and results.md")
    versus: str = option("none", "the credit every other credit is compared with, seed by seed and problem by problem")


SETTINGS = CompareSettings


def credit_order(run: Run) -> tuple[int, int]:
    """Runs by credit (the registry's order: ``none`` first) and then by seed."""
    credit = run.config["credit"]
    return (CREDIT_NAMES.index(credit) if credit in CREDIT_NAMES else len(CREDIT_NAMES), run.config["seed"])


def compare(settings: CompareSettings) -> tuple[list[dict], list[dict]]:
    """Rows (one per run and test set) and summaries (one per recipe, credit and test set)."""
    test_sets = parse_test_sets(settings.test_sets)
    if not settings.start:
        raise MissingInput("--start is required: the starting model's folder or evaluation file")
    if not settings.runs:
        raise UserError("give at least one run folder to compare")
    runs = sorted((load_run(path) for path in settings.runs), key=credit_order)  # tables read the same in any argument order
    rows, summaries = [], []
    for test_set, file in test_sets.items():
        start = start_evaluation(settings.start, file, len(test_sets) == 1)
        scored = scored_runs(runs, file, test_set)
        same_scoring(start, {run.path: run.evaluation(file) for run in scored}, test_set)
        rows += run_rows(scored, start, file, test_set, settings.versus, settings.device, settings.run_command)
        summaries += credit_summaries(scored, start, file, test_set, settings.versus)
    return rows, summaries


def scored_runs(runs: list[Run], file: str, test_set: str) -> list[Run]:
    """The runs a test set covers.  A test set may score some credits and not others (the final
    split scores only the credits whose runs are fixed), but a credit is scored on all its seeds or
    on none: keeping the seeds that happen to have a file would be choosing seeds."""
    by_credit: dict[str, list[Run]] = {}
    for run in runs:
        by_credit.setdefault(run.config["credit"], []).append(run)
    scored, left_out = [], []
    for credit, group in by_credit.items():
        missing = [r.path for r in group if not os.path.exists(os.path.join(r.path, file))]
        if not missing:
            scored += group
        elif len(missing) == len(group):
            left_out.append(credit)
        else:
            raise MissingInput(f"{test_set}: {len(missing)} of the {len(group)} `{credit}` runs have no {file} "
                               f"({', '.join(missing)}): evaluate them too, or leave the credit out")
    if not scored:
        raise MissingInput(f"{test_set}: no run has {file}: evaluate the runs (`attnrhythm eval --out RUN/{file}`) first")
    if left_out:
        logger.info("%s: no %s for %s; those credits are left out of this test set", test_set, file, ", ".join(left_out))
    return scored


def command(settings: CompareSettings, command_line: str | None = None) -> int:
    """`attnrhythm compare` -> results.json, summary.json, results.md."""
    rows, summaries = compare(settings)
    text = table(rows, summaries, settings.versus)
    os.makedirs(settings.out, exist_ok=True)
    io.write_json(os.path.join(settings.out, "results.json"), rows)
    io.write_json(os.path.join(settings.out, "summary.json"), summaries)
    io.write_text(os.path.join(settings.out, "results.md"), text)
    log.emit(text + f"wrote {settings.out}/results.json, summary.json and results.md")
    return 0
