"""Streaming attention: exact statistics of the sampled layers without N x N maps.

A custom function registered in transformers' ``AttentionInterface`` receives q and k after
normalisation and RoPE.  Layers that are not sampled run ordinary SDPA.  A sampled layer is
computed in blocks of query rows exactly as the eager reference does it (scores in the model's
dtype, scaled, masked, softmax in float32), and each block of probabilities is reduced to
statistics (``stats.accumulate_rows``) before the next one is formed, so memory grows as
block x N per head instead of N x N.  Logit softcapping (``softcap``, Gemma 2) and attention sinks
(``s_aux``, GPT-OSS) are applied as the models' eager attention applies them; a layer that is not
sampled but softcaps or has sinks runs the model's own eager attention (SDPA cannot apply them).
Any other attention argument with a value is refused (``common.ATTENTION_ARGUMENTS``).

With ``backend="fused"`` or ``"auto"`` (``mode`` here) a sampled layer runs the Triton kernels of
``capture/fused.py`` instead when they can compute it (checked per layer: device, dtype, head
dim, the attention arguments, and the model's mask against causal + padding + window); ``auto``
falls back to the block loop with a one-line notice, ``fused`` raises.

Receiver layers that are not sampled (``narrow_layers``) are captured narrow: column sums, row
distances and only the first ``narrow_width`` diagonals of the band (what receiver scores and
per-head FAI read, ``common.receiver_band_width``), into statistics of their own.

The capture in flight lives in a ``ContextVar`` (``active()``), set by :func:`streaming_capture`
and reset on exit: captures nest (the inner one is in force within its block) and each thread
has its own.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnrhythm import log
from attnrhythm.capture.common import (capture_mode, masked_entropy, receiver_band_width, text_config,
                                       unknown_attention_arguments)
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.stats import AttentionStats, accumulate_rows, empty_stats
from attnrhythm.errors import UserError

IMPLEMENTATION_NAME = "attnrhythm_streaming"
DEFAULT_BLOCK_BYTES = 256 * 2**20
MODES = ("block", "fused", "auto")
logger = log.get_logger(__name__)


@functools.cache  # one line per distinct reason and process (thread-safe); tests call cache_clear()
def notice_fallback(reason: str) -> None:
    logger.warning("attnrhythm: fused attention statistics unavailable (%s); using the block path", reason)


@dataclass
class _Capture:
    layers: list[int]
    band_width: int
    valid: Tensor
    block_bytes: int
    stats: AttentionStats | None = None
    seen: set = field(default_factory=set)
    mode: str = "block"
    model_name: str = ""
    masks_checked: dict = field(default_factory=dict)
    stats_only: bool = False
    """Statistics only: a sampled layer returns ``(None, None)`` and the caller takes the output
    from the model's own attention (``capture/in_pass.py``: TRL's log-prob pass stays bitwise)."""
    narrow_layers: list[int] = field(default_factory=list)
    narrow_width: int = 0
    narrow_stats: AttentionStats | None = None
    """Receiver layers that are not sampled, captured with a ``narrow_width`` band (see the module
    docstring)."""
    owner: object = None
    """The in-pass capture this forward belongs to (``capture/in_pass.py``), else None."""

    def target(self, layer: int, query: Tensor, sinks: bool) -> tuple[AttentionStats, int]:
        """The statistics ``layer`` fills and its slot there: the sampled layers' (full band) or
        the narrow layers'."""
        batch, heads, length, _ = query.shape
        if layer in self.layers:
            if self.stats is None:
                self.stats = empty_stats(self.layers, batch, heads, length, self.band_width, self.valid, query.device)
            stats, slot = self.stats, self.layers.index(layer)
        else:
            if self.narrow_stats is None:
                self.narrow_stats = empty_stats(self.narrow_layers, batch, heads, length, self.narrow_width,
                                                self.valid, query.device)
            stats, slot = self.narrow_stats, self.narrow_layers.index(layer)
        if sinks and stats.row_mass is None:
            # rows of models with sinks sum to less than 1 over positions: keep each row's mass (WAAD's
            # capped distance needs it); rows captured so far had no sink, so mass 1 on real tokens
            stats.row_mass = _unit_mass(stats)
        return stats, slot


def _unit_mass(stats: AttentionStats) -> Tensor:
    """Row mass 1 on every real row, 0 on padding: [B, L, H, N]."""
    batch, n_layers, heads, length = stats.row_distance.shape
    return stats.valid.to(stats.row_distance.device, torch.float32)[:, None, None].expand(
        batch, n_layers, heads, length).clone()


_active: ContextVar[_Capture | None] = ContextVar("attnrhythm_active_capture", default=None)


def active() -> _Capture | None:
    """The streaming capture in force in this context (thread, task), or None."""
    return _active.get()


