"""`attnrhythm analyze`: sample responses to real problems, capture attention in one extra forward
pass per batch of responses, and write the paper's analysis (METHOD.md sections 2, 3 and 5).

Pipeline (the Python API is what the CLI runs):

1. :func:`analyze` yields one record per response: generation (``generation.py``), then
   ``capture_statistics`` + ``rhythm_from_stats`` over the batch (:func:`capture_records`).
2. :func:`finalize` calibrates the receiver heads on **all responses of the run** (kurtosis of
   the vertical scores averaged over them, METHOD.md section 2), fills ``fai_receiver``, and
   computes the Table 2 couplings.  Per-head FAI of this process's responses is kept in memory;
   responses reused by ``--resume`` are recaptured from their stored token ids.
3. :func:`run_analysis` drives both with ``metrics.jsonl`` appended and flushed per response, then
   writes ``couplings.json``/``couplings.md``, figures and ``report.html`` (``report.py``).

Defaults: the FAI horizon is the paper appendix's analysis horizon (every later token,
``config.ANALYSIS_HORIZON``); head sets are per response; entropy at temperature 1.

``metrics.jsonl``, one object per response: ``id question gold prompt_style prompt response
correct finish_reason prompt_token_ids response_token_ids tokens layers``, per-token lists
``waad delta fai fai_receiver entropy`` (null = undefined), ``local_heads global_heads
receiver_heads`` ([model layer, head]), ``head_distance receiver_kurtosis`` ([L][H], L = the
sampled ``layers``) and ``couplings`` (this response's Table 2 statistics).  Undefined values:
FAI is null where no later row exists (the last token; every token of a response shorter than
the horizon start); an empty response keeps its record with empty lists and no head sets and
is left out of calibration and couplings.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attnrhythm.capture import BACKENDS, capture_statistics, resolve_layers
from attnrhythm.core.config import ANALYSIS_HORIZON, RhythmConfig
from attnrhythm.core.couplings import couplings_markdown, couplings_table, response_couplings
from attnrhythm.data import Problem
from attnrhythm.generation import (PROMPT_STYLES, batch_seed, check_prompt_fits, encode_prompt, prompt_text,
                         resolve_prompt_style, sample_responses, token_strings)
from attnrhythm.core.heads import mask_to_heads, select_receiver_heads
from attnrhythm.core.metrics import future_column_sums, receiver_kurtosis, rhythm_from_stats
from attnrhythm.studies.report import atomic_write_text, machine_info, read_jsonl, to_json, write_report

ANALYSIS_CONFIG = RhythmConfig(fai_horizon=ANALYSIS_HORIZON)
OUTPUTS = ("metrics.jsonl", "run.json", "couplings.json", "couplings.md", "report.html",
           "figures/attention_maps.png", "figures/rhythm_curves.png")


@dataclass
class AnalyzeSettings:
    """Run-level settings (stored in run.json; ``RhythmConfig`` holds the method's constants)."""

    model: str = "smollm2-135m"
    data: str = "gsm8k"
    n: int = 70
    seed: int = 0
    prompt: str = "auto"
    max_new_tokens: int = 384
    temperature: float = 0.7
    batch_size: int = 8
    backend: str = "streaming"
    n_boot: int = 2000
    figure_response: str | None = None
    """Problem id of the response drawn in the figures (None: ``figures.choose_figure_record``)."""

    # settings that change what a response is: a resumed run must match them
    RESUME_KEYS = ("model", "data", "n", "seed", "prompt", "max_new_tokens", "temperature")


def _floats(x) -> list:
    """A float series as JSON-ready list: NaN -> None; 9 significant digits round-trip float32."""
    return [None if not math.isfinite(v) else float(f"{v:.9g}") for v in torch.as_tensor(x).double().tolist()]


def _series(values, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=dtype)


def per_head_fai(stats, positions: torch.Tensor, mask: torch.Tensor, horizon) -> torch.Tensor:
    """FAI of every single head: [B, L, H, T], NaN where T(s) is empty or at padding.  FAI is
    linear in A with per-position counts shared by all heads, so the FAI of a head set's mean
    map is the mean of these over the set (how ``fai_receiver`` is formed after calibration)."""
    sums, counts = future_column_sums(stats.band, stats.col_sum, stats.valid, *horizon)
    fai = sums / counts[:, None, None].clamp(min=1)
    fai = torch.where(counts[:, None, None] > 0, fai, torch.full_like(fai, math.nan))
    batch, n_layers, n_heads, _ = fai.shape
    out = fai.gather(-1, positions[:, None, None].expand(batch, n_layers, n_heads, -1))
    return torch.where(mask[:, None, None], out, torch.full_like(out, math.nan))


def _empty_metrics(layers: list[int]) -> dict:
    """An empty response: no series, no head sets (every metric is undefined)."""
    return dict(layers=layers, waad=[], delta=[], fai=[], entropy=[], local_heads=[], global_heads=[],
                head_distance=None, receiver_kurtosis=None, _head_fai=np.zeros((0, 0, 0), np.float32))


def capture_records(model, prompt_ids: list[list[int]], response_ids: list[list[int]],
                    config: RhythmConfig = ANALYSIS_CONFIG, backend: str = "streaming") -> list[dict]:
    """Metrics of B responses from one capture pass over the right-padded batch.

    Returns B dicts: ``layers`` (model layer indices), series ``waad``/``delta``/``fai``/``entropy``
    (lists, None = undefined), ``local_heads``/``global_heads`` ([model layer, head] pairs),
    ``head_distance`` and ``receiver_kurtosis`` ([L][H]), and ``_head_fai`` ([L, H, T] array).
    """
    layers = resolve_layers(model, config)
    out = [_empty_metrics(layers) for _ in prompt_ids]
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
    stats = capture_statistics(model, input_ids.to(device), attention_mask.to(device), config=config,
                               layers=layers, backend=backend).to("cpu")
    result = rhythm_from_stats(stats, response_mask, config)
    kurt = receiver_kurtosis(stats, response_mask, config.receiver_gap)
    head_fai = per_head_fai(stats, result.positions, result.mask, config.fai_horizon)
    for j, i in enumerate(live):
        r, n = result[j], len(response_ids[i])
        out[i] = dict(
            layers=layers, waad=_floats(r.waad), delta=_floats(r.delta), fai=_floats(r.fai),
            entropy=_floats(r.entropy),
            local_heads=[[layers[s], h] for s, h in r.local_heads],
            global_heads=[[layers[s], h] for s, h in r.global_heads],
            head_distance=[_floats(row) for row in r.head_distance],
            receiver_kurtosis=[_floats(row) for row in kurt[j]],
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

    Every prompt is checked against the model's context before anything is generated; a
    prompt that fills it raises ValueError.  Empty responses give records with empty series.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids must be unique (resume and the report key responses by id)")
    style = resolve_prompt_style(prompt, tokenizer, model_name)
    resolve_layers(model, config)  # a bad layer spec fails before any generation
    prompts = [prompt_text(p, tokenizer, style) for p in problems]
    prompt_ids = [encode_prompt(tokenizer, t, style) for t in prompts]
    budgets = [check_prompt_fits(model, p, max_new_tokens, f"the prompt of problem {q.id!r}")
               for p, q in zip(prompt_ids, problems)]
    bar = tqdm(total=len(problems), unit="response", desc="analyze", disable=not progress)
    try:
        for start in range(0, len(problems), batch_size):
            chunk = list(range(start, min(len(problems), start + batch_size)))
            sampled = sample_responses(model, tokenizer, [prompt_ids[i] for i in chunk],
                                       max_new_tokens=min(budgets[i] for i in chunk), temperature=temperature,
                                       seed=batch_seed(seed, [ids[i] for i in chunk]))
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
                bar.update(1)
    finally:
        bar.close()


def calibrate_receivers(records: list[dict], count: int) -> list[list[int]]:
    """Receiver heads from the mean kurtosis over ``records`` (responses without a defined
    kurtosis are left out); [model layer, head] pairs, [] when no kurtosis is defined."""
    usable = [r for r in records if r.get("receiver_kurtosis") is not None]
    if not usable:
        return []
    layers = usable[0]["layers"]
    kurt = torch.stack([torch.stack([_series(row) for row in r["receiver_kurtosis"]]) for r in usable])
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
    slots = [record["layers"].index(layer) for layer, _ in receivers]
    heads = [h for _, h in receivers]
    record["fai_receiver"] = _floats(torch.from_numpy(head_fai[slots, heads]).double().mean(0))


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
    series = lambda key: None if record.get(key) is None else _series(record[key])[None]  # noqa: E731
    stats = response_couplings(series("waad"), series("fai"), None, entropy=series("entropy"),
                               fai_receiver=series("fai_receiver"), config=config)
    return {name: {k: _floats(v)[0] for k, v in pair.items()} for name, pair in stats.items()}


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
                 config: RhythmConfig = ANALYSIS_CONFIG, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, command: str | None = None) -> dict:
    """The whole `analyze` job into ``out_dir``; returns the final run.json content."""
    from attnrhythm.studies.figures import choose_figure_record, write_figures

    out = Path(out_dir)
    metrics_path, run_path = out / "metrics.jsonl", out / "run.json"
    if metrics_path.exists() and not (resume or overwrite):
        raise ValueError(f"{out} already holds an analysis; pass --resume to continue it or --overwrite to replace it")
    if overwrite and not resume:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    style = resolve_prompt_style(settings.prompt, tokenizer, settings.model)
    run = dict(settings=asdict(settings), config=config.to_dict(), prompt_style=style,
               layers=resolve_layers(model, config), command=command, machine=machine_info(model),
               receiver_calibration="all non-empty responses of this run (kurtosis averaged over them)",
               started=datetime.now(timezone.utc).isoformat(timespec="seconds"), status="running")
    done: list[dict] = []
    if resume and metrics_path.exists():
        previous = json.loads(run_path.read_text()) if run_path.exists() else {}
        _check_resumable(previous, run)
        done = read_jsonl(metrics_path, repair=True)
    atomic_write_text(run_path, to_json(run))

    wanted = {p.id for p in problems}
    done = [r for r in done if r["id"] in wanted]
    todo = [p for p in problems if p.id not in {r["id"] for r in done}]
    head_fai, new = {}, []
    with metrics_path.open("a", encoding="utf-8") as f:
        for record in analyze(model, tokenizer, todo, config, prompt=settings.prompt,
                              max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                              batch_size=settings.batch_size, seed=settings.seed, backend=settings.backend,
                              model_name=settings.model, progress=progress):
            head_fai[record["id"]] = record.pop("_head_fai")
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()  # a crash keeps every finished response
            new.append(record)

    order = {p.id: i for i, p in enumerate(problems)}
    records = sorted(done + new, key=lambda r: order[r["id"]])
    receivers, table = finalize(model, records, head_fai, config, backend=settings.backend,
                                batch_size=settings.batch_size, n_boot=settings.n_boot, seed=settings.seed,
                                progress=progress)
    atomic_write_text(metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    meta = {"model": settings.model, "data": settings.data, "problems": len(records), "seed": settings.seed,
            "prompt": style, "command": command or "(python API)"}
    atomic_write_text(out / "couplings.json", to_json(dict(meta=meta, table=table)))
    atomic_write_text(out / "couplings.md", couplings_markdown(table, meta))
    figure_record = choose_figure_record(records, settings.figure_response)
    run["figure_response"] = figure_record["id"] if figure_record else None
    run["figures"] = write_figures(model, figure_record, out / "figures", config) if figure_record else {}
    run.update(status="complete", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               receiver_heads=receivers, n_responses=len(records),
               n_empty=sum(not r["response_token_ids"] for r in records),
               accuracy=_mean([r["correct"] for r in records if r.get("correct") is not None]))
    atomic_write_text(run_path, to_json(run))
    write_report(out)
    return run


def _mean(values):
    return sum(values) / len(values) if values else None


def _check_resumable(previous: dict, current: dict) -> None:
    if not previous:
        raise ValueError("cannot resume: run.json is missing, so the settings of the partial run are unknown")
    diffs = [f"{key}: {previous['settings'].get(key)!r} -> {current['settings'][key]!r}"
             for key in AnalyzeSettings.RESUME_KEYS if previous["settings"].get(key) != current["settings"][key]]
    if previous.get("config") != current["config"]:
        diffs.append("the RhythmConfig differs")
    if diffs:
        raise ValueError("cannot resume a run with different settings (" + "; ".join(diffs) +
                         "); use another --out or --overwrite")


# ------------------------------------------------------------------ command line
def _layers_arg(text: str):
    if text in ("middle", "bottom", "top", "all"):
        return text
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--layers must be middle, bottom, top, all or a comma list of ints, got {text!r}") from None


def _horizon_arg(text: str) -> tuple[int, int | None]:
    named = {"analysis": ANALYSIS_HORIZON, "rl": (10, 100), "v1": (10, 50)}
    if text in named:
        return named[text]
    lo, _, hi = text.partition(",")
    try:
        return int(lo), (int(hi) if hi.strip() else None)
    except ValueError:
        raise ValueError(f"--fai-horizon must be analysis, rl, v1 or LO,HI (LO, = to the end), got {text!r}") from None


def configure_parser(p) -> None:
    from attnrhythm.cli import add_problem_arguments

    s = AnalyzeSettings()
    add_problem_arguments(p)
    p.add_argument("--out", default="runs/analyze", help="output folder (default %(default)s)")
    p.add_argument("--prompt", choices=PROMPT_STYLES, default=s.prompt,
                   help="auto: chat template for instruct models (SmolLM2), the paper's prompt otherwise")
    p.add_argument("--max-new-tokens", type=int, default=s.max_new_tokens)
    p.add_argument("--temperature", type=float, default=s.temperature, help="sampling temperature (0 = greedy)")
    p.add_argument("--batch-size", type=int, default=s.batch_size, help="responses per generation/capture batch")
    p.add_argument("--backend", choices=BACKENDS, default=s.backend)
    p.add_argument("--layers", default="middle", help="middle, bottom, top, all, or a comma list of layer indices")
    p.add_argument("--fai-horizon", default="analysis", help="analysis (to the end), rl (10,100), v1 (10,50) or LO,HI")
    p.add_argument("--receiver-heads", type=int, default=RhythmConfig.n_receiver_heads, help="receiver heads kept")
    p.add_argument("--n-boot", type=int, default=s.n_boot, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--figure-response", default=None, help="problem id of the response drawn in the figures")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--resume", action="store_true", help="continue a partial run in --out, skipping done problems")
    p.add_argument("--overwrite", action="store_true", help="replace an existing analysis in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command_line(args) -> str:
    """The full command that reruns this analysis (every option spelled out)."""
    import shlex
    parts = ["attnrhythm", "analyze"]
    for key, value in vars(args).items():
        if key == "command" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def run(args) -> int:
    from attnrhythm.data import load_problems
    from attnrhythm.models import load_model

    try:
        config = ANALYSIS_CONFIG.replace(layers=_layers_arg(args.layers), fai_horizon=_horizon_arg(args.fai_horizon),
                                         n_receiver_heads=args.receiver_heads)
        settings = AnalyzeSettings(**{f.name: getattr(args, f.name) for f in fields(AnalyzeSettings)})
        problems = load_problems(args.data, args.n, args.seed)
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        command = _command_line(args)
        run_info = run_analysis(model, tokenizer, problems, args.out, settings, config, resume=args.resume,
                                overwrite=args.overwrite, progress=not args.no_progress, command=command)
    except (ValueError, FileNotFoundError, ImportError, OSError, MemoryError) as err:
        print(f"attnrhythm analyze: error: {err}", file=sys.stderr)
        return 2
    print(f"{run_info['n_responses']} responses analysed; report: {Path(args.out) / 'report.html'}")
    print((Path(args.out) / "couplings.md").read_text())
    return 0
