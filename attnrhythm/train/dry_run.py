"""`attnrhythm train --config X --dry-run`: resolve a run and check it without loading weights,
training or writing anything.

    attnrhythm train --config examples/paper/qwen3-4b-countdown.yaml --dry-run \
        --accelerate-config examples/accelerate/zero3.yaml
    from attnrhythm.train.dry_run import dry_run
    report = dry_run("examples/paper/qwen3-4b-countdown.yaml", world_size=8).text

``dry_run(config)`` returns a ``DryRun``: the report text plus ``errors`` and ``warnings`` (one line
each; the command exits 2 on an error) and ``values`` (the report's numbers).

What it reads (never writes): the YAML, the training rows exactly as the run loads them (so a
data file the run would refuse is refused here), the model's ``config.json`` (a local folder, the
embedded model's converted cache, or the Hugging Face cache via ``AutoConfig.from_pretrained(...,
local_files_only=True)``), a local tokenizer to measure one typical prompt, and the accelerate
config when one is given.  Never weights, never the network.  Nothing about particular tasks or
models is written here: the shape comes from config.json or is reported as unknown.

A real run makes the same checks first (``run.validate``).  The one difference is what is missing
on this machine (a data file, a hub model not in the local cache while offline): a warning here,
where a config may be checked for the machine that has them, an error for a run about to start
here (``here=True``).  What is here is checked as strictly as the run checks it.  ``plan`` is the
rollout arithmetic both use.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from attnrhythm import io
from attnrhythm.errors import MissingInput, UserError, closest
from attnrhythm.train.config import TrainConfig, load_function, load_yaml, resolved, train_size

TYPICAL_PROMPT_TOKENS = 256
"""Prompt length assumed when no prompt of the task can be built or measured here."""

CHARS_PER_TOKEN = 3.5
"""Prompt tokens are estimated as ceil(chars / 3.5) when no tokenizer is at hand (BPE on English
text with digits and symbols: 3-4 characters per token)."""


# Rough seconds per generated completion token of a whole rollout batch (generation, reward, the
# attention pass and its optimizer steps), measured with SmolLM2-135M: CPU, 2 shared cores: one
# rollout batch of 32 x 128 tokens took 3.5-5 minutes; H200, bf16: 256 x 128 in about 25 s.
_SECONDS_PER_TOKEN = {"cpu": 0.06, "cuda": 0.0008}


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


@dataclass(frozen=True)
class Plan:
    """The rollout arithmetic of a run (TRL 1.16, gradient_accumulation_steps = 1)."""

    world_size: int
    micro_batch: int
    """Completions per optimizer step: per_device_batch x world size."""
    completions_per_rollout: int
    optimizer_steps_per_rollout: int
    """steps_per_generation x num_iterations."""
    prompts_per_rollout: float
    """completions_per_rollout / num_generations (a whole number when the run is valid)."""
    rollout_batches: float
    """max_steps / optimizer_steps_per_rollout (the last one is generated whole)."""
    total_completions: int
    prompts_needed: int
    train_size: int
    epochs: float


def plan(config: TrainConfig, world_size: int = 1) -> Plan:
    """The rollout arithmetic of ``config`` on ``world_size`` processes."""
    micro = config.per_device_batch * world_size
    completions = micro * config.steps_per_generation
    steps = config.steps_per_generation * config.num_iterations
    prompts = completions / config.num_generations
    rollouts = config.max_steps / steps
    needed = math.ceil(math.ceil(rollouts) * prompts)
    size = train_size(config, world_size)
    return Plan(world_size, micro, completions, steps, prompts, rollouts, math.ceil(rollouts) * completions, needed,
                size, needed / size)


def plan_line(config: TrainConfig, world_size: int = 1) -> str:
    """One line: preset, rollout arithmetic and a rough time estimate (for a 135M model)."""
    p = plan(config, world_size)
    device = "cpu" if config.device == "cpu" else "cuda"
    seconds = p.total_completions * config.max_completion_length * _SECONDS_PER_TOKEN[device] / world_size
    return (f"preset {config.preset}: {math.ceil(p.rollout_batches)} rollout batch(es) of {p.completions_per_rollout} "
            f"completions ({p.prompts_per_rollout:g} prompts x {config.num_generations}), up to "
            f"{config.max_completion_length} tokens, {config.max_steps} optimizer steps, lr {config.learning_rate:g}, "
            f"credit {config.credit}; rough time for a 135M model on {device}: "
            f"{max(1, round(seconds / 60))} min (larger models take longer)")


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
        return io.read_json(path), f"{path}", str(folder)
    from attnrhythm.models import EMBEDDED, cache_dir

    if name in EMBEDDED:
        path = cache_dir() / "models" / name / "config.json"  # never converts the GGUF here
        if path.exists():
            return io.read_json(path), str(path), str(path.parent)
        return None, "embedded model not converted yet (first real run converts it)", None
    try:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:  # not in the local cache (transformers says so with an OSError)
        return None, f"model shape unknown offline ({type(err).__name__})", None
    return cfg.to_dict(), "Hugging Face cache", name


def _text_config(cfg: dict) -> dict:
    """Multimodal configs nest the language model's under text_config."""
    return cfg.get("text_config") or cfg


