"""`attnrhythm perturb`: the perturbation study of the paper's Table 1 (docs/method.md section 5).

For each problem: a greedy original response; FAI over it (global heads, analysis horizon
s < t <= N-1); the top-k and bottom-k positions by FAI; at each position the best few
alternatives to the original token under p(. | o_<i); each alternative forced and continued
greedily with the original's token budget; the content-word Jaccard overlap between the
perturbed and the original continuation (the tokens after position i).  If anchors steer the
reasoning, forcing a different token at a high-FAI position changes the rest more (lower Jaccard).

Speed (``generation.decode``): the original responses of ``--batch-size`` problems are decoded as one
left-padded batch; the continuations of one problem run as one batch sharing the KV cache of
prompt + original response, each row masked to its own prefix and positioned as in a fresh
sequence, so nothing of the prefix is recomputed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnrhythm import io, log, models
from attnrhythm.io import option
from attnrhythm.core.config import ANALYSIS_HORIZON, RhythmConfig, parse_layers
from attnrhythm.core.bootstrap import bootstrap_ci
from attnrhythm.core.textstats import content_jaccard
from attnrhythm.data import ProblemSettings
from attnrhythm.errors import UserError, check_device, check_fields
from attnrhythm.generation import (PROMPT_STYLES, check_prompt_fits, decode, encode_prompt, greedy_responses, prefill,
                                   problem_prompt, resolve_prompt_style, stop_strings_for, stop_token_ids, strip_stop,
                                   StopStrings)
from attnrhythm.studies.report import machine_info
from attnrhythm.studies.resume import check_resume

logger = log.get_logger(__name__)

PAPER_TABLE1 = dict(top=0.534, bottom=0.631, top_below_bottom=0.8714)
"""Li et al. (arXiv 2510.13554) Table 1, Qwen3-4B-Base, 70 GSM8K problems: mean Jaccard at the
top-FAI and bottom-FAI positions, and the share of problems where top < bottom."""
PREFIX_CHARS = 240
"""How much of the response before a perturbed position each trial keeps (for the HTML page)."""


# ---------------------------------------------------------------- choosing what to perturb

def select_positions(fai, k: int) -> tuple[list[int], list[int]]:
    """The k highest- and k lowest-FAI positions, in rank order.

    Positions with NaN FAI are left out; ties go to the earlier position.  *Decision*: the two
    sets never overlap and have the same size, min(k, n // 2) for n defined positions, so a short
    response gives fewer positions to both groups instead of the same positions to both.
    """
    fai = np.asarray(fai, dtype=np.float64)
    defined = np.flatnonzero(np.isfinite(fai))
    m = min(k, len(defined) // 2)
    top = defined[np.lexsort((defined, -fai[defined]))][:m].tolist()
    taken = set(top)
    rest = defined[np.lexsort((defined, fai[defined]))]
    bottom = [int(p) for p in rest if p not in taken][:m]
    return [int(p) for p in top], bottom


def alternatives(logits: Tensor, original: int, n: int, excluded: set[int]) -> list[int]:
    """The n most likely tokens other than ``original``.  *Decision*: special tokens (end of
    text among them) are excluded: forcing one ends or breaks the response, so there would be no
    continuation to compare."""
    order = torch.argsort(logits.float(), descending=True, stable=True)[: n + len(excluded) + 1].tolist()
    return [t for t in order if t != original and t not in excluded][:n]


# ---------------------------------------------------------------- one problem

def response_fai(model, prompt_ids: list[int], response_ids: list[int], config: RhythmConfig) -> np.ndarray:
    """FAI of each response token over the global heads ([n], NaN where undefined)."""
    from attnrhythm.capture import capture_statistics
    from attnrhythm.core.metrics import rhythm_from_stats

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids], device=device)
    response_mask = torch.arange(ids.shape[1], device=device)[None] >= len(prompt_ids)
    stats = capture_statistics(model, ids, config=config, entropy=False)
    return rhythm_from_stats(stats, response_mask, config)[0].fai.double().cpu().numpy()


def perturb_response(model, tokenizer, prompt_ids: list[int], response: list[int], *, k: int = 3,
                     n_alternatives: int = 3, max_new_tokens: int = 256, min_after: int = 10,
                     config: RhythmConfig | None = None,
                     stop_strings: StopStrings | None = None) -> tuple[dict, list[dict]]:
    """The protocol for one greedy ``response`` (its stop token stripped): (problem, trials).

    ``min_after`` (*Decision*): positions followed by fewer original tokens are not perturbed.
    With the horizon running to the end, the FAI of the last positions averages one or two rows
    and their continuations are a few tokens long, so they would crowd both groups with Jaccard
    values of 0 or 1 that say nothing about the reasoning.  0 is the literal protocol.
    ``stop_strings`` end the forced continuations as they ended the original (base-model prompts)."""
    config = config or RhythmConfig(fai_horizon=ANALYSIS_HORIZON)
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    fai = response_fai(model, prompt_ids, response, config) if len(response) > 1 else np.full(len(response), np.nan)
    eligible = fai.copy()
    eligible[max(0, len(response) - min_after):] = np.nan
    top, bottom = select_positions(eligible, k)
    positions, groups = top + bottom, ["top"] * len(top) + ["bottom"] * len(bottom)
    ranks = list(range(len(top))) + list(range(len(bottom)))
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    problem = dict(prompt_token_ids=prompt_ids, response_token_ids=response, response_text=text(response),
                   fai=[None if math.isnan(v) else float(v) for v in fai], top_positions=top,
                   bottom_positions=bottom)
    rows = []  # (group, rank, position, forced token, alternative rank, its probability)
    if positions:
        n_prompt = len(prompt_ids)
        ids = torch.tensor([prompt_ids + response], device=device)
        # the logits at P+i-1 are p(. | o_<i), the distribution that produced response token i
        cache, logits = prefill(model, ids, keep=torch.tensor([n_prompt + i - 1 for i in positions], device=device))
        excluded = set(tokenizer.all_special_ids) | stops
        for j, (group, rank, i) in enumerate(zip(groups, ranks, positions)):
            probs = torch.softmax(logits[0, j].float(), -1)
            for a, token in enumerate(alternatives(logits[0, j], response[i], n_alternatives, excluded)):
                rows.append((group, rank, i, token, a, float(probs[token])))
    trials: list[dict] = []
    if rows:
        cache.batch_repeat_interleave(len(rows))
        slots = torch.arange(ids.shape[1], device=device)[None]
        visible = slots < torch.tensor([n_prompt + r[2] for r in rows], device=device)[:, None]
        first = torch.tensor([r[3] for r in rows], device=device)
        # the original's budget: the perturbed response stays within max_new_tokens too
        budgets = [max_new_tokens - r[2] - 1 for r in rows]
        continuations = decode(model, cache, visible, first, budgets, stops, stop_strings=stop_strings)
        for (group, rank, i, token, a, prob), cont in zip(rows, continuations):
            original_text, perturbed_text = text(response[i + 1:]), text(strip_stop(cont, stops))
            trials.append(dict(
                group=group, rank=rank, position=i, fai=float(fai[i]),
                prefix_tail=text(response[:i])[-PREFIX_CHARS:],
                original_token_id=response[i], original_token=text([response[i]]),
                forced_token_id=token, forced_token=text([token]), alternative_rank=a, forced_prob=prob,
                perturbed_token_ids=cont,
                jaccard=content_jaccard(original_text, perturbed_text),
                original_continuation=original_text, perturbed_continuation=perturbed_text))
    for group in ("top", "bottom"):
        values = [t["jaccard"] for t in trials if t["group"] == group]
        problem[f"{group}_mean"] = float(np.mean(values)) if values else None
    problem["n_trials"] = len(trials)
    return problem, trials


# ---------------------------------------------------------------- aggregation over problems

def summarize(problems: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Table 1 over problems: each problem contributes the mean Jaccard of its top-FAI trials and
    of its bottom-FAI trials (problems lacking either are counted and left out).  Intervals are
    95% percentile bootstraps over problems, all from the same resamples (paired)."""
    pairs = [(p["top_mean"], p["bottom_mean"]) for p in problems
             if p.get("top_mean") is not None and p.get("bottom_mean") is not None]
    top, bottom = (np.array([x[c] for x in pairs], dtype=np.float64) for c in (0, 1))
    below = (top < bottom).astype(np.float64)
    nan = float("nan")
    mean = lambda x: float(x.mean()) if x.size else nan  # noqa: E731
    ci = lambda x: list(bootstrap_ci(x, n_boot=n_boot, seed=seed))  # noqa: E731
    return dict(
        n_problems=len(problems), n_compared=len(pairs), n_skipped=len(problems) - len(pairs),
        n_boot=n_boot, bootstrap_seed=seed,
        top=dict(mean=mean(top), ci=ci(top), paper=PAPER_TABLE1["top"]),
        bottom=dict(mean=mean(bottom), ci=ci(bottom), paper=PAPER_TABLE1["bottom"]),
        difference=dict(mean=mean(top - bottom), ci=ci(top - bottom),
                        paper=round(PAPER_TABLE1["top"] - PAPER_TABLE1["bottom"], 4),
                        note="paired per-problem mean Jaccard, top minus bottom"),
        top_below_bottom=dict(share=mean(below), ci=ci(below), paper=PAPER_TABLE1["top_below_bottom"],
                              n_ties=int((top == bottom).sum()), note="ties count as not below"),
    )


# ---------------------------------------------------------------- files

def read_records(path: Path) -> tuple[dict | None, list[dict], list[dict]]:
    """(settings, problems, trials) of a perturbations.jsonl (``io.read_jsonl``'s policy: a cut
    last line is skipped, a bad line elsewhere refused).  A problem counts only when its
    'problem' line (written last, in the same write as its trials) is there; the trials of an
    unfinished problem are dropped."""
    settings, problems, trials = None, [], []
    for record in io.read_jsonl(path):
        kind = record.get("type")
        if kind == "settings":
            settings = record["settings"]
        elif kind == "problem":
            problems.append(record)
        elif kind == "trial":
            trials.append(record)
    done = {p["problem_id"] for p in problems}
    return settings, problems, [t for t in trials if t["problem_id"] in done]


# ---------------------------------------------------------------- HTML page

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ccc;padding:6px;vertical-align:top}
td.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px;width:42%}
.prefix{color:#888}mark.orig{background:#cde}mark.forced{background:#fc9}
.top{color:#b30}.bottom{color:#06a}.q{background:#f6f6f6;padding:8px}"""


def render_html(problems: list[dict], trials: list[dict], summary: dict, settings: dict, n_show: int = 4) -> str:
    """A self-contained page: for the first ``n_show`` problems, every trial's original and
    perturbed continuation side by side, the changed position highlighted.  All model text is
    HTML-escaped."""
    from html import escape

    def side(trial, which):
        token = trial["original_token"] if which == "orig" else trial["forced_token"]
        rest = trial["original_continuation"] if which == "orig" else trial["perturbed_continuation"]
        return (f'<span class="prefix">…{escape(trial["prefix_tail"])}</span>'
                f'<mark class="{which}">{escape(token)}</mark>{escape(rest)}')

    fmt = lambda v: "n/a" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    top, bottom, below = summary["top"], summary["bottom"], summary["top_below_bottom"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Perturbation study</title>"
             f"<style>{_CSS}</style></head><body><h1>Perturbation study (paper Table 1)</h1>",
             f"<p>{escape(str(settings.get('model')))} on {escape(str(settings.get('data')))}, "
             f"{summary['n_compared']} problems. Mean content-word Jaccard: top-FAI {fmt(top['mean'])} "
             f"(paper {top['paper']}), bottom-FAI {fmt(bottom['mean'])} (paper {bottom['paper']}); "
             f"top &lt; bottom in {fmt(below['share'])} of problems (paper {below['paper']}).</p>",
             "<p>Blue: the original token; orange: the forced alternative. Grey: the response before it.</p>"]
    for problem in problems[:n_show]:
        pid = problem["problem_id"]
        parts.append(f"<h2>{escape(pid)}: top {fmt(problem.get('top_mean'))}, "
                     f"bottom {fmt(problem.get('bottom_mean'))}</h2>"
                     f"<p class='q'>{escape(problem.get('question', ''))}</p><table><tr><th>position</th>"
                     "<th>original continuation</th><th>perturbed continuation</th></tr>")
        for trial in (t for t in trials if t["problem_id"] == pid):
            parts.append(f"<tr><td><b class='{trial['group']}'>{trial['group']}-FAI #{trial['rank'] + 1}</b><br>"
                         f"token {trial['position']}<br>FAI {trial['fai']:.4f}<br>p(forced) {trial['forced_prob']:.3f}"
                         f"<br>Jaccard <b>{trial['jaccard']:.3f}</b></td><td class='text'>{side(trial, 'orig')}</td>"
                         f"<td class='text'>{side(trial, 'forced')}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(out: Path, settings: dict, n_show: int = 4) -> dict:
    """perturbation.json and perturbation.html from what perturbations.jsonl holds."""
    _, problems, trials = read_records(out / "perturbations.jsonl")
    summary = summarize(problems, settings["n_boot"], settings["seed"])
    seconds = [p["seconds"] for p in problems]
    result = dict(summary, settings=settings, machine=machine_info(),
                  seconds_per_problem=float(np.mean(seconds)) if seconds else None)
    io.write_json(out / "perturbation.json", result)
    io.write_text(out / "perturbation.html", render_html(problems, trials, summary, settings, n_show))
    return io.json_ready(result)


# ---------------------------------------------------------------- settings and the command

@dataclass
class PerturbSettings(ProblemSettings):
    """Everything a `perturb` run needs; ``study()`` is the part a resumed run must match."""

    out: str = option("runs/perturb", "output folder (perturbations.jsonl, perturbation.json, .html)")
    k: int = option(3, "top-k and bottom-k FAI positions per problem", at_least=1)
    alternatives: int = option(3, "forced alternatives per position", at_least=1)
    max_new_tokens: int = option(256, "token budget of every response", at_least=1)
    min_after: int = option(10, "skip positions followed by fewer original tokens (0: only undefined FAI is skipped)",
                         at_least=0)
    prompt: str = option("auto", "auto: chat template for instruct models (SmolLM2), the paper's prompt otherwise",
                         choices=PROMPT_STYLES)
    layers: str = option("middle", "layers whose heads give FAI: middle, bottom, top, all or a comma list")
    batch_size: int = option(8, "original responses decoded together", at_least=1)
    n_boot: int = option(2000, "bootstrap resamples over problems", at_least=1)
    html_problems: int = option(4, "problems shown in perturbation.html", at_least=0)
    device: str | None = option(None, "cpu or cuda (none: cuda when available)", check=check_device)
    dtype: str = option("auto", "model dtype (auto: bfloat16 on a GPU, float32 on a CPU)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    threads: int | None = option(None, "torch CPU threads (1 on a shared machine avoids threads spinning against "
                                 "each other; none: torch's default)", at_least=1)
    resume: bool = option(False, "continue the run in --out (same settings)")

    def study(self) -> dict:
        """What defines the study; a resumed run must match it."""
        return dict(model=self.model, data=self.data, n=self.n, seed=self.seed, k=self.k,
                    alternatives=self.alternatives, max_new_tokens=self.max_new_tokens, min_after=self.min_after,
                    prompt=self.prompt, layers=self.layers, fai_horizon=list(ANALYSIS_HORIZON), heads="global",
                    n_boot=self.n_boot, decoding="greedy", dtype=models.resolve_dtype(self.dtype, self.device))

    def validate(self) -> None:
        check_fields(self)  # types and the bounds declared above
        self.check_problem_count()
        parse_layers(self.layers)


def run_perturbation(settings: PerturbSettings, model=None, tokenizer=None) -> dict:
    """Run (or resume) the study in ``settings.out``; returns the perturbation.json content.
    ``model``/``tokenizer`` may be passed in to reuse a loaded model."""
    from attnrhythm.data import load_problems

    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    path = out / "perturbations.jsonl"
    study = settings.study()
    if model is not None:
        study["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    saved, problems_done, trials_done = read_records(path)
    check_resume("a perturbation study", out, saved, study, sorted(set(saved or {}) | set(study)),
                 resume=settings.resume)
    done = {p["problem_id"] for p in problems_done}
    problems = [p for p in load_problems(settings.data, settings.n, settings.seed) if p.id not in done]
    if problems and model is None:
        model, tokenizer = models.load_model(settings.model, dtype=study["dtype"], device=settings.device)
    # start from a clean file: settings, then each finished problem's trials and its line
    # (a killed run's unfinished problem leaves orphan trials at the end; they are dropped here)
    clean = [dict(type="settings", settings=study)]
    for problem in problems_done:
        clean += [t for t in trials_done if t["problem_id"] == problem["problem_id"]] + [problem]
    io.write_jsonl(path, clean)
    config = RhythmConfig(fai_horizon=ANALYSIS_HORIZON, layers=parse_layers(settings.layers))
    style = resolve_prompt_style(settings.prompt, tokenizer, settings.model) if problems else None
    stops = stop_token_ids(model, tokenizer) if problems else set()
    stop_strings = stop_strings_for(style, tokenizer) if problems else None
    logger.info(f"perturb: {len(done)} problems already done, {len(problems)} to go -> {out}")
    for start in range(0, len(problems), settings.batch_size):
        chunk = problems[start:start + settings.batch_size]
        started = time.perf_counter()
        prompts = [encode_prompt(tokenizer, problem_prompt(p, style)) for p in chunk]
        budget = min(check_prompt_fits(model, ids, settings.max_new_tokens, p.id) for ids, p in zip(prompts, chunk))
        responses = [strip_stop(r, stops) for r in greedy_responses(model, prompts, budget, stops, stop_strings)]
        shared = (time.perf_counter() - started) / len(chunk)  # the batched originals, split evenly
        for n, (problem, prompt_ids, response) in enumerate(zip(chunk, prompts, responses), start + 1):
            started = time.perf_counter()
            record, trials = perturb_response(model, tokenizer, prompt_ids, response, k=settings.k,
                                              n_alternatives=settings.alternatives, max_new_tokens=budget,
                                              min_after=settings.min_after, config=config,
                                              stop_strings=stop_strings)
            ids = dict(problem_id=problem.id)
            record = dict(type="problem", **ids, question=problem.question, gold=problem.gold, prompt_style=style,
                          **record, seconds=round(shared + time.perf_counter() - started, 3))
            io.append_jsonl(path, [dict(type="trial", **ids, **t) for t in trials] + [record])
            logger.info(f"  [{n}/{len(problems)}] {problem.id}: {len(response)} tokens, {len(trials)} trials, "
                        f"Jaccard top {_fmt(record['top_mean'])} bottom {_fmt(record['bottom_mean'])}, "
                        f"{record['seconds']:.1f} s")
    return write_outputs(out, study, settings.html_problems)


def _fmt(v) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"


SETTINGS = PerturbSettings


def command(settings: PerturbSettings, command_line: str | None = None) -> int:
    result = run_perturbation(settings)
    top, bottom, below = result["top"], result["bottom"], result["top_below_bottom"]
    ci = lambda c: f"[{_fmt(c[0])}, {_fmt(c[1])}]"  # noqa: E731
    log.emit(f"mean Jaccard top-FAI {_fmt(top['mean'])} {ci(top['ci'])} (paper {top['paper']}), bottom-FAI "
             f"{_fmt(bottom['mean'])} {ci(bottom['ci'])} (paper {bottom['paper']}); top < bottom in "
             f"{_fmt(below['share'])} {ci(below['ci'])} of problems (paper {below['paper']}); "
             f"{_fmt(result['seconds_per_problem'])} s per problem; wrote {Path(settings.out) / 'perturbation.json'}")
    return 0
