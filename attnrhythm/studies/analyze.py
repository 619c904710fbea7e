"""`attnrhythm analyze`: sample responses to real problems, capture attention in one extra forward
pass per batch of responses, and write the paper's analysis (docs/method.md sections 2, 3 and 5).

Pipeline (the Python API is what the CLI runs):

1. :func:`analyze` yields one record per response: generation (``generation.py``), then
   ``capture_statistics`` + ``rhythm_from_stats`` over the batch (:func:`capture_records`).
2. :func:`finalize` calibrates the receiver heads on **all responses of the run** (kurtosis of
   the vertical scores averaged over them, docs/method.md section 2), fills ``fai_receiver``, and
   computes the Table 2 couplings.  Per-head FAI of this process's responses is kept in memory;
   responses reused by ``--resume`` are recaptured from their stored token ids.
3. :func:`run_analysis` drives both with ``metrics.jsonl`` appended and flushed per response, then
   writes ``couplings.json``/``couplings.md``, figures and ``report.html`` (``report.py``); a run
   that fails records ``"status": "failed"`` and the error in ``run.json``.
4. :func:`run_analysis_command` (``AnalyzeSettings`` -> run.json) is the `analyze` command: it
   checks the settings, loads the problems, then the model, then runs.

Defaults: the FAI horizon is the paper appendix's analysis horizon (every later token,
``config.ANALYSIS_HORIZON``); head sets are per response; entropy at temperature 1.

``metrics.jsonl``, one object per response: ``id question gold prompt_style prompt response
correct finish_reason prompt_token_ids response_token_ids tokens layers``, per-token lists
``waad delta fai fai_receiver entropy`` (null = undefined), ``fai_rows`` (how many rows each FAI
value averages: few near the end of a response), ``local_heads global_heads
receiver_heads`` ([model layer, head]), ``head_distance`` ([L][H], L = the sampled ``layers``),
``receiver_layers`` and ``receiver_kurtosis`` ([R][H] over those layers: all of the model's by
default, ``RhythmConfig.receiver_layers``) and ``couplings`` (this response's Table 2 statistics).  Undefined values:
FAI is null where no later row exists (the last token; every token of a response shorter than
the horizon start); an empty response keeps its record with empty lists and no head sets and
is left out of calibration and couplings.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attnrhythm import io, log
from attnrhythm.capture import BACKENDS, capture_statistics, check_backend_memory, resolve_layers
from attnrhythm.core.config import ANALYSIS_HORIZON, RhythmConfig, parse_horizon, parse_layers
from attnrhythm.core.couplings import couplings_markdown, couplings_table, response_couplings
from attnrhythm.core.heads import mask_to_heads, select_receiver_heads
from attnrhythm.core.metrics import fai_row_counts, per_head_fai, receiver_kurtosis, rhythm_from_stats
from attnrhythm.data import Problem, ProblemSettings
from attnrhythm.io import option
from attnrhythm.errors import UserError
from attnrhythm.generation import (PROMPT_STYLES, check_prompt_fits, encode_prompt, problem_prompt, prompt_text,
                                   resolve_prompt_style, row_seed, sample_responses, stop_strings_for, token_strings)
from attnrhythm.studies.report import machine_info, write_report

logger = log.get_logger(__name__)
ANALYSIS_CONFIG = RhythmConfig(fai_horizon=ANALYSIS_HORIZON)
OUTPUTS = ("metrics.jsonl", "run.json", "couplings.json", "couplings.md", "report.html",
           "figures/attention_maps.png", "figures/rhythm_curves.png")


@dataclass
class AnalyzeSettings(ProblemSettings):
    """Everything an `analyze` run needs (stored in run.json; ``config()`` gives its RhythmConfig)."""

    prompt: str = option("auto", "auto: chat template for instruct models (SmolLM2), the paper's plain prompt "
                         "otherwise", choices=PROMPT_STYLES)
    max_new_tokens: int = option(384, "tokens per response at most")
    temperature: float = option(0.7, "sampling temperature (paper: 0.7; 0 = greedy)")
    batch_size: int = option(8, "responses generated and captured together")
    backend: str = option("streaming", "streaming: statistics in blocks of rows, memory linear in the length; "
                          "eager: HF output_attentions (the reference)", choices=BACKENDS)
    n_boot: int = option(2000, "bootstrap resamples for the 95% intervals")
    figure_response: str | None = option(None, "problem id of the response drawn in the figures (none: the "
                                         "longest complete response)")
    out: str = option("runs/analyze", "output folder")
    layers: str = option("middle", "sampled layers: middle, bottom, top, all, or a comma list")
    fai_horizon: str = option("analysis", "FAI rows: analysis (every later token), rl (10,100), v1 (10,50) or "
                              "LO,HI (LO, = to the end)")
    receiver_heads: int = option(RhythmConfig.n_receiver_heads, "receiver heads kept")
    receiver_layers: str = option(RhythmConfig.receiver_layers, "rank receiver heads over every layer (the "
                                  "paper's choice) or only the sampled --layers", choices=("all", "sampled"))
    device: str | None = option(None, "cuda, cpu, ... (none: cuda when available)")
    dtype: str = option("auto", "model dtype (auto: bfloat16 on a GPU, float32 on a CPU)",
                        choices=("auto", "float32", "bfloat16", "float16"))
    resume: bool = option(False, "continue a partial run in --out, skipping finished problems")
    overwrite: bool = option(False, "replace an existing analysis in --out")
    progress: bool = option(True, "show a progress bar (one step per generated token)")

    # settings that change what a response is: a resumed run must match them
    RESUME_KEYS = ("model", "data", "n", "seed", "prompt", "max_new_tokens", "temperature")

    def config(self) -> RhythmConfig:
        return ANALYSIS_CONFIG.replace(layers=parse_layers(self.layers), fai_horizon=parse_horizon(self.fai_horizon),
                                       n_receiver_heads=self.receiver_heads, receiver_layers=self.receiver_layers)

    def validate(self) -> None:
        """Refuse what cannot give a result, warn about what gives an unreliable one; before
        anything is loaded."""
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.n_boot < 1:
            raise UserError("--batch-size, --max-new-tokens and --n-boot must be at least 1")
        self.check_problem_count()
        self.config()


def _empty_metrics(layers: list[int], receiver_layers: list[int]) -> dict:
    """An empty response: no series, no head sets (every metric is undefined)."""
    return dict(layers=layers, waad=[], delta=[], fai=[], fai_rows=[], entropy=[], local_heads=[], global_heads=[],
                head_distance=None, receiver_layers=receiver_layers, receiver_kurtosis=None,
                _head_fai=np.zeros((0, 0, 0), np.float32))


def receiver_layers_of(model, config: RhythmConfig) -> list[int]:
    """The model layers receiver heads are ranked in (``config.receiver_layers``)."""
    return resolve_layers(model, config, "all" if config.receiver_layers == "all" else None)


def _receiver_slots(record: dict) -> list[int]:
    """Layers behind a record's ``receiver_kurtosis`` and ``_head_fai`` (older records: the sampled ones)."""
    return record.get("receiver_layers") or record["layers"]


