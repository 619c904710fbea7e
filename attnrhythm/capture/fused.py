"""Fused attention statistics on CUDA (Triton): the sampled layers without probability maps.

Two kernels per sampled layer, both reading q [B,Hq,N,D] and k (and v) [B,Hkv,N,D] in place
(any strides; query head h reads KV head h // (Hq/Hkv), K and V are never repeated):

1. ``forward_kernel``, one program per (query block, sequence x query head): a flash-attention
   forward with online softmax in float32.  It writes the attention output the model continues
   with (unless ``write_output=False``: statistics only, beside the model's own output), the
   running max ``m`` and normaliser ``l`` of every row, and the row distance sum_s A[t,s] (t - s),
   accumulated online like the output (one more column).
2. ``column_kernel``, one program per (key block, sequence x query head): recomputes
   ``A[t,s] = exp(q.k * scale - m_t) / l_t`` tile by tile over the query blocks at or below the
   diagonal, sums columns in registers (no atomics, deterministic) and stores the band
   ``A[t, t-o]`` for o < W straight from the tile (each (t, o) lies in exactly one tile).
   Without column sums it visits only the query blocks within the band (O(N W) work).

The kernels themselves are in ``capture/fused_kernels.py`` (base-2 logits, a folded grid,
compile-time head dim, 64-bit offsets where needed).  Launches run under the tensors' own CUDA
device.  Matmul precision: 16-bit inputs use tensor cores with float32 accumulation; float32
inputs use exact float32 products ("ieee", no tensor cores) unless torch is set to allow TF32
(``torch.set_float32_matmul_precision("high")``), the rule torch's own float32 matmuls (and so
the block path) follow; TF32 rounds the inputs to 10 mantissa bits, ~1e-3 relative in the logits.

Masks are computed on chip: causal, optional sliding window (t - s < window), key validity from
the 2-D padding mask (left or right padding, mixed lengths, holes), logit softcapping
``c * tanh(s / c)`` and attention-sink logits (one per query head, as GPT-OSS: they take
probability in the denominator but are not positions).  Rows of padding tokens get zero
statistics, and an output of zeros where no key is visible.  Probabilities are never written.

The streaming attention function (``capture/streaming.py``) calls :func:`fused_layer` for the
sampled layers under ``backend="fused"`` or ``"auto"``; this module is imported only then, so
Triton is never imported by a plain capture.  On CPU the kernels run under the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is first imported), which is how the tests
exercise them.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from attnrhythm.capture.common import unknown_attention_arguments

try:
    import triton
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
else:
    from attnrhythm.capture import fused_kernels

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
MAX_GRID_Y = 65535
"""CUDA's limit on grid dimensions 2 and 3: sequences x heads beyond it fold into dimension 3."""
INT32_LIMIT = 2**31 - 1
"""Offsets within one head up to this stay 32-bit; beyond it the kernels compile 64-bit ones."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fused_available(device, dtype, head_dim: int, **attention_kwargs) -> tuple[bool, str]:
    """(True, "") when the fused kernels can compute this layer, else (False, one-line reason).
    The reason starts with "not CUDA" exactly when the device is the only obstacle."""
    if triton is None:
        return False, "Triton is not installed (pip install 'attnrhythm[gpu]')"
    device = torch.device(device)
    if device.type != "cuda" and not interpreting():
        return False, f"not CUDA (device {device}; set TRITON_INTERPRET=1 to run the kernels on CPU)"
    if dtype not in SUPPORTED_DTYPES:
        return False, f"unsupported dtype {dtype} (fused kernels take float16, bfloat16, float32)"
    if not 1 <= int(head_dim) <= MAX_HEAD_DIM:
        return False, f"unsupported head dim {head_dim} (fused kernels take 1..{MAX_HEAD_DIM})"
    unknown = unknown_attention_arguments(attention_kwargs)
    if unknown:
        return False, f"the model's attention takes argument(s) the kernel does not implement: {', '.join(unknown)}"
    if attention_kwargs.get("dropout"):
        return False, f"attention dropout {attention_kwargs['dropout']} (fused kernels run inference only)"
    if attention_kwargs.get("is_causal") is False:
        return False, "a non-causal attention layer"
    return True, ""


def mask_mismatch(attention_mask: Tensor | None, valid: Tensor, sliding_window: int | None,
                  rows_per_chunk: int | None = None) -> str | None:
    """None when the model's 4-D mask is causal & key-valid (& window) on every real row, which
    is what the kernels compute from ``valid`` [B, N]; else a one-line reason.  Works in chunks
    of rows (never a second N x N mask; 2**25 elements per chunk by default) and synchronises
    once."""
    batch, length = valid.shape
    rows_per_chunk = rows_per_chunk or max(1, 2**25 // max(1, batch * length))
    if attention_mask is None:
        return None if bool(valid.all()) else "the model passed no attention mask for a padded batch"
    if attention_mask.dtype != torch.bool:
        return f"a {attention_mask.dtype} attention mask (fused kernels check boolean masks only)"
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or tuple(attention_mask.shape[-2:]) != (length, length):
        return f"an attention mask of shape {tuple(attention_mask.shape)}"
    index = torch.arange(length, device=valid.device)
    bad = torch.zeros((), dtype=torch.bool, device=valid.device)
    for r0 in range(0, length, rows_per_chunk):
        rows = index[r0:r0 + rows_per_chunk, None]
        want = (index[None, :] <= rows) & valid[:, None, None, :]
        if sliding_window:
            want &= rows - index[None, :] < sliding_window
        diff = (attention_mask[:, :, r0:r0 + rows_per_chunk] != want) & valid[:, None, r0:r0 + rows_per_chunk, None]
        bad |= diff.any()
    if bool(bad):
        return "the model's attention mask is not causal + padding (+ sliding window)"
    return None


def default_blocks(head_dim: int, dtype: torch.dtype = torch.bfloat16, capability: tuple[int, int] | None = None) -> dict:
    """Tile sizes for a GPU of compute ``capability`` (None: the interpreter's small tiles).  Not
    autotuned (no GPU was at hand): flash-like sizes chosen so that no kernel spills registers
    on sm_90 or sm_80 in 16-bit (``benchmarks/fused_compile_check.py``, its record in
    ``benchmarks/results/fused_compile_sm90.txt``).  float32 takes smaller tiles: its products
    run without tensor cores unless TF32 is allowed (``dot_precision``) and spill at flash sizes."""
    if capability is None:
        return dict(block_m=16, block_n=16, col_block_m=16, col_block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        tf32 = dot_precision(dtype, upcast=False) == "tf32"
        return dict(block_m=64, block_n=32, col_block_m=32, col_block_n=64, num_warps=4 if tf32 else 8,
                    num_stages=2 if tf32 else 1)
    if head_dim <= 64:
        return dict(block_m=128, block_n=64, col_block_m=64, col_block_n=128, num_warps=8, num_stages=3)
    if head_dim <= 128:  # Ampere has fewer registers to spare for the pipeline's second stage
        return dict(block_m=128, block_n=64, col_block_m=64, col_block_n=128, num_warps=8,
                    num_stages=2 if capability >= (9, 0) else 1)
    return dict(block_m=64, block_n=32, col_block_m=32, col_block_n=64, num_warps=8, num_stages=2)


SMALLER = dict(block_m=64, block_n=32, col_block_m=32, col_block_n=64, num_warps=4, num_stages=1)


def _launch(kernel, grid_of, blocks: dict, args: tuple, constexprs) -> None:
    """Launch with ``blocks``; where a GPU lacks the shared memory or registers for them
    (OutOfResources at compile time), once more with each size the smaller of the requested one
    and ``SMALLER``'s (re-raised when that changes nothing)."""
    try:
        kernel[grid_of(blocks)](*args, **constexprs(blocks))
    except triton.runtime.errors.OutOfResources:
        small = {**blocks, **{k: min(blocks.get(k, v), v) for k, v in SMALLER.items()}}
        if small == blocks:
            raise
        kernel[grid_of(small)](*args, **constexprs(small))


def device_guard(device: torch.device):
    """The tensors' own CUDA device made current for a launch (Triton launches on the current
    device and its stream; a layer on cuda:1 would otherwise run on cuda:0's)."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def folded_grid(blocks: int, heads: int) -> tuple[int, int, int]:
    """(blocks, y, z) with y * z >= heads and y <= MAX_GRID_Y: the kernels read the (sequence,
    head) index as pid2 * y + pid1 and return at once past ``heads``."""
    y = min(heads, MAX_GRID_Y)
    z = triton.cdiv(heads, y)
    if z > MAX_GRID_Y:
        raise ValueError(f"{heads} sequence x head pairs exceed the grid ({MAX_GRID_Y}**2); split the batch")
    return blocks, y, z


def _span(tensor: Tensor, dims: tuple[int, ...]) -> int:
    """Largest element offset within one (sequence, head) slice of ``tensor`` along ``dims``."""
    return sum((tensor.shape[d] - 1) * abs(tensor.stride(d)) for d in dims if tensor.shape[d] > 0)


def needs_wide_offsets(query: Tensor, key: Tensor, value: Tensor, out: Tensor | None, band: Tensor) -> bool:
    """Whether some offset within a head passes 2**31 - 1 (transformers' [B, N, H, D] layout
    beyond 128K tokens x 64 heads x 256), so the kernels must compute offsets in 64 bits.
    q/k/v/band [B, H, N, X], out [B, N, H, D]; meta tensors work (shapes and strides only)."""
    spans = [_span(t, (2, 3)) for t in (query, key, value, band)]
    if out is not None:
        spans.append(_span(out, (1, 3)))
    return max(spans) > INT32_LIMIT


def dot_precision(dtype: torch.dtype, upcast: bool) -> str:
    """Triton's ``input_precision`` (see the module docstring): float32 follows torch's float32
    matmul setting; 16-bit inputs run on tensor cores whatever this says."""
    if upcast:
        return "ieee"
    if dtype == torch.float32:
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"


def _bounds(valid: Tensor) -> tuple[Tensor, Tensor]:
    """First real position and last real position + 1 per sequence (N and 0 when empty)."""
    length = valid.shape[1]
    index = torch.arange(length, device=valid.device)
    start = torch.where(valid, index, length).amin(1).to(torch.int32)
    end = torch.where(valid, index + 1, 0).amax(1).to(torch.int32)
    return start.contiguous(), end.contiguous()


def fused_attention(query: Tensor, key: Tensor, value: Tensor, valid: Tensor, *, band_width: int,
                    scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
                    s_aux: Tensor | None = None, row_distance: Tensor | None = None, band: Tensor | None = None,
                    col_sum: Tensor | None = None, need_col_sum: bool = True, write_output: bool = True,
                    blocks: dict | None = None):
    """Attention output and statistics of one layer.

    query [B,Hq,N,D], key/value [B,Hkv,N,D] (any strides), valid [B,N] (True = real token).
    ``row_distance`` [B,Hq,N], ``band`` [B,Hq,N,W] and ``col_sum`` [B,Hq,N] float32 may be given
    (e.g. views of one layer's slot in ``AttentionStats``); ``band`` must then hold zeros, since
    only entries a real key can reach are written.  Returns ``(out [B,N,Hq,D] in the query's
    dtype or None without ``write_output``, lse [B,Hq,N] float32 (+inf where a row sees nothing),
    row_distance, band, col_sum)``; col_sum stays zero when ``need_col_sum`` is False.  With
    ``band_width=0`` and no column sums only the forward kernel runs (pass 1).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    batch, q_heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_heads % kv_heads or key.shape != value.shape or key.shape[2] != length:
        raise ValueError(f"query {tuple(query.shape)} and key/value {tuple(key.shape)} do not form a GQA layer")
    device = query.device
    scaling = head_dim ** -0.5 if scaling is None else float(scaling)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    blocks = {**default_blocks(head_dim, query.dtype, capability), **(blocks or {})}
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
    row_distance = zeros(batch, q_heads, length) if row_distance is None else row_distance
    band = zeros(batch, q_heads, length, band_width) if band is None else band
    col_sum = zeros(batch, q_heads, length) if col_sum is None else col_sum
    valid8 = valid.to(device=device, dtype=torch.int8).contiguous()
    start, end = _bounds(valid.to(device))
    out = torch.empty(batch, length, q_heads, head_dim, dtype=query.dtype, device=device) if write_output else None
    m = torch.empty(batch, q_heads, length, dtype=torch.float32, device=device)
    l = torch.empty_like(m)  # noqa: E741
    sink = (s_aux.to(device=device, dtype=torch.float32).reshape(q_heads) * LOG2E if s_aux is not None
            else torch.zeros(1, dtype=torch.float32, device=device)).contiguous()
    window = int(sliding_window) if sliding_window else 0
    # base-2 logits: log2(e) folded into the scale (into the cap with softcapping)
    qk_scale, cap2 = (scaling / float(softcap), float(softcap) * LOG2E) if softcap else (scaling * LOG2E, 1.0)
    heads = batch * q_heads
    # the interpreter has no bfloat16 arithmetic: it gets exact float32 copies of the tiles
    upcast = device.type != "cuda" and query.dtype != torch.float32
    flags = dict(D=head_dim, HAS_SOFTCAP=bool(softcap), HAS_WINDOW=bool(window),
                 WIDE=needs_wide_offsets(query, key, value, out, band), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                 PRECISION=dot_precision(query.dtype, upcast), UPCAST=upcast)
    o_args = (out if out is not None else m, *(out.stride() if out is not None else (0, 0, 0, 0)))
    with device_guard(device):
        _launch(fused_kernels.forward_kernel, lambda c: folded_grid(triton.cdiv(length, c["block_m"]), heads), blocks,
                (query, key, value, o_args[0], m, l, row_distance, valid8, start, sink,
                 *query.stride(), *key.stride(), *value.stride(), *o_args[1:], *row_distance.stride(),
                 length, q_heads, heads, min(heads, MAX_GRID_Y), q_heads // kv_heads, qk_scale, cap2, window),
                lambda c: dict(HAS_SINK=s_aux is not None, WRITE_OUT=write_output, BLOCK_M=c["block_m"],
                               BLOCK_N=c["block_n"], num_warps=c["num_warps"], num_stages=c["num_stages"], **flags))
        if band_width > 0 or need_col_sum:
            _launch(fused_kernels.column_kernel, lambda c: folded_grid(triton.cdiv(length, c["col_block_n"]), heads),
                    blocks, (query, key, m, l, valid8, start, end, band, col_sum,
                             *query.stride(), *key.stride(), *band.stride(), *col_sum.stride(),
                             length, q_heads, heads, min(heads, MAX_GRID_Y), q_heads // kv_heads, qk_scale, cap2,
                             window, band_width),
                    lambda c: dict(NEED_COL=need_col_sum, BLOCK_M=c["col_block_m"], BLOCK_N=c["col_block_n"],
                                   num_warps=c["num_warps"], num_stages=c["num_stages"], **flags))
    lse = torch.where(l > 0, (m + l.log2()) / LOG2E, torch.full_like(m, float("inf")))
    return out, lse, row_distance, band, col_sum


def fused_layer(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, stats, slot: int,
                scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
                s_aux: Tensor | None = None, need_col_sum: bool = True, write_output: bool = True,
                blocks: dict | None = None) -> Tensor | None:
    """The block path's per-layer step, fused: fills slot ``slot`` of ``stats``
    (``attnrhythm.core.stats.AttentionStats``, whose ``valid`` is the 2-D padding mask; its band
    width is the layer's) and returns the attention output [B, N, Hq, D] (None without
    ``write_output``: statistics only).  ``attention_mask`` (the model's 4-D mask) is not read:
    the caller checks it with :func:`mask_mismatch`."""
    out, lse, _, _, _ = fused_attention(
        query, key, value, stats.valid, band_width=stats.band.shape[-1], scaling=scaling,
        sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, row_distance=stats.row_distance[:, slot],
        band=stats.band[:, slot], col_sum=stats.col_sum[:, slot], need_col_sum=need_col_sum,
        write_output=write_output, blocks=blocks)
    if s_aux is not None and getattr(stats, "row_mass", None) is not None:
        # lse includes the sink logit: the row's mass over positions is 1 - p(sink)
        sink = s_aux.to(device=lse.device, dtype=torch.float32).reshape(1, -1, 1)
        stats.row_mass[:, slot] = (1.0 - torch.exp(sink - lse)) * stats.valid.to(lse.device, torch.float32)[:, None]
    return out
