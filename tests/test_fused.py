"""The fused Triton kernels (capture/fused.py) under the Triton interpreter on CPU: output and
statistics against a float64 reference of the attention maps (GQA, left/right padding with mixed
lengths, sliding window, softcap, sinks, band widths, N not a multiple of the block, bfloat16),
the capability checks, and ``capture_statistics(backend="fused")`` against the block path and
HF eager (Gemma 2 softcapping, GPT-OSS sinks)."""
import logging
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and attnrhythm.capture.fused) is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'attnrhythm[gpu]')")
import triton.language.standard  # noqa: E402

from attnrhythm.capture import capture_statistics, fused, streaming  # noqa: E402
from attnrhythm.core.config import RhythmConfig  # noqa: E402
from attnrhythm.errors import UserError  # noqa: E402

from conftest import tiny_gemma2, tiny_gpt_oss, tiny_qwen3_sliding  # noqa: E402


if any(type(f).__name__ != "InterpretedFunction"
       for f in (fused.fused_kernels.forward_kernel, triton.language.standard.cdiv)):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it)",
                allow_module_level=True)

CONFIG = RhythmConfig(layers=[1, 3], fai_horizon=(10, 100))  # two sampled layers: the interpreter is slow


def reference(q, k, v, valid, scaling, band_width, window=None, softcap=None, sink=None):
    """Explicit float64 maps -> (output [B,N,H,D], row_distance, band, col_sum)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n = q.shape[2]
    s = q @ k.transpose(-1, -2) * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    rows, cols = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (cols <= rows) & valid[:, None, None, :]
    if window:
        allowed &= rows - cols < window
    s = s.masked_fill(~allowed, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.double()[None, :, None, None].expand(*s.shape[:3], 1)], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows that see nothing: zeros
    p = p[..., :n]
    row_valid = valid[:, None, :, None].double()
    offsets = rows - torch.arange(band_width)[None, :]
    band = p.gather(-1, offsets.clamp(min=0).expand(*p.shape[:2], n, band_width)) * (offsets >= 0) * row_valid
    return ((p @ v).transpose(1, 2), (p * (rows - cols).clamp(min=0) * row_valid).sum(-1), band,
            (p * row_valid).sum(-2))


def relative(actual, expected):
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def inputs(batch=3, q_heads=4, kv_heads=2, length=37, head_dim=24, left=True, seed=0, dtype=torch.float32,
           lengths=(None, 20, 29, 5)):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, length, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, length, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, length, head_dim, generator=g)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(lengths[:batch]):  # mixed lengths (None: no padding)
        n = length if n is None else min(n, length)
        if left:
            valid[b, length - n:] = True
        else:
            valid[b, :n] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), valid


CASES = {  # name: (inputs kwargs, kernel kwargs, band width)
    "gqa_left": (dict(), dict(), 12),
    "right_pad": (dict(left=False, seed=1), dict(), 12),
    "window": (dict(seed=2), dict(sliding_window=7), 12),
    "window_interior_tiles": (dict(seed=10, length=70, batch=2), dict(sliding_window=45), 50),
    "softcap": (dict(seed=3), dict(softcap=2.0), 5),
    "sinks": (dict(seed=4, left=False), dict(s_aux=torch.tensor([0.5, -1.0, 2.0, 0.0])), 12),
    "wide_band_mha_d8": (dict(seed=5, q_heads=2, kv_heads=2, head_dim=8, length=21), dict(), 40),
    # tiles of different sizes (window edge, interior and diagonal loops), head dim 80, and a
    # sequence that is all padding
    "uneven_blocks_d80_empty": (dict(seed=9, batch=3, length=70, head_dim=80, lengths=(None, 0, 33)),
                                dict(sliding_window=60, blocks=dict(block_m=32, block_n=16, col_block_m=16,
                                                                    col_block_n=32)), 30),
    "band1_window_softcap_sinks": (dict(seed=6, batch=2), dict(sliding_window=5, softcap=3.0,
                                                                s_aux=torch.tensor([1.0, 0.0, -2.0, 0.5])), 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_float64_reference(case):
    shape, kwargs, width = CASES[case]
    q, k, v, valid = inputs(**shape)
    q = q * 1.5  # peaked rows, so that softcap and window matter
    out, lse, rd, band, col = fused.fused_attention(q, k, v, valid, band_width=width, scaling=0.4, **kwargs)
    want = reference(q, k, v, valid, 0.4, width, kwargs.get("sliding_window"), kwargs.get("softcap"),
                     kwargs.get("s_aux"))
    for name, got, exp in zip(("output", "row_distance", "band", "col_sum"), (out, rd, band, col), want):
        assert relative(got, exp) < 1e-5, name
    assert torch.isfinite(out).all() and (rd[~valid[:, None].expand_as(rd)] == 0).all()
    assert lse.shape == rd.shape


def test_kernel_without_column_sums_and_with_given_views():
    q, k, v, valid = inputs(seed=7, length=40)
    full = torch.zeros(3, 2, 4, 40, 6)  # [B, L, H, N, W]: write slot 1 through a strided view
    _, _, rd, band, col = fused.fused_attention(q, k, v, valid, band_width=6, scaling=0.3, band=full[:, 1],
                                                need_col_sum=False, blocks=dict(col_block_m=32, col_block_n=16))
    _, want_rd, want_band, _ = reference(q, k, v, valid, 0.3, 6)
    assert relative(full[:, 1], want_band) < 1e-5 and relative(rd, want_rd) < 1e-5
    assert (full[:, 0] == 0).all() and (full[:, 1] == band).all() and (col == 0).all()


def test_bfloat16_inputs():
    """bf16 q/k/v: statistics are float32 from float32 scores (the rounded inputs are exact in
    float64), the output carries the bf16 rounding of the probabilities."""
    q, k, v, valid = inputs(seed=8, dtype=torch.bfloat16)
    out, _, rd, band, col = fused.fused_attention(q, k, v, valid, band_width=12, scaling=0.4, sliding_window=9)
    want = reference(q, k, v, valid, 0.4, 12, window=9)
    assert out.dtype == torch.bfloat16 and relative(out, want[0]) < 2e-2
    for got, exp in zip((rd, band, col), want[1:]):
        assert relative(got, exp) < 1e-5


# ---------------------------------------------------------------- capability checks
def test_fused_available_reasons(monkeypatch):
    assert fused.fused_available("cpu", torch.float32, 128) == (True, "")
    assert fused.fused_available("cpu", torch.bfloat16, 80, scaling=0.1, dropout=0.0, position_ids=1)[0]
    for args, kwargs, words in [((torch.float64, 64), {}, "dtype"), ((torch.float32, 512), {}, "head dim"),
                                ((torch.float32, 64), dict(alibi_slopes=torch.ones(2)), "alibi_slopes"),
                                ((torch.float32, 64), dict(dropout=0.1), "dropout"),
                                ((torch.float32, 64), dict(is_causal=False), "non-causal")]:
        ok, reason = fused.fused_available("cpu", *args, **kwargs)
        assert not ok and words in reason and "\n" not in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = fused.fused_available("cpu", torch.float32, 64)
    assert not ok and reason.startswith("not CUDA")
    monkeypatch.setattr(fused, "triton", None)
    assert "Triton" in fused.fused_available("cuda", torch.float32, 64)[1]


def test_mask_check():
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False
    rows, cols = torch.arange(9)[:, None], torch.arange(9)[None, :]
    good = ((cols <= rows) & valid[:, None, None, :])
    assert fused.mask_mismatch(good, valid, None, rows_per_chunk=4) is None
    assert fused.mask_mismatch(good & (rows - cols < 4), valid, 4, rows_per_chunk=4) is None
    assert "window" in fused.mask_mismatch(good & (rows - cols < 4), valid, None)
    chunked = good & ((rows // 4) == (cols // 4))  # chunked attention (Llama 4): not ours
    assert fused.mask_mismatch(chunked, valid, None) is not None
    assert "no attention mask" in fused.mask_mismatch(None, valid, None)
    assert fused.mask_mismatch(None, torch.ones(2, 9, dtype=torch.bool), None) is None
    assert "float" in fused.mask_mismatch(good.float(), valid, None)


# ---------------------------------------------------------------- capture_statistics end to end
def padded(lengths, left, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        o = width - n if left else 0
        ids[b, o:o + n] = torch.randint(3, 259, (n,), generator=g)
        mask[b, o:o + n] = 1
    return ids, mask


def assert_same_stats(a, b, tol=1e-5):
    for key in ("row_distance", "band", "col_sum", "entropy"):
        x, y = getattr(a, key), getattr(b, key)
        assert torch.equal(torch.isnan(x), torch.isnan(y)), key
        assert relative(x.nan_to_num(0), y.nan_to_num(0).double()) < tol, key
    assert torch.equal(a.valid, b.valid) and a.layers == b.layers


@pytest.mark.parametrize("name,left", [("llama_gqa", True), ("qwen3", False)])
def test_capture_fused_equals_streaming(tiny_models, name, left):
    model = tiny_models[name]
    ids, mask = padded([19, 7, 13], left, seed=len(name))
    want = capture_statistics(model, ids, mask, config=CONFIG, backend="streaming", block_bytes=1)
    got = capture_statistics(model, ids, mask, config=CONFIG, backend="fused")
    assert_same_stats(got, want)
    auto = capture_statistics(model, ids, mask, config=CONFIG, backend="auto", block_bytes=1)  # CPU: block path
    assert torch.equal(auto.band, want.band) and torch.equal(auto.col_sum, want.col_sum)


def test_capture_fused_sliding_window():
    model = tiny_qwen3_sliding(window=6)
    ids, mask = padded([17, 11], left=True, seed=3)
    want = capture_statistics(model, ids, mask, config=CONFIG, backend="streaming", block_bytes=1)
    assert_same_stats(capture_statistics(model, ids, mask, config=CONFIG, backend="fused"), want)


def test_fused_refuses_and_auto_falls_back_with_one_notice(tiny_models, monkeypatch, caplog):
    model = tiny_models["llama"]
    ids, mask = padded([9, 6], left=True)
    with pytest.raises(UserError, match="fused.*dtype"):
        capture_statistics(model.double(), ids, mask, config=CONFIG, backend="fused")
    model.float()
    # a layer the kernels cannot compute (here: a mask that is not causal + padding)
    monkeypatch.setattr(fused, "mask_mismatch", lambda *args: "a chunked attention mask")
    with pytest.raises(UserError, match="layer 1.*chunked"):
        capture_statistics(model, ids, mask, config=CONFIG, backend="fused")
    streaming.notice_fallback.cache_clear()
    # "auto" on CPU resolves to the block path before any layer; the per-layer fallback (here: a
    # float64 layer) runs as it would on CUDA
    model.double()
    try:
        want = capture_statistics(model, ids, mask, config=CONFIG, backend="streaming")
        streaming.register()
        with caplog.at_level(logging.WARNING, logger="attnrhythm.capture.streaming"):
            with torch.no_grad(), streaming.streaming_capture([1, 3], CONFIG.band_width, mask.bool(),
                                                              mode="auto") as cap:
                model.set_attn_implementation(streaming.IMPLEMENTATION_NAME)
                try:
                    model.model(input_ids=ids, attention_mask=mask, use_cache=False,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
                finally:
                    model.set_attn_implementation("sdpa")
    finally:
        model.float()
    notices = [r for r in caplog.records if "block path" in r.getMessage()]
    assert len(notices) == 1 and "dtype" in notices[0].getMessage()  # one notice for two layers
    torch.testing.assert_close(cap.stats.band, want.band, rtol=0, atol=0, equal_nan=True)


def test_auto_notice_names_the_reason_unless_only_the_device(tiny_models, monkeypatch, caplog):
    """``resolve_mode``: auto on CPU is the block path without a word; on a (pretended) CUDA
    device without what the kernels need, one notice with the reason."""
    model = tiny_models["llama"]
    streaming.notice_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="attnrhythm.capture.streaming"):
        assert streaming.resolve_mode(model, "auto", torch.device("cpu")) == "block"
        assert not caplog.records
        monkeypatch.setattr(fused, "triton", None)
        for _ in range(2):
            assert streaming.resolve_mode(model, "auto", torch.device("cuda")) == "block"
        with pytest.raises(UserError, match="not available.*Triton"):
            streaming.resolve_mode(model, "fused", torch.device("cuda"))
    assert len(caplog.records) == 1 and "Triton" in caplog.records[0].getMessage()


@pytest.mark.parametrize("layer", [0, 1], ids=["sample_sliding", "sample_full"])
@pytest.mark.parametrize("build", [tiny_gemma2, tiny_gpt_oss], ids=["gemma2_softcap", "gpt_oss_sinks"])
def test_softcap_and_sink_models_match_hf_eager(build, layer):
    """The fused kernels reproduce HF eager maps of models that pass ``softcap`` (Gemma 2) or
    ``s_aux`` (GPT-OSS) to their attention function; the layer that is not sampled must still
    softcap / use its sinks (the model's eager attention)."""
    model = build()
    ids, mask = padded([14, 10], left=True, seed=5)
    config = CONFIG.replace(layers=[layer])
    eager = capture_statistics(model, ids, mask, config=config, backend="eager")
    got = capture_statistics(model, ids, mask, config=config, backend="fused")
    for key in ("row_distance", "band", "col_sum", "entropy"):
        want = getattr(eager, key).nan_to_num(0).double()
        assert relative(getattr(got, key).nan_to_num(0), want) < 1e-5, key
    if build is tiny_gpt_oss:  # the rows' mass over positions (WAAD leaves the sink's share out)
        assert relative(got.row_mass, eager.row_mass.double()) < 1e-5
