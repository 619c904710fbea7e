"""One forward pass of a causal LM -> attention statistics and token entropy.

``capture_statistics`` is the single entry point used by analysis, perturbation and training.
Every backend produces the same :class:`~attnrhythm.core.stats.AttentionStats`; ``BACKENDS``
maps a name to its module's ``capture(model, kwargs, layers, config, valid, entropy,
block_bytes)``, the one place a new backend is registered:

* ``"streaming"`` (default): a custom attention function computes the sampled layers in blocks
  of rows and never holds an N x N map (``capture/streaming.py``).
* ``"fused"``: the streaming function with the sampled layers computed by the Triton kernels of
  ``capture/fused.py`` (CUDA; a flash forward + a column pass, float32 statistics on chip);
  raises a UserError with the reason when they cannot run.
* ``"auto"``: ``"fused"`` where it can run on CUDA, else the block loop of ``"streaming"`` (a
  one-line logging notice when the reason is anything but the device).
* ``"eager"``: the reference, Hugging Face ``output_attentions=True`` (``capture/eager.py``);
  materialises every layer's maps, so it refuses up front when they would not fit.
"""
from __future__ import annotations

from functools import partial

from torch import Tensor

from attnrhythm.capture import eager, streaming
from attnrhythm.capture.common import (available_bytes, check_inputs, model_layer_count, position_ids_from_mask,
                                       resolve_layers, text_config, token_entropy)
from attnrhythm.capture.eager import attention_maps
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.stats import AttentionStats
from attnrhythm.errors import unknown_name

_BACKENDS = {"streaming": streaming.capture, "eager": eager.capture,
             "fused": partial(streaming.capture, mode="fused"), "auto": partial(streaming.capture, mode="auto")}
BACKENDS = tuple(_BACKENDS)

__all__ = ["BACKENDS", "attention_maps", "available_bytes", "capture_statistics", "check_backend_memory",
           "model_layer_count", "position_ids_from_mask", "resolve_layers", "text_config", "token_entropy"]


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
    config = config or RhythmConfig()
    check_backend(backend)
    attention_mask = check_inputs(model, input_ids, attention_mask)
    chosen = resolve_layers(model, config, layers)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return _BACKENDS[backend](model, kwargs, chosen, config, attention_mask.bool(), entropy, block_bytes)
