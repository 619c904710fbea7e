"""`attnrhythm train --config X --dry-run`: resolve a run and check it without loading weights,
training or writing anything.

    attnrhythm train --config examples/paper/qwen3-4b-countdown.yaml --dry-run \
        --accelerate-config examples/accelerate/zero3.yaml
    from attnrhythm.train.dry_run import dry_run
    report = dry_run("examples/paper/qwen3-4b-countdown.yaml", world_size=8).text

``dry_run(config)`` returns a ``DryRun``: the report text plus ``errors`` and ``warnings`` (one line
each; the command exits 2 on an error) and ``values`` (the report's numbers).

What it reads (never writes): the YAML, the task name (``get_task``, no data generated), the data
file of a ``math-jsonl:``/``choice-jsonl:`` task when it exists (its lines are counted), the model's
``config.json`` (a local folder, the embedded model's converted cache, or the Hugging Face cache via
``AutoConfig.from_pretrained(..., local_files_only=True)``), a local tokenizer to measure one
typical prompt, and the accelerate config when one is given.  Never weights, never the network.
Nothing about particular models is hard-coded: the shape comes from config.json or is reported as
unknown.  A typo'd field or preset is a UserError (one line, the closest known name), as in a run.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from attnrhythm.errors import MissingInput, UserError, closest
from attnrhythm.train.config import TrainConfig, load_yaml, resolved, train_size

TYPICAL_PROMPT_TOKENS = 256
"""Prompt length assumed when no prompt of the task can be built or measured here."""

CHARS_PER_TOKEN = 3.5
"""Prompt tokens are estimated as ceil(chars / 3.5) when no tokenizer is at hand (BPE on English
text with digits and symbols: 3-4 characters per token)."""


@dataclass
class DryRun:
    text: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)
    """The numbers of the report, for tests and scripts."""

    @property
    def ok(self) -> bool:
        return not self.errors


# ----------------------------------------------------------------------------- config
def _load(config) -> tuple[TrainConfig, str]:
    """(TrainConfig, source) from a TrainConfig, a mapping or a YAML path (layered on the defaults
    and the preset exactly as `train --config` does)."""
    if isinstance(config, TrainConfig):
        return config, "resolved config"
    if isinstance(config, (str, os.PathLike)):
        return TrainConfig.from_layers(load_yaml(config)), str(config)
    if isinstance(config, dict):
        return TrainConfig.from_layers(config), "mapping"
    raise UserError(f"a dry run needs a TrainConfig, a mapping or a YAML path, got {type(config).__name__}")


def _world_size(world_size, accelerate_config, env) -> tuple[int, str]:
    if world_size is not None:
        return int(world_size), "given"
    if env.get("WORLD_SIZE"):
        return int(env["WORLD_SIZE"]), "env WORLD_SIZE"
    if accelerate_config is not None:
        data = load_yaml(accelerate_config)
        n = data.get("num_processes")
        if n is None:
            raise UserError(f"{accelerate_config} has no num_processes")
        machines = int(data.get("num_machines", 1) or 1)
        return int(n), f"num_processes of {accelerate_config}" + (f" ({machines} machines)" if machines > 1 else "")
    return 1, "assumed: 1 process; set WORLD_SIZE or pass --accelerate-config"


# ----------------------------------------------------------------------------- model
def _find_model_config(name: str) -> tuple[dict | None, str, str | None]:
    """(config.json as a dict or None, where it came from or why not, folder for a tokenizer)."""
    folder = Path(name)
    if folder.is_dir():
        path = folder / "config.json"
        if not path.exists():
            raise MissingInput(f"{name} is a folder without config.json: not a Hugging Face model folder")
        return json.loads(path.read_text()), f"{path}", str(folder)
    from attnrhythm.models import EMBEDDED, cache_dir

    if name in EMBEDDED:
        path = cache_dir() / "models" / name / "config.json"  # never converts the GGUF here
        if path.exists():
            return json.loads(path.read_text()), str(path), str(path.parent)
        return None, "embedded model not converted yet (first real run converts it)", None
    try:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception as err:  # offline and not cached, or no transformers: not an error of the config
        return None, f"model shape unknown offline ({type(err).__name__})", None
    return cfg.to_dict(), "Hugging Face cache", name


def _text_config(cfg: dict) -> dict:
    """Multimodal configs nest the language model's under text_config."""
    return cfg.get("text_config") or cfg


