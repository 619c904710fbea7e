"""One forward pass of a causal LM -> attention statistics and token entropy.

``capture_statistics`` is the single entry point used by analysis and training.  Two backends
produce the same :class:`~attnrhythm.stats.AttentionStats`:

* ``"streaming"`` (default): a custom attention function computes the sampled layers in blocks
  of rows and never holds an N x N map (``attnrhythm.streaming``).
* ``"eager"``: the reference, Hugging Face ``attn_implementation="eager"`` with
  ``output_attentions=True``; materialises every layer's maps, so it refuses up front when they
  would not fit in memory.

Token entropy is computed from the final hidden states in chunks, so the full
[N, vocabulary] logits never exist at once.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from . import streaming
from .config import RhythmConfig, select_layers
from .stats import AttentionStats, accumulate_rows, empty_stats

BACKENDS = ("streaming", "eager")


def model_layer_count(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def resolve_layers(model, config: RhythmConfig, layers=None) -> list[int]:
    return select_layers(config.layers if layers is None else layers, model_layer_count(model), config.n_layers_sampled)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Each sequence's own positions, so left padding does not shift RoPE."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def _capture_mode(model, implementation: str | None):
    """Eval mode (no dropout, no gradient checkpointing), no grad, and a temporary attention
    implementation; everything is restored afterwards, also on error."""
    was_training = model.training
    original = model.config._attn_implementation
    if implementation is not None and implementation != original:
        if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
            raise ValueError(
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


def _check_inputs(model, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(text_config, "max_position_embeddings", None)
    longest = int(attention_mask.sum(-1).max())
    if limit is not None and longest > limit:
        raise ValueError(f"a sequence has {longest} tokens but the model's context is {limit}; "
                         "truncate the prompt or the response (e.g. lower max_new_tokens)")
    return attention_mask


def _available_bytes(device: torch.device) -> int:
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
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(text_config, "final_logit_softcapping", None)
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


def capture_statistics(model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                       config: RhythmConfig | None = None, layers=None, backend: str = "streaming",
                       entropy: bool = True, block_bytes: int | None = None) -> AttentionStats:
    """Attention statistics of ``layers`` (default: ``config.layers``) for a padded batch.

    input_ids, attention_mask: [B, N] (left or right padding; 1 = real token).  Positions are
    each sequence's own (``position_ids_from_mask``), so padding never changes the result.
    Returns statistics for every position; metrics pick the response rows.  ``block_bytes``
    bounds the streaming backend's working set per block of rows (default 256 MiB on CPU,
    2 GiB on a GPU).
    """
    config = config or RhythmConfig()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    attention_mask = _check_inputs(model, input_ids, attention_mask)
    chosen = resolve_layers(model, config, layers)
    valid = attention_mask.bool()
    decoder = model.get_decoder()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)

    if backend == "streaming":
        if block_bytes is None:
            block_bytes = 8 * streaming.DEFAULT_BLOCK_BYTES if input_ids.device.type == "cuda" else streaming.DEFAULT_BLOCK_BYTES
        streaming.register()
        with _capture_mode(model, streaming.IMPLEMENTATION_NAME), \
                streaming.streaming_capture(chosen, config.band_width, valid, block_bytes) as cap:
            hidden = decoder(**kwargs).last_hidden_state
            stats = cap.stats
            missing = set(chosen) - cap.seen
            if stats is None or missing:
                raise ValueError(f"layers {sorted(missing or chosen)} never called the attention interface; "
                                 f"this model ({type(model).__name__}) cannot be captured by the streaming backend")
            if entropy:
                stats.entropy = _mask_entropy(token_entropy(model, hidden, config.entropy_temperature), valid)
        return stats

    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    batch, length = input_ids.shape
    heads = getattr(text_config, "num_attention_heads", None)
    if heads is None:
        raise ValueError(f"{type(model).__name__} has no attention heads (no num_attention_heads); it cannot be captured")
    element = torch.finfo(next(model.parameters()).dtype).bits // 8
    need = model_layer_count(model) * batch * heads * length * length * element
    have = _available_bytes(input_ids.device)
    if need > 0.8 * have:
        raise MemoryError(f"eager capture would materialise {need / 2**30:.1f} GiB of attention maps "
                          f"but {have / 2**30:.1f} GiB are free; use backend='streaming'")
    with _capture_mode(model, "eager"):
        out = decoder(**kwargs, output_attentions=True)
        if out.attentions is None or any(a is None for a in out.attentions):
            raise ValueError(f"{type(model).__name__} returned no attention maps with output_attentions=True")
        stats = empty_stats(chosen, batch, heads, length, config.band_width, valid, input_ids.device)
        for slot, layer in enumerate(chosen):
            accumulate_rows(stats, slot, out.attentions[layer].float(), 0, 0)
        if entropy:
            stats.entropy = _mask_entropy(token_entropy(model, out.last_hidden_state, config.entropy_temperature), valid)
    return stats


def _mask_entropy(entropy: Tensor, valid: Tensor) -> Tensor:
    """NaN where the token or the one before it is padding (no real predicting position)."""
    ok = valid.clone()
    ok[:, 1:] &= valid[:, :-1]
    ok[:, 0] = False
    return torch.where(ok, entropy, torch.full_like(entropy, float("nan")))


def attention_maps(model, input_ids: Tensor, layers: list[int]) -> Tensor:
    """Full eager maps of one sequence for figures: [len(layers), H, N, N] float32."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    with _capture_mode(model, "eager"):
        out = model.get_decoder()(input_ids=input_ids, output_attentions=True, use_cache=False)
    return torch.stack([out.attentions[layer][0].float() for layer in layers])
