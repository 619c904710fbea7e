"""Cost of rhythm credit in a GRPO step: one rollout batch with --credit none vs coupled (CPU).

Each credit runs in its own process (the same data, seed and settings), through the real trainer
(``attnrhythm.train.run.build_trainer``): generation, rewards, the attention pass (coupled only)
and ``steps_per_generation`` optimizer steps.  The table reads the trainer's own logs:

  step s       sum of TRL's ``step_time`` over the rollout batch (generation + attention pass +
               log-prob and backward passes of every optimizer step)
  attention s  ``rhythm/attention_s``: capture + metrics + gamma of the rollout batch
  share        attention s / step s (paper, Qwen3-4B on GPU, 1K tokens: 2.2%)
  tokens       prompt + completion tokens of the rollout batch (TRL's ``num_tokens``)
  completion   mean completion length

    python benchmarks/train_step.py                       # 4 prompts x 8 completions, 128 tokens
    python benchmarks/train_step.py --prompts 2 --num-generations 4 --max-completion-length 32   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(args) -> dict:
    import torch

    from attnrhythm.train.config import TrainConfig, resolved
    from attnrhythm.train.run import build_trainer

    torch.set_num_threads(args.threads)
    completions = args.prompts * args.num_generations
    with tempfile.TemporaryDirectory(prefix="train_step-") as out:
        config = resolved(TrainConfig(
            model=args.model, task=args.task, credit=args.credit, out=out, device="cpu", seed=args.seed,
            num_generations=args.num_generations, per_device_batch=args.per_device_batch,
            # one rollout batch = steps_per_generation micro-batches of per_device_batch completions
            steps_per_generation=completions // args.per_device_batch,
            max_steps=completions // args.per_device_batch, max_completion_length=args.max_completion_length,
            gradient_checkpointing=False, save_steps=10**9, logging_steps=1))
        trainer = build_trainer(config)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    total = lambda key: sum(r.get(key) or 0.0 for r in records)  # noqa: E731
    step_s, attention_s = total("step_time"), total("rhythm/attention_s")
    lengths = [r["completions/mean_length"] for r in records if "completions/mean_length" in r]
    return {"credit": args.credit, "completions": completions, "wall_s": wall, "step_s": step_s,
            "attention_s": attention_s, "share": attention_s / step_s if step_s else None,
            "tokens": int(max((r.get("num_tokens") or 0 for r in records), default=0)),
            "step_times": [round(r["step_time"], 2) for r in records if "step_time" in r],
            "completion_len": sum(lengths) / len(lengths) if lengths else None,
            "reward": records[0].get("reward") if records else None}


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="e.g. a warm-started folder: completions then end early")
    p.add_argument("--task", default="countdown-easy")
    p.add_argument("--credits", nargs="+", default=["none", "coupled"])
    p.add_argument("--prompts", type=int, default=4, help="prompts in the rollout batch")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--credit", help=argparse.SUPPRESS)  # worker mode: one credit, JSON on the last line
    args = p.parse_args()
    if (args.prompts * args.num_generations) % args.per_device_batch:
        p.error("prompts x num-generations must be a multiple of per-device-batch")
    if args.credit:
        print(json.dumps(worker(args)))
        return 0

    rows = []
    for credit in args.credits:
        cmd = [sys.executable, __file__, "--credit", credit] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("credit", "credits")]
        print(f"running {credit} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    head = ["credit", "completions", "wall s", "step s", "attention s", "share", "tokens", "completion len"]
    table = [[r["credit"], str(r["completions"]), _fmt(r["wall_s"], ".1f"), _fmt(r["step_s"], ".1f"),
              _fmt(r["attention_s"] or None, ".2f"), _fmt(r["share"] or None, ".1%"), str(r["tokens"]),
              _fmt(r["completion_len"], ".0f")] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    for line in [head, ["-" * w for w in widths]] + table:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    for r in rows:  # the first step of a rollout batch also generates (and runs the attention pass)
        print(f"{r['credit']}: per optimizer step {r['step_times']} s")
    base = next((r for r in rows if r["credit"] == "none"), None)
    for r in rows:
        if base and r is not base and base["step_s"]:
            print(f"{r['credit']}: step time x{r['step_s'] / base['step_s']:.2f} of credit none "
                  f"(CPU, threads={args.threads}, model {args.model})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