def capture_records(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                    config: RhythmConfig = ANALYSIS_CONFIG, backend: str = "streaming") -> list[dict]:
    """Metrics of B responses from one capture pass over the right-padded batch.

    Returns B dicts: ``layers`` (the sampled model layers), series ``waad``/``delta``/``fai``/
    ``entropy`` (lists, None = undefined), ``local_heads``/``global_heads`` ([model layer, head]
    pairs), ``head_distance`` ([L][H]), ``receiver_layers`` (the layers receiver heads are ranked
    in: every layer, or the sampled ones, ``config.receiver_layers``), ``receiver_kurtosis``
    ([R][H] over those) and ``_head_fai`` ([R, H, T] array).  One capture serves both: the sampled
    layers' statistics are a slice of the all-layer capture.
    """
    layers = resolve_layers(model, config)
    receiver_layers = receiver_layers_of(model, config)
    out = [_empty_metrics(layers, receiver_layers) for _ in prompt_ids]
    live = [i for i, r in enumerate(response_ids) if r]
    if not live:
        return out
    seqs = [prompt_ids[i] + response_ids[i] for i in live]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for j, i in enumerate(live):
        input_ids[j, :len(seqs[j])] = torch.tensor(seqs[j])
        attention_mask[j, :len(seqs[j])] = 1
        response_mask[j, len(prompt_ids[i]):len(seqs[j])] = True
    device = next(model.parameters()).device
    captured = sorted(set(layers) | set(receiver_layers))
    all_stats = capture_statistics(model, input_ids.to(device), attention_mask.to(device), config=config,
                                   layers=captured, backend=backend).to("cpu")
    stats, receiver_stats = all_stats.subset(layers), all_stats.subset(receiver_layers)
    result = rhythm_from_stats(stats, response_mask, config)
    kurt = receiver_kurtosis(receiver_stats, response_mask, config.receiver_gap)
    head_fai = per_head_fai(receiver_stats, result.positions, result.mask, config.fai_horizon)
    rows_behind = fai_row_counts(stats, result.positions, result.mask, config.fai_horizon)
    for j, i in enumerate(live):
        r, n = result[j], len(response_ids[i])
        out[i] = dict(
            layers=layers, waad=io.float_list(r.waad), delta=io.float_list(r.delta), fai=io.float_list(r.fai),
            fai_rows=rows_behind[j, :n].tolist(),
            entropy=io.float_list(r.entropy),
            local_heads=[[layers[s], h] for s, h in r.local_heads],
            global_heads=[[layers[s], h] for s, h in r.global_heads],
            head_distance=[io.float_list(row) for row in r.head_distance],
            receiver_layers=receiver_layers,
            receiver_kurtosis=[io.float_list(row) for row in kurt[j]],
            _head_fai=head_fai[j, :, :, :n].numpy())
    return out


