"""The fused kernels on the way to a GPU (issue 19), under the Triton interpreter: launches under the
tensors' device, the folded grid, 64-bit offsets, the fallback tiles, the statistics-only and
pass-1-only modes, the float32 precision rule, the fused statistics inside someone else's forward
pass (TRL's) against the two-pass path, narrow receiver layers, and the prepared GPU check's dry
run (with its stage time limits and watchdog)."""
import contextlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (tests/conftest.py sets it too)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'attnrhythm[gpu]')")

from test_fused import CONFIG, assert_same_stats, inputs, padded, reference, relative  # noqa: E402 - skips as it does

from attnrhythm.capture import capture_statistics, fused  # noqa: E402


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


def test_gpu_check_in_pass_stage_reports_its_timeout(tiny_models, monkeypatch):
    """The in-pass capture swallows errors (a training pass must go on), a stage timeout included;
    the check must still report its stage out of time, however fast the rest of it runs (CI once
    saw 4 of 5 stages time out at --stage-scale 1e-4: the in-pass stage finished in the half second
    before the alarm rang again)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import fused_gpu_check
    import stages

    model = tiny_models["qwen3"]
    row = fused_gpu_check.in_pass_check(model, 16, model.config.vocab_size, "cpu")
    assert row["ok"], row
    monkeypatch.setattr(stages, "_deadline", [0.0])  # the stage's limit has passed
    with pytest.raises(stages.StageTimeout):
        fused_gpu_check.in_pass_check(model, 16, model.config.vocab_size, "cpu")


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
