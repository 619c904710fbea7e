"""Drift curves and the credit view read what the trainer writes (metrics.jsonl, rollouts.jsonl)."""
from __future__ import annotations

import json

from attnrhythm.train.rhythm_views import credit_view, plot_rhythm


def write_run(path, credit="coupled"):
    path.mkdir()
    (path / "config.yaml").write_text(f"credit: {credit}\n")
    with open(path / "metrics.jsonl", "w") as f:
        for step in (4, 8):
            f.write(json.dumps({"step": step, "rhythm/jaccard_local": 1.0 if step == 4 else 0.5,
                                "rhythm/jaccard_global": 1.0, "rhythm/waad_mean": 3.0, "rhythm/fai_mean": 0.01,
                                "rhythm/waad_peak_density": 0.2, "rhythm/fai_peak_density": 0.1}) + "\n")
        f.write('{"step": 9, "rhythm/jacc')  # the cut last line of a killed run
    with open(path / "rollouts.jsonl", "w") as f:
        f.write(json.dumps({"step": 4, "credit": credit, "tokens": ["<b>", " x", "=1"], "gamma": [1.5, 1.0, 1.25],
                            "sets": ["anchor", "", "intro+local"], "waad": [1, 2, 3], "fai": [0.1, None, 0.2],
                            "advantage": 0.5}) + "\n")
        f.write(json.dumps({"step": 8, "credit": credit, "tokens": ["y"], "gamma": [1.0], "sets": [""],
                            "waad": [0], "fai": [None], "advantage": -0.5}) + "\n")


def test_plot_rhythm_draws_the_logged_panels(tmp_path):
    write_run(tmp_path / "a")
    out = tmp_path / "drift.png"
    empty = plot_rhythm([str(tmp_path / "a")], str(out))
    assert out.stat().st_size > 10_000
    assert "mean head distance" in empty and "WAAD mean" not in empty


def test_credit_view_escapes_and_labels_tokens(tmp_path):
    write_run(tmp_path / "a")
    out = tmp_path / "view.html"
    assert credit_view(str(tmp_path / "a"), str(out), steps=[4]) == 1
    page = out.read_text()
    assert "&lt;b&gt;" in page and "<b>" not in page.replace("<body", "")
    assert "sets=intro+preplan" in page and "gamma=1.5" in page and "dominated anchor" in page
    assert "rgba(214,39,40,0.750)" in page  # the largest gamma gets the full red
    assert credit_view(str(tmp_path / "a"), str(out)) == 2
