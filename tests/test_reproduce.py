"""`attnrhythm reproduce`: claims with their families and counting, the report from constructed
tables, the per-problem files and the check that recomputes every table from them (on synthetic
records, and on the published docs/reproduction*/ folders), head overlap, and (slow) the whole
command on SmolLM2, then again reusing every output."""
import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from attnrhythm.core.couplings import COUPLINGS, DISJOINT, PAPER_TABLE2
from attnrhythm.core.peak_rules import PeakRule, coupling_sweep
from attnrhythm.studies import published, verdicts
from attnrhythm.studies.figures import reproduction_figures
from attnrhythm.studies.perturb import summarize
from attnrhythm.studies.records import disjoint_fai, head_overlap, record_couplings, records_table
from attnrhythm.studies.reproduce import assemble, write_report
from attnrhythm.studies.tables import reproduction_markdown
from attnrhythm.studies.verdicts import MIN_PROBLEMS, RANGES, claims, claims_summary

ROOT = Path(__file__).resolve().parents[1]
N = MIN_PROBLEMS  # enough problems for a verdict
PUBLISHED = sorted(p for p in (ROOT / "docs").glob("reproduction*") if (p / "reproduction.json").exists())


# ---------------------------------------------------------------- claims from constructed tables
def _coupling_row(lift, ci):
    return dict(label="x", observed=0.4, random=0.3, lift=lift, observed_ci=(0.3, 0.5), random_ci=(0.2, 0.4),
                lift_ci=ci, n=N, n_skipped=0, n_boot=100)


def _tables():
    table2 = {name: _coupling_row(lift, ci) for name, lift, ci in
              zip(COUPLINGS, (0.3, 0.1, -0.2), ((0.1, 0.5), (-0.1, 0.3), (-0.3, -0.1)))}
    table2[DISJOINT] = _coupling_row(0.05, (0.01, 0.09))
    table1 = dict(n_problems=N, n_compared=N, n_skipped=0, seconds_per_problem=12.0,
                  top=dict(mean=0.45, ci=[0.4, 0.5], paper=0.534), bottom=dict(mean=0.6, ci=[0.55, 0.65], paper=0.631),
                  difference=dict(mean=-0.15, ci=[-0.2, -0.1], paper=-0.097),
                  top_below_bottom=dict(share=0.8, ci=[0.6, 0.95], paper=0.8714, n_ties=0),
                  settings=dict(k=3, alternatives=3, max_new_tokens=256, min_after=10, dtype="float32"))
    # each range its own numbers, except the middle's entropy and follows-WAAD rows: Table 2 again
    ranges = {}
    for i, name in enumerate(RANGES):
        table = {c: _coupling_row(0.2 + 0.1 * i + 0.01 * j, (0.1 + 0.1 * i + 0.01 * j, 0.3 + 0.1 * i))
                 for j, c in enumerate(COUPLINGS + (DISJOINT,))}
        if name == "middle":
            table.update({c: table2[c] for c in ("entropy_at_waad_peaks", "fai_follows_waad")})
        ranges[name] = dict(layers=[i, i + 1], table=table)
    return table2, table1, ranges


