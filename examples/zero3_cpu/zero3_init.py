"""Does `zero3_init_flag` reach `from_pretrained`?  Loads a model the way `attnrhythm train`'s
build_trainer does (GRPOConfig first, then load_model) or in the old order, and prints per rank
how many parameters ZeRO-3 partitioned at load and how many elements the rank holds.

    DS_ACCELERATOR=cpu accelerate launch --config_file Z3INIT.yaml examples/zero3_cpu/zero3_init.py after
    DS_ACCELERATOR=cpu accelerate launch --config_file Z3INIT.yaml examples/zero3_cpu/zero3_init.py before

Z3INIT.yaml: examples/accelerate/zero3_cpu.yaml with `zero3_init_flag: true`.  --model DIR takes
any Hugging Face model folder; without it grpo_step.py's tiny Llama is saved to a temp folder.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("order", choices=["after", "before"], help="load the model after (new) or before (old) the GRPOConfig")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    from transformers.integrations import is_deepspeed_zero3_enabled

    from attnrhythm.models import load_model
    from attnrhythm.train.config import TrainConfig, to_grpo_config

    folder = args.model
    if folder is None:  # every rank saves the same tiny model (seed 0) to its own folder
        from grpo_step import byte_tokenizer, tiny_llama
        folder = tempfile.mkdtemp()
        tiny_llama().save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
    config = TrainConfig(preset="cpu", device="cpu", out=tempfile.mkdtemp())
    if args.order == "before":
        model, _ = load_model(folder, dtype="float32", device="cpu")
        grpo_args = to_grpo_config(config)
    else:
        # keep the GRPOConfig alive: transformers holds its DeepSpeed config by weak reference only
        grpo_args = to_grpo_config(config)
        model, _ = load_model(folder, dtype="float32", device="cpu")
    params = list(model.parameters())
    print(f"rank {os.environ.get('RANK', '0')}: order {args.order}, zero3 enabled {is_deepspeed_zero3_enabled()}, "
          f"partitioned at load {sum(hasattr(p, 'ds_id') for p in params)}/{len(params)} parameters, "
          f"elements held {sum(p.data.numel() for p in params):,}", flush=True)
    del grpo_args


if __name__ == "__main__":
    main()
