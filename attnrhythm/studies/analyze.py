"""`attnrhythm analyze`: sample responses to real problems, capture attention in one extra forward
pass per batch of responses, and write the paper's analysis (docs/method.md sections 2, 3 and 5).

Pipeline (the Python API is what the CLI runs):

1. :func:`analyze` yields one record per response: generation (``generation.py``), then
   ``capture_statistics`` + ``rhythm_from_stats`` over the batch (``records.capture_records``).
2. ``records.finalize`` calibrates the receiver heads on **all responses of the run** (kurtosis of
   the vertical scores averaged over them, docs/method.md section 2), fills ``fai_receiver``, and
   computes the Table 2 couplings.  Per-head FAI of this process's responses is kept in memory;
   responses reused by ``--resume`` are recaptured from their stored token ids.
3. :func:`run_analysis` drives both with ``metrics.jsonl`` appended and flushed per response, then
   writes ``couplings.json``/``couplings.md`` (``tables.py``), figures and ``report.html``
   (``report.py``); a run that fails records ``"status": "failed"`` and the error in ``run.json``;
   ``--resume`` follows ``resume.py``.
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

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from attnrhythm import io, log
from attnrhythm.capture import BACKENDS, check_backend_memory, resolve_layers
from attnrhythm.core.config import RhythmConfig, parse_horizon, parse_layers
from attnrhythm.data import Problem, ProblemSettings
from attnrhythm.io import option
from attnrhythm.errors import UserError, check_device, check_fields
from attnrhythm.generation import (PROMPT_STYLES, check_prompt_fits, encode_prompt, problem_prompt, prompt_text,
                                   resolve_prompt_style, row_seed, sample_responses, stop_strings_for, token_strings)
from attnrhythm.studies.records import ANALYSIS_CONFIG, capture_records, finalize, receiver_layers_of
from attnrhythm.studies.report import machine_info, write_report
from attnrhythm.studies.resume import check_resume
from attnrhythm.studies.tables import couplings_markdown
from attnrhythm.tasks import check_verifier_errors, score_completions
from attnrhythm.tasks.math import MATH_ANSWER

logger = log.get_logger(__name__)
OUTPUTS = ("metrics.jsonl", "run.json", "couplings.json", "couplings.md", "report.html",
           "figures/attention_maps.png", "figures/rhythm_curves.png")


@dataclass
class AnalyzeSettings(ProblemSettings):
    """Everything an `analyze` run needs (stored in run.json; ``config()`` gives its RhythmConfig)."""

    prompt: str = option("auto", "auto: chat template for instruct models (SmolLM2), the paper's plain prompt "
                         "otherwise", choices=PROMPT_STYLES)
    max_new_tokens: int = option(384, "tokens per response at most", at_least=1)
    temperature: float = option(0.7, "sampling temperature (paper: 0.7; 0 = greedy)", at_least=0)
    batch_size: int = option(8, "responses generated and captured together", at_least=1)
    backend: str = option("streaming", "streaming: statistics in blocks of rows, memory linear in the length; "
                          "eager: HF output_attentions (the reference)", choices=BACKENDS)
    n_boot: int = option(2000, "bootstrap resamples for the 95% intervals", at_least=1)
    figure_response: str | None = option(None, "problem id of the response drawn in the figures (none: the "
                                         "longest complete response)")
    out: str = option("runs/analyze", "output folder")
    layers: str = option("middle", "sampled layers: middle, bottom, top, all, or a comma list")
    fai_horizon: str = option("analysis", "FAI rows: analysis (every later token), rl (10,100), v1 (10,50) or "
                              "LO,HI (LO, = to the end)")
    receiver_heads: int = option(RhythmConfig.n_receiver_heads, "receiver heads kept", at_least=1)
    receiver_layers: str = option(RhythmConfig.receiver_layers, "rank receiver heads over every layer (the "
                                  "paper's choice) or only the sampled --layers", choices=("all", "sampled"))
    device: str | None = option(None, "cuda, cpu, ... (none: cuda when available)", check=check_device)
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
        check_fields(self)  # types and the bounds declared above
        self.check_problem_count()
        self.config()


def _score(response: str, gold: str, errors: list[str]) -> float | None:
    """math-verify's score (0 where the verifier raised: counted in ``errors``, as train and eval do)."""
    import importlib.util
    if importlib.util.find_spec("math_verify") is None:
        return None  # scoring is optional: without math-verify, correctness is not reported
    rewards, failed = score_completions(MATH_ANSWER, [response], [{"gold": gold}])
    errors += failed
    return rewards[0]


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
    verifier_errors: list[str] = []
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
                           correct=_score(response, problems[i].gold, verifier_errors), finish_reason=s.finish_reason,
                           prompt_token_ids=prompt_ids[i], response_token_ids=s.token_ids,
                           tokens=token_strings(tokenizer, s.token_ids), **m,
                           fai_receiver=None, receiver_heads=None)
        check_verifier_errors("math", verifier_errors, len(problems))  # eval's rule: stop when all failed
    finally:
        bar.close()


