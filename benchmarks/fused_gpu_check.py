"""One prepared GPU check of the fused backend, in one process, under 5 minutes on one H100.

    python benchmarks/fused_gpu_check.py --out DIR      # DIR/fused_gpu_check.txt and DIR/fused_gpu_check.json
    TRITON_INTERPRET=1 python benchmarks/fused_gpu_check.py --dry-run --out DIR   # tiny shapes on CPU (a test runs it)

Every stage runs under its own time limit (``STAGES``, scaled by --stage-scale; one that runs over
is reported and the next begins) and a watchdog bounds the whole run (--limit, default 290 s: it
writes what was done and exits 124).  The report is rewritten after every row, so whatever
stops the run keeps the rows before it.

1. exact: the kernels at Qwen3-4B's layer shape (32 query / 8 KV heads, head dim 128, bf16,
   N = 4096, two sequences, one left-padded) against the block path's arithmetic in float32 on
   the same inputs (target 1e-3 relative, expected ~1e-5) and the output against SDPA; then head
   dims 64/80/256, window + softcap + sinks, float32 and float16 at N = 1024;
2. eager: ``benchmarks/fused_vs_eager.py`` on the GPU (tiny models against HF eager maps);
3. kernels: one layer at N = 8K and 32K, median of 5: SDPA (flash, causal), fused (output +
   statistics), statistics only (inside training), pass 1 only (forward + row distance), band
   only (no column sums), and alternative tiles for the defaults;
4. model: a random model of Qwen3-4B's shape, bf16, N = 8K, 16K, 32K, best of 2 with peak memory
   above the start: decoder (the decoder's forward alone: the memory baseline, no logits),
   plain (with full-vocabulary logits), streaming and fused capture (5 sampled layers, entropy,
   metrics), in pass (the decoder forward inside ``statistics_in_pass``, fused statistics only);
   fused vs streaming agreement at each N;
5. in pass: at N = 4096 the pass's logits bitwise as without the statistics, and its statistics
   against the separate fused capture.

Targets (issue 19): fused capture at most 1.25x the decoder forward at 8-32K, memory at most the
decoder's + 10%.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(ROOT), ROOT]  # this checkout's attnrhythm; capture_gpu, fused_vs_eager

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from capture_gpu import sync as _sync  # noqa: E402

from attnrhythm.capture import fused  # noqa: E402
from attnrhythm.core.stats import accumulate_rows, empty_stats  # noqa: E402
from stages import Report, StageTimeout, check_deadline, time_limit  # noqa: E402

STAGES = {"exact": 50, "eager": 25, "kernels": 60, "model": 100, "in_pass": 20}  # seconds on an H100 (+ ~20 s to build the model)


# ---------------------------------------------------------------- 1. exactness
def block_reference(q, k, v, valid, scaling, band_width, window=None, softcap=None, sink=None, rows=256):
    """The block path's arithmetic in float32 (scores, mask, softmax, accumulate_rows) on
    float32 copies of the inputs, in blocks of rows."""
    batch, heads, n, _ = q.shape
    group = heads // k.shape[1]
    stats = empty_stats([0], batch, heads, n, band_width, valid, q.device)
    kf, index = k.float().repeat_interleave(group, 1), torch.arange(n, device=q.device)
    for t0 in range(0, n, rows):
        t1 = min(n, t0 + rows)
        s = q[:, :, t0:t1].float() @ kf.transpose(-1, -2) * scaling
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        r, c = index[t0:t1, None], index[None, :]
        allowed = (c <= r) & valid[:, None, None, :]
        if window:
            allowed &= r - c < window
        s = s.masked_fill(~allowed, torch.finfo(torch.float32).min)
        if sink is not None:
            s = torch.cat([s, sink.float()[None, :, None, None].expand(*s.shape[:3], 1)], -1)
        p = torch.softmax(s, -1)[..., :n]
        accumulate_rows(stats, 0, p, t0, 0)
    return stats


def rel(a, b, rows):
    a, b = a[rows], b[rows]
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def kernel_check(device, batch, heads, kv_heads, n, d, dtype, band_width=101, **kwargs) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    shape = lambda h: (batch, h, n, d)  # noqa: E731
    q = (torch.randn(shape(heads), generator=g, device=device) * 1.5).to(dtype)
    k, v = (torch.randn(shape(kv_heads), generator=g, device=device).to(dtype) for _ in range(2))
    valid = torch.ones(batch, n, dtype=torch.bool, device=device)
    valid[-1, : n // 3] = False  # left padding in the last sequence
    sink = kwargs.pop("sinks", False)
    sink = torch.randn(heads, generator=g, device=device).to(dtype) if sink else None
    scaling = d ** -0.5
    _sync(device)
    t0 = time.perf_counter()
    out, _, rd, band, col = fused.fused_attention(q, k, v, valid, band_width=band_width, scaling=scaling, s_aux=sink,
                                                  **kwargs)
    _sync(device)
    seconds = time.perf_counter() - t0
    ref = block_reference(q, k, v, valid, scaling, band_width, kwargs.get("sliding_window"), kwargs.get("softcap"), sink)
    real = valid[:, None, :].expand(batch, heads, n)
    row = dict(stage="exact", shape=[batch, heads, kv_heads, n, d], dtype=str(dtype), **kwargs,
               sinks=sink is not None, first_call_s=round(seconds, 3),
               row_distance=rel(rd, ref.row_distance[:, 0], real), band=rel(band, ref.band[:, 0], real),
               col_sum=rel(col, ref.col_sum[:, 0], real))
    if not kwargs and sink is None:  # the output against SDPA on the real rows
        index = torch.arange(n, device=device)
        mask = (index[None, :] <= index[:, None]) & valid[:, None, None, :]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True).transpose(1, 2)
        row["output_vs_sdpa"] = rel(out.float(), want.float(), valid)
    row["ok"] = max(row["row_distance"], row["band"], row["col_sum"]) < 1e-3 and row.get("output_vs_sdpa", 0) < 2e-2
    return row


def exact_checks(dry_run: bool) -> list[dict]:
    n, big = (40, (2, 4, 2, 40, 32)) if dry_run else (1024, (2, 32, 8, 4096, 128))
    checks = [dict(zip(("batch", "heads", "kv_heads", "n", "d"), big), dtype=torch.bfloat16)]
    checks += [dict(batch=1, heads=8, kv_heads=2, n=n, d=d, dtype=torch.bfloat16) for d in (64, 80, 256)]
    common = dict(batch=2, heads=8, kv_heads=2, n=n, d=128)
    return checks + [dict(common, dtype=torch.bfloat16, sliding_window=n // 5, softcap=3.0, sinks=True),
                     dict(common, dtype=torch.float32, band_width=7),
                     dict(common, dtype=torch.float16, sliding_window=n // 3)]


# ---------------------------------------------------------------- 3. kernel timings
def elapsed_ms(fn, device, repeats=5) -> float:
    """Median milliseconds of fn (after one warm-up call that also compiles)."""
    fn()
    if torch.device(device).type != "cuda":  # dry run: one wall-clock call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


KERNEL_ROWS = {"fused": dict(), "statistics only": dict(write_output=False),
               "pass 1 only": dict(band_width=0, need_col_sum=False), "band only": dict(need_col_sum=False)}
ALTERNATIVE_TILES = [dict(block_n=128), dict(num_stages=3), dict(col_block_m=128, col_block_n=64),
                     dict(col_block_m=32, col_block_n=128, num_stages=3)]


def kernel_rows(n, heads, kv_heads, d, device, alternatives):
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    q = torch.randn(1, heads, n, d, device=device, dtype=dtype)
    k, v = (torch.randn(1, kv_heads, n, d, device=device, dtype=dtype) for _ in range(2))
    valid = torch.ones(1, n, dtype=torch.bool, device=device)
    sdpa = elapsed_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), device)
    yield dict(stage="kernels", n=n, row="sdpa", ms=round(sdpa, 3))
    runs = [(name, kwargs, None) for name, kwargs in KERNEL_ROWS.items()]
    runs += [("fused", {}, tiles) for tiles in alternatives]
    for name, kwargs, tiles in runs:
        call = dict(dict(band_width=101, scaling=d ** -0.5, blocks=tiles), **kwargs)
        try:
            ms = elapsed_ms(lambda: fused.fused_attention(q, k, v, valid, **call), device)
            yield dict(stage="kernels", n=n, row=name, tiles=tiles or "default", ms=round(ms, 3),
                       vs_sdpa=round(ms / sdpa, 2))
        except Exception as err:  # noqa: BLE001 - e.g. tiles a GPU cannot hold
            check_deadline(err)
            yield dict(stage="kernels", n=n, row=name, tiles=tiles, error=f"{type(err).__name__}: {err}"[:200])


# ---------------------------------------------------------------- 4. model rows, 5. in pass
def model_rows(model, n, vocab, device, repeats):
    import attnrhythm as ar
    from attnrhythm.capture.in_pass import statistics_in_pass
    from capture_gpu import compare, measure

    config = ar.RhythmConfig()
    ids = torch.randint(0, vocab, (1, n), device=device)
    mask = torch.ones_like(ids)
    response = torch.arange(n, device=device)[None] >= n // 4

    def decoder():
        with torch.no_grad():
            model.get_decoder()(input_ids=ids, attention_mask=mask)

    def plain():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def capture(backend):
        return lambda: ar.rhythm_from_stats(ar.capture_statistics(model, ids, mask, config=config, backend=backend),
                                            response, config)

    def in_pass():
        with torch.no_grad(), statistics_in_pass(model, config, entropy=True) as cap:
            model.get_decoder()(input_ids=ids, attention_mask=mask)
        if cap.failed:
            raise RuntimeError(cap.failed)

    rows = {}
    for name, fn in (("decoder", decoder), ("plain", plain), ("streaming", capture("streaming")),
                     ("fused", capture("fused")), ("in pass", in_pass)):
        try:
            rows[name] = measure(fn, device, repeats)
        except Exception as err:  # noqa: BLE001 - one row failing must not hide the others
            check_deadline(err)
            rows[name] = f"{type(err).__name__}: {err}"[:160]
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    base = rows["decoder"]
    for name, value in rows.items():
        row = dict(stage="model", n=n, row=name)
        if isinstance(value, tuple):
            row.update(seconds=round(value[0], 4))
            if value[1] == value[1]:  # not NaN: CUDA
                row.update(added_peak_gib=round(value[1], 3), peak_gib=round(value[2], 3))
            if isinstance(base, tuple):
                row["vs_decoder"] = round(value[0] / base[0], 2)
                if base[2] == base[2]:
                    row["peak_vs_decoder"] = round(value[2] / base[2], 3)
        else:
            row["error"] = value
        yield row
    if all(isinstance(rows[k], tuple) for k in ("streaming", "fused")):
        yield dict(stage="model", n=n, row="fused vs streaming", **compare([capture("fused")()], [capture("streaming")()]))


def in_pass_check(model, n, vocab, device) -> dict:
    import attnrhythm as ar
    from attnrhythm.capture.in_pass import statistics_in_pass

    config = ar.RhythmConfig()
    ids = torch.randint(0, vocab, (2, n), device=device)
    mask = torch.ones_like(ids)
    mask[1, : n // 4] = 0  # left padding
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with statistics_in_pass(model, config, entropy=True) as cap:
            inside = model(input_ids=ids, attention_mask=mask).logits
    check_deadline()  # the in-pass capture swallows errors (a StageTimeout too) so the caller's pass goes on
    row = dict(stage="in_pass", n=n, failed=cap.failed, logits_bitwise=bool(torch.equal(plain, inside)))
    del plain, inside
    if not cap.failed:
        stats = cap.chunks[0][1]
        separate = ar.capture_statistics(model, ids, mask, config=config, backend="auto")
        real = separate.valid[:, None, None, :].expand_as(separate.row_distance)
        row.update(row_distance=rel(stats.row_distance, separate.row_distance, real),
                   col_sum=rel(stats.col_sum, separate.col_sum, real), statistics_s=round(cap.seconds, 4))
    row["ok"] = bool(row["logits_bitwise"] and not cap.failed and max(row.get("row_distance", 1),
                                                                       row.get("col_sum", 1)) < 1e-3)
    return row


# ---------------------------------------------------------------- the run
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the results (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--limit", type=float, default=290.0, help="seconds for the whole run (watchdog)")
    parser.add_argument("--stage-scale", type=float, default=1.0, help="multiplies every stage's time limit")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out DIR is required (or set $OUT): a remote run's results must land where they come back")
    report = Report(args.out)
    device = "cpu" if args.dry_run else "cuda"
    name = "cpu (dry run, Triton interpreter)" if args.dry_run else torch.cuda.get_device_name()
    ok, reason = fused.fused_available(device, torch.bfloat16, 128)
    report(f"device: {name}; torch {torch.__version__}; fused available: {ok} {reason}")
    if not ok:
        return 1

    def watchdog():
        report(f"watchdog: the run passed --limit {args.limit:.0f} s; stopped")
        os._exit(124)

    timer = threading.Timer(args.limit, watchdog)
    timer.daemon = True
    timer.start()
    failures = 0

    def stage(key, rows):
        nonlocal failures
        t0 = time.perf_counter()
        try:
            with time_limit(STAGES[key] * args.stage_scale):
                for row in rows():
                    failures += isinstance(row, dict) and row.get("ok") is False
                    report(row)
                check_deadline()  # a stage past its limit timed out, even where something swallowed the alarm
        except Exception as err:  # noqa: BLE001 - report and go on to the next stage
            failures += 1
            try:
                check_deadline(err)
                report(dict(stage=key, error=f"{type(err).__name__}: {err}"[:300]))
            except StageTimeout:
                report(dict(stage=key, timeout=f"over its limit of {STAGES[key] * args.stage_scale:.3g} s"))
        report(f"stage {key}: {time.perf_counter() - t0:.1f} s")
        if device == "cuda":
            torch.cuda.empty_cache()

    def exact():
        for check in exact_checks(args.dry_run):
            try:
                yield kernel_check(device, **check)
            except Exception as err:  # noqa: BLE001 - one failing case must not hide the rest
                check_deadline(err)
                yield dict(stage="exact", check={k: str(v) for k, v in check.items()}, ok=False,
                           error=f"{type(err).__name__}: {err}"[:300])

    def eager():
        import fused_vs_eager
        for name in ["qwen3"] if args.dry_run else fused_vs_eager.models():
            row = fused_vs_eager.run(device, [name])[0]
            check_deadline()  # run() reports a model's error as a row, a timeout included
            yield dict(stage="eager", **row)

    def kernels():
        shape = (4, 2, 32) if args.dry_run else (32, 8, 128)
        for n in ((32,) if args.dry_run else (8192, 32768)):
            yield from kernel_rows(n, *shape, device, ALTERNATIVE_TILES[:1 if args.dry_run else None])

    from capture_gpu import QWEN3_4B, TINY, build_model
    shape = TINY if args.dry_run else QWEN3_4B
    model = build_model(shape, device, torch.float32 if args.dry_run else torch.bfloat16)

    def models():
        for n in ((64,) if args.dry_run else (8192, 16384, 32768)):
            yield from model_rows(model, n, shape["vocab_size"], device, 1 if args.dry_run else 2)

    stage("exact", exact)
    stage("eager", eager)
    stage("kernels", kernels)
    stage("model", models)
    stage("in_pass", lambda: [in_pass_check(model, 48 if args.dry_run else 4096, shape["vocab_size"], device)])
    timer.cancel()
    report(f"done: {failures} failed row(s) or stage(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