def test_claims_families_and_counting(tmp_path):
    table2, table1, ranges = _tables()
    analysis = dict(layers=[1, 2], receiver_layers="all")
    rows = claims(table2, table1, ranges, analysis)
    assert [r["family"] for r in rows] == ["main"] * 5 + ["disjoint"] + ["layer ranges"] * 12
    assert [r["direction"] for r in rows[:5]] == ["reproduced", "inconclusive", "opposite", "reproduced",
                                                  "reproduced"]
    # the difference [-0.2, -0.1] excludes -0.097; the share [0.6, 0.95] holds 87.1% but reaches below 68.6%
    assert [r["magnitude"] for r in rows[:5]] == ["not reproduced", "not reproduced", "not reproduced",
                                                  "not reproduced", "undetermined"]
    assert {r["magnitude"] for r in rows[5:]} == {"not judged"}  # no paper number
    # the middle range (the analysis's layers [1, 2]): entropy and follows-WAAD repeat Table 2
    uncounted = [r["key"] for r in rows if not r["counted"]]
    assert uncounted == ["middle/entropy_at_waad_peaks", "middle/fai_follows_waad"]
    summary = claims_summary(rows)
    assert summary.startswith("Paper's numbers (Tables 1 and 2): 5 numbers: direction reproduced in 3, inconclusive "
                              "in 1, opposite in 1; magnitude reproduced in 0, not reproduced in 4, undetermined in 1")
    assert "Layer ranges (v2 Table 10): 10 numbers" in summary
    assert "not counted: 2 rows repeat a number counted elsewhere" in summary
    assert "Co-occurrence with disjoint head sets: 1 number: direction reproduced in 1" in summary
    result = dict(claims=rows, table2=table2, table1=table1, layer_ranges=ranges, analysis=analysis)
    assert published.check_claims(result) == []
    # receivers ranked in the sampled layers: the middle co-occurrence rows repeat Table 2 too
    sampled = claims(table2, table1, ranges, dict(analysis, receiver_layers="sampled"))
    assert sum(not r["counted"] for r in sampled) == 4
    # no head shared between the sets (Table 2, and the bottom third): the disjoint rows repeat their
    # co-occurrence rows
    none_shared = dict(table2=dict(shared_max=0), bottom=dict(shared_max=0), top=dict(shared_max=2))
    keys = [r["key"] for r in claims(table2, table1, ranges, analysis, none_shared) if not r["counted"]]
    assert keys == [DISJOINT, f"bottom/{DISJOINT}", "middle/entropy_at_waad_peaks", "middle/fai_follows_waad"]
    # a statistic no problem defines (Gemma's thirds: every head a receiver head, none left for the
    # disjoint global set) is shown, not counted, and named as undefined rather than inconclusive
    void = {name: dict(entry, table={**entry["table"], DISJOINT: dict(entry["table"][DISJOINT], n=0, lift=None,
                                                                        lift_ci=[None, None])})
            for name, entry in ranges.items()}
    rows_void = claims(table2, table1, void, analysis)
    assert [r["key"] for r in rows_void if r.get("paper_note") == verdicts.UNDEFINED] == \
        [f"{name}/{DISJOINT}" for name in ranges]
    summary = claims_summary(rows_void)
    assert "Layer ranges (v2 Table 10): 7 numbers" in summary
    assert "not counted: 2 rows repeat a number counted elsewhere and 3 rows are undefined" in summary
    assert published.check_claims(dict(result, claims=rows_void, layer_ranges=void)) == []
    # the check finds a repeated number counted, a verdict off the rule, and a row counted twice
    broken = [dict(r, counted=True) for r in rows]
    broken[0] = dict(broken[0], magnitude="reproduced")
    errors = published.check_claims(dict(result, claims=broken + broken[:1]))
    assert any("middle third: entropy" in e and "counted" in e for e in errors)
    assert any("stored magnitude 'reproduced'" in e for e in errors)
    assert any("counted twice" in e for e in errors)
    assert "analysis" in published.check_claims(dict(claims=rows))[0]