def run_analysis(model, tokenizer, problems: list[Problem], out_dir, settings: AnalyzeSettings | None = None,
                 config: RhythmConfig | None = None, *, resume: bool | None = None, overwrite: bool | None = None,
                 progress: bool | None = None, command: str | None = None) -> dict:
    """The whole `analyze` job into ``out_dir``; returns the final run.json content.
    ``settings`` default to ``AnalyzeSettings()``, ``config`` to ``settings.config()``;
    ``resume``/``overwrite``/``progress`` to the settings' values.  A folder that holds an
    analysis continues only with ``resume`` and the same settings (``studies/resume.py``).  A run
    that fails records ``"status": "failed"`` and the error in run.json, then raises."""
    settings = settings if settings is not None else AnalyzeSettings()
    config = config if config is not None else settings.config()
    resume = settings.resume if resume is None else resume
    overwrite = settings.overwrite if overwrite is None else overwrite
    job = _Job(model, tokenizer, settings, config, Path(out_dir), settings.progress if progress is None else progress)
    out, metrics_path, run_path = job.out, job.out / "metrics.jsonl", job.out / "run.json"
    now = dict(asdict(settings), config=config.to_dict())
    saved = None
    if metrics_path.exists() and (resume or not overwrite):
        previous = io.read_json(run_path) if run_path.exists() else None
        if previous is None and resume:
            raise UserError("cannot resume: run.json is missing, so the settings of the partial run are unknown")
        saved = dict(previous["settings"], config=previous.get("config")) if previous else {}
    resuming = check_resume("an analysis", out, saved, now, AnalyzeSettings.RESUME_KEYS + ("config",),
                            resume=resume, can_overwrite=True)
    if overwrite and not resume:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run = dict(settings=asdict(settings), config=config.to_dict(),
               prompt_style=resolve_prompt_style(settings.prompt, tokenizer, settings.model),
               layers=resolve_layers(model, config), command=command, machine=machine_info(model),
               receiver_calibration="all non-empty responses of this run (kurtosis averaged over them)",
               receiver_layers=receiver_layers_of(model, config),
               started=datetime.now(timezone.utc).isoformat(timespec="seconds"), status="running")
    done = io.read_jsonl(metrics_path, repair=True) if resuming else []
    io.write_json(run_path, run)
    try:
        return job.finish(job.generate(problems, done), run)
    except BaseException as err:
        run.update(status="failed" if not isinstance(err, KeyboardInterrupt) else "interrupted",
                   error=f"{type(err).__name__}: {err}", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        io.write_json(run_path, run)
        raise


@dataclass
class _Job:
    """One `analyze` run's fixed parts: what generates and captures, with which settings, where."""

    model: object
    tokenizer: object
    settings: AnalyzeSettings
    config: RhythmConfig
    out: Path
    progress: bool

    def generate(self, problems: list[Problem], done: list[dict]) -> tuple[list[dict], dict]:
        """(records of ``problems`` in their order, {id: per-head FAI} of the new ones): the ``done``
        records kept, the others generated, each appended to metrics.jsonl as it comes."""
        s = self.settings
        wanted = {p.id for p in problems}
        done = [r for r in done if r["id"] in wanted]
        todo = [p for p in problems if p.id not in {r["id"] for r in done}]
        head_fai, new = {}, []
        for record in analyze(self.model, self.tokenizer, todo, self.config, prompt=s.prompt,
                              max_new_tokens=s.max_new_tokens, temperature=s.temperature, batch_size=s.batch_size,
                              seed=s.seed, backend=s.backend, model_name=s.model, progress=self.progress):
            head_fai[record["id"]] = record.pop("_head_fai")
            io.append_jsonl(self.out / "metrics.jsonl", [record])  # a crash keeps every finished response
            new.append(record)
        order = {p.id: i for i, p in enumerate(problems)}
        return sorted(done + new, key=lambda r: order[r["id"]]), head_fai

    def finish(self, generated: tuple[list[dict], dict], run: dict) -> dict:
        """Receiver heads, couplings, figures and report from all records; returns run.json."""
        from attnrhythm.studies.figures import choose_figure_record, write_figures

        s, out = self.settings, self.out
        records, head_fai = generated
        receivers, table = finalize(self.model, records, head_fai, self.config, backend=s.backend,
                                    batch_size=s.batch_size, n_boot=s.n_boot, seed=s.seed, progress=self.progress)
        io.write_jsonl(out / "metrics.jsonl", records)
        meta = {"model": s.model, "data": s.data, "problems": len(records), "seed": s.seed,
                "prompt": run["prompt_style"], "command": run["command"] or "(python API)"}
        io.write_json(out / "couplings.json", dict(meta=meta, table=table))
        io.write_text(out / "couplings.md", couplings_markdown(table, meta))
        figure_record = choose_figure_record(records, s.figure_response)
        run["figure_response"] = figure_record["id"] if figure_record else None
        run["figures"] = write_figures(self.model, figure_record, out / "figures", self.config) if figure_record else {}
        run.update(status="complete", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   receiver_heads=receivers, n_responses=len(records),
                   n_empty=sum(not r["response_token_ids"] for r in records),
                   accuracy=_mean([r["correct"] for r in records if r.get("correct") is not None]))
        io.write_json(out / "run.json", run)
        write_report(out)
        return run


def _mean(values):
    return sum(values) / len(values) if values else None


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
    if settings.figure_response is not None and settings.figure_response not in {p.id for p in problems}:
        ids = [p.id for p in problems]
        raise UserError(f"--figure-response {settings.figure_response!r} is not a problem of this run; its problems: "
                        f"{', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}")
    if model is None:
        model, tokenizer = models.load_model(settings.model, dtype=settings.dtype, device=settings.device)
    return run_analysis(model, tokenizer, problems, settings.out, settings, settings.config(), command=command)


def command(settings: AnalyzeSettings, command_line: str | None = None) -> int:
    run_info = run_analysis_command(settings, command_line)
    logger.info(f"{run_info['n_responses']} responses analysed; report: {Path(settings.out) / 'report.html'}")
    log.emit((Path(settings.out) / "couplings.md").read_text())
    return 0
