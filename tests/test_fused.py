"""The fused Triton kernels (capture/fused.py) under the Triton interpreter on CPU: output and
statistics against a float64 reference of the attention maps (GQA, left/right padding with mixed
lengths, sliding window, softcap, sinks, band widths, N not a multiple of the block, bfloat16),
the capability checks, and ``capture_statistics(backend="fused")`` against the block path and
HF eager (Gemma 2 softcapping, GPT-OSS sinks)."""
import contextlib
import logging
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and attnrhythm.capture.fused) is first imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'attnrhythm[gpu]')")

from attnrhythm.capture import capture_statistics, fused, streaming  # noqa: E402
from attnrhythm.core.config import RhythmConfig  # noqa: E402
from attnrhythm.errors import UserError  # noqa: E402

from conftest import tiny_gemma2, tiny_gpt_oss, tiny_qwen3_sliding  # noqa: E402

if type(fused.fused_kernels.forward_kernel).__name__ != "InterpretedFunction":
    pytest.skip("attnrhythm.capture.fused was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

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


# ---------------------------------------------------------------- launches on real hardware (issue 19, item 1)
def test_launches_run_under_the_tensors_device(monkeypatch):
    """Both kernels launch inside ``device_guard(query.device)``, which makes the tensors' own CUDA
    device current (Triton launches on the current device: a layer on cuda:1 would fault)."""
    guard = fused.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(fused.device_guard("cpu"), contextlib.nullcontext)
    current, under = [], []

    @contextlib.contextmanager
    def guard_of(device):
        current.append(torch.device(device))
        yield
        current.pop()

    real_launch = fused._launch
    monkeypatch.setattr(fused, "device_guard", guard_of)
    monkeypatch.setattr(fused, "_launch", lambda *args: (under.append(list(current)), real_launch(*args)))
    q, k, v, valid = inputs(batch=1, length=9)
    fused.fused_attention(q, k, v, valid, band_width=3)
    assert under == [[q.device], [q.device]]


def test_grid_folds_sequences_times_heads(monkeypatch):
    """B * H programs fold into grid dimensions 2 and 3 (each <= 65535); here the limit is 5, so
    12 (sequence, head) pairs run as 5 x 3 with 3 idle programs, and the result is unchanged."""
    assert fused.folded_grid(7, 12) == (7, 12, 1) and fused.folded_grid(7, 70_000) == (7, 65535, 2)
    with pytest.raises(ValueError, match="split the batch"):
        fused.folded_grid(1, 65535**2 + 1)
    monkeypatch.setattr(fused, "MAX_GRID_Y", 5)
    assert fused.folded_grid(2, 12) == (2, 5, 3)
    q, k, v, valid = inputs(seed=11, length=20)
    out, _, rd, band, col = fused.fused_attention(q, k, v, valid, band_width=6, scaling=0.4)
    for got, want in zip((out, rd, band, col), reference(q, k, v, valid, 0.4, 6)):
        assert relative(got, want) < 1e-5


def test_offsets_past_int32_compile_wide(monkeypatch):
    """Offsets within a head pass 2**31 - 1 beyond 128K tokens x 64 heads x 256 ([B, N, H, D]
    layout, as transformers passes q): the kernels then compute them in 64 bits, with the same
    results."""
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731 - shapes and strides only
    q, k = meta(1, 131072, 64, 256).transpose(1, 2), meta(1, 131072, 8, 256).transpose(1, 2)
    assert not fused.needs_wide_offsets(q, k, k, meta(1, 131072, 64, 256), meta(1, 64, 131072, 101))  # 2**31 - 16129
    q, k = meta(1, 131073, 64, 256).transpose(1, 2), meta(1, 131073, 8, 256).transpose(1, 2)
    assert fused.needs_wide_offsets(q, k, k, None, meta(1, 64, 131073, 101))
    q, k = meta(1, 32768, 32, 128).transpose(1, 2), meta(1, 32768, 8, 128).transpose(1, 2)
    assert not fused.needs_wide_offsets(q, k, k, meta(1, 32768, 32, 128), meta(1, 32, 32768, 101))
    monkeypatch.setattr(fused, "INT32_LIMIT", 0)  # every launch takes the 64-bit variant
    q, k, v, valid = inputs(seed=12, length=20)
    out, _, rd, band, col = fused.fused_attention(q, k, v, valid, band_width=6, scaling=0.4, sliding_window=9)
    for got, want in zip((out, rd, band, col), reference(q, k, v, valid, 0.4, 6, window=9)):
        assert relative(got, want) < 1e-5


def test_fallback_tiles_are_never_larger_than_requested():
    """Out of resources: the retry takes each size as the smaller of the request and SMALLER;
    a request already that small is re-raised, not retried."""
    from triton.runtime.errors import OutOfResources

    launched = []

    class Kernel:  # fails its first launch
        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                launched.append(constexprs)
                if len(launched) == 1:
                    raise OutOfResources(1, 0, "shared memory")
            return launch

    requested = dict(block_m=32, block_n=64, col_block_m=16, col_block_n=128, num_warps=8, num_stages=3)
    fused._launch(Kernel(), lambda c: (1,), requested, (), dict)
    assert launched[1] == dict(block_m=32, block_n=32, col_block_m=16, col_block_n=64, num_warps=4, num_stages=1)
    launched.clear()
    with pytest.raises(OutOfResources):
        fused._launch(Kernel(), lambda c: (1,), dict(fused.SMALLER), (), dict)


def test_statistics_only_and_pass_one_only():
    """``write_output=False`` (beside the model's own output, in training) gives the same
    statistics bitwise and no output; band width 0 without column sums runs pass 1 alone."""
    q, k, v, valid = inputs(seed=13, length=24)
    out, lse, rd, band, col = fused.fused_attention(q, k, v, valid, band_width=5, scaling=0.4, softcap=2.0)
    none, lse2, rd2, band2, col2 = fused.fused_attention(q, k, v, valid, band_width=5, scaling=0.4, softcap=2.0,
                                                         write_output=False)
    assert none is None and all(torch.equal(a, b) for a, b in ((lse, lse2), (rd, rd2), (band, band2), (col, col2)))
    _, _, rd1, band1, col1 = fused.fused_attention(q, k, v, valid, band_width=0, need_col_sum=False, scaling=0.4,
                                                   softcap=2.0)
    assert torch.equal(rd1, rd) and band1.shape[-1] == 0 and (col1 == 0).all()


def test_float32_precision_follows_torch():
    """float32 products are exact ("ieee") unless torch allows TF32 for float32 matmuls."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert fused.dot_precision(torch.float32, upcast=False) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert fused.dot_precision(torch.float32, upcast=False) == "tf32"
        assert fused.dot_precision(torch.bfloat16, upcast=True) == "ieee"  # the interpreter: float32 copies
    finally:
        torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------- inside training (issue 19, item 2)
def test_in_pass_fused_statistics_equal_the_two_pass_path(tiny_models, monkeypatch):
    """The statistics taken inside someone else's forward passes (TRL's old-log-prob pass, in two
    chunks) by the fused kernels in their statistics-only mode: the pass's logits bitwise as
    without them, and the same gamma as the separate capture of each chunk (the two-pass path);
    "auto" on CPU is the block loop, bitwise as mode="block"."""
    from attnrhythm.capture.in_pass import statistics_in_pass
    from attnrhythm.core.credit import credit_gamma
    from attnrhythm.core.metrics import rhythm_from_stats

    model = tiny_models["llama_gqa"]
    config = CONFIG.replace(layers=[1, 2])
    ids, mask = padded([19, 7, 13, 16], left=True, seed=4)
    response = mask.bool() & (mask.cumsum(-1) > 5)
    calls = []
    real = fused.fused_layer
    monkeypatch.setattr(fused, "fused_layer", lambda *a, **k: (calls.append(k["write_output"]), real(*a, **k))[1])

    def trl_pass(mode):
        with torch.no_grad(), statistics_in_pass(model, config, entropy=True, mode=mode) as cap:
            logits = [model(input_ids=ids[s:s + 2], attention_mask=mask[s:s + 2]).logits for s in (0, 2)]
        assert cap.failed is None and cap.rows == 4
        return logits, cap.chunks

    with torch.no_grad():
        plain = [model(input_ids=ids[s:s + 2], attention_mask=mask[s:s + 2]).logits for s in (0, 2)]
    logits, chunks = trl_pass("fused")
    assert calls == [False] * 4  # two layers x two chunks, statistics only
    for s, stats in chunks:
        assert torch.equal(logits[s // 2], plain[s // 2])
        two_pass = capture_statistics(model, ids[s:s + 2], mask[s:s + 2], config=config, backend="streaming")
        assert_same_stats(stats, two_pass, tol=1e-4)  # the pass's positions shift under left padding: rounding
        gammas = [credit_gamma(rhythm_from_stats(x, response[s:s + 2], config), "coupled", config)
                  for x in (stats, two_pass)]
        assert torch.equal(gammas[0], gammas[1]) and (gammas[0] != 1).any()
    calls.clear()
    auto, block = trl_pass("auto")[1], trl_pass("block")[1]
    assert not calls and all(torch.equal(a.band, b.band) for (_, a), (_, b) in zip(auto, block))


def test_fused_receivers_equal_the_block_path(tiny_models):
    """``capture_with_receivers`` on the fused backend: the narrow receiver layers as the block path."""
    from attnrhythm.capture import capture_with_receivers

    model = tiny_models["qwen3"]
    ids, mask = padded([15, 9], left=True, seed=6)
    config = CONFIG.replace(layers=[2], fai_horizon=(1, None))
    got = capture_with_receivers(model, ids, mask, config=config, receiver_layers=[0, 2], backend="fused")
    want = capture_with_receivers(model, ids, mask, config=config, receiver_layers=[0, 2], backend="streaming")
    for a, b in zip(got, want):
        assert a.band.shape == b.band.shape and a.layers == b.layers
        for key in ("row_distance", "band", "col_sum"):
            assert relative(getattr(a, key), getattr(b, key).double()) < 1e-5, key


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/fused_gpu_check.py end to end on tiny shapes under the interpreter: every stage
    reports its rows (pass 1 alone, statistics only, SDPA; decoder, plain, streaming, fused and in
    pass in one process) into --out, and the exactness rows hold.  Stages past their time limit
    are reported and the run goes on; the watchdog stops the whole run at --limit (exit 124)."""
    rows = gpu_check(tmp_path / "full", 0)
    assert (tmp_path / "full" / "fused_gpu_check.txt").read_text().count("\n") == len(rows)
    found = {(r["stage"], r.get("row")) for r in rows if isinstance(r, dict)}
    for want in [("kernels", "sdpa"), ("kernels", "pass 1 only"), ("kernels", "statistics only"),
                 ("model", "decoder"), ("model", "plain"), ("model", "streaming"), ("model", "fused"),
                 ("model", "in pass"), ("in_pass", None), ("eager", None), ("exact", None)]:
        assert want in found, want
    assert not [r for r in rows if isinstance(r, dict) and ("error" in r or "timeout" in r or r.get("ok") is False)]
    assert rows[-1] == "done: 0 failed row(s) or stage(s)"
    rows = gpu_check(tmp_path / "stages", 1, "--stage-scale", "1e-4")
    assert {r["stage"] for r in rows if isinstance(r, dict) and "timeout" in r} == set(STAGES)
    assert rows[-1] == f"done: {len(STAGES)} failed row(s) or stage(s)"
    rows = gpu_check(tmp_path / "watchdog", 124, "--limit", "2")
    assert rows[-1].startswith("watchdog: the run passed --limit 2 s")


def gpu_check(out, returncode: int, *args) -> list:
    """Rows of one dry run of benchmarks/fused_gpu_check.py (a subprocess: the interpreter and
    the watchdog's exit stay out of this process)."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "fused_gpu_check.py"), "--dry-run",
                           "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == returncode, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((out / "fused_gpu_check.json").read_text())


STAGES = {"exact", "eager", "kernels", "model", "in_pass"}