def test_report_from_constructed_tables(tmp_path):
    table2, table1, ranges = _tables()
    run = dict(settings=dict(model="m", data="d", seed=0, n_boot=100, temperature=0.7, max_new_tokens=9),
               config=dict(receiver_layers="all", coupling_k=3, fai_horizon=[1, None]), layers=[1, 2])
    overlap = {"table2": dict(label="Table 2", receiver_heads=20, receivers_in_layers=1, global_heads_mean=13.0,
                              shared_mean=0.4, shared_min=0, shared_max=1, shared_share=0.03, responses_sharing=40,
                              n_responses=100)}
    figures = reproduction_figures(tmp_path / "figures", table1, ranges)
    assert all((tmp_path / path).stat().st_size > 1000 for path in figures.values())
    result = assemble(run, table2, table1, ranges, [], overlap, {"model": "m", "machine": "cpu"}, figures)
    text = reproduction_markdown(result)
    for number in ("0.534", "0.631", "87.1%", "-0.097", "+52.0%", "+171.5%", "+42.5%", "0.239"):
        assert number in text
    for r in result["claims"]:
        assert f"**{r['verdict']}**" in text
    assert f"**Summary. {result['summary']}.**" in text
    assert "## Head overlap" in text and "| Table 2 | 20 | 1 | 13.0 | 0.40 (0-1) | 40 of 100 |" in text
    assert "disjoint head sets" in text and "the Table 2 number again; not counted" in text
    assert "## What holds under every analysis choice" in text
    assert "figures/jaccard_top_bottom.png" in text and "- **model**: m" in text


