"""Memory of the attention statistics an analysis capture holds on its device, from the shapes
alone (no model runs): every layer captured with the full band (before: ``capture_statistics``
over the sampled and receiver layers together) against ``capture_with_receivers`` (after: the
sampled layers with the full band, the other receiver layers with ``receiver_band_width``
diagonals; the analysis assembles the receivers' statistics on the CPU).  The tensors are
allocated on PyTorch's meta device by the same ``empty_stats`` the capture calls, so the figures
are the bytes a capture allocates for its statistics (float32, one sequence).

    python benchmarks/capture_memory.py      # Qwen3-4B shape (36 layers, 32 query heads), 8K and 32K
    python benchmarks/capture_memory.py --layers 28 --heads 16 --lengths 4096 --out /tmp/memory.txt
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from attnrhythm.capture import receiver_band_width  # noqa: E402
from attnrhythm.core.config import ANALYSIS_HORIZON, RhythmConfig, select_layers  # noqa: E402
from attnrhythm.core.stats import empty_stats  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "capture_memory.txt")


def stats_bytes(layers: list[int], heads: int, length: int, width: int) -> int:
    """Bytes of one sequence's statistics for ``layers`` with band ``width`` (meta tensors)."""
    valid = torch.ones(1, length, dtype=torch.bool, device="meta")
    stats = empty_stats(layers, 1, heads, length, width, valid, "meta")
    return sum(t.numel() * t.element_size() for t in (stats.row_distance, stats.band, stats.col_sum))


def rows(n_layers: int, heads: int, lengths: list[int]) -> list[str]:
    configs = {"analysis (horizon to the end)": RhythmConfig(fai_horizon=ANALYSIS_HORIZON),
               "RL horizon (10, 100)": RhythmConfig()}
    out = []
    for name, config in configs.items():
        sampled = select_layers(config.layers, n_layers, config.n_layers_sampled)
        receivers = list(range(n_layers))  # receiver_layers="all", the default
        wide, narrow = config.band_width, receiver_band_width(config)
        for n in lengths:
            before = stats_bytes(receivers, heads, n, wide)
            others = [layer for layer in receivers if layer not in sampled]
            after = stats_bytes(sampled, heads, n, wide) + stats_bytes(others, heads, n, narrow)
            out.append(f"| {name} | {n} | {wide} | {narrow} | {before / 2**30:.2f} | {after / 2**30:.2f} | "
                       f"{before / after:.1f}x |")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    lines = [f"# Statistics memory of one sequence, {args.layers} layers x {args.heads} query heads, float32, "
             "receivers over every layer; regenerate: python benchmarks/capture_memory.py",
             "| config | N | band | receiver band | before GiB | after GiB | saved |",
             "|---|---:|---:|---:|---:|---:|---:|", *rows(args.layers, args.heads, args.lengths)]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
