"""One prepared GPU check of the fused backend (a few minutes on an H100/H200):

1. kernel exactness at Qwen3-4B's layer shape (32 query heads, 8 KV heads, head dim 128, bf16,
   N = 4096, two sequences, one left-padded): statistics against the block path's arithmetic in
   float32 on the same bf16 inputs (target 1e-3 relative, expected ~1e-5), the output against
   SDPA; then head dims 64/80/96/256 and window + softcap + sinks at N = 1024;
2. kernel timings at that layer shape, N = 8K and 32K: SDPA (flash, causal) against the fused
   kernels with the default tiles and a few alternatives (to choose the defaults);
3. a random model of Qwen3-4B's shape at N = 4096: capture_statistics fused vs streaming (head
   groups identical, WAAD/FAI relative differences);
4. benchmarks/capture_gpu.py at N = 8K, 16K, 32K (plain / eager / block / fused).

    python benchmarks/fused_gpu_check.py                      # writes benchmarks/results/fused_gpu_check.txt
    TRITON_INTERPRET=1 python benchmarks/fused_gpu_check.py --dry-run   # tiny shapes on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's attnrhythm, not an installed one

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnrhythm.capture import fused  # noqa: E402
from attnrhythm.core.stats import accumulate_rows, empty_stats  # noqa: E402


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
    row = dict(shape=[batch, heads, kv_heads, n, d], dtype=str(dtype), **{k: v for k, v in kwargs.items()},
               sinks=sink is not None, first_call_s=round(seconds, 3),
               row_distance=rel(rd, ref.row_distance[:, 0], real), band=rel(band, ref.band[:, 0], real),
               col_sum=rel(col, ref.col_sum[:, 0], real))
    if not kwargs and sink is None:  # the output against SDPA on the real rows
        mask = (torch.arange(n, device=device)[None, :] <= torch.arange(n, device=device)[:, None]) & valid[:, None, None, :]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True).transpose(1, 2)
        row["output_vs_sdpa"] = rel(out.float(), want.float(), valid)
    row["ok"] = max(row["row_distance"], row["band"], row["col_sum"]) < 1e-3 and row.get("output_vs_sdpa", 0) < 2e-2
    return row


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cuda_ms(fn, repeats=5) -> float:
    """Median milliseconds of fn on the GPU (after one warm-up call that also compiles)."""
    fn()
    if not torch.cuda.is_available():  # dry run
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


ALTERNATIVE_TILES = [dict(block_n=128), dict(num_stages=3), dict(col_block_m=128, col_block_n=64),
                     dict(col_block_m=32, col_block_n=128, num_stages=3)]


def kernel_timings(n, heads=32, kv_heads=8, d=128, device="cuda") -> list[dict]:
    q = torch.randn(1, heads, n, d, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, n, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    valid = torch.ones(1, n, dtype=torch.bool, device=device)
    sdpa = cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    rows = []
    for tiles in [None] + ALTERNATIVE_TILES:
        for need_col_sum in ((True, False) if tiles is None else (True,)):
            try:
                ms = cuda_ms(lambda: fused.fused_attention(q, k, v, valid, band_width=101, scaling=d ** -0.5,
                                                           need_col_sum=need_col_sum, blocks=tiles))
                rows.append(dict(n=n, tiles=tiles or "default", col_sum=need_col_sum, fused_ms=round(ms, 2),
                                 sdpa_ms=round(sdpa, 2), ratio=round(ms / sdpa, 2)))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(n=n, tiles=tiles, error=f"{type(err).__name__}: {err}"[:200]))
    return rows


def model_check(device, dtype, dry_run) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import attnrhythm as ar
    from capture_gpu import QWEN3_4B, TINY, build_model

    shape, n = (TINY, 96) if dry_run else (QWEN3_4B, 4096)
    model = build_model(shape, device, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (2, n), generator=g, device=device)
    mask = torch.ones_like(ids)
    mask[1, : n // 4] = 0
    response = (torch.arange(n, device=device)[None] >= n // 2).expand(2, n)
    config = ar.RhythmConfig()
    out = {}
    for backend in ("streaming", "fused"):
        stats = ar.capture_statistics(model, ids, mask, config=config, backend=backend)
        out[backend] = (stats, ar.rhythm_from_stats(stats, response, config))
    (sb, rb), (sf, rf) = out["streaming"], out["fused"]
    valid = sb.valid[:, None, None, :].expand_as(sb.row_distance)
    row = dict(model="qwen3-4b shape" if not dry_run else "tiny", n=n, dtype=str(dtype),
               row_distance=rel(sf.row_distance, sb.row_distance, valid), col_sum=rel(sf.col_sum, sb.col_sum, valid),
               band=rel(sf.band, sb.band, valid[..., None].expand_as(sb.band)),
               waad=max(rel(f.waad, b.waad, ~torch.isnan(b.waad)) for f, b in zip(rf, rb)),
               fai=max(rel(f.fai, b.fai, ~torch.isnan(b.fai)) for f, b in zip(rf, rb)),
               same_heads=all(f.local_heads == b.local_heads and f.global_heads == b.global_heads
                              for f, b in zip(rf, rb)))
    del model, out
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fused_gpu_check.txt"))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--skip-benchmark", action="store_true")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    lines = []

    def report(item):
        text = item if isinstance(item, str) else json.dumps(item)
        print(text, flush=True)
        lines.append(text)
        with open(args.out, "w") as f:  # rewritten after every line: a timeout keeps what was done
            f.write("\n".join(lines) + "\n")

    name = "cpu (dry run, Triton interpreter)" if args.dry_run else torch.cuda.get_device_name()
    ok, reason = fused.fused_available(device, torch.bfloat16, 128)
    report(f"device: {name}; torch {torch.__version__}; fused available: {ok} {reason}")
    if not ok:
        sys.exit(1)
    n, big = (40, (2, 4, 2, 40, 32)) if args.dry_run else (1024, (2, 32, 8, 4096, 128))
    checks = [dict(zip(("batch", "heads", "kv_heads", "n", "d"), big), dtype=torch.bfloat16)]
    for d in (64, 80, 256):
        checks.append(dict(batch=1, heads=8, kv_heads=2, n=n, d=d, dtype=torch.bfloat16))
    checks += [dict(batch=2, heads=8, kv_heads=2, n=n, d=128, dtype=torch.bfloat16, sliding_window=n // 5,
                    softcap=3.0, sinks=True),
               dict(batch=2, heads=8, kv_heads=2, n=n, d=128, dtype=torch.float32, band_width=7),
               dict(batch=2, heads=8, kv_heads=2, n=n, d=128, dtype=torch.float16, sliding_window=n // 3)]
    for check in checks:
        try:
            report(kernel_check(device, **check))
        except Exception as err:  # noqa: BLE001 - report and go on: one failing case must not hide the rest
            report({"check": {k: str(v) for k, v in check.items()}, "error": f"{type(err).__name__}: {err}"[:300]})
        if device == "cuda":
            torch.cuda.empty_cache()
    for n_time in ((32,) if args.dry_run else (8192, 32768)):
        for row in kernel_timings(n_time, *((4, 2, 32, "cpu") if args.dry_run else ())):
            report(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    try:
        report(model_check(device, torch.float32 if args.dry_run else torch.bfloat16, args.dry_run))
    except Exception as err:  # noqa: BLE001
        report({"model_check_error": f"{type(err).__name__}: {err}"[:300]})
    if args.skip_benchmark:
        return
    if device == "cuda":
        torch.cuda.empty_cache()  # the benchmark runs in its own process
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "capture_gpu.py"), "--repeats", "2"]
    command += ["--dry-run", "--repeats", "1"] if args.dry_run else ["--lengths", "8192", "16384", "32768"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    report(result.stdout + (f"\nstderr tail:\n{result.stderr[-2000:]}" if result.returncode else ""))


if __name__ == "__main__":
    main()
