"""Cost of rhythm credit in a GRPO step: one rollout batch, one-pass vs two-pass (CPU).

Each row runs in its own process (the same data, seed and settings, so the same completions),
through the real trainer (``attnrhythm.train.run.build_trainer``): generation, rewards, TRL's
old-log-prob pass, the rhythm statistics and ``steps_per_generation`` optimizer steps.  Rows:
``coupled/one-pass`` (statistics inside TRL's old-log-prob pass, ``one_pass=True``, the
default), ``coupled/two-pass`` (a separate attention pass, ``one_pass=False``) and, with
``--credits none coupled``, ``none`` (no statistics).  The table reads the trainer's own logs:

  step s       sum of TRL's ``step_time`` over the rollout batch (generation + TRL's passes +
               rhythm work + log-prob and backward passes of every optimizer step)
  attention s  ``rhythm/attention_s``: two-pass: the separate capture + metrics + gamma;
               one-pass: the statistics work timed inside TRL's pass (the sampled layers' block
               loop and the entropy from the final hidden states; the layers' own SDPA excluded)
               + metrics + gamma.  TRL's forward itself is never counted.
  share        attention s / step s (paper, Qwen3-4B on GPU, 1K tokens: 2.2%)
  tokens       prompt + completion tokens of the rollout batch (TRL's ``num_tokens``)
  load         1-minute load average before / after the row (other jobs share the machine)

    python benchmarks/train_step.py --out benchmarks/results/train_step_cpu.txt   # 4 x 8 completions, 128 tokens
    python benchmarks/train_step.py --prompts 2 --num-generations 4 --max-completion-length 32   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
            one_pass=bool(args.one_pass),
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
    passes = [r["rhythm/one_pass"] for r in records if "rhythm/one_pass" in r]
    name = args.credit if args.credit == "none" else f"{args.credit}/{'one' if all(passes) else 'two'}-pass"
    return {"credit": name, "completions": completions, "wall_s": wall, "step_s": step_s,
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
    p.add_argument("--credits", nargs="+", default=["coupled"], help="'coupled' runs one-pass and two-pass")
    p.add_argument("--prompts", type=int, default=4, help="prompts in the rollout batch")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--per-device-batch", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--credit", help=argparse.SUPPRESS)  # worker mode: one credit, JSON on the last line
    p.add_argument("--one-pass", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if (args.prompts * args.num_generations) % args.per_device_batch:
        p.error("prompts x num-generations must be a multiple of per-device-batch")
    if args.credit:
        print(json.dumps(worker(args)))
        return 0

    rows = []
    runs = [(c, p) for c in args.credits for p in ((1,) if c == "none" else (1, 0))]
    for credit, one_pass in runs:
        cmd = [sys.executable, __file__, "--credit", credit, f"--one-pass={one_pass}"] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("credit", "credits", "one_pass", "out") and v is not None]
        print(f"running {credit} one_pass={one_pass} ...", flush=True)
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        rows.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "load": (load, os.getloadavg()[0])})

    lines = [f"machine: {_machine()}; torch threads={args.threads}; model {args.model}, task {args.task}, "
             f"{args.prompts} prompts x {args.num_generations} completions, per_device_batch "
             f"{args.per_device_batch}, steps_per_generation {args.prompts * args.num_generations // args.per_device_batch}, "
             f"max_completion_length {args.max_completion_length}, one rollout batch", ""]
    head = ["credit", "completions", "wall s", "step s", "attention s", "share", "tokens", "completion len", "load"]
    table = [[r["credit"], str(r["completions"]), _fmt(r["wall_s"], ".1f"), _fmt(r["step_s"], ".1f"),
              _fmt(r["attention_s"] or None, ".2f"), _fmt(r["share"] or None, ".1%"), str(r["tokens"]),
              _fmt(r["completion_len"], ".0f"), "%.1f/%.1f" % r["load"]] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head, ["-" * w for w in widths]] + table]
    lines.append("")
    for r in rows:  # the first step of a rollout batch also generates (and runs the statistics)
        lines.append(f"{r['credit']}: per optimizer step {r['step_times']} s")
    by = {r["credit"]: r for r in rows}
    one, two = by.get("coupled/one-pass"), by.get("coupled/two-pass")
    if one and two and two["step_s"]:
        lines.append(f"one-pass: step time x{one['step_s'] / two['step_s']:.3f} of two-pass, "
                     f"{two['step_s'] - one['step_s']:.1f} s less per rollout batch")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def _machine() -> str:
    """CPU model, core count and torch version, as the result file names the machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
