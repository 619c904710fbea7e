"""`attnrhythm reproduce`: every analysis claim of the paper on one model and data set, with a
verdict per claim, written to ``REPRODUCTION.md`` and ``figures/`` in ``--out``.

1. Table 2, couplings: the `analyze` outputs of the folder (``metrics.jsonl``, ``couplings.json``);
   a missing or unfinished analysis is run (or resumed) through the analysis API.
2. Table 1, perturbation: the `perturb` outputs of the folder, run or resumed likewise.
3. v2 Table 10, layer ranges: the Table 2 couplings with the head statistics taken from the
   bottom, middle and top thirds of the layers, receiver heads ranked within the third.  The
   saved token ids are recaptured with each layer set; nothing is generated again.  Cached in ``layer_ranges.json``.

What is already in the folder defines the study: its model, data, n and seed must match the
command's (otherwise the command stops and says so); its other settings are kept.

4. Table 2 under other peak rules (``core/peak_rules.py``): top-q for q in {0.1, ..., 0.4} and
   scipy prominence rules, with the peak density and random baseline of each, from the stored
   analysis records (nothing is recomputed); a table and ``figures/peak_rules.png``.

Verdict per claim on two levels (``studies/verdicts.py``), from the 95% bootstrap interval over
problems of the effect (lift for a coupling, top-minus-bottom Jaccard, share of problems with
top < bottom): the *direction* is reproduced when the interval excludes no effect on the paper's
side (opposite when on the other side, inconclusive when it includes no effect); the *magnitude*
is reproduced when the paper's value lies inside the interval.  E.g. "direction reproduced,
magnitude not".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from attnrhythm import io, log
from attnrhythm.core.couplings import COUPLINGS, PAPER_TABLE2
from attnrhythm.core.peak_rules import DEFAULT_RULES, coupling_sweep, sweep_markdown
from attnrhythm.data import ProblemSettings
from attnrhythm.errors import UserError
from attnrhythm.io import option
from attnrhythm.generation import PROMPT_STYLES
from attnrhythm.studies import perturb
from attnrhythm.studies.figures import sweep_figure
from attnrhythm.studies.verdicts import MIN_PROBLEMS, Verdict, summary_line
from attnrhythm.studies.verdicts import verdict as two_level_verdict

logger = log.get_logger(__name__)

CORE = ("model", "data", "n", "seed")
"""Settings that define the study: reused outputs must have been made with these values."""
RANGES = ("bottom", "middle", "top")


# ---------------------------------------------------------------- verdicts

def verdict(ci, null: float, paper: float, n: int | None = None, judge_magnitude: bool = True) -> Verdict:
    """The two-level verdict (``studies.verdicts.verdict``) of an effect whose 95% interval is
    ``ci``, against ``null`` (no effect), the paper's value fixing the expected side; ``n``
    problems behind the interval."""
    return two_level_verdict(ci, paper, null=null, n=n, judge_magnitude=judge_magnitude)


def _float(v) -> float:
    return math.nan if v is None else float(v)


def _pct(v, signed: bool = False) -> str:
    v = _float(v)
    return "n/a" if not math.isfinite(v) else (f"{100 * v:+.1f}%" if signed else f"{100 * v:.1f}%")


def _num(v) -> str:
    v = _float(v)
    return "n/a" if not math.isfinite(v) else f"{v:.3f}"


def _ci(ci, fmt) -> str:
    return "n/a" if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


# ---------------------------------------------------------------- the three studies

def _check_core(kind: str, saved: dict, args) -> None:
    wrong = {k: (saved.get(k), getattr(args, k)) for k in CORE if saved.get(k) != getattr(args, k)}
    if wrong:
        raise UserError(f"the {kind} outputs in {args.out} were made with other settings (saved, asked): "
                         f"{wrong}; use another --out or the saved values")


def ensure_analysis(args, load) -> tuple[dict, list[dict], dict]:
    """(run.json, records, couplings table): reused, resumed or run."""
    from dataclasses import fields

    from attnrhythm.core.config import RhythmConfig
    from attnrhythm.data import load_problems
    from attnrhythm.studies.analyze import ANALYSIS_CONFIG, AnalyzeSettings, run_analysis

    out = Path(args.out)
    run_path = out / "run.json"
    run = io.read_json(run_path) if run_path.exists() else None
    if run is not None:
        _check_core("analysis", run["settings"], args)
    if run is None or run.get("status") != "complete" or not (out / "couplings.json").exists():
        if run is not None:
            saved = run["settings"]
            settings = AnalyzeSettings(**{f.name: saved[f.name] for f in fields(AnalyzeSettings) if f.name in saved})
            config = RhythmConfig.from_dict(run["config"])
        else:
            settings = AnalyzeSettings(model=args.model, data=args.data, n=args.n, seed=args.seed, prompt=args.prompt,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       batch_size=args.batch_size, n_boot=args.n_boot, out=str(out))
            config = ANALYSIS_CONFIG
        logger.info(f"reproduce: {'resuming' if run else 'running'} the analysis in {out}")
        model, tokenizer = load()
        problems = load_problems(settings.data, settings.n, settings.seed)
        run = run_analysis(model, tokenizer, problems, out, settings, config, resume=run is not None,
                           progress=False, command=args.command_line)
    else:
        logger.info(f"reproduce: reusing the analysis in {out}")
    table = io.read_json(out / "couplings.json")["table"]
    return run, io.read_jsonl(out / "metrics.jsonl"), table


def ensure_perturbation(args) -> dict:
    """perturbation.json content: reused, resumed or run (with the saved settings if any)."""
    saved, _, _ = perturb.read_records(Path(args.out) / "perturbations.jsonl")
    if saved is not None:
        _check_core("perturbation", saved, args)
        keys = ("k", "alternatives", "max_new_tokens", "min_after", "prompt", "layers", "n_boot", "dtype")
        values = {k: saved[k] for k in keys}
    else:
        values = dict(k=args.k, alternatives=args.alternatives, max_new_tokens=args.max_new_tokens,
                      min_after=args.min_after, prompt=args.prompt, layers="middle", n_boot=args.n_boot,
                      dtype=args.perturb_dtype)
    return perturb.run_perturbation(perturb.PerturbSettings(
        out=args.out, model=args.model, data=args.data, n=args.n, seed=args.seed, resume=True,
        device=args.device, threads=args.threads, **values))


def layer_range_tables(args, run: dict, records: list[dict], middle: dict, load) -> dict:
    """{range: {"layers": [...], "table": couplings table}} for bottom, middle and top; results
    cached on disk.  Within a range everything comes from that range's layers, receiver heads
    included (``receiver_layers="sampled"``), so the three ranges compare like with like; the
    analysis's own table is reused only when it was computed that way."""
    from attnrhythm.capture import resolve_layers
    from attnrhythm.core.config import RhythmConfig
    from attnrhythm.studies.analyze import capture_records, finalize

    out = Path(args.out)
    cache_path = out / "layer_ranges.json"
    base = RhythmConfig.from_dict(run["config"])
    key = dict(config=run["config"], ids=[r["id"] for r in records], started=run.get("started"),
               receivers="within each range")
    cached = io.read_json(cache_path) if cache_path.exists() else {}
    if cached.get("key") != key:
        cached = dict(key=key, ranges={})
    settings = run["settings"]
    for name in RANGES:
        if name in cached["ranges"]:
            continue
        if base.layers == name and base.receiver_layers == "sampled":
            cached["ranges"][name] = dict(layers=run["layers"], table=middle, source="couplings.json")
            continue
        logger.info(f"reproduce: recapturing {len(records)} responses with the {name} third of the layers")
        model, _ = load()
        config = base.replace(layers=name, receiver_layers="sampled")
        copies, head_fai, batch = [], {}, settings.get("batch_size", 8)
        for start in range(0, len(records), batch):
            chunk = records[start:start + batch]
            metrics = capture_records(model, [r["prompt_token_ids"] for r in chunk],
                                      [r["response_token_ids"] for r in chunk], config, settings.get("backend", "streaming"))
            for r, m in zip(chunk, metrics):
                head_fai[r["id"]] = m.pop("_head_fai")
                copies.append(dict(id=r["id"], prompt_token_ids=r["prompt_token_ids"],
                                   response_token_ids=r["response_token_ids"], **m,
                                   fai_receiver=None, receiver_heads=None))
        _, table = finalize(model, copies, head_fai, config, n_boot=settings.get("n_boot", 2000),
                            seed=settings.get("seed", 0))
        cached["ranges"][name] = dict(layers=resolve_layers(model, config), table=table, source="recaptured")
        io.write_json(cache_path, cached)
    return cached["ranges"]