# ---------------------------------------------------------------- per-problem files and their check
def synthetic_records(n=14, length=60, seed=0):
    """Records with random series, head sets and their couplings (as the analysis stores them)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        series = {key: [float(v) for v in rng.normal(0, 1, length)] for key in ("waad", "fai", "fai_receiver")}
        series["entropy"] = [float(v) for v in rng.uniform(0, 2, length)]
        series["fai"][-1] = None
        r = dict(id=f"p{i}", response_token_ids=list(range(length)), layers=[2, 3], receiver_layers=[0, 1, 2, 3],
                 global_heads=[[2, 0], [3, 1], [3, 2]], **series)
        r["couplings"] = record_couplings(r)
        records.append(r)
    records.append(dict(id="empty", response_token_ids=[], layers=[2, 3], global_heads=[], couplings={},
                        waad=[], fai=[], entropy=[], fai_receiver=[]))
    return records


def _folder(tmp_path, records):
    """A reproduction folder from synthetic records: tables computed the way reproduce computes
    them, then the per-problem files and reproduction.json."""
    for r in records:
        if r["response_token_ids"]:
            r["fai_global_disjoint"] = r["fai_receiver"][::-1]
            r["couplings"][DISJOINT] = record_couplings(r)[DISJOINT]
    table2 = records_table(records, n_boot=200, seed=3)
    rng = np.random.default_rng(1)
    perturbed = [dict(problem_id=f"p{i}", top_mean=float(rng.uniform()), bottom_mean=float(rng.uniform()))
                 for i in range(12)] + [dict(problem_id="short", top_mean=None, bottom_mean=None)]
    table1 = dict(summarize(perturbed, 200, 3), settings=dict(min_after=10), seconds_per_problem=1.0)
    ranges = {}
    for i, name in enumerate(RANGES):  # each range its own series (a recapture with other layers)
        copies = synthetic_records(seed=10 + i)
        ranges[name] = dict(layers=[i], table=records_table(copies, n_boot=200, seed=3),
                            per_problem={r["id"]: r["couplings"] or None for r in copies})
    sweep = coupling_sweep(records, [PeakRule("topq", 0.2), PeakRule("prominence", 0.5)], n_boot=200, seed=3)
    run = dict(settings=dict(seed=3, n_boot=200), config=dict(receiver_layers="all", coupling_k=3), layers=[2, 3])
    result = assemble(run, table2, table1, ranges, sweep, {"table2": head_overlap(records, [[3, 1]])}, {"model": "m"},
                      {})
    published.write_files(tmp_path, records, list(table2), perturbed, ranges)
    write_report(tmp_path, result)
    return result


def test_per_problem_files_recompute_every_table(tmp_path):
    records = synthetic_records()
    result = _folder(tmp_path, records)
    rows = [json.loads(line) for line in (tmp_path / published.TABLE2).read_text().splitlines()]
    assert {(r["problem"], r["claim"]) for r in rows} == {(rec["id"], c) for rec in records for c in result["table2"]}
    for claim, want in result["table2"].items():  # the rule, written out
        pairs = [(r["observed"], r["random"]) for r in rows if r["claim"] == claim and r["observed"] is not None]
        assert sum(o for o, _ in pairs) / sum(x for _, x in pairs) - 1 == pytest.approx(want["lift"], rel=1e-12)
        assert len(pairs) == want["n"]
    errors, checked = published.check_folder(tmp_path)
    assert errors == [] and len(checked) == 4 + 1 + 3 * 3 + 2
    assert published.read_series(tmp_path / published.SERIES) == json.loads(json.dumps(records))
    # a changed number anywhere is found
    for name, old, new in ((published.TABLE2, '"observed": 0.', '"observed": 1.'),
                           (published.TABLE1, '"top": 0.', '"top": 1.'),
                           (published.RANGES, '"random": 0.', '"random": 1.')):
        text = (tmp_path / name).read_text()
        (tmp_path / name).write_text(text.replace(old, new, 1))
        errors, _ = published.check_folder(tmp_path, sweep=False)
        assert errors, name
        (tmp_path / name).write_text(text)
    stored = json.loads((tmp_path / "reproduction.json").read_text())
    stored["claims"][0]["magnitude"] = "reproduced"
    stored["peak_rule_sweep"][0]["lift"] += 0.01
    (tmp_path / "reproduction.json").write_text(json.dumps(stored))
    errors, _ = published.check_folder(tmp_path)
    assert any("the rule gives" in e for e in errors) and any(e.startswith("sweep.top-q 0.2") for e in errors)
    # a number published as undefined (null) while the files define it is found too
    claim = next(iter(stored["table2"]))
    stored["table2"][claim]["lift"] = None
    (tmp_path / "reproduction.json").write_text(json.dumps(stored))
    errors, _ = published.check_folder(tmp_path, sweep=False)
    assert any(e.startswith(f"table2.{claim}.lift: recomputed") for e in errors), errors


def test_head_overlap_and_disjoint_fai():
    record = dict(response_token_ids=[1, 2, 3], layers=[2, 3], receiver_layers=[0, 1, 2, 3],
                  global_heads=[[2, 0], [3, 1], [3, 2]])
    head_fai = np.arange(4 * 3 * 3, dtype=np.float32).reshape(4, 3, 3)  # [layer slot, head, token]
    # receivers [3, 1] and [0, 0]: the global set keeps [2, 0] and [3, 2]
    assert disjoint_fai(record, [[3, 1], [0, 0]], head_fai) == pytest.approx((head_fai[2, 0] + head_fai[3, 2]) / 2)
    assert disjoint_fai(record, [[2, 0], [3, 1], [3, 2]], head_fai) == [None] * 3
    assert disjoint_fai(dict(record, response_token_ids=[]), [], head_fai) is None
    other = dict(record, global_heads=[[2, 0], [2, 1], [2, 2]])
    o = head_overlap([record, other, dict(record, response_token_ids=[])], [[3, 1], [3, 2], [2, 0], [0, 5]], "x")
    assert (o["receivers_in_layers"], o["shared_min"], o["shared_max"], o["responses_sharing"], o["n_responses"]) == \
        (3, 1, 3, 2, 2)
    assert o["shared_mean"] == 2.0 and o["global_heads_mean"] == 3.0 and o["shared_share"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- the published folders
@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_published_verdicts_follow_the_rule(folder):
    """Every published verdict is the rule's, and no number is counted twice."""
    result = json.loads((folder / "reproduction.json").read_text())
    assert published.check_claims(result) == []
    assert {c["magnitude"] for c in result["claims"]} <= {"reproduced", "not reproduced", "undetermined", "not judged"}


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_published_tables_recompute(folder):
    """Every lift and interval of a published reproduction recomputes from its per-problem files."""
    if not (folder / published.TABLE2).exists():
        pytest.skip(f"{folder.name} was published before its per-problem files existed: rerun `attnrhythm reproduce` "
                    "(issue 18) and publish it with scripts/publish_reproduction.sh")
    errors, _ = published.check_folder(folder)
    assert errors == []


