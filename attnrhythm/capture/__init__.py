"""One forward pass of a causal LM -> attention statistics and token entropy.

``capture_statistics`` is the single entry point used by analysis, perturbation and training.
Every backend produces the same :class:`~attnrhythm.core.stats.AttentionStats`; ``BACKENDS`` is
the tuple of names, and ``_BACKENDS`` maps each to its module's ``capture(model, kwargs, layers,
config, valid, entropy, block_bytes, narrow_layers)`` (returning the statistics of ``layers`` and
the narrow ones of ``narrow_layers``, or None), the one place a new backend is registered:

* ``"streaming"`` (default): a custom attention function computes the sampled layers in blocks
  of rows and never holds an N x N map (``capture/streaming.py``).
* ``"fused"``: the streaming function with the sampled layers computed by the Triton kernels of
  ``capture/fused.py`` (CUDA; a flash forward + a column pass, float32 statistics on chip);
  raises a UserError with the reason when they cannot run.
* ``"auto"``: ``"fused"`` where it can run on CUDA, else the block loop of ``"streaming"`` (a
  one-line logging notice when the reason is anything but the device).
* ``"eager"``: the reference, Hugging Face ``output_attentions=True`` (``capture/eager.py``);
  materialises every layer's maps, so it refuses up front when they would not fit.

``capture_with_receivers`` takes the receiver layers in the same pass, each only as wide as the
metrics read (``common.receiver_band_width``): column sums and a few diagonals instead of the
sampled layers' full band.
"""
from __future__ import annotations

from functools import partial

from torch import Tensor

from attnrhythm.capture import eager, streaming
from attnrhythm.capture.common import (assemble_receivers, available_bytes, check_inputs, model_layer_count,
                                       position_ids_from_mask, receiver_band_width, resolve_layers, text_config,
                                       token_entropy)
from attnrhythm.capture.eager import attention_maps
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.stats import AttentionStats
from attnrhythm.errors import unknown_name

_BACKENDS = {"streaming": streaming.capture, "eager": eager.capture,
             "fused": partial(streaming.capture, mode="fused"), "auto": partial(streaming.capture, mode="auto")}
BACKENDS = tuple(_BACKENDS)

__all__ = ["BACKENDS", "attention_maps", "available_bytes", "capture_statistics", "capture_with_receivers",
           "check_backend_memory", "model_layer_count", "position_ids_from_mask", "receiver_band_width",
           "resolve_layers", "text_config", "token_entropy"]


def check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise unknown_name("capture backend", backend, BACKENDS)


def check_backend_memory(model, backend: str, batch: int, length: int) -> None:
    """Refuse before any work when ``backend`` cannot hold ``batch`` sequences of ``length``
    tokens (only the eager backend materialises N x N maps)."""
    check_backend(backend)
    if backend == "eager":
        eager.check_memory(model, batch, length)


def capture_statistics(model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                       config: RhythmConfig | None = None, layers=None, backend: str = "streaming",
                       entropy: bool = True, block_bytes: int | None = None) -> AttentionStats:
    """Attention statistics of ``layers`` (default: ``config.layers``) for a padded batch.

    input_ids, attention_mask: [B, N] (left or right padding; 1 = real token).  Positions are
    each sequence's own (``position_ids_from_mask``), so padding never changes the result.
    Returns statistics for every position; metrics pick the response rows.  ``backend`` is one
    of ``BACKENDS`` (module docstring); ``block_bytes`` bounds the block loop's working set per
    block of rows (default 256 MiB on CPU, 2 GiB on a GPU).
    """
    return _capture(model, input_ids, attention_mask, config, layers, (), backend, entropy, block_bytes)[0]


def capture_with_receivers(model, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                           receiver_layers: list[int], config: RhythmConfig | None = None, layers=None,
                           backend: str = "streaming", entropy: bool = True, block_bytes: int | None = None,
                           device=None) -> tuple[AttentionStats, AttentionStats]:
    """``capture_statistics`` plus the statistics of ``receiver_layers`` from the same forward
    pass: (sampled, receivers), both moved to ``device`` (default: where the capture ran).

    A receiver layer that is not sampled keeps only what receiver scores and per-head FAI read:
    column sums, row distances and a band ``receiver_band_width(config)`` wide; the sampled
    layers among the receivers are cut from the sampled statistics.  On Qwen3-4B at 32K tokens
    with the analysis defaults the capture holds 0.96 instead of 1.69 GiB of statistics for 36
    layers (``benchmarks/capture_memory.py``).
    """
    config = config or RhythmConfig()
    receivers = sorted({int(x) for x in receiver_layers})
    stats, narrow = _capture(model, input_ids, attention_mask, config, layers, receivers, backend, entropy,
                             block_bytes)
    out = stats if device is None else stats.to(device)
    return out, assemble_receivers(stats, narrow, receivers, receiver_band_width(config), device)


def _capture(model, input_ids, attention_mask, config, layers, receivers, backend, entropy, block_bytes):
    """(statistics of the sampled layers, narrow statistics of the receivers that are not among
    them or None)."""
    config = config or RhythmConfig()
    check_backend(backend)
    attention_mask = check_inputs(model, input_ids, attention_mask)
    chosen = resolve_layers(model, config, layers)
    narrow = [layer for layer in resolve_layers(model, config, receivers) if layer not in chosen] if receivers else []
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return _BACKENDS[backend](model, kwargs, chosen, config, attention_mask.bool(), entropy, block_bytes, narrow)