# ---------------------------------------------------------------- claims, figures, report

def claims(table2: dict, table1: dict, ranges: dict) -> list[dict]:
    """Every claim with our value, interval, the paper's value and the verdict."""
    rows = []
    for name in COUPLINGS:
        if name in table2:
            row, paper = table2[name], PAPER_TABLE2[name]
            rows.append(dict(claim=f"{paper['label']}: observed above random (lift > 0)", table="Table 2",
                             ours=row["lift"], ci=row["lift_ci"], paper=paper["lift"], null=0.0, fmt="signed",
                             n=row["n"]))
    for label, key, null in (("top-FAI minus bottom-FAI mean Jaccard < 0", "difference", 0.0),
                             ("share of problems with top-FAI Jaccard < bottom-FAI > 50%", "top_below_bottom", 0.5)):
        stat = table1[key]
        value = stat.get("mean", stat.get("share"))
        rows.append(dict(claim=label, table="Table 1", ours=value, ci=stat["ci"], paper=stat["paper"], null=null,
                         fmt="num" if key == "difference" else "pct", n=table1["n_compared"]))
    for name in RANGES:
        for coupling, row in ranges.get(name, {}).get("table", {}).items():
            if coupling in PAPER_TABLE2:
                rows.append(dict(claim=f"{name} third: {PAPER_TABLE2[coupling]['label']}, lift > 0",
                                 table="v2 Table 10", ours=row["lift"], ci=row["lift_ci"],
                                 paper=PAPER_TABLE2[coupling]["lift"], null=0.0, fmt="signed", paper_note="sign only",
                                 n=row["n"]))
    for row in rows:
        v = verdict(row["ci"], row["null"], row["paper"], row["n"], judge_magnitude=not row.get("paper_note"))
        row.update(verdict=v.label, why=v.why, direction=v.direction, magnitude=v.magnitude)
    return rows


