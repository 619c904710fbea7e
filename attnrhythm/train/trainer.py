"""GRPO with rhythm credit: TRL's GRPOTrainer plus attention statistics per rollout batch.

TRL 1.16's ``_generate_and_score_completions`` generates, rewards and returns the rollout batch
(``prompt_ids`` [B, P] left-padded, ``completion_ids``/``completion_mask`` [B, C] right-padded
and cut after the first EOS, ``advantages`` A_i [B]).  Its ``_compute_loss`` accepts advantages
of shape (B, C) as they are (it unsqueezes only 1-D ones, "to support subclasses"), so the whole
method is one override of that method: take the attention statistics of the current policy over
prompt + completion, compute the credit and hand TRL the shaped advantages
(``core.credit.shape_advantages``: ``A_i * gamma_t``, or a batch-level credit's kept tokens).
``credit='none'`` must give stock TRL's loss exactly; tests/test_trainer.py checks it so that a
TRL upgrade that breaks the contract fails CI.

No extra forward (``one_pass``, the default): when TRL runs its no-grad old-log-prob pass over
prompt + completion (``gradient_accumulation_steps`` not a multiple of ``steps_per_generation *
num_iterations``, our default), ``_get_per_token_logps_and_entropies`` runs it inside
``capture.in_pass.statistics_in_pass``: the statistics of the sampled layers and the token
entropy come from that same forward, TRL's log-probs stay bitwise what TRL computes.  When TRL
skips that pass (or it carries vision inputs, or the model is not on SDPA, or the statistics fail
there) ``_gamma`` runs a separate capture, with full parameters gathered.  tests/test_trainer.py
checks gamma, log-probs and loss against the two-pass path.

Two more overrides keep the learning signal honest: ``_calculate_rewards`` keeps the rewards so
that a group whose rewards are all equal gets an advantage of exactly 0 (``zero_equal_groups``;
TRL's float32 arithmetic leaves ~1e-4 residues there that Adam turns into full steps).  Per
rollout batch the trainer logs the share of groups with a signal, the rhythm drift (``drift.py``,
summed in a ``RolloutSummary``), optionally the KL to the starting model, and writes a few
rollouts token by token (``rollouts.jsonl``, for `attnrhythm credit-view`).

The other overrides are bookkeeping: ``log`` (``rhythm/attention_s`` as a share of step time:
two-pass, the separate capture + metrics + gamma; one-pass, the statistics work timed inside
TRL's pass + metrics + gamma; TRL's own forward is not counted; ``rhythm/one_pass`` says which),
``_save_checkpoint`` / ``_load_optimizer_and_scheduler`` (fixed head sets survive --resume, the
pattern TRL uses for its entropy controller).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import field, fields, make_dataclass

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation

from attnrhythm import io, log
from attnrhythm.capture import capture_statistics
from attnrhythm.capture.in_pass import statistics_in_pass
from attnrhythm.capture.in_pass import supported as in_pass_supported
from attnrhythm.core.credit import credit_sets, gamma_statistics_from_sums, gamma_sums, get_credit, shape_advantages
from attnrhythm.core.heads import HeadSets
from attnrhythm.core.metrics import calibration_distance, heads_from_distance, rhythm_from_stats
from attnrhythm.train.callbacks import truncate_metrics  # noqa: F401 (re-exported for older imports)
from attnrhythm.train.config import TrainConfig
from attnrhythm.train.drift import SERIES_KEYS, RolloutSummary, drift_metrics, head_sets, rollout_rows

RHYTHM_STATE = "rhythm_state.json"
ROLLOUTS = "rollouts.jsonl"
logger = log.get_logger(__name__)


CREDIT_FIELDS = ("rhythm", "head_refresh_steps", "capture_batch_size", "capture_with_none", "zero_equal_groups",
                 "kl_to_start", "rollout_samples", "one_pass")
"""The TrainConfig fields the trainer reads; CreditConfig takes them, defaults and all, from there."""


def _check_strategy(self) -> None:
    get_credit(self.strategy)  # an unknown name is a UserError naming the closest one


def _of(cls, config) -> "CreditConfig":
    """The credit part of a TrainConfig."""
    return cls(strategy=config.credit, **{name: getattr(config, name) for name in CREDIT_FIELDS})


CreditConfig = make_dataclass(
    "CreditConfig",
    [("strategy", str, field(default="none"))]
    + [(f.name, f.type, field(default=f.default, default_factory=f.default_factory))
       for f in fields(TrainConfig) if f.name in CREDIT_FIELDS],
    namespace={"__post_init__": _check_strategy, "of": classmethod(_of), "__module__": __name__,
               "__doc__": "How the trainer shapes advantages (docs/method.md section 4): ``strategy`` (a name "
                          "of core.credit.CREDITS, TrainConfig's ``credit``; default 'none', plain GRPO) and "
                          "TrainConfig's CREDIT_FIELDS, documented there."})


class RhythmGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer(..., credit=CreditConfig(strategy="coupled"))``; everything else is TRL's."""

    def __init__(self, *args, credit: CreditConfig | None = None, **kwargs):
        self.credit = credit or CreditConfig()
        super().__init__(*args, **kwargs)
        self._heads: HeadSets | None = None
        self._heads_step = -1
        self._attention_window = 0.0  # attention-pass seconds since the last log
        self._totals = {"attention_s": 0.0, "step_s": 0.0}
        self._extras: dict = {}
        self._first_heads: tuple[set, set] | None = None  # the first rollout's head sets (drift)
        self._start_model = None
        self._pass_request = False  # armed around TRL's rollout: take the statistics in its log-prob pass
        self._pass_capture = None
        if self.credit.kl_to_start:
            import copy
            self._start_model = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)

    @property
    def captures(self) -> bool:
        return self.credit.strategy != "none" or self.credit.capture_with_none

    # ------------------------------------------------------------------ the overrides
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # kept (gathered over processes, as TRL normalises them) to find the signal-free groups
        self._last_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._last_rewards

    def _generate_and_score_completions(self, inputs):
        self._pass_request, self._pass_capture = self.captures and self.credit.one_pass, None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._pass_request = False
        output["advantages"] = self._zero_equal_groups(output["advantages"])
        if self._start_model is not None:
            self._log_kl_to_start(output)
        advantages = output["advantages"]
        if not self.captures:
            # the values TRL broadcasts from (B, 1): one code path, and the contract stays tested
            output["advantages"] = advantages[:, None].expand(-1, output["completion_ids"].size(1)).contiguous()
            return output
        start = time.perf_counter()
        gamma, entropy, summary = self._gamma(output)
        in_pass = self._pass_capture.seconds if self._pass_capture is not None else 0.0  # also when it failed
        self._pass_capture = None
        valid = output["completion_mask"].bool()
        # a batch-level credit (Wang et al.) also returns the tokens that keep their policy gradient
        output["advantages"], batch_sets = shape_advantages(self.credit.strategy, advantages, gamma, valid,
                                                            self.credit.rhythm, entropy)
        for name, chosen in batch_sets.items():
            summary.sets[name] += int((chosen & valid).sum())
        if advantages.is_cuda:
            torch.cuda.synchronize(advantages.device)
        self._record(time.perf_counter() - start + in_pass, gamma, summary, valid)
        self._write_samples(summary)
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        """TRL's method; the first no-grad call on the policy during an armed rollout (TRL's
        old-log-prob pass) also collects the attention statistics, leaving its outputs bitwise
        as they are (``capture/in_pass.py``).  Vision inputs, another model, or a model not on
        SDPA: TRL's method alone, and ``_gamma`` runs the separate pass."""
        unwrapped = self.accelerator.unwrap_model(model) if self._pass_request else None
        if (not self._pass_request or model is not self.model or torch.is_grad_enabled()
                or any(v is not None for v in extra.values()) or in_pass_supported(unwrapped) is not None):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        self._pass_request = False
        needs_entropy = get_credit(self.credit.strategy).needs_entropy
        with statistics_in_pass(unwrapped, self.credit.rhythm, needs_entropy) as capture:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        self._pass_capture = capture
        return result

    def _pass_chunks(self, ids, mask):
        """The statistics of TRL's pass as [(first row, stats)] when they cover exactly these
        sequences, else None (the separate pass runs)."""
        capture = self._pass_capture
        if capture is not None and capture.failed and not getattr(self, "_pass_failure_noticed", False):
            self._pass_failure_noticed = True
            logger.warning("attnrhythm: statistics in TRL's log-prob pass failed (%s); using a separate "
                           "attention pass", capture.failed)
        if capture is None or capture.failed or capture.rows != ids.size(0) or not capture.chunks:
            return None
        if any(stats.valid.shape[1] != ids.size(1) for _, stats in capture.chunks):
            return None
        valid = torch.cat([stats.valid for _, stats in capture.chunks]).to(mask.device)
        return capture.chunks if torch.equal(valid, mask.bool()) else None

    def _zero_equal_groups(self, advantages):
        """Advantages [B_local] with the rows of equal-reward groups set to exactly 0; logs the
        share of groups that carry a signal as ``rollout/groups_with_signal``."""
        rewards_per_func = getattr(self, "_last_rewards", None)
        if rewards_per_func is None:
            return advantages
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights[None]).nansum(1).view(-1, group)
        equal = (rewards == rewards[:, :1]).all(1)  # exact: any difference is a signal
        self._metrics[mode]["rollout/groups_with_signal"].append(1.0 - equal.float().mean().item())
        if not self.credit.zero_equal_groups:
            return advantages
        start = self.accelerator.process_index * advantages.numel()
        local = equal.repeat_interleave(group)[start:start + advantages.numel()].to(advantages.device)
        return advantages.masked_fill(local, 0.0)

    @torch.no_grad()
    def _log_kl_to_start(self, output) -> None:
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
        width, chunk = output["completion_ids"].size(1), self.args.per_device_train_batch_size
        current = output.get("old_per_token_logps")  # TRL's own pass, when it ran one
        if current is None:
            current = self._get_per_token_logps_and_entropies(self.model, ids, mask, width, batch_size=chunk)[0]
        start = self._get_per_token_logps_and_entropies(self._start_model.to(ids.device), ids, mask, width,
                                                        batch_size=chunk)[0]
        diff = start - current
        valid = output["completion_mask"].bool()
        total = self._summed({"kl": ((torch.exp(diff) - diff - 1) * valid).sum().item(), "n": valid.sum().item()})
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rollout/kl_to_start"].append(total["kl"] / max(1.0, total["n"]))

    @contextlib.contextmanager
    def _gathered_policy(self):
        """The current policy with full parameters, gathered exactly as TRL gathers them to
        generate (ZeRO-3: GatheredParameters; FSDP1: summon_full_params), gradient checkpointing
        off.  FSDP2 has no summon: the root group (embeddings, norm, head) is unsharded here, the
        layers unshard themselves in their pre-forward hooks."""
        dist = getattr(self, "_dist", None)
        summon = dist.summon_full_params(self.model_wrapped, recurse=False) if dist else contextlib.nullcontext()
        with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as model, summon:
            fsdp2 = hasattr(model, "unshard") and hasattr(model, "reshard")
            if fsdp2:
                model.unshard()
            try:
                yield model
            finally:
                if fsdp2:
                    model.reshard()

    @torch.no_grad()
    def _gamma(self, output):
        """gamma [B, C] (1 on padding), token entropy [B, C] (NaN where not captured) and the
        rollout's RolloutSummary."""
        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        ids = torch.cat([prompt_ids, completion_ids], 1)
        mask = torch.cat([prompt_mask, completion_mask], 1)
        response = torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1).bool()
        batch, width = completion_ids.shape
        offset = prompt_ids.size(1)
        cfg, strategy = self.credit.rhythm, get_credit(self.credit.strategy)
        gamma = torch.ones(batch, width, device=ids.device)
        entropy = torch.full((batch, width), math.nan, device=ids.device)
        # a private, step-seeded generator: random credit is reproducible across --resume and
        # never shifts the global RNG that TRL samples completions with
        generator = torch.Generator().manual_seed(
            self.args.seed * 1_000_003 + self.state.global_step * 7919 + self.accelerator.process_index)
        chunks = self._pass_chunks(ids, mask)
        summary = RolloutSummary(one_pass=chunks is not None)
        with contextlib.nullcontext() if chunks is not None else self._gathered_policy() as model:
            for s, stats in chunks if chunks is not None else self._separate_pass(model, ids, mask):
                sl = slice(s, s + stats.valid.shape[0])
                heads = self._fixed_heads(stats, response[sl]) if cfg.head_mode == "fixed" else None
                r = rhythm_from_stats(stats, response[sl], cfg, heads=heads)
                # response token j of row b sits at completion column positions[b, j] - P
                rows, js = r.mask.nonzero(as_tuple=True)
                cols = r.positions[rows, js] - offset
                g, sets = credit_sets(r, strategy.name, cfg, generator=generator)
                gamma[s + rows, cols] = g[rows, js].to(gamma.dtype)
                if r.entropy is not None:
                    entropy[s + rows, cols] = r.entropy[rows, js].float()
                summary.add(r, sets, cfg.peak_q)
                want = self.credit.rollout_samples - len(summary.samples)
                if want > 0 and self.accelerator.is_main_process:
                    summary.samples += rollout_rows(self.processing_class, r, sets, gamma[sl], completion_ids[sl],
                                                    output["advantages"][sl], offset, want)
        return gamma, entropy, summary

    def _separate_pass(self, model, ids, mask):
        """The separate attention pass, chunk by chunk: (first row, stats); the fused kernels on CUDA
        where they run, the block loop elsewhere (the same numbers)."""
        chunk = self.credit.capture_batch_size or self.args.per_device_train_batch_size
        strategy = get_credit(self.credit.strategy)
        for s in range(0, ids.size(0), chunk):
            yield s, capture_statistics(model, ids[s:s + chunk], mask[s:s + chunk], config=self.credit.rhythm,
                                        backend="auto", entropy=strategy.needs_entropy)

    def _fixed_heads(self, stats, response) -> HeadSets:
        """Head sets of head_mode='fixed' (``calibration_distance`` averaged over ranks so every
        rank uses the same sets, then ``heads_from_distance``), recomputed every
        head_refresh_steps on the current batch."""
        step = self.state.global_step
        if self._heads is None or step - self._heads_step >= self.credit.head_refresh_steps:
            distance = calibration_distance(stats, response)
            if self.accelerator.num_processes > 1:
                distance = self.accelerator.reduce(distance.to(self.accelerator.device), reduction="mean")
            self._heads, self._heads_step = heads_from_distance(distance, self.credit.rhythm), step
        return self._heads

    # ------------------------------------------------------------------ logging
    def _summed(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` summed over processes (one all-gather of a small vector, keys in sorted order)."""
        names = sorted(values)
        local = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(names, self.accelerator.gather(local[None]).sum(0).tolist()))

    def _record(self, seconds, gamma, summary: RolloutSummary, valid) -> None:
        """Rhythm metrics into TRL's logs, summed over ranks."""
        mode = "train" if self.model.training else "eval"
        total = self._summed({**{f"gamma/{k}": v for k, v in gamma_sums(gamma, valid).items()},
                              "distance/local": summary.distance[0].item(),
                              "distance/global": summary.distance[1].item(), "n_seq": summary.n_seq,
                              **{f"set/{n}": c for n, c in summary.sets.items()}})
        statistics = gamma_statistics_from_sums({k.removeprefix("gamma/"): v for k, v in total.items()
                                                 if k.startswith("gamma/")})
        n = max(1.0, total["gamma/n_tokens"])
        metrics = self._metrics[mode]
        metrics["rhythm/gamma_mean"].append(statistics["mean"] if total["gamma/n_tokens"] else 0.0)
        metrics["rhythm/share_amplified"].append(total["gamma/n_amplified"] / n)
        metrics["rhythm/share_reduced"].append(total["gamma/n_reduced"] / n)
        metrics["rhythm/heads_local_distance"].append(total["distance/local"] / max(1.0, total["n_seq"]))
        metrics["rhythm/heads_global_distance"].append(total["distance/global"] / max(1.0, total["n_seq"]))
        for name in sorted(k for k in total if k.startswith("set/")):
            metrics[f"rhythm/{name.replace('/', '_')}"].append(total[name] / n)
        metrics["rhythm/attention_s"].append(seconds)
        metrics["rhythm/one_pass"].append(float(summary.one_pass))
        self._record_drift(summary, metrics)
        self._attention_window += seconds
        self._extras["head_groups"] = {"mode": self.credit.rhythm.head_mode, **summary.top_heads()}

    def _record_drift(self, summary: RolloutSummary, metrics) -> None:
        """Head-set overlap with the first rollout batch, series means and peak densities."""
        if summary.distance_sum is None:
            return
        series = self._summed({k: summary.series[k] for k in SERIES_KEYS})
        distance = summary.distance_sum.double().to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            distance = self.accelerator.reduce(distance, reduction="sum")
        n_seq = self._summed({"n_seq": summary.n_seq})["n_seq"]
        local, global_ = head_sets(distance.cpu() / max(1.0, n_seq), summary.layers, self.credit.rhythm)
        if self._first_heads is None:
            self._first_heads = (local, global_)
        for key, value in drift_metrics(series, local, global_, *self._first_heads).items():
            metrics[key].append(value)

    def _write_samples(self, summary: RolloutSummary) -> None:
        """The sampled completions of this rollout batch, appended to DIR/rollouts.jsonl."""
        if summary.samples and self.accelerator.is_main_process:
            io.append_jsonl(os.path.join(self.args.output_dir, ROLLOUTS),
                            [{"step": self.state.global_step, "credit": self.credit.strategy, **sample}
                             for sample in summary.samples])

    def pop_log_extras(self) -> dict:
        """Non-scalar extras of the last rollout (head groups) for metrics.jsonl, once."""
        extras, self._extras = self._extras, {}
        return extras

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.model.training and self.captures:
            step_s = sum(self._metrics["train"].get("step_time", []))
            self._totals["attention_s"] += self._attention_window
            self._totals["step_s"] += step_s
            if step_s > 0:
                logs["rhythm/attention_share"] = self._attention_window / step_s
            if self._totals["step_s"] > 0:
                logs["rhythm/attention_share_total"] = self._totals["attention_s"] / self._totals["step_s"]
            self._attention_window = 0.0
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        # written before TRL/transformers write the rest, so trainer_state.json stays the last
        # file of a complete checkpoint
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            state = {"heads_step": self._heads_step, "totals": self._totals,
                     "first_heads": None if self._first_heads is None else [sorted(x) for x in self._first_heads],
                     "heads": None if self._heads is None else
                     {"local": self._heads.local.tolist(), "global": self._heads.global_.tolist()}}
            io.write_json(os.path.join(folder, RHYTHM_STATE), state)
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, RHYTHM_STATE) if checkpoint else None
        if path and os.path.exists(path):
            state = io.read_json(path)
            self._heads_step = state["heads_step"]
            self._totals = state["totals"]
            if state.get("first_heads"):
                self._first_heads = tuple({tuple(h) for h in x} for x in state["first_heads"])
            if state["heads"] is not None:
                self._heads = HeadSets(torch.tensor(state["heads"]["local"]), torch.tensor(state["heads"]["global"]))
