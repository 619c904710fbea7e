"""Figures of one response (docs/method.md section 5), as PNG files.

* ``attention_maps.png``: the aggregated local-head and global-head maps (Abar_loc, Abar_glob)
  of the response rows and columns, from eager ``attention_maps``: a sawtooth of short chunks
  near the diagonal vs vertical stripes under anchor tokens.
* ``rhythm_curves.png``: the per-token curves of WAAD, FAI (global heads and receiver heads) and
  entropy, with their peaks (``couplings.find_peaks``), as the paper's Figure 2.

Matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import torch

from attnrhythm.capture import available_bytes, attention_maps, model_layer_count
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.couplings import ALL_COUPLINGS, COUPLINGS, LABELS, PAPER_TABLE2, find_peaks
from attnrhythm.io import float_series, write_bytes


MIN_FIGURE_TOKENS = 32
"""A complete response shorter than this shows too little rhythm to be the default figure."""
FEW_FAI_ROWS = 10
"""*Decision*: FAI values averaging fewer rows than this (the RL horizon's start) are shaded in the
figures: near the end of a response FAI "to the end" rests on a handful of rows and rises, which
is not an anchor (docs/method.md section 3)."""


def few_rows_spans(rows: list[int], threshold: int = FEW_FAI_ROWS) -> list[tuple[int, int]]:
    """Maximal [start, stop) spans of positions whose FAI averages fewer than ``threshold`` rows."""
    spans, start = [], None
    for t, n in enumerate(list(rows) + [threshold]):
        if n < threshold and start is None:
            start = t
        elif n >= threshold and start is not None:
            spans.append((start, t))
            start = None
    return spans


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def choose_figure_record(records: list[dict], problem_id: str | None = None) -> dict | None:
    """The record with ``problem_id``, else the longest complete response (ended by EOS) of at
    least ``MIN_FIGURE_TOKENS`` tokens, else the longest; None when every response is empty."""
    if problem_id is not None:
        match = [r for r in records if r["id"] == problem_id]
        if not match:
            raise ValueError(f"--figure-response {problem_id!r} is not a problem of this run")
        return match[0]
    live = [r for r in records if r["response_token_ids"]]
    if not live:
        return None
    complete = [r for r in live if r.get("finish_reason") in ("eos", "stop")
                and len(r["response_token_ids"]) >= MIN_FIGURE_TOKENS] or live
    return max(complete, key=lambda r: len(r["response_token_ids"]))


def aggregate_maps(maps: torch.Tensor, layers: list[int], heads: list[list[int]]) -> torch.Tensor:
    """Mean map over ``heads`` ([model layer, head] pairs).  maps: [len(layers), H, N, N] -> [N, N]."""
    slots = [layers.index(layer) for layer, _ in heads]
    return maps[slots, [h for _, h in heads]].mean(0)


def attention_maps_png(local: np.ndarray, global_: np.ndarray, title: str = "") -> bytes:
    """Two heat maps side by side.  local, global_: [T, T] response-by-response maps."""
    from matplotlib.colors import PowerNorm
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4), layout="constrained")
    for ax, data, name in zip(axes, (local, global_), ("local heads (Abar_loc)", "global heads (Abar_glob)")):
        # a power norm keeps faint stripes visible next to the bright diagonal
        top = float(np.quantile(data[data > 0], 0.995)) if (data > 0).any() else 1.0
        image = ax.imshow(data, cmap="magma", norm=PowerNorm(0.4, vmin=0, vmax=max(top, 1e-9)), interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("key position s (response token)")
        ax.set_ylabel("query position t (response token)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return _png(fig)


def rhythm_curves_png(record: dict, config: RhythmConfig = RhythmConfig(), title: str = "") -> bytes:
    """WAAD, FAI (global and receiver heads) and entropy of one record, peaks marked."""
    plt = _pyplot()
    series = {key: float_series(record.get(key) or []).numpy() for key in ("waad", "fai", "fai_receiver", "entropy")}
    # receiver-head FAI gets its own panel: its scale is often several times the global one
    panels = [("WAAD", ["waad"]), ("FAI", ["fai"]), ("FAI", ["fai_receiver"]), ("entropy", ["entropy"])]
    labels = {"waad": "WAAD, local heads", "fai": "FAI, global heads", "fai_receiver": "FAI, receiver heads",
              "entropy": "entropy"}
    colours = {"waad": "tab:blue", "fai": "tab:red", "fai_receiver": "tab:purple", "entropy": "tab:green"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 9), sharex=True, layout="constrained")
    for ax, (name, keys) in zip(axes, panels):
        for key in keys:
            y = series[key]
            if y.size == 0 or np.isnan(y).all():
                continue
            x = np.arange(y.size)
            ax.plot(x, y, lw=1, color=colours[key], label=labels[key])
            peaks = find_peaks(torch.from_numpy(y), None, config.peak_q).numpy()
            ax.plot(x[peaks], y[peaks], "o", ms=3, color=colours[key])
            if key.startswith("fai"):
                for i, (lo, hi) in enumerate(few_rows_spans(record.get("fai_rows") or [])):
                    ax.axvspan(lo - 0.5, hi - 0.5, color="0.6", alpha=0.25, lw=0,
                               label=None if i else f"FAI from < {FEW_FAI_ROWS} rows")
        ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("response token")
    fig.suptitle(title or "per-token rhythm (dots: peaks)")
    return _png(fig)


def write_figures(model, record: dict, folder, config: RhythmConfig = RhythmConfig()) -> dict:
    """Write both figures of ``record`` into ``folder``; returns {name: file name}, and
    ``skipped`` with the reason when matplotlib is missing or the eager maps would not fit."""
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        return {"skipped": "figures: matplotlib is not installed (pip install matplotlib)"}

    folder = Path(folder)

    title = f"problem {record['id']}: {len(record['response_token_ids'])} response tokens"
    out = {}
    write_bytes(folder / "rhythm_curves.png", rhythm_curves_png(record, config, title))
    out["rhythm_curves"] = "figures/rhythm_curves.png"
    ids = record["prompt_token_ids"] + record["response_token_ids"]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    need = model_layer_count(model) * text_config.num_attention_heads * len(ids) ** 2 * 4
    device = next(model.parameters()).device
    if need > 0.5 * available_bytes(device):
        out["skipped"] = f"attention maps: {need / 2**30:.1f} GiB of eager maps would not fit in memory"
        return out
    start = len(record["prompt_token_ids"])
    maps = attention_maps(model, torch.tensor(ids, device=device), record["layers"]).cpu()
    local = aggregate_maps(maps, record["layers"], record["local_heads"])[start:, start:].numpy()
    global_ = aggregate_maps(maps, record["layers"], record["global_heads"])[start:, start:].numpy()
    write_bytes(folder / "attention_maps.png", attention_maps_png(local, global_, title))
    out["attention_maps"] = "figures/attention_maps.png"
    return out


def sweep_figure(rows: list[dict], path) -> None:
    """Lift (top) and random baseline (bottom) per rule for each coupling, 95% intervals as
    error bars, the paper's values as dashed lines; saved to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ALL_COUPLINGS if any(r["coupling"] == n for r in rows)]
    fig, axes = plt.subplots(2, len(names), figsize=(4.2 * len(names), 6.5), squeeze=False)
    for j, name in enumerate(names):
        sub = [r for r in rows if r["coupling"] == name]
        x = np.arange(len(sub))
        for i, (key, paper_key, title) in enumerate((("lift", "paper_lift", "lift"),
                                                     ("random", "paper_random", "random baseline"))):
            ax = axes[i][j]
            v = np.array([r[key] for r in sub])
            ci = np.array([r[f"{key}_ci"] for r in sub], dtype=float)
            ax.errorbar(x, v, yerr=[v - ci[:, 0], ci[:, 1] - v], fmt="o", capsize=3)
            ax.axhline(sub[0][paper_key], ls="--", color="C3", label="paper")
            if key == "lift":
                ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(x, [r["rule"] for r in sub], rotation=60, ha="right", fontsize=8)
            ax.set_title(f"{LABELS[name]}\n{title}" if i == 0 else title, fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    image = BytesIO()
    fig.savefig(image, dpi=120, format="png")
    plt.close(fig)
    write_bytes(path, image.getvalue())  # atomic


def _finite(v) -> float:
    return float("nan") if v is None else float(v)


def reproduction_figures(folder, table1: dict, ranges: dict) -> dict[str, str]:
    """``jaccard_top_bottom.png`` (Table 1 beside the paper) and ``couplings_by_layer_range.png``
    (v2 Table 10) in ``folder``; returns {name: path relative to the folder's parent}."""
    plt = _pyplot()
    folder = Path(folder)
    paths = {}
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    groups = ["top", "bottom"]
    means = [_finite(table1[g]["mean"]) for g in groups]
    errors = np.array([[m - _finite(table1[g]["ci"][0]), _finite(table1[g]["ci"][1]) - m]
                       for g, m in zip(groups, means)]).T
    ax.bar([0, 1], means, yerr=np.nan_to_num(errors), capsize=6, color=["#d62728", "#1f77b4"], label="ours (95% CI)")
    ax.scatter([0, 1], [table1[g]["paper"] for g in groups], marker="D", color="k", zorder=3, label="paper")
    ax.set_xticks([0, 1], ["top-FAI positions", "bottom-FAI positions"])
    ax.set_ylabel("mean content-word Jaccard")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Perturbation (Table 1)")
    write_bytes(folder / "jaccard_top_bottom.png", _png(fig))
    paths["jaccard"] = f"{folder.name}/jaccard_top_bottom.png"

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = ("bottom", "middle", "top")
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        table = ranges.get(name, {}).get("table", {})
        lifts = [_finite(table.get(c, {}).get("lift")) for c in COUPLINGS]
        cis = [table.get(c, {}).get("lift_ci") or (np.nan, np.nan) for c in COUPLINGS]
        err = np.array([[v - _finite(ci[0]), _finite(ci[1]) - v] for v, ci in zip(lifts, cis)]).T
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
    write_bytes(folder / "couplings_by_layer_range.png", _png(fig))
    paths["ranges"] = f"{folder.name}/couplings_by_layer_range.png"
    return paths
