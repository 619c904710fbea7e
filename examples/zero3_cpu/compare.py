"""Compare two grpo_step.py output folders (e.g. DDP vs ZeRO-3): logged loss and grad norm per
step, the rollouts each rank trained on, and the weights after the last step.
    python examples/zero3_cpu/compare.py runs/ddp runs/zero3       -> prints a JSON summary; exit 1 when they differ
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def load(d):
    d = Path(d)
    log = json.loads((d / "log.json").read_text())
    steps = [h for h in log["log_history"] if "loss" in h and "train_loss" not in h]
    rollouts = {p.name: torch.load(p) for p in sorted(d.glob("rollouts_rank*.pt"))}
    return log, steps, rollouts, torch.load(d / "weights.pt"), torch.load(d / "weights_init.pt")


def compare(a, b, rtol_loss=1e-5, atol_w=1e-5):
    la, sa, ra, wa, ia = load(a)
    lb, sb, rb, wb, ib = load(b)
    same_rollouts = ra.keys() == rb.keys() and all(
        len(ra[k]) == len(rb[k]) and all(torch.equal(x["completion_ids"], y["completion_ids"])
                                         for x, y in zip(ra[k], rb[k])) for k in ra)
    adv_diff = max(float((x["advantages"] - y["advantages"]).abs().max())
                   for k in ra for x, y in zip(ra[k], rb[k])) if same_rollouts else None
    same_init = all(torch.equal(ia[k], ib[k]) for k in ia)
    keys = [k for k in wa if k in wb]
    w_diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in keys)
    moved_a = max(float((wa[k].float() - ia[k].float()).abs().max()) for k in keys)
    moved_b = max(float((wb[k].float() - ib[k].float()).abs().max()) for k in keys)
    rel = (sum(float((wa[k].float() - wb[k].float()).norm() ** 2) for k in keys) ** 0.5 /
           sum(float((wa[k].float() - ia[k].float()).norm() ** 2) for k in keys) ** 0.5)
    steps = [{"step": x["step"], "loss_a": x["loss"], "loss_b": y["loss"], "grad_norm_a": x.get("grad_norm"),
              "grad_norm_b": y.get("grad_norm")} for x, y in zip(sa, sb)]
    first = steps[0]
    ok = (same_init and same_rollouts and len(sa) == len(sb) and len(keys) == len(wa) == len(wb)
          and abs(first["loss_a"] - first["loss_b"]) <= rtol_loss * max(1.0, abs(first["loss_a"]))
          and w_diff <= atol_w and moved_a > 100 * atol_w)
    return {"ok": ok, "a": str(a), "b": str(b), "env_a": la["env"], "env_b": lb["env"], "steps": steps,
            "same_initial_weights": same_init, "same_completions_every_rank": same_rollouts,
            "advantage_max_abs_diff": adv_diff, "weights_max_abs_diff_after": w_diff,
            "weights_max_abs_change_a": moved_a, "weights_max_abs_change_b": moved_b,
            "weights_diff_over_update_norm": rel, "n_tensors": len(keys)}


if __name__ == "__main__":
    result = compare(sys.argv[1], sys.argv[2])
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)
