"""The fused backend against Hugging Face eager maps, outside the test suite: tiny random models
(Llama with GQA, Qwen3 with q/k norms, Qwen3 with a sliding window, Gemma 2 with softcapping,
GPT-OSS with attention sinks; the builders of tests/conftest.py), a left-padded batch of mixed
lengths, every layer sampled.  Each row compares ``capture_statistics(backend="fused")`` with
``backend="eager"`` (``output_attentions=True``): the statistics (relative max difference over
real rows) and what the metrics make of them (WAAD, FAI, head groups, receiver kurtosis).  For
the models on SDPA it also compares the statistics taken inside a forward pass
(``statistics_in_pass``, the fused statistics-only mode) with the separate fused capture, and
checks that pass's logits bitwise.

    TRITON_INTERPRET=1 python benchmarks/fused_vs_eager.py      # CPU -> benchmarks/results/fused_vs_eager_interpreter.txt
    python benchmarks/fused_vs_eager.py --device cuda --out DIR/fused_vs_eager.txt
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # this checkout's attnrhythm and its tiny models

import torch  # noqa: E402

from attnrhythm.capture import capture_statistics  # noqa: E402
from attnrhythm.core.config import RhythmConfig  # noqa: E402
from attnrhythm.core.metrics import receiver_kurtosis, rhythm_from_stats  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "fused_vs_eager_interpreter.txt")
TOLERANCE = 1e-5  # float32 statistics of float32 models: both sides exact to rounding
LOOSER = {"receiver_kurtosis": "a fourth moment of float32 scores",
          "in_pass_vs_separate": "the pass keeps HF's default positions, shifted by left padding"}  # 1e-4
CONFIG = RhythmConfig(layers="all", fai_horizon=(10, 100))


def models() -> dict:
    from conftest import tiny_gemma2, tiny_gpt_oss, tiny_llama_gqa, tiny_qwen3, tiny_qwen3_sliding

    return {"llama_gqa": tiny_llama_gqa, "qwen3": tiny_qwen3, "qwen3_sliding": tiny_qwen3_sliding,
            "gemma2_softcap": tiny_gemma2, "gpt_oss_sinks": tiny_gpt_oss}


def batch(lengths=(23, 9, 17), seed=0):
    """Left-padded ids [B, N], mask and response mask (the last 60% of each sequence)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    response = torch.zeros(len(lengths), width, dtype=torch.bool)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, 259, (n,), generator=g)
        mask[b, width - n:] = 1
        response[b, width - n + int(0.4 * n):] = True
    return ids, mask, response


def relative(a, b) -> float:
    a, b = a.double().nan_to_num(0), b.double().nan_to_num(0)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) if b.numel() else 0.0


def compare_stats(got, want) -> dict:
    keys = ["row_distance", "band", "col_sum", "entropy"] + (["row_mass"] if want.row_mass is not None else [])
    return {key: relative(getattr(got, key), getattr(want, key)) for key in keys}


def compare_model(name: str, build, device: str) -> dict:
    model = build().to(device)
    ids, mask, response = (t.to(device) for t in batch())
    eager = capture_statistics(model, ids, mask, config=CONFIG, backend="eager")
    fused = capture_statistics(model, ids, mask, config=CONFIG, backend="fused")
    row = dict(model=name, device=device, **compare_stats(fused, eager))
    a, b = rhythm_from_stats(fused, response, CONFIG), rhythm_from_stats(eager, response, CONFIG)
    row.update(waad=relative(a.waad, b.waad), fai=relative(a.fai, b.fai),
               same_heads=a.local_heads == b.local_heads and a.global_heads == b.global_heads,
               receiver_kurtosis=relative(receiver_kurtosis(fused, response), receiver_kurtosis(eager, response)))
    if model.config._attn_implementation == "sdpa":
        row.update(in_pass(model, ids, mask, fused))
    exact = [v for k, v in row.items() if isinstance(v, float) and k not in LOOSER]
    row["ok"] = bool(max(exact) < TOLERANCE and row["same_heads"] and row.get("logits_bitwise", True)
                     and all(row.get(k, 0.0) < 10 * TOLERANCE for k in LOOSER))
    return row


def in_pass(model, ids, mask, separate) -> dict:
    """The fused statistics-only mode inside a forward pass, against the separate fused capture."""
    from attnrhythm.capture.in_pass import statistics_in_pass

    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with statistics_in_pass(model, CONFIG, entropy=True, mode="fused") as cap:
            inside = model(input_ids=ids, attention_mask=mask).logits
    if cap.failed:
        return dict(in_pass_failed=cap.failed, logits_bitwise=False)
    stats = cap.chunks[0][1]
    return dict(logits_bitwise=bool(torch.equal(plain, inside)),
                in_pass_vs_separate=max(compare_stats(stats, separate).values()))


def run(device: str, names=None) -> list[dict]:
    """One row per tiny model (``names``: a subset of ``models()``)."""
    rows = []
    for name, build in models().items():
        if names is not None and name not in names:
            continue
        try:
            rows.append(compare_model(name, build, device))
        except Exception as err:  # noqa: BLE001 - report every model
            rows.append(dict(model=name, device=device, ok=False, error=f"{type(err).__name__}: {err}"[:300]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu needs TRITON_INTERPRET=1 (set before the run)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    rows = run(args.device)
    lines = [f"# fused vs eager on tiny random models ({args.device}, torch {torch.__version__}; "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}); relative max differences, "
             f"ok = all < {TOLERANCE}, {sorted(LOOSER)} < {10 * TOLERANCE}, logits of the pass bitwise",
             *(json.dumps(r) for r in rows)]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(args.out + ".tmp", args.out)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
