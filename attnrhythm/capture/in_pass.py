"""Attention statistics taken inside someone else's forward passes (TRL's old-log-prob pass).

``statistics_in_pass(model, config, entropy)`` is a context manager.  Within it, every forward of
``model``'s decoder (one per chunk of TRL's ``_get_per_token_logps_and_entropies`` loop) also
fills an :class:`~attnrhythm.core.stats.AttentionStats` for the sampled layers, appended to
``PassCapture.chunks`` with the chunk's first row; with ``entropy`` the token entropy comes from
the decoder's final hidden states of that same pass (``masked_entropy``, chunked, at
``config.entropy_temperature``: what the separate capture computes).

What the caller's pass computes is left bitwise unchanged: the model switches to an attention
implementation whose masks are SDPA's own (``sdpa_mask``) and whose every layer returns
transformers' ``sdpa_attention_forward`` output; the sampled layers additionally compute their
statistics only, beside that output (the streaming capture's ``stats_only`` mode, never N x N):
on CUDA with the fused kernels in their statistics-only mode (``mode="auto"``, the default:
where they can run, per layer, else the block loop, as ``backend="auto"`` chooses), elsewhere
with the block loop.  Hooks, the implementation and the capture are restored on exit, also on
error.  The forward in flight is found through the streaming capture's context variable
(``streaming.active()``, whose ``owner`` is the :class:`PassCapture`), so passes in different
threads do not meet.  A statistics failure (an attention argument the block loop does not
implement, ...) never breaks the caller's pass: it is recorded in ``PassCapture.failed`` and the
caller falls back to a separate capture.

Positions are the caller's (TRL passes none, so left-padded rows get HF's default positions,
shifted uniformly by the padding); RoPE makes q.k depend on relative positions only, so the
statistics equal the separate capture's up to rounding.  tests/test_trainer.py checks that gamma,
the log-probs and the loss are identical to the two-pass path (block loop), and
tests/test_fused_gpu_path.py the gamma and the logits with the fused kernels (Triton interpreter).

Only models configured with ``attn_implementation="sdpa"`` are supported (``supported``); others
keep the separate capture.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from attnrhythm.capture import streaming
from attnrhythm.capture.common import masked_entropy, resolve_layers
from attnrhythm.core.config import RhythmConfig
from attnrhythm.core.stats import AttentionStats
from attnrhythm.errors import UserError

IMPLEMENTATION_NAME = "attnrhythm_in_pass"
OWN_IMPLEMENTATION = "sdpa"


@dataclass
class PassCapture:
    layers: list[int]
    chunks: list[tuple[int, AttentionStats]] = field(default_factory=list)
    """(first row, statistics of the chunk's rows), in the order of the caller's forwards."""
    rows: int = 0
    seconds: float = 0.0
    """Time of the statistics work inside the pass: the sampled layers' statistics (their own SDPA
    call excluded) and the entropy from the final hidden states."""
    failed: str | None = None
    _events: list = field(default_factory=list)

    def finish(self) -> None:
        """Adds the CUDA-event timings (read once, after the pass, so the pass is never synchronised)."""
        if self._events:
            torch.cuda.synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events.clear()


def supported(model) -> str | None:
    """None when ``statistics_in_pass`` can run on ``model``, else the reason."""
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != OWN_IMPLEMENTATION:
        return f"attention implementation {implementation!r} (the in-pass statistics need 'sdpa')"
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        return f"{type(model).__name__} cannot switch its attention implementation"
    if not hasattr(model, "get_decoder"):
        return f"{type(model).__name__} has no get_decoder()"
    return None


@contextlib.contextmanager
def _timed(cap: PassCapture, device: torch.device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        cap._events.append((start, end))
    else:
        t0 = time.perf_counter()
        yield
        cap.seconds += time.perf_counter() - t0


def _in_pass_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                       sliding_window=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                    sliding_window=sliding_window, **kwargs)
    active = streaming.active()
    cap = None if active is None else active.owner
    if cap is None or cap.failed or getattr(module, "layer_idx", None) not in active.layers:
        return output
    try:
        with _timed(cap, query.device):
            streaming.streaming_attention(module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, sliding_window=sliding_window, **kwargs)
    except Exception as error:  # noqa: BLE001 - the caller's pass must go on; the trainer falls back
        cap.failed = f"{type(error).__name__}: {error}"
    return output


def register() -> None:
    """Make ``IMPLEMENTATION_NAME`` known to transformers, with SDPA's masks (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION_NAME, _in_pass_attention)
    AttentionMaskInterface.register(IMPLEMENTATION_NAME, sdpa_mask)


