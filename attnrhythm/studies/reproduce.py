"""`attnrhythm reproduce`: every analysis claim of the paper on one model and data set, with a
verdict per claim, written to ``REPRODUCTION.md``, ``reproduction.json`` and ``figures/`` in ``--out``.

1. Table 2, couplings: the `analyze` outputs of the folder (``metrics.jsonl``, ``couplings.json``);
   a missing or unfinished analysis is run (or resumed) through the analysis API.
2. Table 1, perturbation: the `perturb` outputs of the folder, run or resumed likewise.
3. Head overlap and disjoint head sets: how many heads the receiver and global sets share, and
   the co-occurrence with the receiver heads taken out of the global set (``reanalysis.py``).
4. v2 Table 10, layer ranges: Table 2 from the bottom, middle and top thirds of the layers,
   receiver heads ranked within the third (``reanalysis.py``).
5. Table 2 under other peak rules (``core/peak_rules.py``), from the stored series.

What is already in the folder defines the study: its model, data, n and seed must match the
command's (otherwise the command stops and says so, ``resume.py``); its other settings are kept.
Nothing is generated twice; the reanalyses are cached.

Verdicts (``verdicts.py``): direction and magnitude per claim, each number counted once.  The
per-problem files (``published.py``) let every table be recomputed without a model; the
Markdown comes from ``tables.py``, the figures from ``figures.py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from attnrhythm import io, log
from attnrhythm.core.couplings import DISJOINT
from attnrhythm.core.peak_rules import DEFAULT_RULES, coupling_sweep
from attnrhythm.data import ProblemSettings
from attnrhythm.errors import check_device, check_fields
from attnrhythm.generation import PROMPT_STYLES
from attnrhythm.io import option
from attnrhythm.studies import perturb, published
from attnrhythm.studies.figures import reproduction_figures, sweep_figure
from attnrhythm.studies.reanalysis import disjoint_series, layer_range_tables
from attnrhythm.studies.records import head_overlap, record_couplings, records_table
from attnrhythm.studies.resume import check_resume
from attnrhythm.studies.tables import reproduction_markdown
from attnrhythm.studies.verdicts import claims, claims_summary, directions_by_choice

logger = log.get_logger(__name__)

CORE = ("model", "data", "n", "seed")
"""Settings that define the study: reused outputs must have been made with these values."""
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ReproduceSettings(ProblemSettings):
    """Everything a `reproduce` run needs; the analysis and the perturbation take the fields they
    share with it (same names), unless the folder already holds them."""

    out: str = option("runs/reproduce", "output folder, shared with analyze and perturb")
    max_new_tokens: int = option(256, "token budget of analysis and perturbation", at_least=1)
    temperature: float = option(0.7, "analysis sampling temperature (paper: 0.7)", at_least=0)
    prompt: str = option("auto", "auto: chat template for instruct models, the paper's prompt otherwise",
                         choices=PROMPT_STYLES)
    batch_size: int = option(8, "responses per generation/capture batch", at_least=1)
    n_boot: int = option(2000, "bootstrap resamples for the 95% intervals", at_least=1)
    k: int = option(3, "perturbation: top-k and bottom-k FAI positions", at_least=1)
    alternatives: int = option(3, "perturbation: forced alternatives per position", at_least=1)
    min_after: int = option(10, "perturbation: skip positions this close to the end", at_least=0)
    dtype: str = option("auto", "model dtype of analysis and perturbation (auto: bfloat16 on a GPU, float32 on a "
                        "CPU)", choices=DTYPES)
    device: str | None = option(None, "cpu or cuda (none: cuda when available)", check=check_device)
    threads: int | None = option(None, "torch CPU threads (1 on a shared machine; none: torch's default)", at_least=1)
    command_line: str | None = option(None, "", cli=False)
    """The command that ran this (for the report); None from Python."""

    def validate(self) -> None:
        check_fields(self)  # types and the bounds declared above
        self.check_problem_count()


def settings_for(cls, source, **values):
    """A ``cls`` settings object with the fields it shares with ``source`` (same names), then
    ``values`` (e.g. those a folder already holds) on top."""
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: v for k, v in vars(source).items() if k in names},
                  **{k: v for k, v in values.items() if k in names}})


# ---------------------------------------------------------------- the studies it runs or reuses

def ensure_analysis(args: ReproduceSettings, load) -> tuple[dict, list[dict], dict]:
    """(run.json, records, couplings table): reused, resumed or run."""
    from attnrhythm.core.config import RhythmConfig
    from attnrhythm.data import load_problems
    from attnrhythm.studies.analyze import AnalyzeSettings, run_analysis

    out = Path(args.out)
    run = io.read_json(out / "run.json") if (out / "run.json").exists() else None
    check_resume("the analysis", out, run and run["settings"], vars(args), CORE, resume=True)
    if run is None or run.get("status") != "complete" or not (out / "couplings.json").exists():
        settings = settings_for(AnalyzeSettings, args, **(run["settings"] if run else {}))
        config = RhythmConfig.from_dict(run["config"]) if run else settings.config()
        problems = load_problems(settings.data, settings.n, settings.seed)  # bad data refused before the model loads
        logger.info(f"reproduce: {'resuming' if run else 'running'} the analysis in {out}")
        model, tokenizer = load()
        run = run_analysis(model, tokenizer, problems, out, settings, config, resume=run is not None, progress=False,
                           command=args.command_line)
    else:
        logger.info(f"reproduce: reusing the analysis in {out}")
    return run, io.read_jsonl(out / "metrics.jsonl"), io.read_json(out / "couplings.json")["table"]


def ensure_perturbation(args: ReproduceSettings) -> dict:
    """perturbation.json content: reused, resumed or run (with the saved settings if any)."""
    saved, _, _ = perturb.read_records(Path(args.out) / "perturbations.jsonl")
    check_resume("the perturbation", args.out, saved, vars(args), CORE, resume=True)
    return perturb.run_perturbation(settings_for(perturb.PerturbSettings, args, **(saved or {}), resume=True))


def with_disjoint(run: dict, records: list[dict], table2: dict, series: dict) -> dict:
    """Table 2 with the disjoint co-occurrence row; each record gets ``fai_global_disjoint`` and
    that coupling (in place)."""
    from attnrhythm.core.config import RhythmConfig

    config = RhythmConfig.from_dict(run["config"])
    for r in records:
        r["fai_global_disjoint"] = series.get(r["id"])
        pair = record_couplings(r, config).get(DISJOINT) if r.get("couplings") and r["fai_global_disjoint"] else None
        if pair is not None:
            r["couplings"][DISJOINT] = pair
    saved = run["settings"]
    extra = records_table(records, [DISJOINT], n_boot=saved.get("n_boot", 2000), seed=saved["seed"])
    return {**table2, **extra}


# ---------------------------------------------------------------- the result

def _receiver_scope(run: dict) -> str:
    layers = run.get("receiver_layers") or run.get("layers") or []
    scope = "every layer" if run["config"].get("receiver_layers") == "all" else "the sampled layers"
    return f"{scope} ({len(layers)})"


def describe(run: dict, table1: dict, table2: dict, command: str | None, machine: dict | None) -> dict:
    """The report's header lines (``meta``) from the analysis's run.json and the tables."""
    saved, perturbed = run["settings"], table1["settings"]
    in_table2 = max((row["n"] for row in table2.values()), default=0)
    analysed = f"{run['n_responses']} analysed, {in_table2} of them in Table 2"
    if in_table2 < run["n_responses"]:
        analysed += f" ({run['n_responses'] - in_table2} with no statistic defined: {run.get('n_empty', 0)} empty)"
    perturbed_text = f"{table1['n_problems']} perturbed, {table1['n_compared']} of them in Table 1"
    if table1["n_compared"] < table1["n_problems"]:
        perturbed_text += (f" (the others have no top- and bottom-FAI positions at least {perturbed['min_after']} "
                           "tokens before the end)")
    return {
        "model": saved["model"], "data": saved["data"],
        "problems": f"{analysed}; {perturbed_text}",
        "seeds": f"problem sample and sampling seed {saved['seed']}; bootstrap seed {saved['seed']} "
                 f"({saved.get('n_boot')} resamples over problems)",
        "analysis": f"sampling T = {saved['temperature']}, up to {saved['max_new_tokens']} new tokens, "
                    f"prompt {run.get('prompt_style')}, layers {run.get('layers')}, FAI horizon "
                    f"{run['config']['fai_horizon']}, receiver heads calibrated on this run over "
                    f"{_receiver_scope(run)}",
        "perturbation": f"greedy, up to {perturbed['max_new_tokens']} new tokens, k = {perturbed['k']}, "
                        f"{perturbed['alternatives']} alternatives, positions at least {perturbed['min_after']} "
                        f"tokens before the end, dtype {perturbed['dtype']}",
        "command": f"`{command or '(python API)'}`",
        "machine": json.dumps(machine or run.get("machine")),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def assemble(run: dict, table2: dict, table1: dict, ranges: dict, sweep: list[dict], overlap: dict,
             meta: dict, figures: dict) -> dict:
    """reproduction.json: the tables, the claims with their verdicts, the summary, the
    directions under every analysis choice and what the intervals were computed with."""
    analysis = dict(layers=run.get("layers"), receiver_layers=run["config"].get("receiver_layers"))
    rows = claims(table2, table1, ranges, analysis, overlap)
    saved = run["settings"]
    return dict(meta=meta, summary=claims_summary(rows), claims=rows, choices=directions_by_choice(rows, sweep),
                analysis=analysis,
                table2=table2, table1={k: v for k, v in table1.items() if k != "machine"},
                layer_ranges={name: {k: v for k, v in entry.items() if k != "per_problem"}
                              for name, entry in ranges.items()},
                head_overlap=overlap, figures=figures, peak_rule_sweep=sweep,
                bootstrap=dict(n_boot=saved.get("n_boot", 2000), seed=saved["seed"],
                               coupling_k=run["config"].get("coupling_k", 3)))


def write_report(folder, result: dict) -> None:
    io.write_text(Path(folder) / "REPRODUCTION.md", reproduction_markdown(result))
    io.write_json(Path(folder) / "reproduction.json", result)


def refresh(folder) -> dict:
    """Re-derive the claims, verdicts, summary and choices of a reproduction folder from the
    tables its ``reproduction.json`` holds (e.g. after the verdict rule changed), with the
    header's problem counts from its ``run.json``; no number is recomputed.  Rewrites
    ``reproduction.json`` and ``REPRODUCTION.md`` in ``folder`` and returns the content."""
    folder = Path(folder)
    old, run = io.read_json(folder / "reproduction.json"), io.read_json(folder / "run.json")
    meta = dict(old["meta"])
    meta["problems"] = describe(run, old["table1"], old["table2"], None, None)["problems"]
    result = assemble(run, old["table2"], old["table1"], old["layer_ranges"], old.get("peak_rule_sweep") or [],
                      old.get("head_overlap") or {}, meta, old["figures"])
    write_report(folder, result)
    return result


# ---------------------------------------------------------------- the command

def run_reproduction(settings: ReproduceSettings) -> dict:
    """The whole job; returns the reproduction.json content."""
    import torch

    from attnrhythm import models
    from attnrhythm.studies.report import machine_info

    args = settings
    args.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved_run = io.read_json(out / "run.json") if (out / "run.json").exists() else {}
    dtype = saved_run.get("settings", {}).get("dtype", args.dtype)  # an analysis in the folder keeps its own
    loaded = {}

    def load():  # the analysis model, loaded once and only when something must be computed
        if not loaded:
            loaded["pair"] = models.load_model(args.model, dtype=dtype, device=args.device)
        return loaded["pair"]

    run, records, table2 = ensure_analysis(args, load)
    table1 = ensure_perturbation(args)
    table2 = with_disjoint(run, records, table2, disjoint_series(out, run, records, load))
    ranges = layer_range_tables(out, run, records, load)
    overlap = {"table2": head_overlap(records, run.get("receiver_heads") or [], "Table 2 (receivers over "
                                      f"{_receiver_scope(run)})"),
               **{name: entry["overlap"] for name, entry in ranges.items()}}
    saved = run["settings"]
    sweep = coupling_sweep(records, DEFAULT_RULES, k=run["config"].get("coupling_k", 3),
                           n_boot=saved.get("n_boot", 2000), seed=saved["seed"])
    figures = reproduction_figures(out / "figures", table1, ranges)
    sweep_figure(sweep, out / "figures" / "peak_rules.png")
    figures["peak_rules"] = "figures/peak_rules.png"
    meta = describe(run, table1, table2, args.command_line, machine_info(loaded["pair"][0] if loaded else None))
    result = assemble(run, table2, table1, ranges, sweep, overlap, meta, figures)
    _, perturbed, _ = perturb.read_records(out / "perturbations.jsonl")
    published.write_files(out, records, list(table2), perturbed, ranges)
    write_report(out, result)
    return result


SETTINGS = ReproduceSettings


def command(settings: ReproduceSettings, command_line: str | None = None) -> int:
    settings.command_line = command_line
    result = run_reproduction(settings)
    log.emit("\n".join(f"  {row['verdict']:>45}  {row['table']}: {row['claim']}" for row in result["claims"]))
    log.emit(f"  {result['summary']}")
    logger.info(f"wrote {Path(settings.out) / 'REPRODUCTION.md'}")
    return 0
