"""The README is a front page that does not lie: short, its links resolve, every number in its
analysis table is in the report its column links to, and its Python example runs and computes
what HF's own attention maps give."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NUMBER = re.compile(r"[-+]?\d+\.\d+")


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_front_page_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert targets
    missing = [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]
    assert not missing, missing


def test_every_number_of_the_analysis_table_is_in_the_report_its_column_links_to():
    rows = [line for line in _section("What the analysis shows").splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    sources = [re.search(r"\]\(([^)]+)\)", c) for c in columns]
    assert sum(s is not None for s in sources) == 3 and len(body) == 5
    for line in body:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for cell, source in zip(cells, sources):
            if source is None:
                continue
            text = (ROOT / source.group(1)).read_text()
            for number in NUMBER.findall(cell):
                assert number.lstrip("+-") in text, f"{number} ({cell}) is not in {source.group(1)}"


def test_the_python_example_runs_and_matches_eager_attention_maps(capsys):
    """Runs the README's block as written (on the embedded SmolLM2), then recomputes the same
    rhythm from HF's ``output_attentions=True`` maps (the eager backend)."""
    import attnrhythm as ar
    from attnrhythm.models import load_model

    try:
        load_model("smollm2-135m", device="cpu")
    except (FileNotFoundError, ImportError, OSError) as err:
        pytest.skip(f"SmolLM2 is not available: {err}")
    code = re.search(r"```python\n(.*?)```", _section("Python API"), re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # our own README, not model output
    printed = capsys.readouterr().out
    assert "tensor" in printed
    r, gamma, cfg, ids, response = (scope[k] for k in ("r", "gamma", "cfg", "ids", "response"))
    reference = ar.rhythm_from_stats(ar.capture_statistics(scope["model"], ids.input_ids, ids.attention_mask,
                                                           config=cfg, backend="eager"), response, cfg)
    assert r.waad.shape == (1, int(response.sum()))
    torch.testing.assert_close(r.waad, reference.waad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.fai, reference.fai, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert torch.isfinite(r.fai).any(), "the answer is long enough for FAI to be defined"
    assert torch.equal(gamma, ar.credit_gamma(reference, "coupled", cfg))
    assert (gamma > 1).any() and ((gamma == 1) | (gamma > 1)).all()
