"""`attnrhythm reproduce`: the verdict rule on constructed intervals, the report from constructed
tables, and (slow) the whole command on SmolLM2, then again reusing every output."""
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from attnrhythm.studies import reproduce
from attnrhythm.core.couplings import COUPLINGS, PAPER_TABLE2
from attnrhythm.studies.reproduce import MIN_PROBLEMS, claims, render_markdown, verdict, write_figures

ROOT = Path(__file__).resolve().parents[1]
N = MIN_PROBLEMS  # enough problems for a verdict


# ---------------------------------------------------------------- verdicts (two levels: direction, magnitude)
def test_verdict_positive_paper_effect():
    assert verdict((0.05, 0.30), null=0.0, paper=0.52, n=N).direction == "reproduced"
    assert verdict((0.05, 0.30), null=0.0, paper=0.52, n=N).label == "direction reproduced, magnitude not"
    assert verdict((0.30, 0.60), null=0.0, paper=0.52, n=N).label == "direction and magnitude reproduced"
    assert verdict((-0.30, -0.01), null=0.0, paper=0.52, n=N).direction == "opposite"
    assert verdict((-0.30, -0.01), null=0.0, paper=0.52, n=N).label == "not reproduced: opposite direction"
    assert verdict((-0.05, 0.30), null=0.0, paper=0.52, n=N).direction == "inconclusive"
    assert verdict((0.0, 0.30), null=0.0, paper=0.52, n=N).direction == "inconclusive"  # touching no effect
    assert verdict((0.05, 0.30), null=0.0, paper=0.52, n=N, judge_magnitude=False).magnitude == "not judged"


def test_verdict_negative_paper_effect_and_other_nulls():
    # Table 1: top minus bottom Jaccard, the paper's effect is negative
    assert verdict((-0.2, -0.01), null=0.0, paper=-0.097, n=N).label == "direction and magnitude reproduced"
    assert verdict((0.01, 0.2), null=0.0, paper=-0.097, n=N).direction == "opposite"
    # share of problems with top < bottom, no effect = 50%
    assert verdict((0.6, 0.9), null=0.5, paper=0.8714, n=N).label == "direction and magnitude reproduced"
    v = verdict((0.51, 0.70), null=0.5, paper=0.8714, n=N)
    assert v.label == "direction reproduced, magnitude not" and "above the interval" in v.why
    assert verdict((0.2, 0.45), null=0.5, paper=0.8714, n=N).direction == "opposite"
    assert verdict((0.45, 0.9), null=0.5, paper=0.8714, n=N).direction == "inconclusive"


def test_verdict_without_interval_or_with_few_problems():
    assert verdict(None, 0.0, 0.5).label == "inconclusive"
    assert verdict((math.nan, math.nan), 0.0, 0.5, n=N).label == "inconclusive"
    assert verdict((None, None), 0.0, 0.5, n=N).label == "inconclusive"
    v = verdict((0.1, 0.2), 0.0, 0.5, n=MIN_PROBLEMS - 1)
    assert v.label == "inconclusive" and "sample size" in v.why


# ---------------------------------------------------------------- report from constructed tables
def _coupling_row(lift, ci):
    return dict(label="x", observed=0.4, random=0.3, lift=lift, observed_ci=(0.3, 0.5), random_ci=(0.2, 0.4),
                lift_ci=ci, n=N, n_skipped=0, n_boot=100)


def _tables():
    table2 = {name: _coupling_row(lift, ci) for name, lift, ci in
              zip(COUPLINGS, (0.3, 0.1, -0.2), ((0.1, 0.5), (-0.1, 0.3), (-0.3, -0.1)))}
    table1 = dict(n_problems=N, n_compared=N, n_skipped=0, seconds_per_problem=12.0,
                  top=dict(mean=0.45, ci=[0.4, 0.5], paper=0.534), bottom=dict(mean=0.6, ci=[0.55, 0.65], paper=0.631),
                  difference=dict(mean=-0.15, ci=[-0.2, -0.1], paper=-0.097),
                  top_below_bottom=dict(share=0.8, ci=[0.6, 0.95], paper=0.8714, n_ties=0),
                  settings=dict(k=3, alternatives=3, max_new_tokens=256, min_after=10, dtype="float32"))
    ranges = {name: dict(layers=[i, i + 1], table=table2) for i, name in enumerate(reproduce.RANGES)}
    return table2, table1, ranges