def model_shape(cfg: dict, rhythm) -> dict:
    """Layers, heads, head dim, the layers the attention pass samples and a parameter estimate
    (dense decoder: embeddings, attention, gated MLP, the two norms per layer; per-head q/k norms,
    where a model has them, are a few thousand weights and left out; MoE and other shapes are
    marked)."""
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
        per_layer = attn + 3 * hidden * int(inter) + 2 * hidden  # norms inside attention (q/k norms) left out
        params = int(vocab) * hidden * (1 if tied else 2) + L * per_layer + hidden
        shape["params"] = params
    else:
        shape["params"] = None
        shape["params_note"] = "mixture of experts: no dense estimate" if moe else "incomplete config.json"
    return shape


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ----------------------------------------------------------------------------- lengths
def _prompt_tokens(prompt, tokenizer_source: str | None) -> tuple[int, str]:
    """(tokens, how measured) of one prompt of the task (None: no rows at hand)."""
    if prompt is None:
        return TYPICAL_PROMPT_TOKENS, f"assumed {TYPICAL_PROMPT_TOKENS} (no prompt of the task at hand)"
    text = "\n".join(m.get("content", "") for m in prompt) if isinstance(prompt, list) else prompt  # chat messages
    folder = Path(tokenizer_source) if tokenizer_source else None
    unusable = ""
    if folder is not None and (not folder.is_dir() or any(
            (folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))):
        try:  # a folder without tokenizer files is skipped: AutoTokenizer may build an empty one from config.json
            from transformers import AutoTokenizer
            n = len(AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)(text)["input_ids"])
            if n > 0:
                return n, "measured with the model's tokenizer"
        except (OSError, ValueError) as err:  # not cached here, or files it cannot read: estimate instead
            unusable = f"; the tokenizer is not usable here ({type(err).__name__})"
    return math.ceil(len(text) / CHARS_PER_TOKEN), f"estimated from {len(text)} characters / {CHARS_PER_TOKEN}{unusable}"


