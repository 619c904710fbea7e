"""The Triton kernels behind ``capture/fused.py`` (which documents what they compute and launches
them).  Conventions shared by both kernels:

* Logits are kept in base 2: ``s2 = q.k * scale * log2(e)`` (``qk_scale`` folds log2(e) in), so
  every exponential is ``exp2``; with softcapping ``s2 = c log2(e) tanh(q.k * scale / c)``
  (``qk_scale = scale / c``, ``cap2 = c log2(e)``).  The stored row maximum ``M`` is in base 2
  too; ``L`` is the plain normaliser, so ``lse = (M + log2 L) ln 2``.
* Programs: axis 0 walks blocks of rows (forward) or of keys (column pass); axes 1 and 2 fold the
  sequence x query-head index ``bh = pid2 * GRID_Y + pid1`` so that no grid dimension beyond the
  first exceeds CUDA's 65535 (programs past ``BH`` return at once).
* The head dimension ``D`` is a compile-time constant: where it is a power of two (>= 16) no
  load carries a mask on it.  ``WIDE`` compiles 64-bit offsets within a head, for tensors whose
  offsets pass 2**31 (``fused.needs_wide_offsets``); base offsets per (sequence, head) are always
  64-bit.
* ``UPCAST`` (the interpreter only, which has no bfloat16 arithmetic) works on float32 copies.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # exp2-based so the interpreter and the GPU agree; exp2(-2|x| log2 e) never overflows
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _dim_mask(offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """offs_d < D, as a constant True where the head dimension fills the tile (no mask at all)."""
    if D == BLOCK_D:
        return tl.full([BLOCK_D], 1, tl.int1)
    else:
        return offs_d < D


@triton.jit
def _program_head(GRID_Y, H):
    """(sequence x head index, sequence, query head) of this program, 64-bit."""
    bh = tl.program_id(2).to(tl.int64) * GRID_Y + tl.program_id(1)
    return bh, bh // H, bh % H


@triton.jit
def _ranges(start, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr):
    """Positions start + [0, BLOCK_A) of this program's block, [0, BLOCK_B) of the blocks it
    visits and [0, BLOCK_D) of the head dimension; 64-bit with ``WIDE``."""
    offs_a = start + tl.arange(0, BLOCK_A)
    offs_b = tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE:
        offs_a = offs_a.to(tl.int64)
        offs_b = offs_b.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    return offs_a, offs_b, offs_d


@triton.jit
def _scaled(dot, qk_scale, cap2, HAS_SOFTCAP: tl.constexpr):
    """Base-2 logits of a tile of q.k products."""
    if HAS_SOFTCAP:
        return cap2 * _tanh(dot * qk_scale)
    else:
        return dot * qk_scale


@triton.jit
def _forward_step(acc, m_i, l_i, dist, q, k_base, v_base, valid_base, n0, offs_m, offs_n0, offs_d, d_ok,
                  skn, skd, svn, svd, N, qk_scale, cap2, window,
                  HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr, WRITE_OUT: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = n0 + offs_n0
    n_in = offs_n < N
    kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_in[None, :] & d_ok[:, None],
                 other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
    s = _scaled(tl.dot(q, kt, input_precision=PRECISION), qk_scale, cap2, HAS_SOFTCAP)
    ok = (tl.load(valid_base + offs_n, mask=n_in, other=0) != 0)[None, :]
    if MASK:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if HAS_WINDOW:
            ok = ok & (offs_m[:, None] - offs_n[None, :] < window)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    distance = (offs_m[:, None] - offs_n[None, :]).to(tl.float32)
    dist = dist * alpha + tl.sum(p * distance, 1)
    if WRITE_OUT:
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_in[:, None] & d_ok[None, :],
                    other=0.0)
        p_v = p.to(v.dtype)  # the probabilities the output is made of, in the model's dtype
        if UPCAST:
            p_v = p_v.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=PRECISION)
    return acc, m_new, l_i, dist


@triton.jit
def forward_kernel(Q, K, V, O, M, L, RD, VALID, START, SINK,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sob, son, soh, sod, srb, srh, srn,
                   N, H, BH, GRID_Y, GROUP, qk_scale, cap2, window,
                   D: tl.constexpr, HAS_SINK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   WRITE_OUT: tl.constexpr, WIDE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Pass 1: a flash-attention forward with the row distance accumulated like the output, and
    each row's base-2 maximum M and normaliser L.  ``WRITE_OUT=False`` (statistics only, beside
    the model's own attention output) skips V and the output entirely."""
    bh, b, h = _program_head(GRID_Y, H)
    if bh >= BH:
        return
    # the longest rows (most keys) first, so that the last wave of programs is short
    m0 = (tl.cdiv(N, BLOCK_M) - 1 - tl.program_id(0)) * BLOCK_M
    offs_m, offs_n0, offs_d = _ranges(m0, BLOCK_M, BLOCK_N, BLOCK_D, WIDE)
    d_ok = _dim_mask(offs_d, D, BLOCK_D)
    row_in = offs_m < N
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_in[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + (h // GROUP) * skh
    v_base = V + b * svb + (h // GROUP) * svh
    valid_base = VALID + b * N
    if HAS_SINK:  # the sink logit enters as a key with exp2(sink - m) already summed
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINK + h).to(tl.float32)
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:  # finite start: fully masked tiles give exp2(-inf - (-1e30)) = 0, never NaN
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
                                                offs_n0, offs_d, d_ok, skn, skd, svn, svd, N, qk_scale, cap2,
                                                window, HAS_SOFTCAP, HAS_WINDOW, True, WRITE_OUT, PRECISION, UPCAST)
    for n0 in range(a, c, BLOCK_N):
        acc, m_i, l_i, dist = _forward_step(acc, m_i, l_i, dist, q, k_base, v_base, valid_base, n0, offs_m,
                                            offs_n0, offs_d, d_ok, skn, skd, svn, svd, N, qk_scale, cap2, window,
                                            HAS_SOFTCAP, HAS_WINDOW, False, WRITE_OUT, PRECISION, UPCAST)
    for n0 in range(c, hi, BLOCK_N):
        acc, m_i, l_i, dist = _forward_step(acc, m_i, l_i, dist, q, k_base, v_base, valid_base, n0, offs_m,
                                            offs_n0, offs_d, d_ok, skn, skd, svn, svd, N, qk_scale, cap2, window,
                                            HAS_SOFTCAP, HAS_WINDOW, True, WRITE_OUT, PRECISION, UPCAST)

    seen = l_i > 0
    inv_l = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    row_ok = tl.load(valid_base + offs_m, mask=row_in, other=0) != 0
    if WRITE_OUT:
        out = acc * inv_l[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=row_in[:, None] & d_ok[None, :])
    tl.store(M + bh * N + offs_m, m_i, mask=row_in)
    tl.store(L + bh * N + offs_m, l_i, mask=row_in)
    tl.store(RD + b * srb + h * srh + offs_m * srn, tl.where(row_ok, dist * inv_l, 0.0), mask=row_in)


@triton.jit
def column_kernel(Q, K, M, L, VALID, START, END, BAND, COL,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, sbb, sbh, sbn, sbw, scb, sch, scn,
                  N, H, BH, GRID_Y, GROUP, qk_scale, cap2, window, band_width,
                  D: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, NEED_COL: tl.constexpr,
                  WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Pass 2, one program per block of keys: ``A[t, s]`` recomputed from M and L over the query
    blocks at or below the diagonal, as the transposed tile [keys, rows] (FlashAttention's
    backward orientation), so the column sum reduces along each thread's own row instead of
    across warps; the band ``A[t, t-o]``, o < band_width, is stored straight from the tile."""
    bh, b, h = _program_head(GRID_Y, H)
    if bh >= BH:
        return
    n0 = tl.program_id(0) * BLOCK_N
    offs_n, offs_m0, offs_d = _ranges(n0, BLOCK_N, BLOCK_M, BLOCK_D, WIDE)
    d_ok = _dim_mask(offs_d, D, BLOCK_D)
    n_in = offs_n < N
    k = tl.load(K + b * skb + (h // GROUP) * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_in[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    valid_base = VALID + b * N
    key_ok = tl.load(valid_base + offs_n, mask=n_in, other=0) != 0
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
                    mask=row_in[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        row_ok = tl.load(valid_base + offs_m, mask=row_in, other=0) != 0
        l_row = tl.load(L + bh * N + offs_m, mask=row_in, other=0.0)
        m_row = tl.where(l_row > 0, tl.load(M + bh * N + offs_m, mask=row_in, other=0.0), 0.0)
        inv_l = tl.where(row_ok & (l_row > 0), 1.0 / tl.where(l_row > 0, l_row, 1.0), 0.0)
        s = _scaled(tl.dot(k, tl.trans(q), input_precision=PRECISION), qk_scale, cap2, HAS_SOFTCAP)
        ok = key_ok[:, None] & (offs_n[:, None] <= offs_m[None, :]) & row_ok[None, :]
        if HAS_WINDOW:
            ok = ok & (offs_m[None, :] - offs_n[:, None] < window)
        p = tl.where(ok, tl.exp2(tl.where(ok, s, 0.0) - m_row[None, :]) * inv_l[None, :], 0.0)
        if NEED_COL:
            col += tl.sum(p, 1)
        if m0 < band_end:
            offset = offs_m[None, :] - offs_n[:, None]
            tl.store(BAND + b * sbb + h * sbh + offs_m[None, :] * sbn + offset * sbw, p,
                     mask=(offset >= 0) & (offset < band_width) & row_in[None, :])
    if NEED_COL:
        tl.store(COL + b * scb + h * sch + offs_n * scn, col, mask=n_in)