# ---------------------------------------------------------------- end to end on SmolLM2
@pytest.mark.slow
def test_reproduce_end_to_end_then_reuse(tmp_path, monkeypatch, smollm2):
    from attnrhythm import cli
    out = tmp_path / "repro"
    argv = ["reproduce", "--out", str(out), "--n", "2", "--max-new-tokens", "48", "--n-boot", "200", "--threads", "1"]
    assert cli.main(argv) == 0
    for name in ("REPRODUCTION.md", "reproduction.json", "metrics.jsonl", "couplings.json", "perturbations.jsonl",
                 "perturbation.json", "perturbation.html", "layer_ranges.json", "disjoint.json",
                 "figures/jaccard_top_bottom.png", "figures/couplings_by_layer_range.png", "figures/peak_rules.png",
                 *published.FILES):
        assert (out / name).exists(), name
    text = (out / "REPRODUCTION.md").read_text()
    for piece in ("smollm2-135m", "gsm8k", "0.534", "0.631", "87.1%", "cpu_count", "torch", "attnrhythm reproduce",
                  "Table 2", "Table 1", "Table 10", "bottom [", "top [", "inconclusive", "under other peak rules",
                  "Head overlap", "disjoint head sets"):
        assert piece in text, piece
    saved = json.loads((out / "reproduction.json").read_text())
    assert len(saved["claims"]) == 3 + 2 + 1 + 3 * 4
    assert {r["direction"] for r in saved["claims"]} == {"inconclusive"}  # 2 problems: too few to judge
    assert set(saved["layer_ranges"]) == {"bottom", "middle", "top"}
    assert saved["layer_ranges"]["bottom"]["layers"] != saved["layer_ranges"]["middle"]["layers"]
    assert published.check_folder(out)[0] == []

    # a second run reuses everything: no generation, no model, no recapture
    def refuse(*args, **kwargs):
        raise AssertionError("reproduce generated or loaded a model again")
    monkeypatch.setattr("attnrhythm.models.load_model", refuse)
    monkeypatch.setattr("attnrhythm.studies.analyze.sample_responses", refuse)
    monkeypatch.setattr("attnrhythm.studies.perturb.greedy_responses", refuse)
    monkeypatch.setattr("attnrhythm.studies.reanalysis.capture_records", refuse)
    monkeypatch.setattr("attnrhythm.studies.reanalysis.recapture_head_fai", refuse)
    before = (out / "metrics.jsonl").read_text(), (out / "perturbations.jsonl").read_text()
    assert cli.main(argv) == 0
    assert before == ((out / "metrics.jsonl").read_text(), (out / "perturbations.jsonl").read_text())
    # another n with the same folder is refused instead of mixing studies
    assert cli.main(argv[:4] + ["3"] + argv[5:]) == 2

    # published into a docs folder: every figure link of the copied report resolves there, and
    # the per-problem files travel with it
    docs = tmp_path / "docs"
    subprocess.run(["bash", str(ROOT / "scripts" / "publish_reproduction.sh"), str(out), "tiny"],
                   env={**os.environ, "DOCS": str(docs)}, check=True, timeout=60, capture_output=True)
    published_md = (docs / "REPRODUCTION-tiny.md").read_text()
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", published_md)
    assert links and all(link.startswith("reproduction-tiny/figures/") and (docs / link).exists() for link in links)
    assert "Outputs in this folder" not in published_md and "[docs/reproduction-tiny/](reproduction-tiny/)" in published_md
    assert not (docs / "reproduction-tiny" / "metrics.jsonl").exists()
    assert (docs / "reproduction-tiny" / "reproduction.json").read_text() == (out / "reproduction.json").read_text()
    assert published.check_folder(docs / "reproduction-tiny")[0] == []
    refused = subprocess.run(["bash", str(ROOT / "scripts" / "publish_reproduction.sh"), str(tmp_path / "none")],
                             env={**os.environ, "DOCS": str(docs)}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "reproduce --out" in refused.stderr