def test_claims_and_markdown(tmp_path):
    table2, table1, ranges = _tables()
    rows = claims(table2, table1, ranges)
    assert len(rows) == 3 + 2 + 3 * 3
    assert [r["direction"] for r in rows[:5]] == ["reproduced", "inconclusive", "opposite", "reproduced",
                                                  "reproduced"]
    assert [r["magnitude"] for r in rows[:5]] == ["not reproduced", "not reproduced", "not reproduced",
                                                  "not reproduced", "reproduced"]
    assert rows[3]["verdict"] == "direction reproduced, magnitude not"
    assert {r["magnitude"] for r in rows[5:]} == {"not judged"}  # v2 Table 10: sign only
    figures = write_figures(tmp_path / "figures", table1, ranges)
    assert all((tmp_path / path).stat().st_size > 1000 for path in figures.values())
    text = render_markdown({"model": "m", "machine": "cpu"}, rows, table2, table1, ranges, figures)
    for number in ("0.534", "0.631", "87.1%", "-0.097", "+52.0%", "+171.5%", "+42.5%", "0.239"):
        assert number in text
    for r in rows:
        assert f"**{r['verdict']}**" in text
    assert "**Summary: 14 claims: direction reproduced in 6, of which magnitude reproduced in 1" in text
    assert "figures/jaccard_top_bottom.png" in text and "- **model**: m" in text


# ---------------------------------------------------------------- end to end on SmolLM2
@pytest.mark.slow
def test_reproduce_end_to_end_then_reuse(tmp_path, monkeypatch, smollm2):
    from attnrhythm import cli
    out = tmp_path / "repro"
    argv = ["reproduce", "--out", str(out), "--n", "2", "--max-new-tokens", "48", "--n-boot", "200", "--threads", "1"]
    assert cli.main(argv) == 0
    for name in ("REPRODUCTION.md", "reproduction.json", "metrics.jsonl", "couplings.json", "perturbations.jsonl",
                 "perturbation.json", "perturbation.html", "layer_ranges.json", "figures/jaccard_top_bottom.png",
                 "figures/couplings_by_layer_range.png", "figures/peak_rules.png"):
        assert (out / name).exists(), name
    text = (out / "REPRODUCTION.md").read_text()
    for piece in ("smollm2-135m", "gsm8k", "0.534", "0.631", "87.1%", "cpu_count", "torch", "attnrhythm reproduce",
                  "Table 2", "Table 1", "Table 10", "bottom [", "top [", "inconclusive", "under other peak rules"):
        assert piece in text, piece
    saved = json.loads((out / "reproduction.json").read_text())
    assert len(saved["claims"]) == 3 + 2 + 9
    assert {r["verdict"] for r in saved["claims"]} == {"inconclusive"}  # 2 problems: too few to judge
    assert set(saved["layer_ranges"]) == {"bottom", "middle", "top"}
    assert saved["layer_ranges"]["bottom"]["layers"] != saved["layer_ranges"]["middle"]["layers"]

    # a second run reuses everything: no generation, no model, no recapture
    def refuse(*args, **kwargs):
        raise AssertionError("reproduce generated or loaded a model again")
    monkeypatch.setattr("attnrhythm.models.load_model", refuse)
    monkeypatch.setattr("attnrhythm.studies.analyze.sample_responses", refuse)
    monkeypatch.setattr("attnrhythm.studies.perturb.greedy_responses", refuse)
    monkeypatch.setattr("attnrhythm.studies.analyze.capture_records", refuse)
    before = (out / "metrics.jsonl").read_text(), (out / "perturbations.jsonl").read_text()
    assert cli.main(argv) == 0
    assert before == ((out / "metrics.jsonl").read_text(), (out / "perturbations.jsonl").read_text())
    # another n with the same folder is refused instead of mixing studies
    assert cli.main(argv[:4] + ["3"] + argv[5:]) == 2

    # published into a docs folder: every figure link of the copied report resolves there
    docs = tmp_path / "docs"
    subprocess.run(["bash", str(ROOT / "scripts" / "publish_reproduction.sh"), str(out), "tiny"],
                   env={**os.environ, "DOCS": str(docs)}, check=True, timeout=60, capture_output=True)
    published = (docs / "REPRODUCTION-tiny.md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", published)
    assert links and all(link.startswith("reproduction-tiny/figures/") and (docs / link).exists() for link in links)
    assert "Outputs in this folder" not in published and "[docs/reproduction-tiny/](reproduction-tiny/)" in published
    assert not (docs / "reproduction-tiny" / "metrics.jsonl").exists()
    assert (docs / "reproduction-tiny" / "reproduction.json").read_text() == (out / "reproduction.json").read_text()
    refused = subprocess.run(["bash", str(ROOT / "scripts" / "publish_reproduction.sh"), str(tmp_path / "none")],
                             env={**os.environ, "DOCS": str(docs)}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "reproduce --out" in refused.stderr
