"""Regression: small `analyze`, `perturb` and `train` runs through the command line, compared with
the outputs recorded in tests/golden/ after the application layer was rebuilt (issue 9).

A change that moves any response token, metric, Jaccard, loss or reward fails here.  When a
change is meant to move them, rerun with ATTNRHYTHM_UPDATE_GOLDEN=1 to record the new outputs,
and say why in the commit.
"""
import json
import math
import os
from pathlib import Path

import pytest

from attnrhythm.cli import main

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("ATTNRHYTHM_UPDATE_GOLDEN") == "1"
QUESTIONS = ["Tom has 3 apples. He buys 2 more. How many apples does he have?", "What is 2+2?",
             "A train goes 60 miles in 2 hours. How far does it go in 5 hours?"]


def _round(x):
    """Floats to 6 significant digits (what is compared), recursively."""
    if isinstance(x, float):
        return x if not math.isfinite(x) else float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def _close(got, want, where="") -> list[str]:
    if isinstance(want, float) and isinstance(got, (int, float)):
        return [] if math.isclose(got, want, rel_tol=2e-4, abs_tol=1e-6) else [f"{where}: {got} != {want}"]
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return [f"{where}: keys {sorted(set(got) ^ set(want))} differ"]
        return [e for k in want for e in _close(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
        return [e for i, (g, w) in enumerate(zip(got, want)) for e in _close(g, w, f"{where}[{i}]")]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def check(name: str, summary: dict) -> None:
    path = GOLDEN / f"{name}.json"
    summary = _round(json.loads(json.dumps(summary)))
    if UPDATE or not path.exists():
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        if not UPDATE:
            pytest.fail(f"{path} was missing and has been written; check it in")
    errors = _close(summary, json.loads(path.read_text()), name)
    assert not errors, "\n".join(errors[:20])


@pytest.fixture(scope="module")
def folder(tiny_model, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    tiny_model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "problems.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "question": q, "answer": "#### 5"}) + "\n"
                                                 for i, q in enumerate(QUESTIONS)))
    return root


def test_analyze_outputs(folder, tmp_path, one_thread):
    out = tmp_path / "analyze"
    assert main(["analyze", "--model", str(folder / "model"), "--data", str(folder / "problems.jsonl"), "--n", "3",
                 "--max-new-tokens", "12", "--batch-size", "2", "--n-boot", "50", "--out", str(out),
                 "--no-progress"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((out / "run.json").read_text())
    table = json.loads((out / "couplings.json").read_text())["table"]
    check("analyze", dict(
        records=[{k: r[k] for k in ("id", "response_token_ids", "finish_reason", "waad", "delta", "fai", "fai_rows",
                                     "fai_receiver", "entropy", "local_heads", "global_heads", "receiver_heads")}
                 for r in records],
        run={k: run[k] for k in ("status", "layers", "receiver_heads", "n_responses", "prompt_style")},
        table={name: {k: row[k] for k in ("observed", "random", "lift", "lift_ci", "n")} for name, row in table.items()}))


def test_perturb_outputs(folder, tmp_path, one_thread):
    out = tmp_path / "perturb"
    assert main(["perturb", "--model", str(folder / "model"), "--data", str(folder / "problems.jsonl"), "--n", "2",
                 "--k", "1", "--alternatives", "2", "--max-new-tokens", "14", "--min-after", "2", "--n-boot", "50",
                 "--prompt", "paper", "--dtype", "float32", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "perturbations.jsonl").read_text().splitlines()]
    result = json.loads((out / "perturbation.json").read_text())
    check("perturb", dict(
        trials=[{k: t[k] for k in ("problem_id", "group", "position", "forced_token_id", "jaccard",
                                    "perturbed_token_ids")} for t in lines if t["type"] == "trial"],
        problems=[{k: p[k] for k in ("problem_id", "response_token_ids", "fai", "top_positions", "bottom_positions")}
                  for p in lines if p["type"] == "problem"],
        summary={k: result[k] for k in ("top", "bottom", "difference", "n_compared")}))


def test_train_outputs(tmp_path, one_thread):
    pytest.importorskip("trl")
    try:
        from test_trainer import build_tiny_model
    except ImportError:
        from tests.test_trainer import build_tiny_model
    model = build_tiny_model(tmp_path / "tiny")
    out = tmp_path / "train"
    assert main(["train", "--model", model, "--task", "countdown-easy", "--credit", "coupled", "--num-generations", "2",
                 "--per-device-batch", "2", "--steps-per-generation", "2", "--max-completion-length", "12",
                 "--device", "cpu", "--save-steps", "0", "--max-steps", "2", "--learning-rate", "0.01",
                 "--reward-function", "test_trainer:id_reward", "--out", str(out)]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = ("step", "loss", "reward", "rhythm/gamma_mean", "rhythm/share_amplified", "rhythm/set_anchor",
            "rhythm/set_dominated", "rhythm/set_intro", "rhythm/set_local", "completions/mean_length")
    check("train", dict(steps=[{k: r.get(k) for k in keys} for r in records]))
