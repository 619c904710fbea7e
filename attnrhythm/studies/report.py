"""The analysis report: one self-contained ``report.html`` (figures embedded as base64), and the
facts about the machine a run ran on.

The page holds the run's settings, the Table 2 couplings beside the paper's numbers, the
figures, and every response as text coloured by FAI or by WAAD (a toggle; the paper's
Figure 8), each token's values in its hover title.  All model and problem text is HTML-escaped:
it is untrusted.  Every file is written to a temporary file and moved into place (os.replace),
so a crash never leaves a half-written report.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np

from attnrhythm import io
from attnrhythm.core.couplings import PAPER_TABLE2
from attnrhythm.studies.tables import lift, value


# ------------------------------------------------------------------ run facts
def machine_info(model=None) -> dict:
    """Where a run ran: platform, library versions, device (and GPU name)."""
    import platform

    import transformers
    import torch
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                device=str(device))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------ HTML pieces
_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} img{max-width:100%;border:1px solid #eee} code{font-size:12px}
.tokens{font-family:ui-monospace,monospace;white-space:pre-wrap;line-height:1.7;font-size:13px;
        border:1px solid #ddd;padding:.6em}
/* one block per response; the radio buttons pick which per-token value colours it */
#by-fai:checked ~ .responses .tokens span{background:rgba(214,39,40,var(--f,0))}
#by-waad:checked ~ .responses .tokens span{background:rgba(31,119,180,var(--w,0))}
#by-fai:checked ~ .responses .nf, #by-waad:checked ~ .responses .nw{outline:1px dotted #999}
.response{margin:1.5em 0;padding-top:.5em;border-top:2px solid #eee}
.legend{display:inline-block;width:90px;height:10px;vertical-align:middle}
"""

_COLOURS = {"fai": (214, 39, 40), "waad": (31, 119, 180)}  # as in the CSS above


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def _with_ci(row: dict, key: str, fmt) -> str:
    lo, hi = row.get(key + "_ci") or (None, None)
    return f"{fmt(row.get(key))} ({fmt(lo)} to {fmt(hi)})"


def couplings_html(table: dict) -> str:
    rows = ["<table><tr><th>coupling</th><th>random (95% CI)</th><th>observed (95% CI)</th><th>lift (95% CI)</th>"
            "<th>problems used / skipped</th><th>paper: random / observed / lift</th></tr>"]
    for name, row in table.items():
        paper = PAPER_TABLE2.get(name, {})
        unit = paper.get("unit", "value")
        mean = lambda v: value(v, unit)  # noqa: E731
        paper_txt = (f"{value(paper['random'], unit)} / {value(paper['observed'], unit)} / {lift(paper['lift'])}"
                     if paper else "-")
        rows.append(f"<tr><td>{esc(row.get('label', name))}</td><td>{_with_ci(row, 'random', mean)}</td>"
                    f"<td>{_with_ci(row, 'observed', mean)}</td><td>{_with_ci(row, 'lift', lift)}</td>"
                    f"<td>{row.get('n')} / {row.get('n_skipped')}</td><td>{paper_txt}</td></tr>")
    return "\n".join(rows) + "</table>"


def _kv_table(items: dict) -> str:
    cells = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(v if isinstance(v, str) else json.dumps(v))}</code></td></tr>"
                    for k, v in items.items())
    return f"<table>{cells}</table>"