def _score(response: str, gold: str) -> float | None:
    import importlib.util
    if importlib.util.find_spec("math_verify") is None:
        return None  # scoring is optional: without math-verify, correctness is not reported
    from attnrhythm.tasks.math import score_math
    return score_math(response, gold)


def analyze(model, tokenizer, problems: list[Problem], config: RhythmConfig = ANALYSIS_CONFIG, *,
            prompt: str = "auto", max_new_tokens: int = 384, temperature: float = 0.7, batch_size: int = 8,
            seed: int = 0, backend: str = "streaming", model_name: str = "", progress: bool = False):
    """Yield one record (a JSON-ready dict, plus the array ``_head_fai``) per problem, in order.

    Every prompt is checked against the model's context, and the eager backend's memory against
    the longest sequence, before anything is generated.  Each response is sampled from its own
    generator (``generation.row_seed(seed, problem id)``): it depends on the seed and the problem,
    not on the batch size.  Empty responses give records with empty series.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError("batch_size and max_new_tokens must be >= 1")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise UserError("problem ids must be unique (resume and the report key responses by id)")
    style = resolve_prompt_style(prompt, tokenizer, model_name)
    resolve_layers(model, config)  # a bad layer spec fails before any generation
    prompts = [prompt_text(tokenizer, problem_prompt(p, style)) for p in problems]
    prompt_ids = [encode_prompt(tokenizer, problem_prompt(p, style)) for p in problems]
    budgets = [check_prompt_fits(model, p, max_new_tokens, f"the prompt of problem {q.id!r}")
               for p, q in zip(prompt_ids, problems)]
    if problems:
        check_backend_memory(model, backend, min(batch_size, len(problems)),
                             max(len(p) + b for p, b in zip(prompt_ids, budgets)))
    stop_strings = stop_strings_for(style, tokenizer)
    # one step per generated token; a response that stops early skips the rest of its budget
    bar = tqdm(total=sum(budgets), unit="tok", desc="analyze", disable=not progress)
    try:
        for start in range(0, len(problems), batch_size):
            chunk = list(range(start, min(len(problems), start + batch_size)))
            sampled = sample_responses(model, tokenizer, [prompt_ids[i] for i in chunk],
                                       max_new_tokens=[budgets[i] for i in chunk], temperature=temperature,
                                       seeds=[row_seed(seed, ids[i]) for i in chunk], on_tokens=bar.update,
                                       stop_strings=stop_strings)
            bar.update(sum(budgets[:chunk[-1] + 1]) - bar.n)  # the chunk's unused budget
            metrics = capture_records(model, [prompt_ids[i] for i in chunk], [s.token_ids for s in sampled],
                                      config, backend)
            for i, s, m in zip(chunk, sampled, metrics):
                response = tokenizer.decode(s.token_ids, skip_special_tokens=True)
                yield dict(id=problems[i].id, question=problems[i].question, gold=problems[i].gold,
                           prompt_style=style, prompt=prompts[i], response=response,
                           correct=_score(response, problems[i].gold), finish_reason=s.finish_reason,
                           prompt_token_ids=prompt_ids[i], response_token_ids=s.token_ids,
                           tokens=token_strings(tokenizer, s.token_ids), **m,
                           fai_receiver=None, receiver_heads=None)
    finally:
        bar.close()


def calibrate_receivers(records: list[dict], count: int) -> list[list[int]]:
    """Receiver heads from the mean kurtosis over ``records`` (responses without a defined
    kurtosis are left out); [model layer, head] pairs, [] when no kurtosis is defined."""
    usable = [r for r in records if r.get("receiver_kurtosis") is not None]
    if not usable:
        return []
    layers = _receiver_slots(usable[0])
    if any(_receiver_slots(r) != layers for r in usable):
        raise UserError("the stored responses rank receiver heads over other layers than this run "
                        "(--receiver-layers changed?): resume with the old setting or pass --overwrite")
    kurt = torch.stack([torch.stack([io.float_series(row) for row in r["receiver_kurtosis"]]) for r in usable])
    finite_heads = int(torch.isfinite(kurt).any(0).sum())
    if finite_heads == 0:
        return []
    mask = select_receiver_heads(kurt, min(count, finite_heads))
    return [[layers[s], h] for s, h in mask_to_heads(mask)]


def fill_receiver_fai(record: dict, receivers: list[list[int]], head_fai: np.ndarray) -> None:
    """Set ``fai_receiver`` (mean per-head FAI over the receiver heads) and ``receiver_heads``."""
    record["receiver_heads"] = receivers
    if not record["response_token_ids"] or not receivers:
        record["fai_receiver"] = [None] * len(record["response_token_ids"])
        return
    slots = [_receiver_slots(record).index(layer) for layer, _ in receivers]
    heads = [h for _, h in receivers]
    record["fai_receiver"] = io.float_list(torch.from_numpy(head_fai[slots, heads]).double().mean(0))


def recapture_head_fai(model, records: list[dict], config: RhythmConfig = ANALYSIS_CONFIG,
                       backend: str = "streaming", batch_size: int = 8, progress: bool = False) -> dict:
    """{id: per-head FAI [L, H, T]} recaptured from the records' stored token ids."""
    out = {}
    for start in tqdm(range(0, len(records), batch_size), desc="recapture", disable=not progress):
        chunk = records[start:start + batch_size]
        metrics = capture_records(model, [r["prompt_token_ids"] for r in chunk],
                                  [r["response_token_ids"] for r in chunk], config, backend)
        out.update({r["id"]: m["_head_fai"] for r, m in zip(chunk, metrics)})
    return out