# ----------------------------------------------------------------------------- report
def dry_run(config, *, world_size: int | None = None, accelerate_config: str | None = None,
            env: dict | None = None, resume: str | bool | None = None, source: str | None = None,
            here: bool = False) -> DryRun:
    """Resolve ``config`` (TrainConfig, mapping or YAML path) and check it: rollout arithmetic,
    task rows, reward function, model, lengths, `trl:` keys, the accelerate config.  World size:
    ``world_size`` > env ``WORLD_SIZE`` > ``num_processes`` of ``accelerate_config`` > 1.
    ``resume``: the checkpoint a ``--resume`` would continue from (False: --resume given but there
    is none).  ``here``: the run starts on this machine, so what is missing here is an error."""
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
    errors, warnings, lines = [], [], []
    G, per_device, spg = config.num_generations, config.per_device_batch, config.steps_per_generation
    p = plan(config, world)

    lines.append(f"attnrhythm train --dry-run  ({source})")
    lines.append(f"  model        {config.model}")
    lines.append(f"  task         {config.task} (template {config.template})")
    lines.append(f"  preset       {config.preset or '(none)'}")
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
        if str(acc.get("mixed_precision", "no")) == "bf16" and not config.bf16:
            errors.append(f"{accelerate_config} sets mixed_precision bf16 but the run resolves bf16 to False: "
                          f"set bf16: true in the run config (or mixed_precision 'no' in the accelerate config)")
        if acc.get("distributed_type") == "DEEPSPEED" and config.device == "cpu" and env.get("DS_ACCELERATOR") != "cpu":
            warnings.append("DeepSpeed on CPU: launch with DS_ACCELERATOR=cpu (gloo backend; see examples/zero3_cpu/README.md)")

    # TRL passthrough: names must be GRPOConfig fields (a typo there would only fail at launch)
    from trl import GRPOConfig
    known = {f.name for f in fields(GRPOConfig)}
    for key in sorted(set(config.trl) - known):
        guess = closest(key, known)
        errors.append(f"trl: {key!r} is not a GRPOConfig field" + (f" (did you mean {guess!r}?)" if guess else ""))
    if "generation_batch_size" in config.trl:
        errors.append("trl: generation_batch_size and steps_per_generation are both set (TRL accepts one); "
                      "set steps_per_generation only")

    # rollout arithmetic
    lines.append("rollout arithmetic")
    lines.append(f"  micro-batch        {per_device} per device x {world} = {p.micro_batch} completions per optimizer step")
    lines.append(f"  rollout batch      {p.micro_batch} x {spg} steps_per_generation = {p.completions_per_rollout} completions")
    if p.completions_per_rollout % G:
        errors.append(f"rollout batch of {p.completions_per_rollout} completions ({per_device} x {world} x {spg}) is "
                      f"not divisible by num_generations {G}")
        lines.append(f"  prompts            {p.completions_per_rollout} / {G} = {p.prompts_per_rollout:.2f}: NOT a whole number")
    else:
        lines.append(f"  prompts            {p.completions_per_rollout} / {G} generations = {p.prompts_per_rollout:g} "
                     "prompts per rollout batch")
    steps, iters = p.optimizer_steps_per_rollout, config.num_iterations
    lines.append(f"  optimizer steps    {spg} per rollout batch" + (f" x {iters} iterations = {steps}" if iters > 1 else ""))
    if config.max_steps % steps:
        warnings.append(f"max_steps {config.max_steps} is not a multiple of {steps} optimizer steps per rollout batch: "
                        f"the last rollout batch ({config.max_steps % steps} of its {steps} steps) is generated but "
                        "only partly trained on")
    rollouts = p.rollout_batches
    lines.append(f"  rollout batches    max_steps {config.max_steps} / {steps} = "
                 + (f"{int(rollouts)}" if rollouts == int(rollouts) else f"{rollouts:.2f} (generates {math.ceil(rollouts)})"))
    lines.append(f"  total completions  {math.ceil(rollouts)} x {p.completions_per_rollout} = {p.total_completions:,}")
    lines.append(f"  training prompts   {math.ceil(rollouts)} x {p.prompts_per_rollout:g} = {p.prompts_needed:,} needed; "
                 f"train_size {p.train_size:,}{'' if asked.train_size is not None else ' (library default)'} -> "
                 f"{p.epochs:.2f} epochs")
    values = {"preset": config.preset, **{k: getattr(p, k) for k in (
        "world_size", "micro_batch", "completions_per_rollout", "optimizer_steps_per_rollout", "prompts_per_rollout",
        "rollout_batches", "total_completions", "prompts_needed", "train_size", "epochs")}}

    # the task: its rows, loaded as the run loads them
    rows = None
    try:
        from attnrhythm.tasks import get_task
        rows = get_task(config.task, config.template).load("train", p.train_size, config.seed)
        lines.append(f"  training rows      {len(rows):,} loaded (as the run loads them)")
    except MissingInput as err:
        (errors if here else warnings).append(f"task: {err}")
    except UserError as err:
        errors.append(f"task: {err}")
    if config.reward_function is not None:
        try:
            load_function(config.reward_function)
        except UserError as err:
            errors.append(str(err))

    # the model
    from attnrhythm.models import check_model
    shape, cfg, tok_source = None, None, None
    try:
        check_model(config.model)
        cfg, where, tok_source = _find_model_config(config.model)
    except MissingInput as err:
        if here or os.path.exists(config.model):
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
                n = shape["params"]
                lines.append(f"  parameters         ~{_fmt_params(n)} (dense decoder estimate); bf16 weights {2 * n / 2**30:.1f} GiB; "
                             f"ZeRO-3 shard of weights+grads+Adam (2+2+12 bytes) {16 * n / world / 2**30:.1f} GiB per process")
            else:
                lines.append(f"  parameters         unknown ({shape['params_note']})")
            values["shape"] = shape

    # lengths: completion + a typical prompt against the model's context (and vLLM's)
    prompt_tokens, how = _prompt_tokens(rows[0]["prompt"] if rows else None, tok_source)
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
    lines += [f"  warning: {w}" for w in warnings] + [f"  error: {e}" for e in errors]
    if not warnings and not errors:
        lines.append("  ok")
    return DryRun("\n".join(lines), errors, warnings, values)


__all__ = ["DryRun", "Plan", "dry_run", "model_shape", "plan", "plan_line"]