@contextlib.contextmanager
def statistics_in_pass(model, config: RhythmConfig, entropy: bool, block_bytes: int | None = None,
                       mode: str = "auto"):
    """Within the block, each forward of ``model`` (unwrapped; its caller may wrap it) yields one
    chunk of statistics in the returned :class:`PassCapture`.  ``mode`` is the streaming
    capture's (``streaming.MODES``): "auto" takes the fused kernels where they can run (CUDA),
    "block" the block loop, "fused" the kernels or a failure.  See the module docstring."""
    reason = supported(model)
    if reason is not None:
        raise ValueError(f"in-pass statistics unavailable: {reason}")
    register()
    layers = resolve_layers(model, config)
    cap = PassCapture(layers)
    decoder = model.get_decoder()
    state: dict = {}

    def close():
        context = state.pop("context", None)
        state.clear()
        if context is not None:
            context.__exit__(None, None, None)

    def before(module, args, kwargs):
        close()
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None and args:
            ids = args[0]
        if cap.failed:
            return
        if ids is None or ids.dim() != 2 or kwargs.get("inputs_embeds") is not None:
            cap.failed = "the pass does not give input_ids [B, N]"
            return
        if kwargs.get("past_key_values") is not None or kwargs.get("position_ids") is not None:
            cap.failed = "the pass uses a cache or its own position_ids"
            return
        mask = torch.ones_like(ids) if mask is None else mask
        if mask.shape != ids.shape:
            cap.failed = f"attention_mask of shape {tuple(mask.shape)}"
            return
        bytes_ = block_bytes or (8 if ids.device.type == "cuda" else 1) * streaming.DEFAULT_BLOCK_BYTES
        try:
            resolved = streaming.resolve_mode(model, mode, ids.device)
        except UserError as error:  # mode="fused" where the kernels cannot run
            cap.failed = str(error)
            return
        context = streaming.streaming_capture(layers, config.band_width, mask.bool(), bytes_, resolved,
                                              type(model).__name__, stats_only=True, owner=cap)
        state.update(context=context, active=context.__enter__(), valid=mask.bool(), rows=ids.shape[0])

    def after(module, args, kwargs, output):
        active, valid, rows = state.get("active"), state.get("valid"), state.get("rows", 0)
        close()
        if cap.failed or valid is None:
            return
        missing = set(layers) - active.seen
        if active.stats is None or missing:
            cap.failed = f"layers {sorted(missing or layers)} never called the attention interface"
            return
        stats = active.stats
        if entropy:
            hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            with _timed(cap, hidden.device), torch.no_grad(), \
                    torch.autocast(device_type=hidden.device.type, enabled=False):
                stats.entropy = masked_entropy(model, hidden, valid, config.entropy_temperature)
        cap.chunks.append((cap.rows, stats))
        cap.rows += rows

    original = model.config._attn_implementation
    hooks = [decoder.register_forward_pre_hook(before, with_kwargs=True),
             decoder.register_forward_hook(after, with_kwargs=True)]
    model.set_attn_implementation(IMPLEMENTATION_NAME)
    try:
        yield cap
    finally:
        close()
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation(original)
        cap.finish()
