"""Views of the rhythm during training: drift curves and the credit view.

* ``plot_rhythm(runs, out)``: per rollout batch, the head-set overlap with the first batch
  (Jaccard, local and global), the mean head distance of each group, WAAD/FAI means and peak
  densities, and the gamma set shares -- one panel each, one line per run (``attnrhythm plot
  --rhythm RUN...``).
* ``credit_view(run, out, steps)``: an HTML page of the rollouts the trainer sampled into
  ``DIR/rollouts.jsonl``: every token coloured by its gamma and labelled by its credit set
  (preplan = local, anchor, dominated anchor, intro), values on hover, all text escaped
  (``attnrhythm credit-view RUN``).
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass

from attnrhythm import io, log
from attnrhythm.errors import MissingInput, UserError, check_fields
from attnrhythm.io import option
from attnrhythm.train.config import run_name

SIGNATURE = "attnrhythm plot"
"""The drift figure is drawn by `attnrhythm plot --rhythm` and signed as its figures are."""

DRIFT_PANELS = [
    ("head sets vs first rollout (Jaccard)", ["rhythm/jaccard_local", "rhythm/jaccard_global"]),
    ("mean head distance", ["rhythm/heads_local_distance", "rhythm/heads_global_distance"]),
    ("WAAD mean", ["rhythm/waad_mean"]),
    ("FAI mean", ["rhythm/fai_mean"]),
    ("peak density", ["rhythm/waad_peak_density", "rhythm/fai_peak_density"]),
    ("gamma set shares", ["rhythm/set_local", "rhythm/set_anchor", "rhythm/set_dominated", "rhythm/set_intro",
                          "rhythm/share_amplified"]),
]
SET_COLOURS = {"local": "#1f77b4", "anchor": "#d62728", "dominated": "#ff7f0e", "intro": "#2ca02c",
               "selected": "#9467bd"}
# the trainer's set names -> the method's words (coupled credit: T_loc, T_glob, D, I(D))
SET_NAMES = {"local": "preplan", "anchor": "anchor", "dominated": "dominated anchor", "intro": "intro"}


def _records(path: str) -> list[dict]:
    return [r for r in io.read_jsonl(path) if isinstance(r, dict)]  # a cut last line is dropped


def read_rollouts(run: str) -> list[dict]:
    """The rollouts of DIR/rollouts.jsonl, each checked: tokens (strings), gamma (numbers) and
    every other per-token list given, of one length; a damaged record is a UserError naming the
    file and line."""
    path = os.path.join(run, "rollouts.jsonl")
    kinds = {"tokens": str, "gamma": (int, float), "sets": str, "fai": (int, float, type(None)),
             "waad": (int, float, type(None))}
    rows = []
    for number, r in io.numbered_jsonl(path):
        r = r if isinstance(r, dict) else {}
        n = len(r.get("tokens") or [])
        bad = [k for k, kind in kinds.items() if (k in ("tokens", "gamma") or r.get(k) is not None) and not (
            isinstance(r.get(k), list) and len(r[k]) == n and all(isinstance(v, kind) for v in r[k]))]
        if bad:
            raise UserError(f"{path}:{number}: not a rollout of `attnrhythm train` ({', '.join(bad)}: missing, of "
                            "another length than tokens, or of the wrong type); the file is damaged")
        rows.append(r)
    return rows


def _label(run: str) -> str:
    """'credit (folder)': runs of one credit with different seeds stay apart."""
    return f"{run_name(run)} ({os.path.basename(os.path.normpath(run))})"


def plot_rhythm(runs: list[str], out: str) -> list[str]:
    """Draw the drift panels for ``runs`` into ``out`` (PNG, written atomically); returns the
    panels that had no data in any run (a 'none' run logs drift only with capture_with_none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {run: [r for r in _records(os.path.join(run, "metrics.jsonl")) if "rhythm/jaccard_local" in r]
            for run in runs}
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    empty = []
    for ax, (title, keys) in zip(axes.flat, DRIFT_PANELS):
        drawn = False
        for run, records in data.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if points:
                    xs, ys = zip(*points)
                    suffix = key.split("/")[-1] if len(keys) > 1 else ""
                    ax.plot(xs, ys, marker=".", label=f"{_label(run)} {suffix}".strip())
                    drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if drawn:
            ax.legend(fontsize=7)
        else:
            empty.append(title)
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("rhythm drift per rollout batch")
    fig.tight_layout()
    if len(empty) == len(DRIFT_PANELS):
        plt.close(fig)
        raise UserError(f"none of {', '.join(runs)} logged rhythm drift (rhythm/jaccard_local in metrics.jsonl): it "
                        "is logged by runs whose credit captures attention (any but none, or capture_with_none)")
    io.write_figure(fig, out, SIGNATURE)
    return empty


def _colour(gamma: float, lo: float, hi: float) -> str:
    """Red above 1 (amplified), blue below 1 (damped), white at 1."""
    if gamma >= 1:
        a = 0 if hi <= 1 else (gamma - 1) / (hi - 1)
        return f"rgba(214,39,40,{0.75 * a:.3f})"
    a = 0 if lo >= 1 else (1 - gamma) / (1 - lo)
    return f"rgba(31,119,180,{0.75 * a:.3f})"


def credit_view(run: str, out: str, steps: list[int] | None = None) -> int:
    """Write the credit view of ``run`` (rollouts at ``steps``, default all) to ``out``; returns
    the number of rollouts shown.  Nothing to show is a UserError (no page)."""
    rows = read_rollouts(run)
    logged = sorted({r.get("step") for r in rows if isinstance(r.get("step"), int)})
    if steps:
        rows = [r for r in rows if r.get("step") in set(steps)]
    if not rows:
        raise UserError(f"{run}/rollouts.jsonl has no rollouts" + (f" at step {', '.join(map(str, steps))}; "
                        f"logged steps: {', '.join(map(str, logged)) or 'none'}" if steps else ""))
    parts = [f"<h1>credit view: {html.escape(_label(run))}</h1>",
             "<p>Each token is coloured by its gamma (red &gt; 1, blue &lt; 1) and underlined by its credit set: "
             + " ".join(f'<span style="border-bottom:3px solid {c}">{html.escape(SET_NAMES.get(n, n))}</span>'
                        for n, c in SET_COLOURS.items())
             + ". Hover a token for its values.</p>"]
    for r in rows:
        gammas = r.get("gamma") or [1.0]
        lo, hi = min(gammas), max(gammas)
        spans = []
        for i, token in enumerate(r.get("tokens", [])):
            sets = (r.get("sets") or [""] * (i + 1))[i]
            first = sets.split("+")[0] if sets else ""
            underline = f"border-bottom:3px solid {SET_COLOURS[first]};" if first in SET_COLOURS else ""
            fai = (r.get("fai") or [None] * (i + 1))[i]
            waad = (r.get("waad") or [None] * (i + 1))[i]
            named = "+".join(SET_NAMES.get(n, n) for n in sets.split("+")) if sets else "-"
            title = f"t={i} gamma={gammas[i]} sets={named} waad={waad} fai={fai}"
            spans.append(f'<span title="{html.escape(title, quote=True)}" '
                         f'style="background:{_colour(gammas[i], lo, hi)};{underline}">{html.escape(token)}</span>')
        adv = r.get("advantage")
        head = f"step {r.get('step')}, credit {html.escape(str(r.get('credit')))}" + (
            f", advantage {adv:+.3f}" if isinstance(adv, (int, float)) else "")
        parts.append(f"<h3>{head}</h3><pre style='white-space:pre-wrap;line-height:1.7'>{''.join(spans)}</pre>")
    page = ("<!doctype html><meta charset='utf-8'><title>credit view</title>"
            "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>" + "\n".join(parts) + "</body>")
    io.write_text(out, page)
    return len(rows)


@dataclass
class CreditViewSettings:
    """What `credit-view` shows."""

    run: list[str] = option([], "the training run folder (holds rollouts.jsonl)", positional=True, metavar="DIR")
    steps: list[int] | None = option(None, "optimizer steps to show (none: every logged rollout)")
    out: str = option("credit_view.html", "HTML file to write")

    def __post_init__(self) -> None:
        check_fields(self)
        if len(self.run) != 1:
            raise UserError(f"credit-view takes one run folder, got {len(self.run)}")


SETTINGS = CreditViewSettings


def command(settings: CreditViewSettings, command_line: str | None = None) -> int:
    """`attnrhythm credit-view RUN`: the sampled rollouts with every token coloured by its gamma."""
    run = settings.run[0]
    if not os.path.exists(os.path.join(run, "rollouts.jsonl")):
        raise MissingInput(f"{run} has no rollouts.jsonl: it is written by `attnrhythm train` when the credit "
                           "captures attention (any credit but none, or capture_with_none) and rollout_samples > 0")
    shown = credit_view(run, settings.out, settings.steps)
    log.emit(f"{shown} rollouts; wrote {settings.out}")
    return 0


__all__ = ["DRIFT_PANELS", "CreditViewSettings", "credit_view", "plot_rhythm"]