def model_shape(cfg: dict, rhythm) -> dict:
    """Layers, heads, head dim, the layers the attention pass samples and a parameter estimate
    (dense decoder: embeddings, attention, gated MLP, norms; MoE and other shapes are marked)."""
    from attnrhythm.core.config import select_layers

    c = _text_config(cfg)
    L = int(c["num_hidden_layers"])
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    hidden = int(c["hidden_size"])
    head_dim = int(c.get("head_dim") or hidden // heads)
    inter = c.get("intermediate_size")
    vocab = c.get("vocab_size")
    tied = bool(c.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    shape = {"model_type": c.get("model_type", cfg.get("model_type")), "layers": L, "heads": heads, "kv_heads": kv,
             "head_dim": head_dim, "hidden": hidden, "intermediate": inter, "vocab": vocab, "tied_embeddings": tied,
             "context": c.get("max_position_embeddings"),
             "sampled_layers": select_layers(rhythm.layers, L, rhythm.n_layers_sampled)}
    moe = any(k in c for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    if inter and vocab and not moe:
        bias = bool(c.get("attention_bias", False))
        attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
        if bias:
            attn += heads * head_dim + 2 * kv * head_dim
        qk_norm = 2 * head_dim if str(shape["model_type"]).startswith("qwen3") else 0
        per_layer = attn + 3 * hidden * int(inter) + 2 * hidden + qk_norm
        params = int(vocab) * hidden * (1 if tied else 2) + L * per_layer + hidden
        shape["params"] = params
    else:
        shape["params"] = None
        shape["params_note"] = "mixture of experts: no dense estimate" if moe else "incomplete config.json"
    return shape


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ----------------------------------------------------------------------------- task
def _task_rows(task: str) -> tuple[int | None, str | None]:
    """(rows in the data file of a file task, path) when the file is here; (None, path) when not."""
    for prefix in ("math-jsonl:", "choice-jsonl:"):
        if task.startswith(prefix):
            path = task[len(prefix):]
            if not os.path.isfile(path):
                return None, path
            with open(path, encoding="utf-8") as f:
                return sum(1 for line in f if line.strip()), path
    return None, None


def _typical_prompt(config: TrainConfig, tokenizer_source: str | None) -> tuple[int, str]:
    """(tokens, how measured) of one prompt of the task."""
    text = None
    try:
        from attnrhythm.tasks import get_task
        task = get_task(config.task, config.template)
        if config.task.startswith(("countdown",)):
            text = task.load("train", 1, config.seed)[0]["prompt"]
        else:
            rows, path = _task_rows(config.task)
            if rows:
                text = task.load("train", 1, config.seed)[0]["prompt"]
    except Exception:
        text = None
    if text is None:
        return TYPICAL_PROMPT_TOKENS, f"assumed {TYPICAL_PROMPT_TOKENS} (no prompt of the task at hand)"
    if isinstance(text, list):  # chat messages
        text = "\n".join(m.get("content", "") for m in text)
    folder = Path(tokenizer_source) if tokenizer_source else None
    if folder is not None and (not folder.is_dir() or any(
            (folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))):
        try:  # a folder without tokenizer files is skipped: AutoTokenizer may build an empty one from config.json
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
            n = len(tok(text)["input_ids"])
            if n > 0:
                return n, "measured with the model's tokenizer"
        except Exception:
            pass
    return math.ceil(len(text) / CHARS_PER_TOKEN), f"estimated from {len(text)} characters / {CHARS_PER_TOKEN}"


# ----------------------------------------------------------------------------- report
def dry_run(config, *, world_size: int | None = None, accelerate_config: str | None = None,
            env: dict | None = None, resolve_model: bool = True, resume: str | bool | None = None,
            source: str | None = None) -> DryRun:
    """Resolve ``config`` (TrainConfig, mapping or YAML path) and check it: rollout arithmetic,
    task, model, lengths, `trl:` keys, the accelerate config.  World size: ``world_size`` > env
    ``WORLD_SIZE`` > ``num_processes`` of ``accelerate_config`` > 1.  ``resume``: the checkpoint a
    ``--resume`` would continue from (False: --resume given but there is none)."""
    env = os.environ if env is None else env
    config, loaded_from = _load(config)
    source = source or loaded_from
    world, world_from = _world_size(world_size, accelerate_config, env)
    if world < 1:
        raise UserError(f"world size must be >= 1, got {world}")
    asked = config
    config = resolved(config, world)  # device, bf16 and train_size made concrete, as a run writes them
    bf16_note = " (auto)" if asked.bf16 is None else ""
    if asked.bf16 is None and config.device.startswith("cuda") and not config.bf16:
        import torch
        if not torch.cuda.is_available():  # checked off the target machine: assume its GPU has bf16
            config, bf16_note = config.update({"bf16": True}), " (auto: assumes the run's GPU has bf16)"
    preset = config.preset
    errors, warnings, lines = [], [], []
    G, per_device, spg, iters = config.num_generations, config.per_device_batch, config.steps_per_generation, config.num_iterations

    lines.append(f"attnrhythm train --dry-run  ({source})")
    lines.append(f"  model        {config.model}")
    lines.append(f"  task         {config.task} (template {config.template})")
    lines.append(f"  preset       {preset or '(none)'}")
    lines.append(f"  credit       {config.credit} (q {config.rhythm.q}, amp {config.rhythm.amp}, W {config.rhythm.window}, "
                 f"FAI horizon {list(config.rhythm.fai_horizon)}, layers {config.rhythm.layers})")
    lines.append(f"  device       {config.device}" + (" (auto)" if asked.device == "auto" else "")
                 + f", world size {world} ({world_from})")
    vllm = f", vLLM {config.trl.get('vllm_mode', 'colocate')}" if config.use_vllm else ""
    lines.append(f"  precision    model_dtype {config.model_dtype}, bf16 {config.bf16}{bf16_note}{vllm}")
    lines.append(f"  out          {config.out}" + ("" if resume is None else
                 f" (resume from {resume})" if resume else " (--resume: no complete checkpoint, starts at step 0)"))

    # the accelerate config's precision must agree with the run's: DeepSpeed refuses bf16.enabled=True
    # when TrainingArguments.bf16 is False (measured: ValueError before the first step)
    if accelerate_config is not None:
        acc = load_yaml(accelerate_config)
        mixed = str(acc.get("mixed_precision", "no"))
        if mixed == "bf16" and not config.bf16:
            errors.append(f"{accelerate_config} sets mixed_precision bf16 but the run resolves bf16 to False: "
                          f"set bf16: true in the run config (or mixed_precision 'no' in the accelerate config)")
        if acc.get("distributed_type") == "DEEPSPEED" and config.device == "cpu" and env.get("DS_ACCELERATOR") != "cpu":
            warnings.append("DeepSpeed on CPU: launch with DS_ACCELERATOR=cpu (gloo backend; see examples/zero3_cpu/README.md)")

    # TRL passthrough: names must be GRPOConfig fields (a typo there would only fail at launch)
    try:
        from trl import GRPOConfig
        known = {f.name for f in fields(GRPOConfig)}
        for key in sorted(set(config.trl) - known):
            guess = closest(key, known)
            errors.append(f"trl: {key!r} is not a GRPOConfig field" + (f" (did you mean {guess!r}?)" if guess else ""))
    except ImportError:
        warnings.append("trl is not installed here: trl: keys not checked")
    if "generation_batch_size" in config.trl:
        errors.append("trl: generation_batch_size and steps_per_generation are both set (TRL accepts one); "
                      "set steps_per_generation only")

    # rollout arithmetic (TRL 1.16, gradient_accumulation_steps = 1)
    micro = per_device * world
    completions = micro * spg
    per_rollout_steps = spg * iters
    values = {"world_size": world, "micro_batch": micro, "completions_per_rollout": completions,
              "optimizer_steps_per_rollout": per_rollout_steps, "preset": preset}
    lines.append("rollout arithmetic")
    lines.append(f"  micro-batch        {per_device} per device x {world} = {micro} completions per optimizer step")
    lines.append(f"  rollout batch      {micro} x {spg} steps_per_generation = {completions} completions")
    if G < 2:
        errors.append(f"num_generations must be >= 2 (GRPO compares completions within a group), got {G}")
    if completions % max(G, 1):
        errors.append(f"rollout batch of {completions} completions ({per_device} x {world} x {spg}) is not divisible "
                      f"by num_generations {G}")
        prompts_per = completions / max(G, 1)
        lines.append(f"  prompts            {completions} / {G} = {prompts_per:.2f}: NOT a whole number")
    else:
        prompts_per = completions // G
        lines.append(f"  prompts            {completions} / {G} generations = {prompts_per} prompts per rollout batch")
    lines.append(f"  optimizer steps    {spg} per rollout batch" + (f" x {iters} iterations = {per_rollout_steps}" if iters > 1 else ""))
    rollouts = config.max_steps / per_rollout_steps
    if config.max_steps % per_rollout_steps:
        warnings.append(f"max_steps {config.max_steps} is not a multiple of {per_rollout_steps} optimizer steps per "
                        f"rollout batch: the last rollout batch ({config.max_steps % per_rollout_steps} of its "
                        f"{per_rollout_steps} steps) is generated but only partly trained on")
    n_rollouts = math.ceil(rollouts)
    total_completions = n_rollouts * completions
    prompts_needed = math.ceil(n_rollouts * prompts_per)
    lines.append(f"  rollout batches    max_steps {config.max_steps} / {per_rollout_steps} = "
                 + (f"{int(rollouts)}" if rollouts == int(rollouts) else f"{rollouts:.2f} (generates {n_rollouts})"))
    lines.append(f"  total completions  {n_rollouts} x {completions} = {total_completions:,}")
    size = train_size(config, world)
    epochs = prompts_needed / size if size else float("inf")
    lines.append(f"  training prompts   {n_rollouts} x {prompts_per:g} = {prompts_needed:,} needed; train_size {size:,}"
                 f"{'' if config.train_size is not None else ' (library default)'} -> {epochs:.2f} epochs")
    values.update(prompts_per_rollout=prompts_per, rollout_batches=rollouts, total_completions=total_completions,
                  prompts_needed=prompts_needed, train_size=size, epochs=epochs)

    # the task: its name, and for file tasks the file's rows
    try:
        from attnrhythm.tasks import get_task
        get_task(config.task, config.template)
    except UserError as err:
        errors.append(f"task: {err}")
    rows, path = _task_rows(config.task)
    if path is not None and rows is None:
        warnings.append(f"data file {path} is not here: its rows are checked at launch (train_size {size:,} needs that many)")
    elif rows is not None:
        lines.append(f"  data file          {path}: {rows:,} rows")
        if size > rows:
            errors.append(f"train_size {size:,} exceeds the {rows:,} rows of {path}: set train_size <= {rows:,}")
    if config.task == "gsm8k":
        errors.append("task gsm8k: the packaged GSM8K has only a 'test' split; train on math-jsonl:PATH")
    if config.reward_function is not None:
        from attnrhythm.train.run import load_function
        try:
            load_function(config.reward_function)
        except UserError as err:
            errors.append(str(err))

    # the model
    shape, cfg, tok_source = None, None, None
    if resolve_model:
        from attnrhythm.models import check_model
        try:
            check_model(config.model)
            cfg, where, tok_source = _find_model_config(config.model)
        except MissingInput as err:
            if os.path.exists(config.model):
                errors.append(f"model: {err}")
            else:  # a hub id that is not cached while offline: a run on the target machine downloads it
                warnings.append(f"model: {err}")
            where = "unknown here (not in the local cache)"
        except UserError as err:
            errors.append(f"model: {err}")
            where = "not found"
        lines.append("model")
        if cfg is None:
            lines.append(f"  shape              {where}")
        else:
            try:
                shape = model_shape(cfg, config.rhythm)
            except (KeyError, TypeError, ValueError) as err:
                lines.append(f"  shape              config.json incomplete ({err})")
            else:
                lines.append(f"  config             {where} ({shape['model_type']})")
                lines.append(f"  layers             {shape['layers']}, heads {shape['heads']}, kv heads {shape['kv_heads']}, "
                             f"head dim {shape['head_dim']}, hidden {shape['hidden']}, context {shape['context']}")
                lines.append(f"  sampled layers     {shape['sampled_layers']} ({config.rhythm.layers})")
                if shape["params"]:
                    p = shape["params"]
                    lines.append(f"  parameters         ~{_fmt_params(p)} (dense decoder estimate); bf16 weights {2 * p / 2**30:.1f} GiB; "
                                 f"ZeRO-3 shard of weights+grads+Adam (2+2+12 bytes) {16 * p / world / 2**30:.1f} GiB per process")
                else:
                    lines.append(f"  parameters         unknown ({shape['params_note']})")
                values["shape"] = shape

    # lengths: completion + a typical prompt against the model's context (and vLLM's)
    prompt_tokens, how = _typical_prompt(config, tok_source)
    seq = prompt_tokens + config.max_completion_length
    lines.append("lengths")
    lines.append(f"  typical prompt     {prompt_tokens} tokens ({how})")
    lines.append(f"  prompt+completion  {seq} = {prompt_tokens} + max_completion_length {config.max_completion_length}")
    values.update(prompt_tokens=prompt_tokens, sequence_tokens=seq)
    context = shape["context"] if shape else None
    if context:
        if seq > int(context):
            errors.append(f"max_completion_length {config.max_completion_length} + a typical prompt of {prompt_tokens} "
                          f"tokens = {seq} exceeds the model's context of {context}")
    else:
        lines.append("  context            unknown (no config.json here): length not checked")
    vmax = config.trl.get("vllm_max_model_length")
    if config.use_vllm and vmax is not None and seq > int(vmax):
        errors.append(f"trl.vllm_max_model_length {vmax} < prompt + completion {seq}")
    if shape:
        chunk = config.capture_batch_size or per_device
        band = config.rhythm.band_width
        gib = chunk * len(shape["sampled_layers"]) * shape["heads"] * seq * band * 4 / 2**30
        lines.append(f"  attention pass     [{chunk} seqs, {len(shape['sampled_layers'])} layers, {shape['heads']} heads, "
                     f"{seq} tokens, {band}] float32 band statistics = {gib:.2f} GiB per chunk")
        values["attention_pass_gib"] = gib

    lines.append("checks")
    for w in warnings:
        lines.append(f"  warning: {w}")
    for e in errors:
        lines.append(f"  error: {e}")
    if not warnings and not errors:
        lines.append("  ok")
    return DryRun("\n".join(lines), errors, warnings, values)


def dry_run_report(config, **kwargs) -> str:
    """The dry-run report of ``config`` as text (see ``dry_run`` for the keyword arguments)."""
    return dry_run(config, **kwargs).text


__all__ = ["DryRun", "dry_run", "dry_run_report", "model_shape"]