def record_couplings(record: dict, config: RhythmConfig = ANALYSIS_CONFIG) -> dict:
    """Table 2 statistics of one response: {name: {"observed": float|None, "random": ...}}."""
    if not record["response_token_ids"]:
        return {}
    series = lambda key: None if record.get(key) is None else io.float_series(record[key])[None]  # noqa: E731
    stats = response_couplings(series("waad"), series("fai"), None, entropy=series("entropy"),
                               fai_receiver=series("fai_receiver"), config=config)
    return {name: {k: io.float_list(v)[0] for k, v in pair.items()} for name, pair in stats.items()}


def finalize(model, records: list[dict], head_fai: dict, config: RhythmConfig = ANALYSIS_CONFIG, *,
             backend: str = "streaming", batch_size: int = 8, n_boot: int = 2000, seed: int = 0,
             progress: bool = False) -> tuple[list[list[int]], dict]:
    """Calibrate receiver heads on all ``records``, fill ``fai_receiver`` and per-response
    ``couplings`` in place, and aggregate Table 2.  ``head_fai`` ({id: [L, H, T]}) covers the
    responses of this process; the others are recaptured unless their stored receiver series
    already uses the same heads.  Returns (receiver heads, couplings table)."""
    receivers = calibrate_receivers(records, config.n_receiver_heads)
    stale = [r for r in records if r["id"] not in head_fai and r["response_token_ids"]
             and (r.get("receiver_heads") != receivers or r.get("fai_receiver") is None)]
    if stale:
        if model is None:
            raise ValueError(f"{len(stale)} responses need recapturing for their receiver-head FAI; pass the model")
        head_fai = {**head_fai, **recapture_head_fai(model, stale, config, backend, batch_size, progress)}
    for r in records:
        if r["id"] in head_fai or not r["response_token_ids"]:
            fill_receiver_fai(r, receivers, head_fai.get(r["id"]))
        r["couplings"] = record_couplings(r, config)
    per_response = [{name: {k: [math.nan if v is None else v] for k, v in pair.items()}
                     for name, pair in r["couplings"].items()} for r in records if r["couplings"]]
    return receivers, couplings_table(per_response, n_boot=n_boot, seed=seed)