def streaming_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                        dropout: float = 0.0, sliding_window: int | None = None, **kwargs):
    """The attention function of ``IMPLEMENTATION_NAME`` (module docstring); also called by
    ``capture/in_pass.py`` beside SDPA for the statistics only."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "layer_idx", None)
    unknown = unknown_attention_arguments(kwargs)
    if unknown:
        raise UserError(f"{_owner(module)} passes {', '.join(repr(k) for k in unknown)} to its attention function, which "
                        "the streaming capture does not implement; use backend='eager'")
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    cap = _active.get()
    if cap is None or (layer not in cap.layers and layer not in cap.narrow_layers):
        if softcap is not None or sinks is not None:
            return _model_eager_attention(module, query, key, value, attention_mask, scaling, dropout,
                                          sliding_window, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, sliding_window=sliding_window, **kwargs)
    batch, q_heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("streaming capture needs the whole sequence in one forward pass (no KV cache)")
    stats, slot = cap.target(layer, query, sinks is not None)
    cap.seen.add(layer)
    scaling = head_dim ** -0.5 if scaling is None else scaling
    group = q_heads // kv_heads
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise UserError(f"layer {layer} of {_owner(module)} is not causal; "
                        "the capture computes causal attention only")
    if cap.mode != "block":
        reason = _fused_obstacle(cap, module, query, attention_mask, scaling, dropout, sliding_window, kwargs)
        if reason is None:
            from attnrhythm.capture.fused import fused_layer
            return fused_layer(query, key, value, attention_mask, stats, slot, scaling, sliding_window,
                               softcap=softcap, s_aux=sinks, write_output=not cap.stats_only), None
        if cap.mode == "fused":
            raise UserError(f"backend='fused' cannot compute layer {layer}: {reason}")
        if not reason.startswith("not CUDA"):
            notice_fallback(reason)

    # [B, Hkv, g, N, d]: query head h reads KV head h // g without repeating K and V
    q = query.view(batch, kv_heads, group, length, head_dim)
    k = key[:, :, None]
    v = value[:, :, None]
    out = None if cap.stats_only else torch.empty(batch, kv_heads, group, length, head_dim, dtype=query.dtype,
                                                   device=query.device)
    rows_per_block = max(16, cap.block_bytes // max(1, 12 * batch * q_heads * length))
    min_value = torch.finfo(query.dtype).min
    for t0 in range(0, length, rows_per_block):
        t1 = min(length, t0 + rows_per_block)
        k0 = 0 if not sliding_window else max(0, t0 - sliding_window + 1)
        scores = torch.matmul(q[:, :, :, t0:t1], k[:, :, :, k0:t1].transpose(-1, -2)).mul_(scaling)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is None and not sliding_window:
            # causal: only the block's own diagonal square has masked entries
            upper = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=query.device).triu_(1)
            scores[..., t0 - k0:].masked_fill_(upper, min_value)
        elif attention_mask is None:
            rows = torch.arange(t0, t1, device=query.device)[:, None]
            cols = torch.arange(k0, t1, device=query.device)[None, :]
            scores.masked_fill_((cols > rows) | (rows - cols >= sliding_window), min_value)
        elif attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask[:, :, t0:t1, k0:t1][:, :, None], min_value)
        else:
            scores.add_(attention_mask[:, :, t0:t1, k0:t1][:, :, None])
        if sinks is not None:  # one extra logit per head in the denominator, not a position
            sink = sinks.reshape(1, kv_heads, group, 1, 1).to(scores.dtype).expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat([scores, sink], -1), dim=-1, dtype=torch.float32)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if out is not None:
            out[:, :, :, t0:t1] = torch.matmul(probs.to(value.dtype), v[:, :, :, k0:t1])
        accumulate_rows(stats, slot, probs.view(batch, q_heads, t1 - t0, t1 - k0), t0, k0)
        del scores, probs
    if out is None:
        return None, None
    out = out.view(batch, q_heads, length, head_dim).transpose(1, 2).contiguous()
    return out, None


def _owner(module) -> str:
    """The model and attention class, as errors name them: ``Gemma2ForCausalLM (Gemma2Attention)``."""
    cap = _active.get()
    name = cap.model_name if cap is not None else ""
    return f"{name} ({type(module).__name__})" if name else type(module).__name__


def _model_eager_attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window, **kwargs):
    """A layer that is not sampled but softcaps its logits or has attention sinks, which SDPA
    cannot apply: the model's own ``eager_attention_forward``, given the additive mask it expects
    (causal + padding + window; the boolean SDPA mask, or None, converted)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise UserError(f"{_owner(module)} uses logit softcapping or attention sinks but its module has no "
                        "eager_attention_forward; use backend='eager'")
    length = query.shape[2]
    if attention_mask is None or attention_mask.dtype == torch.bool:
        index = torch.arange(length, device=query.device)
        allowed = index[None, :] <= index[:, None]
        if sliding_window:
            allowed = allowed & (index[:, None] - index[None, :] < sliding_window)
        allowed = allowed[None, None] if attention_mask is None else allowed & attention_mask
        attention_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        attention_mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)
    return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                 sliding_window=sliding_window, **kwargs)


