"""What the capture backends share: model geometry, input checks, the band a receiver layer keeps,
the capture mode, the attention arguments a capture implements, and token entropy from the final
hidden states (in chunks: the [N, vocabulary] logits never exist at once)."""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from attnrhythm.core.config import RhythmConfig, select_layers
from attnrhythm.core.stats import AttentionStats, empty_stats
from attnrhythm.errors import UserError


def text_config(model):
    """The text part of a (possibly multimodal) model's config."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def model_layer_count(model) -> int:
    return int(text_config(model).num_hidden_layers)


def resolve_layers(model, config: RhythmConfig, layers=None) -> list[int]:
    return select_layers(config.layers if layers is None else layers, model_layer_count(model), config.n_layers_sampled)


def receiver_band_width(config: RhythmConfig) -> int:
    """Diagonals a receiver layer that is not sampled must keep: the vertical scores read the
    first ``receiver_gap`` (``core/metrics.receiver_vertical_scores``) and the per-head FAI the
    first ``lo`` with a horizon to the end, or up to ``hi`` (``future_column_sums``).  4 with the
    analysis defaults (gap 4, horizon (1, None)) against ``config.band_width`` = 10."""
    lo, hi = config.fai_horizon
    return max(config.receiver_gap, lo if hi is None else hi + 1)


def assemble_receivers(sampled: AttentionStats, narrow: AttentionStats | None, receivers: list[int], width: int,
                       device=None) -> AttentionStats:
    """Statistics of ``receivers`` (in that order, band ``width``) from a capture's two parts:
    each layer from ``sampled`` (its band cut to ``width``) or from ``narrow`` (the receiver
    layers that were not sampled).  Built on ``device`` (default: the capture's), so a caller
    that moves the result off the GPU holds no second copy there."""
    device = sampled.row_distance.device if device is None else torch.device(device)
    batch, _, heads, length = sampled.row_distance.shape
    sinks = sampled.row_mass is not None or (narrow is not None and narrow.row_mass is not None)
    out = empty_stats(receivers, batch, heads, length, width, sampled.valid, device, row_mass=sinks)
    for slot, layer in enumerate(receivers):
        source = sampled if layer in sampled.layers else narrow
        at = source.layers.index(layer)
        out.row_distance[:, slot] = source.row_distance[:, at]
        out.col_sum[:, slot] = source.col_sum[:, at]
        out.band[:, slot] = source.band[:, at, ..., :width]
        if sinks:  # a layer captured before any sink was seen has mass 1 on every real row
            mass = source.row_mass[:, at] if source.row_mass is not None else out.valid[:, None].float()
            out.row_mass[:, slot] = mass
    return out


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Each sequence's own positions, so left padding does not shift RoPE."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def capture_mode(model, implementation: str | None):
    """Eval mode (no dropout, no gradient checkpointing), no grad, and a temporary attention
    implementation; everything is restored afterwards, also on error."""
    was_training = model.training
    original = model.config._attn_implementation
    if implementation is not None and implementation != original:
        if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
            raise UserError(
                f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
                "so its attention cannot be captured; use a model implemented in transformers >= 5")
        model.set_attn_implementation(implementation)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if implementation is not None and implementation != original:
            model.set_attn_implementation(original)
        model.train(was_training)


def check_inputs(model, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The attention mask (all ones when None) after checking shapes and the model's context."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    limit = getattr(text_config(model), "max_position_embeddings", None)
    longest = int(attention_mask.sum(-1).max())
    if limit is not None and longest > limit:
        raise UserError(f"a sequence has {longest} tokens but the model's context is {limit}; "
                        "truncate the prompt or the response (e.g. lower max_new_tokens)")
    return attention_mask


# Arguments transformers passes to an attention function that the streaming and fused paths
# implement (scaling, sliding_window, softcap, s_aux; dropout and is_causal are checked) or that do
# not change a capture's result (positions are already in q and k; a capture has no cache and
# returns no maps).  Any other argument with a value is refused: it could change the attention.
ATTENTION_ARGUMENTS = frozenset({"scaling", "sliding_window", "softcap", "s_aux", "dropout", "is_causal",
                                 "position_ids", "cache_position", "use_cache", "output_attentions"})


def unknown_attention_arguments(kwargs: dict) -> list[str]:
    """The names in ``kwargs`` outside ``ATTENTION_ARGUMENTS`` whose value is not empty (None,
    False or an empty container count as not passed)."""
    def empty(value) -> bool:
        return value is None or value is False or (isinstance(value, (tuple, list, dict, set, str)) and not value)

    return sorted(name for name, value in kwargs.items() if name not in ATTENTION_ARGUMENTS and not empty(value))


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (CUDA: free on the GPU; CPU: available physical pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62


def token_entropy(model, hidden: Tensor, temperature: float = 1.0, chunk_bytes: int = 256 * 2**20) -> Tensor:
    """Entropy of the next-token distributions, in chunks of positions.

    hidden: [B, N, D] final hidden states.  Returns [B, N] where entry t is the entropy of the
    distribution that produced token t (computed from position t-1); entry 0 is NaN.
    """
    head = model.get_output_embeddings()
    softcap = getattr(text_config(model), "final_logit_softcapping", None)
    batch, length, _ = hidden.shape
    vocab = head.weight.shape[0]
    chunk = max(1, chunk_bytes // max(1, 12 * batch * vocab))
    out = torch.full((batch, length), float("nan"), dtype=torch.float32, device=hidden.device)
    for c0 in range(0, length - 1, chunk):
        c1 = min(length - 1, c0 + chunk)
        logits = head(hidden[:, c0:c1]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        # H = log Z - sum_v e_v x_v / Z with x = logits - max, e = exp(x): three passes over
        # the vocabulary instead of log_softmax + exp + product + sum
        x = logits.div_(temperature)
        x = x.sub_(x.amax(-1, keepdim=True))
        e = x.exp()
        z = e.sum(-1)
        out[:, c0 + 1:c1 + 1] = z.log() - torch.linalg.vecdot(e, x) / z
    return out


def masked_entropy(model, hidden: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """``token_entropy``, NaN where the token or the one before it is padding (no real predicting
    position)."""
    entropy = token_entropy(model, hidden, temperature)
    ok = valid.clone()
    ok[:, 1:] &= valid[:, :-1]
    ok[:, 0] = False
    return torch.where(ok, entropy, torch.full_like(entropy, float("nan")))
