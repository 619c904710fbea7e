"""Capture cost: plain forward vs eager capture vs streaming capture (+ metrics).

Each (mode, N) runs in its own process so peak memory is that configuration's alone.

    python benchmarks/capture.py                      # SmolLM2-135M on CPU, N = 512 .. 8192
    python benchmarks/capture.py --lengths 512 1024 --repeats 1

Modes:
  plain      model(input_ids): an ordinary SDPA forward with full logits (what a trainer's
             log-prob pass costs)
  eager      eager attention with output_attentions=True (all layers' N x N maps), reduced to
             statistics, + metrics; refused up front when the maps cannot fit in memory
  streaming  the default capture backend (sampled layers in row blocks, chunked entropy) + metrics
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(mode: str, length: int, model_name: str, repeats: int, threads: int) -> dict:
    import torch

    import attnrhythm as ar
    from attnrhythm.models import load_model

    torch.set_num_threads(threads)
    model, _ = load_model(model_name, device="cpu", dtype="float32")
    torch.manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (1, length))
    mask = torch.ones_like(ids)
    response = torch.arange(length)[None] >= length // 4
    config = ar.RhythmConfig()
    baseline_mb = _peak_rss_mb()

    def once():
        if mode == "plain":
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        else:
            stats = ar.capture_statistics(model, ids, mask, config=config, backend=mode)
            ar.rhythm_from_stats(stats, response, config)

    times = []
    try:
        once()  # warm-up, also the first memory peak
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    except MemoryError as err:
        return {"mode": mode, "n": length, "error": str(err).split(";")[0]}
    return {"mode": mode, "n": length, "seconds": min(times), "peak_mb": _peak_rss_mb(),
            "model_mb": baseline_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--modes", nargs="+", default=["plain", "eager", "streaming"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.model, args.repeats, args.threads)))
        return

    import torch

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {args.threads}, model {args.model}, best of {args.repeats}")
    rows = []
    for n in args.lengths:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--worker", mode, str(n), "--model", args.model,
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode != 0 or not lines:
                reason = "killed (out of memory)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
                rows.append({"mode": mode, "n": n, "error": reason})
            else:
                rows.append(json.loads(lines[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    plain = {r["n"]: r for r in rows if r["mode"] == "plain" and "seconds" in r}
    print("\n| N | mode | time (s) | x plain | peak RSS (MB) | over plain (MB) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        base = plain.get(r["n"])
        if "error" in r:
            print(f"| {r['n']} | {r['mode']} | - | - | - | {r['error']} |")
            continue
        ratio = f"{r['seconds'] / base['seconds']:.2f}" if base else "-"
        over = f"{r['peak_mb'] - base['peak_mb']:+.0f}" if base else "-"
        print(f"| {r['n']} | {r['mode']} | {r['seconds']:.2f} | {ratio} | {r['peak_mb']:.0f} | {over} |")


if __name__ == "__main__":
    main()
