"""`attnrhythm eval`: pass@1, avg@k and pass@k of a model on the test split of a task.

    attnrhythm eval --model runs/coupled --task countdown-easy --n 512 --samples 1 --out eval.json

samples=1 is greedy unless a temperature is given (the paper's pass@1); samples=k > 1 samples k
completions per problem at --temperature (default 1.0, the paper's sampling temperature) and
reports avg@k (mean accuracy over all k samples, the paper's AIME metric) and pass@k (share of
problems with at least one correct sample).  A completion is *correct* when the task's reward is
1.0 (Countdown also pays 0.1 for a well-formed wrong answer: that is in `reward`, not accuracy).

Generation is batched with left padding; the JSON result (written atomically) holds the settings,
the metrics and every problem's scores and completions.
"""
from __future__ import annotations

import json
import os
import time

import torch

from attnrhythm.tasks import get_task


def _prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def _eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos and the model's generation eos."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(model.generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, samples: int = 1, temperature: float | None = None,
             max_new_tokens: int = 256, batch_size: int = 32, seed: int = 0,
             progress: bool = False) -> tuple[list[list[str]], list[list[int]]]:
    """``samples`` completions per prompt (texts, token counts), batched with left padding.

    Greedy when temperature is None or 0 (then samples must be 1); otherwise pure temperature
    sampling (top_k=0, top_p=1: nothing truncated, as GRPO rollouts sample), seeded once.
    """
    from transformers import GenerationConfig

    greedy = not temperature
    if greedy and samples > 1:
        raise ValueError("greedy decoding gives the same completion k times: give a temperature for samples > 1")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, num_return_sequences=samples,
                              eos_token_id=eos, pad_token_id=pad,
                              **({} if greedy else {"temperature": float(temperature), "top_k": 0, "top_p": 1.0}))
    device = next(model.parameters()).device
    per_batch = max(1, batch_size // samples)  # problems per generate call
    texts, lengths = [], []
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # completions must start at one column
    was_training = model.training
    model.eval()
    t0 = time.time()
    try:
        for i in range(0, len(prompts), per_batch):
            chunk = [_prompt_text(tokenizer, p) for p in prompts[i : i + per_batch]]
            # chat text already carries its special tokens; base text is tokenised as TRL does
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=isinstance(prompts[i], str)).to(device)
            out = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1] :]
            for j in range(0, out.shape[0], samples):
                rows = out[j : j + samples]
                texts.append(tokenizer.batch_decode(rows, skip_special_tokens=True))
                lengths.append([_length(r, eos) for r in rows.tolist()])
            if progress:
                print(f"  generated {len(texts)}/{len(prompts)} problems  {time.time() - t0:.0f}s", flush=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return texts, lengths


def _length(ids: list[int], eos: list[int]) -> int:
    """Generated tokens up to and including the first eos (all of them when none: truncated)."""
    for n, t in enumerate(ids):
        if t in eos:
            return n + 1
    return len(ids)


def summarize(scores: list[list[float]], lengths: list[list[int]] | None = None,
              max_new_tokens: int | None = None) -> dict:
    """Metrics of per-problem score lists (all of the same length k)."""
    k = len(scores[0]) if scores else 1
    flat = [s for row in scores for s in row]
    correct = [[s >= 1.0 for s in row] for row in scores]
    accuracy = sum(map(sum, correct)) / max(1, len(flat))
    metrics = {"accuracy": accuracy, "reward": sum(flat) / max(1, len(flat)),
               "format": sum(s > 0 for s in flat) / max(1, len(flat))}
    if k == 1:
        metrics["pass@1"] = accuracy
    else:
        metrics[f"avg@{k}"] = accuracy
        metrics[f"pass@{k}"] = sum(any(row) for row in correct) / max(1, len(correct))
    if lengths:
        flat_len = [n for row in lengths for n in row]
        metrics["mean_tokens"] = sum(flat_len) / len(flat_len)
        if max_new_tokens:  # hit the limit without an eos
            metrics["truncated"] = sum(n >= max_new_tokens for n in flat_len) / len(flat_len)
    return metrics


def evaluate(model, tokenizer, task, n: int = 512, samples: int = 1, temperature: float | None = None,
             max_new_tokens: int = 256, batch_size: int = 32, seed: int = 0, template: str = "base",
             split: str = "test", progress: bool = False) -> dict:
    """Evaluate on ``n`` problems of the task's ``split`` (test by default).

    ``task`` is a Task or a task name.  The same ``seed`` draws the problems and seeds sampling,
    so two models evaluated with the same arguments see the same problems.  Returns
    ``{"settings": ..., "metrics": ..., "problems": [{task fields, "scores", "completions"}]}``.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if samples > 1 and not temperature:
        temperature = 1.0  # avg@k needs sampling; 1.0 is the paper's sampling temperature
    task = get_task(task, template) if isinstance(task, str) else task
    rows = task.load(split, n, seed)
    t0 = time.time()
    texts, lengths = generate(model, tokenizer, [r["prompt"] for r in rows], samples, temperature,
                              max_new_tokens, batch_size, seed, progress)
    scores = [[float(task.score(c, row)) for c in completions] for completions, row in zip(texts, rows)]
    settings = {"task": task.name, "template": template, "split": split, "n": len(rows), "samples": samples,
                "temperature": temperature, "greedy": not temperature, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "seed": seed}
    problems = [{**{k: v for k, v in row.items() if k != "prompt"}, "scores": s, "completions": c}
                for row, s, c in zip(rows, scores, texts)]
    return {"settings": settings, "metrics": summarize(scores, lengths, max_new_tokens),
            "seconds": time.time() - t0, "problems": problems}


# ----------------------------------------------------------------------------- command line
def resolve_model_dir(path: str) -> str:
    """A run folder without a saved model at its top -> its latest checkpoint-N folder."""
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        steps = [int(d.split("-")[-1]) for d in os.listdir(path)
                 if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()
                 and os.path.exists(os.path.join(path, d, "config.json"))]
        if steps:
            return os.path.join(path, f"checkpoint-{max(steps)}")
    return path


def write_json(path: str, data: dict) -> None:
    """Atomic: a reader (or `attnrhythm plot`) never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def format_table(results: list[dict]) -> str:
    """One row per result: model, task, n, samples and every metric."""
    keys = []
    for r in results:
        keys += [k for k in r["metrics"] if k not in keys]
    head = ["model", "task", "n", "k"] + keys
    rows = [[str(r.get("model", "")), r["settings"]["task"], str(r["settings"]["n"]), str(r["settings"]["samples"])]
            + [f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def configure_parser(p) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name (smollm2-135m), model folder, run folder (latest checkpoint) or hub id")
    p.add_argument("--task", default="countdown", help="countdown, countdown-easy, gsm8k, math-jsonl:PATH, ...")
    p.add_argument("--template", default="base", choices=["base", "chat"])
    p.add_argument("--n", type=int, default=512, help="test problems (the paper's Countdown test set: 512)")
    p.add_argument("--samples", type=int, default=1, help="completions per problem: 1 = pass@1, k = avg@k and pass@k")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; default greedy for --samples 1, 1.0 for --samples > 1")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--seed", type=int, default=0, help="draws the test problems and seeds sampling")
    p.add_argument("--split", default="test", choices=["test", "train"])
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU, else float32), float32, bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--step", type=int, default=None, help="training step of this model, recorded for `plot`")
    p.add_argument("--out", default=None, help="write the JSON result here (e.g. RUN_DIR/eval.json)")


def run(args) -> int:
    from attnrhythm.models import load_model

    path = resolve_model_dir(args.model)
    model, tokenizer = load_model(path, dtype=args.dtype, device=args.device)
    result = evaluate(model, tokenizer, args.task, n=args.n, samples=args.samples, temperature=args.temperature,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                      template=args.template, split=args.split, progress=True)
    result = {"model": args.model, "model_path": path, "step": args.step, **result}
    if args.out:
        write_json(args.out, result)
    print(format_table([result]))
    print(f"{result['seconds']:.0f}s" + (f"; wrote {args.out}" if args.out else ""))
    return 0
