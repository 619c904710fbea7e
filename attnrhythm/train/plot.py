"""`attnrhythm plot`: training (and evaluation) curves of several runs in one figure.

    attnrhythm plot runs/none runs/coupled runs/random --metric reward accuracy --out curves.png

Each run folder holds ``metrics.jsonl`` (one JSON object per logging step, with ``step`` and
numeric metrics, as the trainer writes it) and optionally ``eval*.json`` (``attnrhythm eval
--out``).  Every requested metric gets one panel; each run is drawn raw (thin) and smoothed as the
paper's running peak (docs/method.md section 6)

    EMA_t = a * max(x_t, EMA_{t-1}) + (1 - a) * EMA_{t-1}

Evaluation results are drawn as markers at their ``step`` (the run's last training step when the
file has none).  The legend is the run's credit strategy (``DIR/config.yaml``), else the folder name.
A metric one run lacks is skipped with a note (runs log different keys); a folder with nothing to
draw, or a metric no run has, is an error that lists what there is.
"""
from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass

from attnrhythm import io, log
from attnrhythm.errors import MissingInput, UserError, check_fields
from attnrhythm.io import option
from attnrhythm.train.config import run_name

SIGNATURE = "attnrhythm plot"
"""Written into every figure's metadata: `plot --out` replaces only a figure it drew."""

logger = log.get_logger(__name__)


def running_peak(xs, a: float = 0.1) -> list[float]:
    """The paper's smoothing; EMA_0 = x_0.  Non-finite values (missing logs) keep the previous
    value.  a = 0.1 is a **Decision** (the paper gives none); a = 1 is the running maximum."""
    if not 0 < a <= 1:
        raise UserError(f"a must be in (0, 1], got {a}")
    out, ema = [], math.nan
    for x in xs:
        x = float(x) if x is not None else math.nan
        if math.isfinite(x):
            # = a*max(x, ema) + (1-a)*ema, written so that rounding can never make it fall
            ema = x if not math.isfinite(ema) else ema + a * max(x - ema, 0.0)
        out.append(ema)
    return out


# ----------------------------------------------------------------------------- reading runs
def read_metrics(run_dir: str) -> list[dict]:
    """The records of DIR/metrics.jsonl (``io.read_jsonl``: a line cut by a killed run is skipped)."""
    return [r for r in io.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if isinstance(r, dict) and "step" in r]


def read_evals(run_dir: str) -> list[dict]:
    evals = []
    for path in sorted(glob.glob(os.path.join(run_dir, "eval*.json"))):
        try:
            data = io.read_json(path)
        except UserError as err:  # a damaged eval file is skipped with a note, as a missing metric
            logger.warning(f"note: {err} (skipped)")
            continue
        if isinstance(data.get("metrics"), dict):
            evals.append({**data, "file": os.path.basename(path)})
    return evals


def find_key(keys, metric: str) -> str | None:
    """``metric`` itself, else a logged key that ends in '/metric' or '/metric/mean'
    (TRL logs reward functions as 'rewards/NAME/mean')."""
    if metric in keys:
        return metric
    for key in sorted(keys):
        if key.endswith("/" + metric) or key.endswith("/" + metric + "/mean"):
            return key
    return None