def run_analysis(model, tokenizer, problems: list[Problem], out_dir, settings: AnalyzeSettings = AnalyzeSettings(),
                 config: RhythmConfig = ANALYSIS_CONFIG, *, resume: bool | None = None, overwrite: bool | None = None,
                 progress: bool | None = None, command: str | None = None) -> dict:
    """The whole `analyze` job into ``out_dir``; returns the final run.json content.
    ``resume``/``overwrite``/``progress`` default to the settings' values.  A run that fails
    records ``"status": "failed"`` and the error in run.json, then raises."""
    resume = settings.resume if resume is None else resume
    overwrite = settings.overwrite if overwrite is None else overwrite
    progress = settings.progress if progress is None else progress
    out = Path(out_dir)
    metrics_path, run_path = out / "metrics.jsonl", out / "run.json"
    if metrics_path.exists() and not (resume or overwrite):
        raise UserError(f"{out} already holds an analysis; pass --resume to continue it or --overwrite to replace it")
    if overwrite and not resume:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    style = resolve_prompt_style(settings.prompt, tokenizer, settings.model)
    run = dict(settings=asdict(settings), config=config.to_dict(), prompt_style=style,
               layers=resolve_layers(model, config), command=command, machine=machine_info(model),
               receiver_calibration="all non-empty responses of this run (kurtosis averaged over them)",
               receiver_layers=receiver_layers_of(model, config),
               started=datetime.now(timezone.utc).isoformat(timespec="seconds"), status="running")
    done: list[dict] = []
    if resume and metrics_path.exists():
        previous = io.read_json(run_path) if run_path.exists() else {}
        _check_resumable(previous, run)
        done = io.read_jsonl(metrics_path, repair=True)
    io.write_json(run_path, run)
    try:
        return _run(model, tokenizer, problems, out, settings, config, run, done, progress, command)
    except BaseException as err:
        run.update(status="failed" if not isinstance(err, KeyboardInterrupt) else "interrupted",
                   error=f"{type(err).__name__}: {err}", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        io.write_json(run_path, run)
        raise


def _run(model, tokenizer, problems, out, settings, config, run, done, progress, command) -> dict:
    from attnrhythm.studies.figures import choose_figure_record, write_figures

    metrics_path, run_path = out / "metrics.jsonl", out / "run.json"
    wanted = {p.id for p in problems}
    done = [r for r in done if r["id"] in wanted]
    todo = [p for p in problems if p.id not in {r["id"] for r in done}]
    head_fai, new = {}, []
    for record in analyze(model, tokenizer, todo, config, prompt=settings.prompt,
                          max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                          batch_size=settings.batch_size, seed=settings.seed, backend=settings.backend,
                          model_name=settings.model, progress=progress):
        head_fai[record["id"]] = record.pop("_head_fai")
        io.append_jsonl(metrics_path, [record])  # a crash keeps every finished response
        new.append(record)

    order = {p.id: i for i, p in enumerate(problems)}
    records = sorted(done + new, key=lambda r: order[r["id"]])
    receivers, table = finalize(model, records, head_fai, config, backend=settings.backend,
                                batch_size=settings.batch_size, n_boot=settings.n_boot, seed=settings.seed,
                                progress=progress)
    io.write_jsonl(metrics_path, records)
    meta = {"model": settings.model, "data": settings.data, "problems": len(records), "seed": settings.seed,
            "prompt": run["prompt_style"], "command": command or "(python API)"}
    io.write_json(out / "couplings.json", dict(meta=meta, table=table))
    io.write_text(out / "couplings.md", couplings_markdown(table, meta))
    figure_record = choose_figure_record(records, settings.figure_response)
    run["figure_response"] = figure_record["id"] if figure_record else None
    run["figures"] = write_figures(model, figure_record, out / "figures", config) if figure_record else {}
    run.update(status="complete", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               receiver_heads=receivers, n_responses=len(records),
               n_empty=sum(not r["response_token_ids"] for r in records),
               accuracy=_mean([r["correct"] for r in records if r.get("correct") is not None]))
    io.write_json(run_path, run)
    write_report(out)
    return run


def _mean(values):
    return sum(values) / len(values) if values else None


def _check_resumable(previous: dict, current: dict) -> None:
    if not previous:
        raise UserError("cannot resume: run.json is missing, so the settings of the partial run are unknown")
    diffs = [f"{key}: {previous['settings'].get(key)!r} -> {current['settings'][key]!r}"
             for key in AnalyzeSettings.RESUME_KEYS if previous["settings"].get(key) != current["settings"][key]]
    if previous.get("config") != current["config"]:
        diffs.append("the RhythmConfig differs")
    if diffs:
        raise UserError("cannot resume a run with different settings (" + "; ".join(diffs) +
                        "); use another --out or --overwrite")


# ------------------------------------------------------------------ command
SETTINGS = AnalyzeSettings


def run_analysis_command(settings: AnalyzeSettings, command: str | None = None, model=None, tokenizer=None) -> dict:
    """`attnrhythm analyze` from Python: validates everything, loads the problems, then the model
    (unless given), and runs; returns run.json's content."""
    from attnrhythm import models
    from attnrhythm.capture import check_backend
    from attnrhythm.data import load_problems

    settings.validate()
    check_backend(settings.backend)
    problems = load_problems(settings.data, settings.n, settings.seed)
    if model is None:
        model, tokenizer = models.load_model(settings.model, dtype=settings.dtype, device=settings.device)
    return run_analysis(model, tokenizer, problems, settings.out, settings, settings.config(), command=command)


def command(settings: AnalyzeSettings, command_line: str | None = None) -> int:
    run_info = run_analysis_command(settings, command_line)
    logger.info(f"{run_info['n_responses']} responses analysed; report: {Path(settings.out) / 'report.html'}")
    log.emit((Path(settings.out) / "couplings.md").read_text())
    return 0
