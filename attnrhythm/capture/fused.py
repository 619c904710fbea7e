"""Fused attention statistics on CUDA (Triton): the sampled layers without probability maps.

Two kernels per sampled layer, both reading q [B,Hq,N,D] and k (and v) [B,Hkv,N,D] in place
(any strides; query head h reads KV head h // (Hq/Hkv), K and V are never repeated):

1. ``_forward_kernel``, one program per (query block, sequence x query head): a flash-attention
   forward with online softmax in float32.  It writes the attention output the model continues
   with, the running max ``m`` and normaliser ``l`` of every row (log-sum-exp = m + log l), and
   the row distance sum_s A[t,s] (t - s), accumulated online like the output (one more column).
2. ``_column_kernel``, one program per (key block, sequence x query head): recomputes
   ``A[t,s] = exp(q.k * scale - m_t) / l_t`` tile by tile over the query blocks at or below the
   diagonal, sums columns in registers (no atomics, deterministic) and stores the band
   ``A[t, t-o]`` for o < W straight from the tile (each (t, o) lies in exactly one tile).
   Without column sums it visits only the query blocks within the band (O(N W) work).

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

import os

import torch
from torch import Tensor

from attnrhythm.capture.common import unknown_attention_arguments

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


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


def default_blocks(head_dim: int, device) -> dict:
    """Tile sizes: small under the interpreter, flash-like on a GPU.  Not autotuned (no GPU was
    at hand); chosen so that no kernel spills registers on sm_90 in bf16
    (``benchmarks/fused_compile_check.py``)."""
    if torch.device(device).type != "cuda":
        return dict(block_m=16, block_n=16, col_block_m=16, col_block_n=16, num_warps=1, num_stages=1)
    if head_dim <= 64:
        return dict(block_m=128, block_n=64, col_block_m=64, col_block_n=128, num_warps=8, num_stages=3)
    if head_dim <= 128:
        return dict(block_m=128, block_n=64, col_block_m=64, col_block_n=128, num_warps=8, num_stages=2)
    return dict(block_m=64, block_n=32, col_block_m=32, col_block_n=64, num_warps=8, num_stages=2)


SMALLER = dict(block_m=64, block_n=32, col_block_m=32, col_block_n=64, num_warps=4, num_stages=1)


def _launch(kernel, grid_of, blocks: dict, args: tuple, constexprs) -> None:
    """Launch with ``blocks``; where a GPU lacks the shared memory or registers for them
    (OutOfResources at compile time), once more with the smaller ``SMALLER`` tiles."""
    try:
        kernel[grid_of(blocks)](*args, **constexprs(blocks))
    except triton.runtime.errors.OutOfResources:
        small = {**blocks, **{k: min(v, SMALLER[k]) for k, v in SMALLER.items()}}
        kernel[grid_of(small)](*args, **constexprs(small))


if triton is not None:

    @triton.jit
    def _tanh(x):
        # exp-based so the interpreter and the GPU agree; exp(-2|x|) never overflows
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _logits(q, k_base, valid_base, n0, offs_m, offs_n0, offs_d, skn, skd, N, D, scale, softcap, window,
                HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """Scaled (soft-capped) logits of one tile, -inf where masked; also the key positions."""
        offs_n = n0 + offs_n0
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < N) & (offs_d[:, None] < D), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        key_ok = tl.load(valid_base + offs_n, mask=offs_n < N, other=0) != 0
        ok = key_ok[None, :]
        if MASK:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
            if HAS_WINDOW:
                ok = ok & (offs_m[:, None] - offs_n[None, :] < window)
        return tl.where(ok, s, float("-inf")), offs_n

    @triton.jit
    def _forward_step(acc, m_i, l_i, dist, q, k_base, v_base, valid_base, n0, offs_m, offs_n0, offs_d,
                      skn, skd, svn, svd, N, D, scale, softcap, window,
                      HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        s, offs_n = _logits(q, k_base, valid_base, n0, offs_m, offs_n0, offs_d, skn, skd, N, D, scale, softcap,
                            window, HAS_SOFTCAP, HAS_WINDOW, MASK, PRECISION, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        distance = (offs_m[:, None] - offs_n[None, :]).to(tl.float32)
        dist = dist * alpha + tl.sum(p * distance, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=(offs_n[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        p_v = p.to(v.dtype)  # the probabilities the output is made of, in the model's dtype
        if UPCAST:
            p_v = p_v.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=PRECISION)
        return acc, m_new, l_i, dist

    @triton.jit
    def _forward_kernel(Q, K, V, O, M, L, RD, VALID, START, SINK,
                        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sob, son, soh, sod, srb, srh, srn,
                        N, D, H, GROUP, scale, softcap, window,
                        HAS_SINK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # the longest rows (most keys) first, so that the last wave of programs is short
        m0 = (tl.cdiv(N, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)  # 64-bit base offsets: [B, L, H, N, W] bands get large
        b = bh // H
        h = bh % H
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=(offs_m[:, None] < N) & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b * skb + (h // GROUP) * skh
        v_base = V + b * svb + (h // GROUP) * svh
        valid_base = VALID + b * N
        if HAS_SINK:  # the sink logit enters as a key with exp(s_aux - m) already summed
            m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINK + h).to(tl.float32)
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        else:  # finite start: fully masked tiles give exp(-inf - (-1e30)) = 0, never NaN
            m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dist = tl.zeros([BLOCK_M], tl.float32)

        hi = tl.minimum(m0 + BLOCK_M, N)
        lo = tl.load(START + b)  # first real token: keys before it are padding
        if HAS_WINDOW:
            lo = tl.maximum(lo, m0 - window + 1)
        lo = (tl.maximum(lo, 0) // BLOCK_N) * BLOCK_N
        # [lo, a): window edge (masked); [a, c): every row sees every key; [c, hi): diagonal (masked)
        a = lo
        if HAS_WINDOW:
            a = tl.cdiv(tl.maximum(m0 + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
        a = tl.minimum(tl.maximum(a, lo), hi)
        c = tl.minimum(tl.maximum(((m0 + 1) // BLOCK_N) * BLOCK_N, a), hi)
        if HAS_WINDOW:  # compiled for sliding-window layers only (fewer live registers otherwise)
            for n0 in range(lo, a, BLOCK_N):
                acc, m_i, l_i, dist = _forward_step(acc, m_i, l_i, dist, q, k_base, v_base, valid_base, n0, offs_m,
                                                    offs_n0, offs_d, skn, skd, svn, svd, N, D, scale, softcap,
                                                    window, HAS_SOFTCAP, HAS_WINDOW, True, PRECISION, UPCAST)
        for n0 in range(a, c, BLOCK_N):
            acc, m_i, l_i, dist = _forward_step(acc, m_i, l_i, dist, q, k_base, v_base, valid_base, n0, offs_m,
                                                offs_n0, offs_d, skn, skd, svn, svd, N, D, scale, softcap, window,
                                                HAS_SOFTCAP, HAS_WINDOW, False, PRECISION, UPCAST)
        for n0 in range(c, hi, BLOCK_N):
            acc, m_i, l_i, dist = _forward_step(acc, m_i, l_i, dist, q, k_base, v_base, valid_base, n0, offs_m,
                                                offs_n0, offs_d, skn, skd, svn, svd, N, D, scale, softcap, window,
                                                HAS_SOFTCAP, HAS_WINDOW, True, PRECISION, UPCAST)

        seen = l_i > 0
        inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
        row_in = offs_m < N
        row_ok = tl.load(valid_base + offs_m, mask=row_in, other=0) != 0
        out = acc * inv_l[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=row_in[:, None] & (offs_d[None, :] < D))
        tl.store(M + bh * N + offs_m, m_i, mask=row_in)
        tl.store(L + bh * N + offs_m, l_i, mask=row_in)
        tl.store(RD + b * srb + h * srh + offs_m * srn, tl.where(row_ok, dist * inv_l, 0.0), mask=row_in)

    @triton.jit
    def _column_kernel(Q, K, M, L, VALID, START, END, BAND, COL,
                       sqb, sqh, sqn, sqd, skb, skh, skn, skd, sbb, sbh, sbn, sbw, scb, sch, scn,
                       N, D, H, GROUP, scale, softcap, window, band_width,
                       HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, NEED_COL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        n0 = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        k_base = K + b * skb + (h // GROUP) * skh
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < N) & (offs_d[:, None] < D), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        valid_base = VALID + b * N
        key_ok = tl.load(valid_base + offs_n, mask=offs_n < N, other=0) != 0
        band_end = n0 + BLOCK_N - 1 + band_width  # rows at or past it have no band entry here
        m_hi = tl.load(END + b)  # rows after the last real token contribute nothing
        if n0 + BLOCK_N <= tl.load(START + b):  # keys of left padding: no attention at all
            m_hi = 0
        if not NEED_COL:
            m_hi = tl.minimum(m_hi, band_end)
        if HAS_WINDOW:
            m_hi = tl.minimum(m_hi, n0 + BLOCK_N - 1 + window)
        col = tl.zeros([BLOCK_N], tl.float32)
        for m0 in range(((n0 // BLOCK_M) * BLOCK_M), m_hi, BLOCK_M):
            offs_m = m0 + offs_m0
            row_in = offs_m < N
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                        mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            row_ok = tl.load(valid_base + offs_m, mask=row_in, other=0) != 0
            l_row = tl.load(L + bh * N + offs_m, mask=row_in, other=0.0)
            m_row = tl.where(l_row > 0, tl.load(M + bh * N + offs_m, mask=row_in, other=0.0), 0.0)
            inv_l = tl.where(row_ok & (l_row > 0), 1.0 / tl.where(l_row > 0, l_row, 1.0), 0.0)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale
            if HAS_SOFTCAP:
                s = softcap * _tanh(s / softcap)
            ok = key_ok[None, :] & (offs_n[None, :] <= offs_m[:, None]) & row_ok[:, None]
            if HAS_WINDOW:
                ok = ok & (offs_m[:, None] - offs_n[None, :] < window)
            p = tl.where(ok, tl.exp(tl.where(ok, s, 0.0) - m_row[:, None]) * inv_l[:, None], 0.0)
            if NEED_COL:
                col += tl.sum(p, 0)
            if m0 < band_end:
                offset = offs_m[:, None] - offs_n[None, :]
                tl.store(BAND + b * sbb + h * sbh + offs_m[:, None] * sbn + offset * sbw, p,
                         mask=(offset >= 0) & (offset < band_width) & row_in[:, None])
        if NEED_COL:
            tl.store(COL + b * scb + h * sch + offs_n * scn, col, mask=offs_n < N)


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
                    col_sum: Tensor | None = None, need_col_sum: bool = True, blocks: dict | None = None):
    """Attention output and statistics of one layer.

    query [B,Hq,N,D], key/value [B,Hkv,N,D] (any strides), valid [B,N] (True = real token).
    ``row_distance`` [B,Hq,N], ``band`` [B,Hq,N,W] and ``col_sum`` [B,Hq,N] float32 may be given
    (e.g. views of one layer's slot in ``AttentionStats``); ``band`` must then hold zeros, since
    only entries a real key can reach are written.  Returns ``(out [B,N,Hq,D] in the query's
    dtype, lse [B,Hq,N] float32 (+inf where a row sees nothing), row_distance, band, col_sum)``;
    col_sum stays zero when ``need_col_sum`` is False.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    batch, q_heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_heads % kv_heads or key.shape != value.shape or key.shape[2] != length:
        raise ValueError(f"query {tuple(query.shape)} and key/value {tuple(key.shape)} do not form a GQA layer")
    device = query.device
    scaling = head_dim ** -0.5 if scaling is None else float(scaling)
    blocks = {**default_blocks(head_dim, device), **(blocks or {})}
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
    row_distance = zeros(batch, q_heads, length) if row_distance is None else row_distance
    band = zeros(batch, q_heads, length, band_width) if band is None else band
    col_sum = zeros(batch, q_heads, length) if col_sum is None else col_sum
    valid8 = valid.to(device=device, dtype=torch.int8).contiguous()
    start, end = _bounds(valid.to(device))
    out = torch.empty(batch, length, q_heads, head_dim, dtype=query.dtype, device=device)
    m = torch.empty(batch, q_heads, length, dtype=torch.float32, device=device)
    l = torch.empty_like(m)  # noqa: E741
    sink = (s_aux.to(device=device, dtype=torch.float32).reshape(q_heads).contiguous() if s_aux is not None
            else torch.zeros(1, dtype=torch.float32, device=device))
    window = int(sliding_window) if sliding_window else 0
    cap = float(softcap) if softcap else 1.0
    block_d = max(16, triton.next_power_of_2(head_dim))
    # the interpreter has no bfloat16 arithmetic: it gets exact float32 copies of the tiles
    upcast = device.type != "cuda" and query.dtype != torch.float32
    precision = "ieee" if query.dtype == torch.float32 or upcast else "tf32"
    flags = dict(HAS_SOFTCAP=bool(softcap), HAS_WINDOW=bool(window), BLOCK_D=block_d, PRECISION=precision,
                 UPCAST=upcast)
    _launch(_forward_kernel, lambda c: (triton.cdiv(length, c["block_m"]), batch * q_heads), blocks,
            (query, key, value, out, m, l, row_distance, valid8, start, sink,
             *query.stride(), *key.stride(), *value.stride(), *out.stride(), *row_distance.stride(),
             length, head_dim, q_heads, q_heads // kv_heads, scaling, cap, window),
            lambda c: dict(HAS_SINK=s_aux is not None, BLOCK_M=c["block_m"], BLOCK_N=c["block_n"],
                           num_warps=c["num_warps"], num_stages=c["num_stages"], **flags))
    if band_width > 0 or need_col_sum:
        _launch(_column_kernel, lambda c: (triton.cdiv(length, c["col_block_n"]), batch * q_heads), blocks,
                (query, key, m, l, valid8, start, end, band, col_sum,
                 *query.stride(), *key.stride(), *band.stride(), *col_sum.stride(),
                 length, head_dim, q_heads, q_heads // kv_heads, scaling, cap, window, band_width),
                lambda c: dict(NEED_COL=need_col_sum, BLOCK_M=c["col_block_m"], BLOCK_N=c["col_block_n"],
                               num_warps=c["num_warps"], num_stages=c["num_stages"], **flags))
    lse = torch.where(l > 0, m + l.log(), torch.full_like(m, float("inf")))
    return out, lse, row_distance, band, col_sum


def fused_layer(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, stats, slot: int,
                scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
                s_aux: Tensor | None = None, need_col_sum: bool = True, blocks: dict | None = None) -> Tensor:
    """The block path's per-layer step, fused: fills slot ``slot`` of ``stats``
    (``attnrhythm.core.stats.AttentionStats``, whose ``valid`` is the 2-D padding mask) and returns
    the attention output [B, N, Hq, D].  ``attention_mask`` (the model's 4-D mask) is not read:
    the caller checks it with :func:`mask_mismatch`."""
    out, lse, _, _, _ = fused_attention(
        query, key, value, stats.valid, band_width=stats.band.shape[-1], scaling=scaling,
        sliding_window=sliding_window, softcap=softcap, s_aux=s_aux, row_distance=stats.row_distance[:, slot],
        band=stats.band[:, slot], col_sum=stats.col_sum[:, slot], need_col_sum=need_col_sum, blocks=blocks)
    if s_aux is not None and getattr(stats, "row_mass", None) is not None:
        # lse includes the sink logit: the row's mass over positions is 1 - p(sink)
        sink = s_aux.to(device=lse.device, dtype=torch.float32).reshape(1, -1, 1)
        stats.row_mass[:, slot] = (1.0 - torch.exp(sink - lse)) * stats.valid.to(lse.device, torch.float32)[:, None]
    return out