def claims_summary(rows: list[dict]) -> str:
    """One line over the claims: the overall count (``verdicts.summary_line``), then how many
    claims got each verdict, e.g. "... : direction reproduced, magnitude not in 4; direction
    inconclusive, magnitude not in 1; ..."."""
    from collections import Counter

    counts = Counter(r["verdict"] for r in rows)
    by_label = "; ".join(f"{label} in {count}" for label, count in counts.items())
    overall = summary_line([Verdict(r["direction"], r["magnitude"], r["verdict"], r["why"]) for r in rows])
    return f"{overall}. By verdict: {by_label}"


def write_figures(folder: Path, table1: dict, ranges: dict) -> dict[str, str]:
    """figures/jaccard_top_bottom.png and figures/couplings_by_layer_range.png."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    groups = ["top", "bottom"]
    means = [_float(table1[g]["mean"]) for g in groups]
    errors = np.array([[m - _float(table1[g]["ci"][0]), _float(table1[g]["ci"][1]) - m] for g, m in zip(groups, means)]).T
    ax.bar([0, 1], means, yerr=np.nan_to_num(errors), capsize=6, color=["#d62728", "#1f77b4"], label="ours (95% CI)")
    ax.scatter([0, 1], [table1[g]["paper"] for g in groups], marker="D", color="k", zorder=3, label="paper")
    ax.set_xticks([0, 1], ["top-FAI positions", "bottom-FAI positions"])
    ax.set_ylabel("mean content-word Jaccard")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Perturbation (Table 1)")
    paths["jaccard"] = folder / "jaccard_top_bottom.png"
    fig.savefig(paths["jaccard"], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(RANGES)
    for j, name in enumerate(RANGES):
        table = ranges.get(name, {}).get("table", {})
        lifts = [_float(table.get(c, {}).get("lift")) for c in COUPLINGS]
        cis = [table.get(c, {}).get("lift_ci") or (math.nan, math.nan) for c in COUPLINGS]
        err = np.array([[lift - _float(ci[0]), _float(ci[1]) - lift] for lift, ci in zip(lifts, cis)]).T
        ax.bar(np.arange(len(COUPLINGS)) + (j - 1) * width, lifts, width, yerr=np.nan_to_num(err), capsize=3,
               label=f"{name} third {ranges.get(name, {}).get('layers', '')}")
    ax.scatter(np.arange(len(COUPLINGS)), [PAPER_TABLE2[c]["lift"] for c in COUPLINGS], marker="D", color="k",
               zorder=3, label="paper (middle layers)")
    ax.axhline(0, color="#888", lw=0.8)
    ax.set_xticks(np.arange(len(COUPLINGS)), ["entropy at\nWAAD peaks", "receiver & global\nFAI peaks",
                                              "FAI peak after\nWAAD peak"])
    ax.set_ylabel("lift over random (95% CI)")
    ax.legend(fontsize=7)
    ax.set_title("Couplings by layer range (v2 Table 10)")
    paths["ranges"] = folder / "couplings_by_layer_range.png"
    fig.savefig(paths["ranges"], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {k: str(v.relative_to(folder.parent)) for k, v in paths.items()}


def render_markdown(meta: dict, rows: list[dict], table2: dict, table1: dict, ranges: dict, figures: dict,
                    sweep: list[dict] | None = None) -> str:
    fmts = dict(signed=lambda v: _pct(v, True), pct=_pct, num=_num)
    lines = ["# Reproduction of Li et al. (arXiv 2510.13554), analysis claims", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()]
    lines += ["", "## Verdicts", "", f"**Summary: {claims_summary(rows)}.**", "",
              "Two levels per claim. Direction reproduced: the 95% interval of the effect excludes no effect, "
              "on the paper's side (opposite: on the other side; inconclusive: it includes no effect). "
              "Magnitude reproduced: the paper's value lies inside the interval. "
              f"Fewer than {MIN_PROBLEMS} problems behind an interval: inconclusive on both levels. "
              "v2 Table 10 rows are compared with the paper's middle-layer value for the sign only.", "",
              "| claim | source | ours (95% CI) | paper | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        fmt = fmts[r["fmt"]]
        paper = fmt(r["paper"]) + (" (middle layers; sign compared)" if r.get("paper_note") else "")
        lines.append(f"| {r['claim']} | {r['table']} | {fmt(r['ours'])} {_ci(r['ci'], fmt)} | {paper} | "
                     f"**{r['verdict']}**: {r['why']} |")
    lines += ["", "## Table 2: couplings", "", "| coupling | random (ours / paper) | observed (ours / paper) | "
              "lift (ours / paper) | problems |", "|---|---|---|---|---|"]
    for name in COUPLINGS:
        if name not in table2:
            continue
        row, paper = table2[name], PAPER_TABLE2[name]
        f = _pct if paper["unit"] == "share" else _num
        lines.append(f"| {paper['label']} | {f(row['random'])} {_ci(row['random_ci'], f)} / {f(paper['random'])} | "
                     f"{f(row['observed'])} {_ci(row['observed_ci'], f)} / {f(paper['observed'])} | "
                     f"{_pct(row['lift'], True)} {_ci(row['lift_ci'], lambda v: _pct(v, True))} / "
                     f"{_pct(paper['lift'], True)} | {row['n']} ({row['n_skipped']} skipped) |")
    t = table1
    lines += ["", "## Table 1: perturbation", "", "| statistic | ours (95% CI) | paper |", "|---|---|---|",
              f"| mean Jaccard, top-FAI positions | {_num(t['top']['mean'])} {_ci(t['top']['ci'], _num)} | "
              f"{t['top']['paper']} |",
              f"| mean Jaccard, bottom-FAI positions | {_num(t['bottom']['mean'])} {_ci(t['bottom']['ci'], _num)} | "
              f"{t['bottom']['paper']} |",
              f"| top minus bottom (paired) | {_num(t['difference']['mean'])} {_ci(t['difference']['ci'], _num)} | "
              f"{t['difference']['paper']} |",
              f"| problems with top < bottom | {_pct(t['top_below_bottom']['share'])} "
              f"{_ci(t['top_below_bottom']['ci'], _pct)} | {_pct(t['top_below_bottom']['paper'])} |",
              "", f"{t['n_compared']} problems compared ({t['n_skipped']} without both groups), "
              f"{t['top_below_bottom']['n_ties']} ties (counted as not below); settings: "
              f"`{json.dumps(t['settings'])}`; {_num(t.get('seconds_per_problem'))} s per problem.",
              "", "## v2 Table 10: couplings by layer range", "",
              "The paper's Table 10 values are not restated in docs/method.md; each range is judged on the sign "
              "of its lift. Within a range every head comes from its layers, receiver heads included (Table 2 "
              "above ranks receiver heads over every layer), so the middle row can differ from Table 2.", "", "| layers | " + " | ".join(PAPER_TABLE2[c]["label"] for c in COUPLINGS) + " |",
              "|---|" + "---|" * len(COUPLINGS)]
    for name in RANGES:
        entry = ranges.get(name, {})
        cells = [f"{_pct(entry['table'][c]['lift'], True)} {_ci(entry['table'][c]['lift_ci'], lambda v: _pct(v, True))}"
                 if c in entry.get("table", {}) else "n/a" for c in COUPLINGS]
        lines.append(f"| {name} {entry.get('layers', '')} | " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", sweep_markdown(sweep).rstrip()]
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()]
    lines += ["", "Outputs in this folder: `metrics.jsonl`, `couplings.json` and `report.html` (analysis), "
              "`perturbations.jsonl`, `perturbation.json` and `perturbation.html` (perturbation), "
              "`layer_ranges.json`, `reproduction.json`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- settings and the command

def _receiver_scope(run: dict) -> str:
    layers = run.get("receiver_layers") or run.get("layers") or []
    scope = "every layer" if run["config"].get("receiver_layers") == "all" else "the sampled layers"
    return f"{scope} ({len(layers)})"


@dataclass
class ReproduceSettings(ProblemSettings):
    """Everything a `reproduce` run needs; the analysis and the perturbation get their settings from it."""

    out: str = option("runs/reproduce", "output folder, shared with analyze and perturb")
    max_new_tokens: int = option(256, "token budget of analysis and perturbation")
    temperature: float = option(0.7, "analysis sampling temperature (paper: 0.7)")
    prompt: str = option("auto", "auto: chat template for instruct models, the paper's prompt otherwise",
                         choices=PROMPT_STYLES)
    batch_size: int = option(8, "responses per generation/capture batch")
    n_boot: int = option(2000, "bootstrap resamples for the 95% intervals")
    k: int = option(3, "perturbation: top-k and bottom-k FAI positions")
    alternatives: int = option(3, "perturbation: forced alternatives per position")
    min_after: int = option(10, "perturbation: skip positions this close to the end")
    dtype: str = option("auto", "analysis dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    perturb_dtype: str = option("auto", "perturbation dtype (see `perturb --dtype`)")
    device: str | None = option(None, "cpu or cuda (none: cuda when available)")
    threads: int | None = option(None, "torch CPU threads (1 on a shared machine; none: torch's default)")
    command_line: str | None = option(None, "", cli=False)
    """The command that ran this (for the report); None from Python."""

    def validate(self) -> None:
        self.check_problem_count()


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
    loaded = {}

    def load():  # the analysis model, loaded once and only when something must be computed
        if not loaded:
            loaded["pair"] = models.load_model(args.model, dtype=args.dtype, device=args.device)
        return loaded["pair"]

    run, records, table2 = ensure_analysis(args, load)
    table1 = ensure_perturbation(args)
    ranges = layer_range_tables(args, run, records, table2, load)
    rows = claims(table2, table1, ranges)
    figures = write_figures(out / "figures", table1, ranges)
    saved = run["settings"]
    sweep = coupling_sweep(records, DEFAULT_RULES, k=run["config"].get("coupling_k", 3),
                           n_boot=saved.get("n_boot") or args.n_boot, seed=saved["seed"])
    sweep_figure(sweep, out / "figures" / "peak_rules.png")
    figures["peak_rules"] = "figures/peak_rules.png"
    meta = {
        "model": saved["model"], "data": saved["data"],
        "problems": f"{len(records)} (analysis), {table1['n_problems']} (perturbation)",
        "seeds": f"problem sample and sampling seed {saved['seed']}; bootstrap seed {saved['seed']} "
                 f"({saved.get('n_boot')} resamples over problems)",
        "analysis": f"sampling T = {saved['temperature']}, up to {saved['max_new_tokens']} new tokens, "
                    f"prompt {run.get('prompt_style')}, layers {run.get('layers')}, FAI horizon "
                    f"{run['config']['fai_horizon']}, receiver heads calibrated on this run over "
                    f"{_receiver_scope(run)}",
        "perturbation": f"greedy, up to {table1['settings']['max_new_tokens']} new tokens, k = "
                        f"{table1['settings']['k']}, {table1['settings']['alternatives']} alternatives, positions "
                        f"at least {table1['settings']['min_after']} tokens before the end, dtype "
                        f"{table1['settings']['dtype']}",
        "command": f"`{args.command_line or '(python API)'}`",
        "machine": json.dumps(machine_info(loaded["pair"][0] if loaded else None)),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    io.write_text(out / "REPRODUCTION.md", render_markdown(meta, rows, table2, table1, ranges, figures, sweep))
    result = dict(meta=meta, summary=claims_summary(rows), claims=rows, table2=table2,
                  table1={k: v for k, v in table1.items() if k != "machine"}, layer_ranges=ranges, figures=figures,
                  peak_rule_sweep=sweep)
    io.write_json(out / "reproduction.json", result)
    return result


SETTINGS = ReproduceSettings


def command(settings: ReproduceSettings, command_line: str | None = None) -> int:
    settings.command_line = command_line
    result = run_reproduction(settings)
    log.emit("\n".join(f"  {row['verdict']:>45}  {row['table']}: {row['claim']}" for row in result["claims"]))
    log.emit(f"  {result['summary']}")
    logger.info(f"wrote {Path(settings.out) / 'REPRODUCTION.md'}")
    return 0