def _scale(values: list) -> tuple[float, float]:
    """Robust per-response colour range (1st to 99th percentile of the defined values)."""
    x = np.array([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(x, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1e-12)


def _alpha(v, scale: tuple[float, float]) -> str:
    lo, hi = scale
    return f"{min(1.0, max(0.0, (v - lo) / (hi - lo))) * 0.85:.3f}"


def token_spans(record: dict) -> str:
    """The response as one span per token carrying its FAI and WAAD colour strengths as CSS
    variables (--f, --w) and all its values in the hover title; ``nf``/``nw`` mark tokens whose
    FAI/WAAD is undefined."""
    scales = {key: _scale(record.get(key) or []) for key in ("fai", "waad")}
    spans = []
    for t, token in enumerate(record["tokens"]):
        fai, waad = _at(record, "fai", t), _at(record, "waad", t)
        rows = _at(record, "fai_rows", t)
        title = (f"#{t}  FAI {_g(fai)}" + ("" if rows is None else f" (from {rows} rows)") +
                 f" | FAI receiver {_g(_at(record, 'fai_receiver', t))} | "
                 f"WAAD {_g(waad)} | entropy {_g(_at(record, 'entropy', t))}")
        style = ";".join(f"--{name}:{_alpha(v, scales[key])}"
                         for name, key, v in (("f", "fai", fai), ("w", "waad", waad)) if v is not None)
        classes = " ".join(c for c, v in (("nf", fai), ("nw", waad)) if v is None)
        attrs = f' class="{classes}"' if classes else ""
        spans.append(f'<span{attrs} style="{style}" title="{esc(title)}">{esc(token)}</span>')
    return "".join(spans)


def _g(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _at(record: dict, key: str, t: int):
    values = record.get(key) or []
    return values[t] if t < len(values) else None


def response_html(record: dict) -> str:
    correct = record.get("correct")
    verdict = "not scored" if correct is None else ("correct" if correct >= 1 else "wrong")
    head = (f"<h3>{esc(record['id'])}</h3><p>{len(record['response_token_ids'])} response tokens, "
            f"ended by {esc(record.get('finish_reason'))}; gold {esc(record.get('gold'))}: {verdict}</p>"
            f"<details><summary>question</summary><div class='tokens'>{esc(record.get('question', ''))}</div>"
            "</details>")
    if not record["response_token_ids"]:
        return f"<div class='response'>{head}<p><em>empty response: no metrics</em></p></div>"
    return (f"<div class='response'>{head}"
            f"<div class='tokens'>{token_spans(record)}</div></div>")


def _legend(key: str) -> str:
    return f"<span class='legend' style='background:linear-gradient(90deg,#fff,rgb{_COLOURS[key]})'></span>"


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<p><img alt='{esc(path.stem)}' src='data:image/png;base64,{data}'></p>"


def render_report(run: dict, records: list[dict], couplings: dict | None, figures: dict[str, Path]) -> str:
    settings = run.get("settings", {})
    title = f"attnrhythm analysis: {settings.get('model', '?')} on {settings.get('data', '?')}"
    info = {"status": run.get("status"), "command": run.get("command") or "(python API)",
            "prompt style": run.get("prompt_style"), "sampled layers": run.get("layers"),
            "receiver heads": run.get("receiver_heads"), "receiver calibration": run.get("receiver_calibration"),
            "responses": len(records), "empty responses": sum(not r["response_token_ids"] for r in records),
            "accuracy (math-verify)": run.get("accuracy"), "started": run.get("started"),
            "finished": run.get("finished"), **{f"setting: {k}": v for k, v in settings.items()},
            **{f"config: {k}": v for k, v in run.get("config", {}).items()},
            **{f"machine: {k}": v for k, v in run.get("machine", {}).items()}}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>",
             "<h2>Table 2: couplings (95% bootstrap intervals over problems)</h2>",
             couplings_html(couplings["table"]) if couplings else "<p>not computed yet (the run is not finished)</p>",
             "<h2>Figures</h2>"]
    if run.get("figures", {}).get("skipped"):
        parts.append(f"<p>{esc(run['figures']['skipped'])}</p>")
    fig_record = next((r for r in records if r["id"] == run.get("figure_response")), None)
    for name, path in figures.items():
        parts.append(f"<h3>{esc(name.replace('_', ' '))}</h3>" + _image(path))
    if fig_record:
        parts.append(f"<p>heads of this response, [layer, head]: local {esc(fig_record['local_heads'])}; "
                     f"global {esc(fig_record['global_heads'])}</p>")
    parts += ["<h2>Settings</h2>", _kv_table(info),
              "<h2>Responses (paper Figure 8)</h2>",
              "<input type='radio' name='colouring' id='by-fai' checked><label for='by-fai'> colour by FAI "
              f"{_legend('fai')}</label> <input type='radio' name='colouring' id='by-waad'>"
              f"<label for='by-waad'> colour by WAAD {_legend('waad')}</label>"
              "<p>Colours are scaled per response (1st to 99th percentile); dotted tokens have no defined "
              "value (FAI of the last token); hover a token for all its values, including how many later rows "
              "its FAI averages. Near the end of a response FAI rests on few rows and tends to rise: in the "
              "figures the positions whose FAI averages fewer than 10 rows are shaded grey; do not read that "
              "rise as anchors.</p>",
              "<div class='responses'>", *(response_html(r) for r in records), "</div></body></html>"]
    return "\n".join(parts)


def write_report(out_dir) -> Path:
    """(Re)write ``report.html`` from the files of an analysis folder; works on partial runs."""
    out = Path(out_dir)
    if not (out / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{out / 'metrics.jsonl'} does not exist: nothing to report")
    run = io.read_json(out / "run.json") if (out / "run.json").exists() else {}
    records = io.read_jsonl(out / "metrics.jsonl")
    couplings = io.read_json(out / "couplings.json") if (out / "couplings.json").exists() else None
    figures = {name: out / "figures" / f"{name}.png" for name in ("attention_maps", "rhythm_curves")
               if (out / "figures" / f"{name}.png").exists()}
    path = out / "report.html"
    io.write_text(path, render_report(run, records, couplings, figures))
    return path