def series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    key = find_key({k for r in records for k in r}, metric)
    if key is None:
        return [], []
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def known_metrics(run_dirs: list[str]) -> list[str]:
    """Every metric key logged in metrics.jsonl or evaluated in eval*.json of the runs (a folder
    with neither is a UserError)."""
    keys = set()
    for run_dir in run_dirs:
        records, evals = read_metrics(run_dir), read_evals(run_dir)
        if not records and not evals:
            raise MissingInput(f"{run_dir} has no metrics.jsonl or eval*.json to draw: name the folder of a "
                               "`attnrhythm train` run")
        keys |= {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        keys |= {k for e in evals for k in e["metrics"]}
    return sorted(keys - {"step"})


def _names(run_dirs: list[str]) -> list[str]:
    """Run names, with the folder added where two runs would share one (e.g. two seeds)."""
    names = [run_name(d) for d in run_dirs]
    return [f"{n} ({os.path.basename(os.path.normpath(d))})" if names.count(n) > 1 and
            n != os.path.basename(os.path.normpath(d)) else n for n, d in zip(names, run_dirs)]


# ----------------------------------------------------------------------------- drawing
def plot_runs(run_dirs: list[str], metrics=("reward",), out: str = "curves.png", a: float = 0.1,
              title: str | None = None) -> dict:
    """Draw every metric of every run into ``out`` (PNG); returns a summary per run and metric:
    last raw value, final running peak and evaluation values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    known = known_metrics(run_dirs)
    missing = [m for m in metrics if find_key(known, m) is None]
    if missing:
        raise UserError(f"no run has {', '.join(map(repr, missing))}; the runs have: {', '.join(known)}")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    summary: dict = {}
    for i, (run_dir, name) in enumerate(zip(run_dirs, _names(run_dirs))):
        records, evals = read_metrics(run_dir), read_evals(run_dir)
        last_step = records[-1]["step"] if records else 0
        color = colors[i % len(colors)]
        for ax, metric in zip(axes[0], metrics):
            steps, xs = series(records, metric)
            entry = summary.setdefault(name, {}).setdefault(metric, {})
            if xs:
                smooth = running_peak(xs, a)
                ax.plot(steps, xs, color=color, lw=0.7, alpha=0.35)
                ax.plot(steps, smooth, color=color, lw=2, label=name)
                entry.update(last=xs[-1], peak_smoothed=smooth[-1], steps=len(xs))
            points = [(e.get("step") if e.get("step") is not None else last_step, e["metrics"][k])
                      for e in evals if (k := find_key(e["metrics"].keys(), metric))]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, marker="o",
                           edgecolor="black", zorder=3, label=None if xs else f"{name} (eval)")
                entry["eval"] = [p[1] for p in points]
            if not xs and not points:
                log.emit(f"note: {run_dir} has no {metric!r} (skipped)")
    for ax, metric in zip(axes[0], metrics):
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (thin: raw; thick: running peak, a={a})", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    io.write_figure(fig, out, SIGNATURE)  # atomic: a half-written image is never left behind
    return summary


@dataclass
class PlotSettings:
    """What `plot` draws."""

    runs: list[str] = option([], "run folders (metrics.jsonl, optional eval*.json)", positional=True, metavar="DIR")
    metric: list[str] = option(["reward"], "metric keys to plot, one panel each (reward, accuracy, loss, "
                               "rhythm/gamma_mean, ...)")
    out: str = option("curves.png", "figure to write (.png, .pdf or .svg)")
    alpha: float = option(0.1, "running-peak smoothing a in (0, 1]", above=0, at_most=1)
    title: str | None = option(None, "figure title")
    rhythm: bool = option(False, "draw the rhythm drift per rollout batch instead (head-set overlap with the first "
                          "batch, group distances, WAAD/FAI means and peak densities, gamma set shares)")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.runs or not self.metric:
            raise UserError("plot needs at least one run folder and one --metric")


SETTINGS = PlotSettings


def command(settings: PlotSettings, command_line: str | None = None) -> int:
    missing = [d for d in settings.runs if not os.path.isdir(d)]
    if missing:
        raise MissingInput(f"not a folder: {', '.join(missing)}")
    if settings.rhythm:
        from attnrhythm.train.rhythm_views import plot_rhythm

        empty = plot_rhythm(settings.runs, settings.out)
        log.emit(f"wrote {settings.out}" + (f" (not logged by these runs: {', '.join(empty)})" if empty else ""))
        return 0
    summary = plot_runs(settings.runs, settings.metric, settings.out, settings.alpha, settings.title)
    lines = []
    for name, by_metric in summary.items():
        for metric, e in by_metric.items():
            parts = [f"last {e['last']:.4f}", f"peak(smoothed) {e['peak_smoothed']:.4f}"] if "last" in e else []
            parts += [f"eval {v:.4f}" for v in e.get("eval", [])]
            if parts:
                lines.append(f"{name:<28} {metric:<20} " + "  ".join(parts))
    log.emit("\n".join(lines + [f"wrote {settings.out}"]))
    return 0
