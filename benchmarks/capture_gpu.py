"""Capture cost on a CUDA GPU: a randomly initialised model of Qwen3-4B's shape in bf16.

    python benchmarks/capture_gpu.py                    # N = 1K .. 32K, one run, < 10 minutes
    python benchmarks/capture_gpu.py --dry-run          # tiny shapes on CPU (used by the tests)

For each N: (1) a plain SDPA forward with full logits, (2) eager capture (output_attentions=True,
all layers' maps) + metrics, refused up front when the maps cannot fit, (3) block capture
(backend="streaming") + metrics, (4) fused capture (backend="fused", Triton kernels) + metrics,
"n/a (reason)" where the kernels cannot run.  Also checks block against eager where eager fits
(eager rounds its maps to bf16, so agreement is to ~1e-2 relative) and fused against block
(WAAD, FAI and the head groups) at every N.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1_000_000.0, tie_word_embeddings=True)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            tie_word_embeddings=True)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    return model.eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeats: int) -> tuple[float, float, float]:
    """(best seconds, peak GiB above the start, peak GiB in all; NaN off CUDA) of fn, after a
    warm-up call."""
    fn()
    sync(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    if not cuda:
        return best, float("nan"), float("nan")
    peak = torch.cuda.max_memory_allocated()
    return best, (peak - start) / 2**30, peak / 2**30


def fused_status(shape: dict, device: str, dtype: torch.dtype) -> str:
    """"" when the fused backend can run here, else "n/a (reason)"."""
    try:
        from attnrhythm.capture.fused import fused_available
    except Exception as err:  # noqa: BLE001 - any import problem means: not available
        return f"n/a ({type(err).__name__}: {err})"[:120]
    ok, reason = fused_available(device, dtype, shape["head_dim"])
    return "" if ok else f"n/a ({reason})"


def compare(a, b) -> dict:
    """Relative max differences of two RhythmResult lists' WAAD/FAI and whether head groups agree."""
    rel = lambda x, y: ((x - y).abs().nan_to_num(0).max() / y.abs().nan_to_num(0).max()).item()  # noqa: E731
    return dict(waad_rel_diff=max(rel(x.waad, y.waad) for x, y in zip(a, b)),
                fai_rel_diff=max(rel(x.fai, y.fai) for x, y in zip(a, b)),
                same_heads=all(x.local_heads == y.local_heads and x.global_heads == y.global_heads
                               for x, y in zip(a, b)))


def main() -> None:
    import attnrhythm as ar

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    shape = TINY if args.dry_run else QWEN3_4B
    lengths = [64, 128] if args.dry_run else args.lengths
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    model = build_model(shape, device, dtype)
    name = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; model: Qwen3 {'tiny' if args.dry_run else '4B shape'} "
          f"random init, {dtype}; best of {args.repeats}")
    config = ar.RhythmConfig()
    fused_na = fused_status(shape, device, dtype)
    if fused_na:
        print(f"fused backend: {fused_na}")
    rows = []
    for n in lengths:
        ids = torch.randint(0, shape["vocab_size"], (1, n), device=device)
        mask = torch.ones_like(ids)
        response = torch.arange(n, device=device)[None] >= n // 4

        def plain():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)

        def capture(backend):
            def run():
                stats = ar.capture_statistics(model, ids, mask, config=config, backend=backend)
                return ar.rhythm_from_stats(stats, response, config)
            return run

        row = {"n": n}
        runs = [("plain", plain), ("eager", capture("eager")), ("streaming", capture("streaming")),
                ("fused", capture("fused"))]
        for label, fn in runs:
            if label == "fused" and fused_na:
                row[label] = fused_na
                continue
            try:
                row[label] = measure(fn, device, args.repeats)
            except (MemoryError, torch.OutOfMemoryError, ValueError, RuntimeError) as err:
                row[label] = f"failed: {str(err).splitlines()[0][:100]}" if label == "fused" else str(err).split(";")[0][:60]
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        block = capture("streaming")() if isinstance(row["streaming"], tuple) else None
        if isinstance(row["eager"], tuple) and block is not None:
            eager = capture("eager")()
            row["eager_vs_block"] = compare([block], [eager])
        if isinstance(row["fused"], tuple) and block is not None:
            row["fused_vs_block"] = compare([capture("fused")()], [block])
        del block
        rows.append(row)
        print(json.dumps(row), flush=True)

    print("\n| N | plain s | eager s | block s | fused s | block / plain | fused / plain "
          "| plain peak GiB | eager peak GiB | block peak GiB | fused peak GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def cell(v, i):
            if isinstance(v, tuple):
                return f"{v[i]:.3f}"
            return str(v).split(" ")[0].rstrip(":") if str(v).startswith(("n/a", "failed")) else "refused/OOM"

        def ratio(label):
            ok = isinstance(r[label], tuple) and isinstance(r["plain"], tuple)
            return f"{r[label][0] / r['plain'][0]:.2f}" if ok else "-"

        print(f"| {r['n']} | {cell(r['plain'], 0)} | {cell(r['eager'], 0)} | {cell(r['streaming'], 0)} | "
              f"{cell(r['fused'], 0)} | {ratio('streaming')} | {ratio('fused')} | {cell(r['plain'], 1)} | "
              f"{cell(r['eager'], 1)} | {cell(r['streaming'], 1)} | {cell(r['fused'], 1)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