def _fused_obstacle(cap: _Capture, module, query, attention_mask, scaling, dropout, sliding_window,
                    kwargs) -> str | None:
    """None when the fused kernels compute this layer exactly as the block loop would, else the
    reason (it starts with "not CUDA" when the device is the only obstacle)."""
    from attnrhythm.capture import fused

    ok, reason = fused.fused_available(query.device, query.dtype, query.shape[-1], scaling=scaling, dropout=dropout,
                                       sliding_window=sliding_window, **kwargs)
    if not ok:
        return reason
    if cap.mode == "auto" and query.device.type != "cuda":
        return "not CUDA"
    key = (None if attention_mask is None else (attention_mask.data_ptr(), tuple(attention_mask.shape)), sliding_window)
    if key not in cap.masks_checked:  # once per mask tensor and window in a forward pass
        cap.masks_checked[key] = fused.mask_mismatch(attention_mask, cap.valid, sliding_window)
    return cap.masks_checked[key]


def resolve_mode(model, mode: str, device: torch.device) -> str:
    """The mode a capture runs in: "block" for the block loop; "fused" or "auto" when the fused
    kernels can run on ``device`` for the model's dtype and head dim (per-layer checks follow in
    the attention function).  ``fused`` that cannot run raises a UserError with the reason;
    ``auto`` falls back to "block", with a one-line notice unless the device is simply not CUDA."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "block" or (mode == "auto" and device.type != "cuda"):
        return "block"
    from attnrhythm.capture.fused import fused_available

    config = text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ok, reason = fused_available(device, next(model.parameters()).dtype, head_dim)
    if ok:
        return mode
    if mode == "fused":
        raise UserError(f"backend='fused' is not available: {reason}")
    notice_fallback(reason)
    return "block"


def register() -> None:
    """Make ``attn_implementation=IMPLEMENTATION_NAME`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION_NAME, streaming_attention)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, sdpa_mask)


@contextlib.contextmanager
def streaming_capture(layers: list[int], band_width: int, valid: Tensor, block_bytes: int = DEFAULT_BLOCK_BYTES,
                      mode: str = "block", model_name: str = "", stats_only: bool = False,
                      narrow_layers: list[int] = (), narrow_width: int = 0, owner=None):
    """Within the block, a forward pass of a model set to ``IMPLEMENTATION_NAME`` fills
    ``capture.stats`` for ``layers`` (and ``capture.narrow_stats`` for ``narrow_layers``, a band
    ``narrow_width`` wide); ``mode`` is one of ``MODES`` ("block" or, already resolved by
    :func:`resolve_mode`, "fused"/"auto"); ``model_name`` names the model in errors; ``owner``
    is the in-pass capture a forward belongs to.  Nested blocks shadow the outer capture until
    they end."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    cap = _Capture(list(layers), band_width, valid, block_bytes, mode=mode, model_name=model_name,
                   stats_only=stats_only, narrow_layers=list(narrow_layers), narrow_width=narrow_width, owner=owner)
    token = _active.set(cap)
    try:
        yield cap
    finally:
        _active.reset(token)


def capture(model, kwargs: dict, layers: list[int], config: RhythmConfig, valid: Tensor, entropy: bool,
            block_bytes: int | None = None, narrow_layers: list[int] = (),
            mode: str = "block") -> tuple[AttentionStats, AttentionStats | None]:
    """(statistics of ``layers``, of ``narrow_layers`` (band ``receiver_band_width``) or None)
    from one forward pass with
    the streaming attention function.  ``block_bytes`` bounds the working set per block of rows
    (default 256 MiB on CPU, 2 GiB on a GPU); ``mode`` "fused" or "auto" computes the layers with
    the Triton kernels (backends ``fused`` and ``auto``, see :func:`resolve_mode`)."""
    device = kwargs["input_ids"].device
    mode = resolve_mode(model, mode, device)
    if block_bytes is None:
        block_bytes = 8 * DEFAULT_BLOCK_BYTES if device.type == "cuda" else DEFAULT_BLOCK_BYTES
    register()
    with capture_mode(model, IMPLEMENTATION_NAME), \
            streaming_capture(layers, config.band_width, valid, block_bytes, mode, type(model).__name__,
                              narrow_layers=narrow_layers, narrow_width=receiver_band_width(config)) as cap:
        hidden = model.get_decoder()(**kwargs).last_hidden_state
        missing = (set(layers) | set(narrow_layers)) - cap.seen
        if cap.stats is None or missing:
            raise UserError(f"layers {sorted(missing or layers)} never called the attention interface; "
                            f"this model ({type(model).__name__}) cannot be captured by the streaming backend")
        stats = cap.stats
        if entropy:
            stats.entropy = masked_entropy(model, hidden, valid, config.entropy_temperature)
    return stats, cap.narrow_stats
