"""Capture cost on a CUDA GPU: a randomly initialised model of Qwen3-4B's shape in bf16.

    python benchmarks/capture_gpu.py                    # N = 1K .. 32K, one run, < 10 minutes
    python benchmarks/capture_gpu.py --dry-run          # tiny shapes on CPU (used by the tests)

For each N: (1) a plain SDPA forward with full logits, (2) eager capture (output_attentions=True,
all layers' maps) + metrics, refused up front when the maps cannot fit, (3) streaming capture
+ metrics.  Also checks streaming against eager at the lengths where eager fits (float32
statistics from bf16 maps: eager rounds its maps to bf16, so agreement is to ~1e-2 relative).
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, repeats: int) -> tuple[float, float]:
    """(best seconds, peak GiB above the start) of fn."""
    fn()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - start) / 2**30 if device.startswith("cuda") else float("nan")
    return best, peak


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
        for label, fn in (("plain", plain), ("eager", capture("eager")), ("streaming", capture("streaming"))):
            try:
                row[label] = measure(fn, device, args.repeats)
            except (MemoryError, torch.OutOfMemoryError) as err:
                row[label] = str(err).split(";")[0][:60]
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        if isinstance(row["eager"], tuple):
            eager, streaming = capture("eager")(), capture("streaming")()
            rel = ((eager.waad - streaming.waad).abs().max() / eager.waad.abs().max()).item()
            row["waad_rel_diff"] = rel
            row["same_heads"] = eager.local_heads == streaming.local_heads and eager.global_heads == streaming.global_heads
        rows.append(row)
        print(json.dumps(row), flush=True)

    print("\n| N | plain s | eager s | streaming s | streaming / plain | plain peak GiB | eager peak GiB | streaming peak GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cell = lambda v, i: f"{v[i]:.3f}" if isinstance(v, tuple) else "refused/OOM"  # noqa: E731
        ratio = (f"{r['streaming'][0] / r['plain'][0]:.2f}"
                 if isinstance(r["streaming"], tuple) and isinstance(r["plain"], tuple) else "-")
        print(f"| {r['n']} | {cell(r['plain'], 0)} | {cell(r['eager'], 0)} | {cell(r['streaming'], 0)} | {ratio} | "
              f"{cell(r['plain'], 1)} | {cell(r['eager'], 1)} | {cell(r['streaming'], 1)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    main()
