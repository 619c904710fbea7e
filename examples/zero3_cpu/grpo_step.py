"""One GRPO rollout batch (2 optimizer steps) on a tiny random Llama, 2 CPU processes.

Same script for both backends; the launcher decides (from the repository root):
    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/zero3_cpu/grpo_step.py --out runs/ddp
    DS_ACCELERATOR=cpu accelerate launch --config_file examples/accelerate/zero3_cpu.yaml \
        examples/zero3_cpu/grpo_step.py --out runs/zero3

Writes to --out (rank 0): log.json (TRL's log history: loss, grad_norm, reward per step),
weights.pt (full fp32 state dict after the last step, gathered from ZeRO-3 shards when sharded),
weights_init.pt, rollouts_rank{R}.pt (completion ids and advantages each rank trained on), env.json.
compare.py checks two such folders against each other.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

T0 = time.time()


def byte_tokenizer():
    """Byte-level BPE without merges: 3 specials + 256 bytes (as tests/conftest.py), no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    torch.manual_seed(0)  # identical initial weights on every rank and in every run
    model = LlamaForCausalLM(cfg).float()
    model.config._attn_implementation = "sdpa"
    return model


def id_reward(prompts, completions, completion_ids, **kwargs):
    """Deterministic, with spread inside groups (a random model never solves a task)."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--trainer", choices=["trl", "rhythm"], default="rhythm")
    ap.add_argument("--credit", default="coupled")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--use-cpu", choices=["auto", "true", "false"], default="auto",
                    help="GRPOConfig.use_cpu; auto: True for DDP, False (+ ddp_backend gloo) under DeepSpeed")
    args = ap.parse_args()

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    deepspeed_on = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    os.makedirs(args.out, exist_ok=True)

    tok = byte_tokenizer()
    model = tiny_llama()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(args.out, "weights_init.pt"))
    rows = [{"prompt": f"Use {a} {b} {a + b} to make {(a * b) % 50}. Answer:"} for a in range(1, 9) for b in range(1, 5)]

    # Two ways that both work under DeepSpeed on CPU (both measured, README.md):
    #  use_cpu=True  (what attnrhythm's --device cpu sets): accelerate's PartialState takes its MULTI_CPU
    #                path, inits gloo itself; the Accelerator then switches to DEEPSPEED and
    #                deepspeed.initialize reuses that process group.
    #  use_cpu=False + ddp_backend="gloo": PartialState calls deepspeed.init_distributed("gloo").
    #  use_cpu=False without ddp_backend FAILS: PartialState finds no device backend, keeps
    #                num_processes=1 while DeepSpeed runs 2 ranks -> train_batch_size assertion.
    use_cpu = {"true": True, "false": False, "auto": not deepspeed_on}[args.use_cpu]
    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        steps_per_generation=2, num_generations=4, max_completion_length=12, loss_type="grpo", beta=0.0,
        learning_rate=1e-2, lr_scheduler_type="constant", temperature=1.0, use_cpu=use_cpu, bf16=False,
        seed=0, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True,
        gradient_checkpointing=args.gradient_checkpointing, shuffle_dataset=False,
        # DeepSpeed on CPU: without an explicit backend accelerate's PartialState finds no device
        # backend, keeps num_processes=1 while deepspeed.init_distributed runs 2 ranks, and DeepSpeed
        # rejects train_batch_size (4 != 4 * 1 * 2).  'gloo' makes both agree.
        ddp_backend="gloo" if deepspeed_on and not use_cpu else None)
    # rollout arithmetic: 4 per device x 2 processes x 2 steps = 16 completions = 4 prompts x 4 generations

    kwargs = dict(model=model, reward_funcs=[id_reward], args=config, train_dataset=Dataset.from_list(rows),
                  processing_class=tok)
    if args.trainer == "rhythm":
        from attnrhythm.core.config import RhythmConfig
        from attnrhythm.train.trainer import CreditConfig, RhythmGRPOTrainer
        base = RhythmGRPOTrainer
        kwargs["credit"] = CreditConfig(strategy=args.credit, rhythm=RhythmConfig())
    else:
        base = GRPOTrainer

    rollouts = []
    materialised = []

    class Recording(base):
        def _generate_and_score_completions(self, inputs):
            # parameter elements materialised on this rank when a rollout starts: the full count under
            # DDP, only ZeRO-3's persistent small tensors (or 0) when parameters are sharded
            materialised.append(sum(p.data.numel() for p in self.model.parameters()))
            out = super()._generate_and_score_completions(inputs)
            rollouts.append({k: out[k].detach().cpu().clone() for k in ("prompt_ids", "completion_ids", "completion_mask", "advantages")})
            return out

    trainer = Recording(**kwargs)
    t_train = time.time()
    trainer.train()
    t_train = time.time() - t_train

    # full weights after training: ZeRO-3 holds 1/world of every parameter per rank -> gather
    unwrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    params = list(unwrapped.parameters())
    zero = {"stage": None}
    if deepspeed_on:
        import deepspeed
        engine = trainer.model_wrapped
        zero = {"stage": engine.zero_optimization_stage(),
                "engine": type(engine).__name__, "optimizer": type(engine.optimizer).__name__,
                "partitioned_params": sum(getattr(p, "ds_status", None) is not None and
                                          p.ds_status.name == "NOT_AVAILABLE" for p in params),
                "params": len(params),
                "data_numel_now": sum(p.data.numel() for p in params),  # 0 for a partitioned parameter
                "shard_numel_this_rank": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
                "full_numel": sum(p.ds_numel for p in params)}
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {n: p.detach().clone() for n, p in unwrapped.named_parameters()}
    else:
        state = {n: p.detach().clone() for n, p in unwrapped.named_parameters()}
    zero["param_numel_materialised_at_rollout_start"] = materialised
    print(f"ZERO rank{rank}", json.dumps(zero), flush=True)
    torch.save(rollouts, os.path.join(args.out, f"rollouts_rank{rank}.pt"))
    if rank == 0:
        torch.save(state, os.path.join(args.out, "weights.pt"))
        import importlib.metadata as metadata

        def version(name):
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                return None
        info = {"world_size": world, "deepspeed": deepspeed_on,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "backend": str(torch.distributed.get_backend()) if torch.distributed.is_initialized() else None,
                "device": str(trainer.accelerator.device),
                "zero": zero, "full_numel": sum(v.numel() for v in state.values()),
                "train_seconds": round(t_train, 2), "total_seconds": round(time.time() - T0, 2),
                "trainer": args.trainer, "credit": args.credit, "use_cpu": use_cpu,
                "versions": {name: version(name) for name in ("torch", "transformers", "trl", "accelerate", "deepspeed")},
                "ds_accelerator": os.environ.get("DS_ACCELERATOR")}
        with open(os.path.join(args.out, "log.json"), "w") as f:
            json.dump({"log_history": trainer.state.log_history, "env": info}, f, indent=1)
        print("RESULT", json.dumps({"steps": [{k: h.get(k) for k in ("step", "loss", "grad_norm", "reward")}
                                              for h in trainer.state.log_history if "loss" in h], **info}))


if __name__ == "__main__":
    main()
