"""The reference backend: Hugging Face ``attn_implementation="eager"`` with
``output_attentions=True``.  It materialises every layer's N x N maps, so it refuses up front
(before anything is generated, see ``check_memory``) when they would not fit."""
from __future__ import annotations

import torch
from torch import Tensor

from attnrhythm.capture.common import (available_bytes, capture_mode, masked_entropy, model_layer_count,
                                       receiver_band_width, text_config)
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.stats import AttentionStats, accumulate_rows, empty_stats
from attnrhythm.errors import NotEnoughMemory, UserError


def maps_bytes(model, batch: int, length: int) -> int:
    """Bytes of the attention maps an eager forward over ``batch`` x ``length`` tokens holds."""
    heads = getattr(text_config(model), "num_attention_heads", None)
    if heads is None:
        raise UserError(f"{type(model).__name__} has no attention heads (no num_attention_heads); it cannot be captured")
    element = torch.finfo(next(model.parameters()).dtype).bits // 8
    return model_layer_count(model) * batch * heads * length * length * element


def check_memory(model, batch: int, length: int, device=None) -> None:
    """Raise NotEnoughMemory when eager maps of ``batch`` x ``length`` would take more than 80%
    of the free memory (the message names the streaming backend)."""
    device = device if device is not None else next(model.parameters()).device
    need, have = maps_bytes(model, batch, length), available_bytes(torch.device(device))
    if need > 0.8 * have:
        raise NotEnoughMemory(f"eager capture would materialise {need / 2**30:.1f} GiB of attention maps "
                              f"but {have / 2**30:.1f} GiB are free; use backend='streaming'")


def has_attention_sinks(model) -> bool:
    """Whether some attention module has sink logits (GPT-OSS: a ``sinks`` parameter), so its
    maps sum to less than 1 over positions and the statistics keep ``row_mass``."""
    return any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules())


def capture(model, kwargs: dict, layers: list[int], config: RhythmConfig, valid: Tensor, entropy: bool,
            block_bytes: int | None = None,
            narrow_layers: list[int] = ()) -> tuple[AttentionStats, AttentionStats | None]:
    """(statistics of ``layers``, of ``narrow_layers`` (band ``receiver_band_width``) or None)
    from full maps (``block_bytes`` is not used here)."""
    input_ids = kwargs["input_ids"]
    batch, length = input_ids.shape
    check_memory(model, batch, length, input_ids.device)
    heads = text_config(model).num_attention_heads
    with capture_mode(model, "eager"):
        out = model.get_decoder()(**kwargs, output_attentions=True)
        if out.attentions is None or any(a is None for a in out.attentions):
            raise UserError(f"{type(model).__name__} returned no attention maps with output_attentions=True; "
                            "it cannot be captured")
        groups = [(layers, config.band_width), (list(narrow_layers), receiver_band_width(config))]
        results = []
        for group, width in groups[:2 if narrow_layers else 1]:
            stats = empty_stats(group, batch, heads, length, width, valid, input_ids.device,
                                row_mass=has_attention_sinks(model))
            for slot, layer in enumerate(group):
                accumulate_rows(stats, slot, out.attentions[layer].float(), 0, 0)
            results.append(stats)
        if entropy:
            results[0].entropy = masked_entropy(model, out.last_hidden_state, valid, config.entropy_temperature)
    return results[0], (results[1] if narrow_layers else None)


def attention_maps(model, input_ids: Tensor, layers: list[int]) -> Tensor:
    """Full eager maps of one sequence for figures: [len(layers), H, N, N] float32."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    with capture_mode(model, "eager"):
        out = model.get_decoder()(input_ids=input_ids, output_attentions=True, use_cache=False)
    return torch.stack([out.attentions[layer][0].float() for layer in layers])
