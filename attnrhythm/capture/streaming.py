"""Streaming attention: exact statistics of the sampled layers without N x N maps.

A custom function registered in transformers' ``AttentionInterface`` receives q and k after
normalisation and RoPE.  Layers that are not sampled run ordinary SDPA.  A sampled layer is
computed in blocks of query rows exactly as the eager reference does it (scores in the model's
dtype, scaled, masked, softmax in float32), and each block of probabilities is reduced to
statistics (``stats.accumulate_rows``) before the next one is formed, so memory grows as
block x N per head instead of N x N.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnrhythm.capture.common import capture_mode, masked_entropy
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.stats import AttentionStats, accumulate_rows, empty_stats
from attnrhythm.errors import UserError

IMPLEMENTATION_NAME = "attnrhythm_streaming"
DEFAULT_BLOCK_BYTES = 256 * 2**20


@dataclass
class _Capture:
    layers: list[int]
    band_width: int
    valid: Tensor
    block_bytes: int
    stats: AttentionStats | None = None
    seen: set = field(default_factory=set)
    stats_only: bool = False
    """Statistics only: a sampled layer returns ``(None, None)`` and the caller takes the output
    from the model's own attention (``capture/in_pass.py``: TRL's log-prob pass stays bitwise)."""


_active: _Capture | None = None


def _rhythm_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, sliding_window: int | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "layer_idx", None)
    if _active is None or layer not in _active.layers:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, sliding_window=sliding_window, **kwargs)
    cap = _active
    batch, q_heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if query.shape[2] != key.shape[2]:
        raise RuntimeError("streaming capture needs the whole sequence in one forward pass (no KV cache)")
    if cap.stats is None:
        cap.stats = empty_stats(cap.layers, batch, q_heads, length, cap.band_width, cap.valid, query.device)
    cap.seen.add(layer)
    slot = cap.layers.index(layer)
    scaling = head_dim ** -0.5 if scaling is None else scaling
    group = q_heads // kv_heads
    if sliding_window is None:
        sliding_window = getattr(module, "sliding_window", None)

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
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if out is not None:
            out[:, :, :, t0:t1] = torch.matmul(probs.to(value.dtype), v[:, :, :, k0:t1])
        accumulate_rows(cap.stats, slot, probs.view(batch, q_heads, t1 - t0, t1 - k0), t0, k0)
        del scores, probs
    if out is None:
        return None, None
    out = out.view(batch, q_heads, length, head_dim).transpose(1, 2).contiguous()
    return out, None


def register() -> None:
    """Make ``attn_implementation=IMPLEMENTATION_NAME`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION_NAME, _rhythm_attention)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, sdpa_mask)


@contextlib.contextmanager
def streaming_capture(layers: list[int], band_width: int, valid: Tensor, block_bytes: int = DEFAULT_BLOCK_BYTES,
                      stats_only: bool = False):
    """Within the block, a forward pass of a model set to ``IMPLEMENTATION_NAME`` fills
    ``capture.stats`` for ``layers``."""
    global _active
    if _active is not None:
        raise RuntimeError("a streaming capture is already active (captures do not nest)")
    cap = _Capture(list(layers), band_width, valid, block_bytes, stats_only=stats_only)
    _active = cap
    try:
        yield cap
    finally:
        _active = None


def capture(model, kwargs: dict, layers: list[int], config: RhythmConfig, valid: Tensor, entropy: bool,
            block_bytes: int | None = None) -> AttentionStats:
    """Statistics of ``layers`` from one forward pass with the streaming attention function.
    ``block_bytes`` bounds the working set per block of rows (default 256 MiB on CPU, 2 GiB on a GPU)."""
    if block_bytes is None:
        on_gpu = kwargs["input_ids"].device.type == "cuda"
        block_bytes = 8 * DEFAULT_BLOCK_BYTES if on_gpu else DEFAULT_BLOCK_BYTES
    register()
    with capture_mode(model, IMPLEMENTATION_NAME), \
            streaming_capture(layers, config.band_width, valid, block_bytes) as cap:
        hidden = model.get_decoder()(**kwargs).last_hidden_state
        missing = set(layers) - cap.seen
        if cap.stats is None or missing:
            raise UserError(f"layers {sorted(missing or layers)} never called the attention interface; "
                            f"this model ({type(model).__name__}) cannot be captured by the streaming backend")
        stats = cap.stats
        if entropy:
            stats.entropy = masked_entropy(model, hidden, valid, config.entropy_temperature)
    return stats
