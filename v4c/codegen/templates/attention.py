"""Hybrid attention kernels: sparse attention over the window ring + compressed rows (with the
sink, the output de-rotation and the ring append), and the lightning indexer.

Ops:
  * ``sparse_attention`` (fused): quantise this call's KV rows (``fp8_ds`` caches only), attend,
    [combine the split-K partials], append the window ring.  Launch order matters: the attention
    reads the ring *before* the append overwrites slots a query may still need.
  * ``attention`` / ``window_append``: the same kernels, for graphs that were not fused.
  * ``indexer`` (fused): query GEMM + RoPE (+ Hadamard and FP4 round trip for MXFP4 keys) in the
    GEMM epilogue, head-weight GEMM, scores over all compressed keys, streaming top-k.

Kernels (one ``@triton.jit`` kernel per job, small ``@triton.jit`` helpers shared):
  * ``_kv_quant_kernel``: rows -> the fp8_ds byte layout (e4m3 nope dims, bf16 RoPE dims, UE8M0
    block scales), byte-exact with ``quant.quantize_kv_rows``.  This call's new KV rows are
    written to a scratch buffer in that layout; the attention kernel reads them back through the
    same in-load decode as the ring, so they are seen exactly as the cache will hold them (the
    ``storage.round_trip`` of the reference) and the append is a byte copy.
  * ``_attn_kernel``: one program per (batch row, block of ``BLOCK_T`` query tokens, block of
    ``BLOCK_H`` heads, split).  The ``BLOCK_T * BLOCK_H`` query rows share every key tile (MQA:
    all heads read the same rows, K = V).  Keys, in three segments: ring rows whose position is
    in (p-W, p]; this call's rows j in [t0-W+1, t0+BLOCK_T) (positions of a batch row are
    consecutive, valid tokens first); then the HCA prefix ``(w+1)*ratio <= p+1`` or the CSA
    indices ``idx >= 0`` (assumed distinct, as the indexer produces them).  Online softmax in
    fp32; the sink joins the denominator at the end; padding queries (pos < 0) give zeros; the
    epilogue de-rotates the last ``rope_dim`` dims (inverse interleaved RoPE at the query).
    Cached rows are decoded inside the loads (fp8_ds: bytes bitcast to ``tl.float8e4nv`` times
    ``2**(byte-127)``; RoPE dims rebuilt from their two bf16 bytes).
    Decode (T == 1) splits the compressed keys over ``SPLIT_K`` programs; split 0 also takes
    the window.  Their partial (max, sum, acc) go to fp32 scratch and ``_attn_combine_kernel``
    merges them and runs the same epilogue.  Prefill (T > 1) uses ``BLOCK_T`` query tokens per
    program (CSA: 1, its key sets are per token) and no split.
  * ``_ring_append_kernel``: writes each batch row's last W valid tokens to slot ``pos % W``
    (token j is one of them iff token j+W is padding or beyond T), casting to the ring dtype.
  * ``_index_proj_kernel``: ``x @ w.T`` tiled GEMM; epilogue: round to the activation dtype,
    interleaved RoPE on the last ``rope_dim`` dims of each head, and for MXFP4 keys the
    Walsh-Hadamard rotation (a ``tl.dot`` with the +-1 Sylvester matrix) and the e2m1/UE8M0
    quantise-dequantise of the queries.  The q GEMM's N tile is one head.
  * ``_index_scores_kernel``: ``I[t,s] = sum_h (w[t,h]*weight_scale) * relu(q[t,h].k[s]) *
    score_scale`` for a block of tokens x a block of keys, keys decoded in the load (fp8: e4m3
    times the row's fp32 scale; mxfp4: e2m1 nibbles times UE8M0 per 32), causal mask
    ``s < (p+1)//ratio``.  Scores are stored as sortable int64 keys (score bits << 32 | index)
    in a scratch [B, T, capacity]; key tiles no token of the block can see are skipped.  Calls
    whose scratch would exceed ``SCORE_SCRATCH_BYTES`` run in (batch, token) chunks.
  * ``_topk_kernel``: per token, streams its visible keys in tiles (tile sorted with ``tl.sort``,
    merged into a running top-k by the bitonic max trick, tiles that cannot enter skipped); in
    decode ``TOPK_SPLIT`` programs per token write candidate lists that a second launch of the
    same kernel merges.  Unused slots are -1.  Top-k is entirely in Triton.

Host glue: output / scratch allocation, grids, the indexer's chunk loop, and the RoPE
inverse-frequency table (a few scalars per (rope_dim, theta, yarn), computed as the reference does
and cached).  No host synchronisation: nothing reads device values back.

Assumptions shared with the runtime: a batch row's valid tokens come first with consecutive
positions, the ring holds positions before the call's first token, CSA indices are distinct.

Numerics: all accumulation in fp32.  fp32 models get ``input_precision="ieee"`` dots; fp16 /
bf16 models dot in their own dtype (quantised rows decode exactly into it); the interpreter's
bf16 dot is wrong, so there bf16 tiles are upcast.  Roundings to bf16 are done on the bits
(round to nearest even), because the interpreter's fp32 -> bf16 cast truncates; e4m3 codes are
built by hand for the same reason (its fp32 -> fp8 cast mis-rounds across binades).

Self-contained (torch + triton only): a rendered copy runs from inside compiled artifacts.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .prelude import _check, _interpreting, _rope_inv_freq  # v4c: inline prelude

NEG_BIG = tl.constexpr(-1.0e30)  # running max before any key: finite, so exp(m_old - m_new) is never nan
INT64_MIN = tl.constexpr(-9223372036854775808)  # packed key of "no entry"
NEG_INF_KEY = tl.constexpr(-2139095041)  # sortable int32 key of an fp32 -inf score (a masked entry)


# ---- shared helpers ------------------------------------------------------------------------

@triton.jit
def _pow2(e):
    """fp32 ``2**e`` for int32 ``e`` in [-127, 127], built from the bits (2**-127 is subnormal)."""
    biased = e + 127
    bits = tl.where(biased > 0, biased << 23, 1 << 22)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _ue8m0_exponent(amax, THRESH: tl.constexpr, QEXP: tl.constexpr):
    """Smallest ``e`` with ``2**e >= amax / qmax`` (``qmax = (1 + THRESH/2**23) * 2**QEXP``: 448 is
    (0x600000, 8), 6 is (0x400000, 2)), 0 for amax == 0, clamped to UE8M0's [-127, 127]."""
    bits = amax.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    e = biased - 127 - QEXP + ((bits & 0x7FFFFF) > THRESH).to(tl.int32)
    e = tl.where(biased == 0, tl.where(amax == 0.0, 0, -127), e)
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def _rne_bf16(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(x, dt: tl.constexpr):
    """fp32 ``x`` rounded to dtype ``dt`` (nearest even) and back to fp32."""
    if dt == tl.bfloat16:
        y = _rne_bf16(x)
    elif dt == tl.float32:
        y = x
    else:
        y = x.to(dt).to(tl.float32)
    return y


@triton.jit
def _e4m3_byte(y):
    """e4m3fn byte of fp32 ``y`` (|y| <= 448 after the clamp), round to nearest even, built by hand."""
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    a = tl.abs(y)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # binade; -6 = subnormal range
    t = a * _pow2(3 - e)  # exact: the value in units of the e4m3 step, in [0, 16)
    r = ((t + 12582912.0) - 12582912.0).to(tl.int32)  # 1.5 * 2**23: fp32 addition rounds to an integer, ties even
    code = tl.where(r >= 16, (e + 8) << 3, tl.where(r >= 8, ((e + 7) << 3) | (r - 8), r))
    sign = (y.to(tl.int32, bitcast=True) < 0).to(tl.int32) << 7
    return (code | sign).to(tl.uint8)


@triton.jit
def _cos_sin(angle):
    """cos and sin of fp32 angles >= 0, reduced to [-pi, pi] first (two-constant Cody-Waite with
    fma), so fast hardware sin/cos stay accurate at long-context positions."""
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = tl.fma(turns, -6.2831854820251465, angle)
    r = tl.fma(turns, 1.7484555314695172e-07, r)
    return tl.cos(r), tl.sin(r)


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _load_kv_rows(base, rows, ok, stride, cols, D,
                  FP8: tl.constexpr, NOPE: tl.constexpr, KV_ROPE: tl.constexpr, SBLOCK: tl.constexpr):
    """fp32 tile [len(rows), len(cols)] of cached KV rows (zeros where ``ok`` is false).
    Plain formats: the stored values.  fp8_ds: e4m3 nope bytes times their block's UE8M0 scale,
    RoPE dims from two little-endian bf16 bytes."""
    rp = base + rows.to(tl.int64)[:, None] * stride
    rok = ok[:, None]
    if FP8:
        is_nope = (cols < NOPE)[None, :]
        is_rope = ((cols >= NOPE) & (cols < D))[None, :]
        codes = tl.load(rp + cols[None, :], mask=rok & is_nope, other=0)
        sbyte = tl.load(rp + (NOPE + 2 * KV_ROPE + cols // SBLOCK)[None, :], mask=rok & is_nope, other=127)
        nope = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * _pow2(sbyte.to(tl.int32) - 127)
        rc = NOPE + 2 * tl.maximum(cols - NOPE, 0)
        lo = tl.load(rp + rc[None, :], mask=rok & is_rope, other=0).to(tl.uint32)
        hi = tl.load(rp + rc[None, :] + 1, mask=rok & is_rope, other=0).to(tl.uint32)
        rope = ((hi << 24) | (lo << 16)).to(tl.float32, bitcast=True)
        k = tl.where(is_nope, nope, rope)
    else:
        k = tl.load(rp + cols[None, :], mask=rok & (cols < D)[None, :], other=0.0).to(tl.float32)
    return k


@triton.jit
def _online(q, k, vis, m_i, l_i, acc, scale, DOT_F32: tl.constexpr):
    """One key tile of the online softmax: q [M, BD] (dot dtype), k [N, BD] fp32, vis [M, N]."""
    kd = k.to(q.dtype)
    s = _mm(q, tl.trans(kd), DOT_F32) * scale
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(q.dtype), kd, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _finish(acc, m_i, l_i, hh, row_ok, p_row, o_rows, sink_ptr, inv_freq_ptr, D,
            ROPE_DIM: tl.constexpr, M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sink in the denominator, zeros for padding queries, inverse RoPE at the query position on
    the last ``ROPE_DIM`` dims, store to the row pointers ``o_rows`` [M]."""
    sink = tl.load(sink_ptr + hh, mask=row_ok, other=0.0).to(tl.float32)
    m_f = tl.maximum(m_i, sink)
    corr = tl.exp(m_i - m_f)
    denom = l_i * corr + tl.exp(sink - m_f)
    o = acc * (corr / denom)[:, None]
    o = tl.where((row_ok & (p_row >= 0))[:, None], o, 0.0)
    HALF: tl.constexpr = BLOCK_D // 2
    x_even, x_odd = tl.split(tl.reshape(o, (M, HALF, 2)))
    i = tl.arange(0, HALF)
    if ROPE_DIM > 0:
        pair = i - (D - ROPE_DIM) // 2  # frequency index; < 0 before the RoPE tail
        inv = tl.load(inv_freq_ptr + pair, mask=(pair >= 0) & (pair < ROPE_DIM // 2), other=0.0)
        cos, sin = _cos_sin(tl.maximum(p_row, 0).to(tl.float32)[:, None] * inv[None, :])
        y_even = x_even * cos + x_odd * sin  # rotate by -pos
        y_odd = x_odd * cos - x_even * sin
    else:
        y_even = x_even
        y_odd = x_odd
    dt = o_rows.dtype.element_ty
    smask = row_ok[:, None] & (2 * i < D)[None, :]
    tl.store(o_rows[:, None] + (2 * i)[None, :], _round_to(y_even, dt).to(dt), mask=smask)
    tl.store(o_rows[:, None] + (2 * i + 1)[None, :], _round_to(y_odd, dt).to(dt), mask=smask)


# ---- KV rows -> fp8_ds bytes -----------------------------------------------------------------

@triton.jit
def _kv_quant_kernel(x_ptr, out_ptr, R, D, ROW, s_x, s_o,
                     NOPE: tl.constexpr, KV_ROPE: tl.constexpr, SBLOCK: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rows [R, D] -> [R, ROW] bytes: n e4m3 codes, 2r bf16 bytes, n/SBLOCK UE8M0 bytes, zero pad."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rok = r < R
    r64 = r.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + r64[:, None] * s_x + cols[None, :], mask=rok[:, None] & (cols < D)[None, :],
                other=0.0).to(tl.float32)
    o_rows = out_ptr + r64 * s_o
    NB: tl.constexpr = BLOCK_D // SBLOCK
    nope = tl.where((cols < NOPE)[None, :], x, 0.0)
    blocks = tl.reshape(nope, (BLOCK_R, NB, SBLOCK))
    e = _ue8m0_exponent(tl.max(tl.abs(blocks), axis=2), 0x600000, 8)  # [BLOCK_R, NB]
    y = tl.reshape(blocks * _pow2(-e)[:, :, None], (BLOCK_R, BLOCK_D))  # exact: power-of-two scale
    tl.store(o_rows[:, None] + cols[None, :], _e4m3_byte(y), mask=rok[:, None] & (cols < NOPE)[None, :])
    blk = tl.arange(0, NB)
    tl.store(o_rows[:, None] + (NOPE + 2 * KV_ROPE + blk)[None, :], (e + 127).to(tl.uint8),
             mask=rok[:, None] & (blk < NOPE // SBLOCK)[None, :])
    bits = _rne_bf16(x).to(tl.uint32, bitcast=True) >> 16
    rc = NOPE + 2 * tl.maximum(cols - NOPE, 0)
    rmask = rok[:, None] & ((cols >= NOPE) & (cols < D))[None, :]
    tl.store(o_rows[:, None] + rc[None, :], (bits & 0xFF).to(tl.uint8), mask=rmask)
    tl.store(o_rows[:, None] + rc[None, :] + 1, (bits >> 8).to(tl.uint8), mask=rmask)
    pad0 = NOPE + 2 * KV_ROPE + NOPE // SBLOCK
    pc = pad0 + tl.arange(0, BLOCK_P)
    tl.store(o_rows[:, None] + pc[None, :], tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.uint8),
             mask=rok[:, None] & (pc < ROW)[None, :])


# ---- attention -------------------------------------------------------------------------------

@triton.jit
def _attn_kernel(
    q_ptr, new_ptr, ring_ptr, ring_pos_ptr, sink_ptr, pos_ptr, rows_ptr, idx_ptr, inv_freq_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    T, H, D, W, NC, NIDX, ratio, scale,
    s_qb, s_qt, s_qh, s_nb, s_nt, s_rb, s_rw, s_rpb, s_pb, s_cb, s_cn, s_ib, s_it, s_ob, s_ot, s_oh,
    KIND: tl.constexpr, FP8: tl.constexpr, NOPE: tl.constexpr, KV_ROPE: tl.constexpr, SBLOCK: tl.constexpr,
    ROUND_NEW: tl.constexpr, ROPE_DIM: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """KIND: 0 sliding, 1 hca, 2 csa.  ROUND_NEW: this call's plain rows as the ring's dtype holds
    them (0 no, 1 fp16, 2 bf16).  SPLIT_K > 1: write partials instead of the output."""
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    n_tb = tl.cdiv(T, BLOCK_T)
    b = (pid // n_tb).to(tl.int64)
    t0 = (pid % n_tb) * BLOCK_T
    M: tl.constexpr = BLOCK_T * BLOCK_H
    r = tl.arange(0, M)
    tt = t0 + r // BLOCK_H
    hh = hb * BLOCK_H + r % BLOCK_H
    row_ok = (tt < T) & (hh < H)
    p_row = tl.load(pos_ptr + b * s_pb + tt, mask=tt < T, other=-1).to(tl.int32)
    live = row_ok & (p_row >= 0)
    cols = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * s_qb + tt.to(tl.int64)[:, None] * s_qt + hh[:, None] * s_qh + cols[None, :],
                mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full((M,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((M,), dtype=tl.float32)
    acc = tl.zeros((M, BLOCK_D), dtype=tl.float32)
    n_off = tl.arange(0, BLOCK_N)

    if split == 0:
        # window, part 1: ring rows (only the first W tokens of a call can still see the ring)
        if t0 < W:
            for n0 in range(0, W, BLOCK_N):
                j = n0 + n_off
                kpos = tl.load(ring_pos_ptr + b * s_rpb + j, mask=j < W, other=-1).to(tl.int32)
                k = _load_kv_rows(ring_ptr + b * s_rb, j, kpos >= 0, s_rw, cols, D, FP8, NOPE, KV_ROPE, SBLOCK)
                vis = ((kpos[None, :] >= 0) & (kpos[None, :] <= p_row[:, None])
                       & (kpos[None, :] > p_row[:, None] - W) & live[:, None])
                m_i, l_i, acc = _online(q, k, vis, m_i, l_i, acc, scale, DOT_F32)
        # window, part 2: this call's rows that can be inside some query's window
        j_lo = tl.maximum(t0 - W + 1, 0)
        j_hi = tl.minimum(t0 + BLOCK_T, T)
        for n0 in range(j_lo, j_hi, BLOCK_N):
            j = n0 + n_off
            kpos = tl.load(pos_ptr + b * s_pb + j, mask=j < j_hi, other=-1).to(tl.int32)
            k = _load_kv_rows(new_ptr + b * s_nb, j, kpos >= 0, s_nt, cols, D, FP8, NOPE, KV_ROPE, SBLOCK)
            if ROUND_NEW == 1:
                k = k.to(tl.float16).to(tl.float32)
            if ROUND_NEW == 2:
                k = _rne_bf16(k)
            vis = ((kpos[None, :] >= 0) & (kpos[None, :] <= p_row[:, None])
                   & (kpos[None, :] > p_row[:, None] - W) & live[:, None])
            m_i, l_i, acc = _online(q, k, vis, m_i, l_i, acc, scale, DOT_F32)

    if KIND == 1:  # HCA: every complete compressed row, this split's share of them
        p_max = tl.max(tl.where(row_ok, p_row, -1))
        n_vis = tl.minimum((p_max + 1) // ratio, NC)
        chunk = tl.cdiv(tl.cdiv(n_vis, SPLIT_K), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_vis)
        for n0 in range(lo, hi, BLOCK_N):
            w = n0 + n_off
            ok = w < hi
            k = _load_kv_rows(rows_ptr + b * s_cb, w, ok, s_cn, cols, D, FP8, NOPE, KV_ROPE, SBLOCK)
            vis = ((w[None, :] + 1) * ratio <= p_row[:, None] + 1) & ok[None, :] & live[:, None]
            m_i, l_i, acc = _online(q, k, vis, m_i, l_i, acc, scale, DOT_F32)
    if KIND == 2:  # CSA: the rows the indexer picked for this token (BLOCK_T == 1)
        chunk = tl.cdiv(tl.cdiv(NIDX, SPLIT_K), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, NIDX)
        for n0 in range(lo, hi, BLOCK_N):
            i = n0 + n_off
            sel = tl.load(idx_ptr + b * s_ib + t0.to(tl.int64) * s_it + i, mask=i < hi, other=-1).to(tl.int32)
            ok = (sel >= 0) & (sel < NC)
            k = _load_kv_rows(rows_ptr + b * s_cb, tl.where(ok, sel, 0), ok, s_cn, cols, D,
                              FP8, NOPE, KV_ROPE, SBLOCK)
            vis = ok[None, :] & live[:, None]
            m_i, l_i, acc = _online(q, k, vis, m_i, l_i, acc, scale, DOT_F32)

    if SPLIT_K == 1:
        o_rows = out_ptr + b * s_ob + tt.to(tl.int64) * s_ot + hh * s_oh
        _finish(acc, m_i, l_i, hh, row_ok, p_row, o_rows, sink_ptr, inv_freq_ptr, D, ROPE_DIM, M, BLOCK_D)
    else:  # partials [B*T, SPLIT_K, H] (+ [.., D]) for the combine kernel
        slot = ((b * T + tt) * SPLIT_K + split) * H + hh
        tl.store(part_m_ptr + slot, m_i, mask=row_ok)
        tl.store(part_l_ptr + slot, l_i, mask=row_ok)
        tl.store(part_acc_ptr + slot.to(tl.int64)[:, None] * D + cols[None, :], acc,
                 mask=row_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _attn_combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, sink_ptr, pos_ptr, inv_freq_ptr, out_ptr,
                         T, H, D, s_pb, s_ob, s_ot, s_oh,
                         ROPE_DIM: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Merges the SPLIT_K partial softmax states of one token's block of heads, then the epilogue."""
    bt = tl.program_id(0)
    b = bt // T
    t = bt % T
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = hh < H
    cols = tl.arange(0, BLOCK_D)
    m_i = tl.full((BLOCK_H,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for s in range(SPLIT_K):
        slot = (bt.to(tl.int64) * SPLIT_K + s) * H + hh
        m_s = tl.load(part_m_ptr + slot, mask=row_ok, other=NEG_BIG)
        l_s = tl.load(part_l_ptr + slot, mask=row_ok, other=0.0)
        a_s = tl.load(part_acc_ptr + slot[:, None] * D + cols[None, :], mask=row_ok[:, None] & (cols < D)[None, :],
                      other=0.0)
        m_new = tl.maximum(m_i, m_s)
        c_old = tl.exp(m_i - m_new)
        c_new = tl.exp(m_s - m_new)
        l_i = l_i * c_old + l_s * c_new
        acc = acc * c_old[:, None] + a_s * c_new[:, None]
        m_i = m_new
    p = tl.load(pos_ptr + b.to(tl.int64) * s_pb + t).to(tl.int32)
    p_row = tl.zeros((BLOCK_H,), dtype=tl.int32) + p
    o_rows = out_ptr + b.to(tl.int64) * s_ob + t.to(tl.int64) * s_ot + hh * s_oh
    _finish(acc, m_i, l_i, hh, row_ok, p_row, o_rows, sink_ptr, inv_freq_ptr, D, ROPE_DIM, BLOCK_H, BLOCK_D)


@triton.jit
def _ring_append_kernel(src_ptr, pos_ptr, ring_ptr, ring_pos_ptr, T, W, C,
                        s_sb, s_st, s_pb, s_rb, s_rw, s_rpb,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """ring[b, pos % W] = src[b, j] for each of a batch row's last W valid tokens j (valid tokens
    come first: j is among them iff token j + W is padding or past T)."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    p = tl.load(pos_ptr + b * s_pb + j, mask=j < T, other=-1)
    p_next = tl.load(pos_ptr + b * s_pb + j + W, mask=j + W < T, other=-1)
    write = (p >= 0) & (p_next < 0)
    slot = tl.where(write, p % W, 0)
    cols = tl.arange(0, BLOCK_C)
    m2 = write[:, None] & (cols < C)[None, :]
    v = tl.load(src_ptr + b * s_sb + j.to(tl.int64)[:, None] * s_st + cols[None, :], mask=m2, other=0)
    dt = ring_ptr.dtype.element_ty
    if dt == tl.bfloat16:
        v = _rne_bf16(v.to(tl.float32))
    tl.store(ring_ptr + b * s_rb + slot[:, None] * s_rw + cols[None, :], v.to(dt), mask=m2)
    tl.store(ring_pos_ptr + b * s_rpb + slot, p, mask=write)


# ---- lightning indexer ------------------------------------------------------------------------

@triton.jit
def _index_proj_kernel(x_ptr, w_ptr, out_ptr, pos_ptr, inv_freq_ptr, M, N, K, s_xm, s_wn, s_om, hscale,
                       HEAD: tl.constexpr, ROPE_DIM: tl.constexpr, MXFP4: tl.constexpr, LOG2_HEAD: tl.constexpr,
                       DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] = x[M, K] @ w[N, K].T in x's dtype; ROPE_DIM > 0: interleaved RoPE on the last
    ROPE_DIM of every HEAD-wide group; MXFP4 (BLOCK_N == HEAD): Hadamard + e2m1 round trip."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    act = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + rows[:, None] * s_xm + kk[None, :], mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)
        bt = tl.load(w_ptr + offs_n.to(tl.int64)[None, :] * s_wn + kk[:, None],
                     mask=(kk < K)[:, None] & mask_n[None, :], other=0.0)
        if w_ptr.dtype.element_ty != act:  # ref: w.to(x.dtype), rounding to nearest even
            bt = _round_to(bt.to(tl.float32), act)
        bt = bt.to(act)
        acc += _mm(a, bt, DOT_F32)
    acc = _round_to(acc, act)  # the reference's GEMM output, in the activation dtype
    if ROPE_DIM > 0:
        HALF: tl.constexpr = BLOCK_N // 2
        x_even, x_odd = tl.split(tl.reshape(acc, (BLOCK_M, HALF, 2)))
        d = (tl.program_id(1) * BLOCK_N + 2 * tl.arange(0, HALF)) % HEAD
        pair = (d - (HEAD - ROPE_DIM)) // 2
        inv = tl.load(inv_freq_ptr + tl.maximum(pair, 0), mask=d >= HEAD - ROPE_DIM, other=0.0)
        pos = tl.maximum(tl.load(pos_ptr + rows, mask=mask_m, other=0), 0).to(tl.float32)
        cos, sin = _cos_sin(pos[:, None] * inv[None, :])
        acc = tl.reshape(tl.join(x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), (BLOCK_M, BLOCK_N))
        acc = _round_to(acc, act)
    if MXFP4:
        # Walsh-Hadamard (Sylvester order): H[i, j] = (-1)^popcount(i & j), then / sqrt(HEAD)
        hi = tl.arange(0, BLOCK_N)
        both = hi[:, None] & hi[None, :]
        par = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.int32)
        for bit in tl.static_range(LOG2_HEAD):
            par = par ^ ((both >> bit) & 1)
        hmat = tl.where(par == 0, 1.0, -1.0)
        y = tl.dot(acc, hmat, input_precision="ieee") * hscale
        # e2m1 round trip, UE8M0 scale per 32 values
        NB: tl.constexpr = BLOCK_N // 32
        yb = tl.reshape(y, (BLOCK_M, NB, 32))
        e = _ue8m0_exponent(tl.max(tl.abs(yb), axis=2), 0x400000, 2)
        v = yb * _pow2(-e)[:, :, None]
        a = tl.abs(v)
        code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
                + (a > 5.0).to(tl.int32))
        mag = tl.where(code < 2, code.to(tl.float32) * 0.5, ((2 + (code & 1)) << (code >> 1)).to(tl.float32) * 0.25)
        mag = tl.where(v < 0, -mag, mag) * _pow2(e)[:, :, None]
        acc = _round_to(tl.reshape(mag, (BLOCK_M, BLOCK_N)), act)
    tl.store(out_ptr + rows[:, None] * s_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _load_index_keys(base, rows, ok, stride, cols, DI, KFMT: tl.constexpr):
    """fp32 tile of indexer keys.  KFMT 0: plain; 1: fp8 (DI e4m3 codes + fp32 row scale, LE);
    2: mxfp4 (DI/2 bytes of e2m1 pairs, low nibble first, + DI/32 UE8M0 scales)."""
    rp = base + rows.to(tl.int64) * stride
    m2 = ok[:, None] & (cols < DI)[None, :]
    if KFMT == 0:
        k = tl.load(rp[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    elif KFMT == 1:
        codes = tl.load(rp[:, None] + cols[None, :], mask=m2, other=0)
        sbits = tl.zeros(rows.shape, dtype=tl.uint32)
        for i in tl.static_range(4):
            sbits = sbits | (tl.load(rp + DI + i, mask=ok, other=0).to(tl.uint32) << (8 * i))
        k = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * sbits.to(tl.float32, bitcast=True)[:, None]
    else:
        byte = tl.load(rp[:, None] + (cols // 2)[None, :], mask=m2, other=0).to(tl.int32)
        nib = (byte >> (4 * (cols & 1))[None, :]) & 0xF
        code = nib & 7
        mag = tl.where(code < 2, code.to(tl.float32) * 0.5, ((2 + (code & 1)) << (code >> 1)).to(tl.float32) * 0.25)
        sb = tl.load(rp[:, None] + (DI // 2 + cols // 32)[None, :], mask=m2, other=127).to(tl.int32)
        k = tl.where(nib >= 8, -mag, mag) * _pow2(sb - 127)
    return k


@triton.jit
def _index_scores_kernel(q_ptr, w_ptr, keys_ptr, pos_ptr, out_ptr,
                         T, HI, DI, NC, ratio, score_scale, weight_scale,
                         s_qb, s_qt, s_wb, s_wt, s_kb, s_kn, s_pb, s_ob, s_ot,
                         KFMT: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DI: tl.constexpr):
    """Sortable int64 score keys out[b, t, s] for a block of tokens x a block of keys (entries no
    token of the block can see are skipped; masked ones inside the tile get the -inf key)."""
    pid = tl.program_id(0)
    n_tb = tl.cdiv(T, BLOCK_T)
    b = (pid // n_tb).to(tl.int64)
    t0 = (pid % n_tb) * BLOCK_T
    tt = t0 + tl.arange(0, BLOCK_T)
    p_t = tl.load(pos_ptr + b * s_pb + tt, mask=tt < T, other=-1).to(tl.int32)
    vis_t = tl.maximum(p_t + 1, 0) // ratio
    vis_max = tl.minimum(tl.max(vis_t), NC)
    s0 = tl.program_id(1) * BLOCK_S
    if s0 < vis_max:
        s = s0 + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, BLOCK_DI)
        k = _load_index_keys(keys_ptr + b * s_kb, s, s < vis_max, s_kn, cols, DI, KFMT)
        M: tl.constexpr = BLOCK_T * BLOCK_H
        r = tl.arange(0, M)
        tr = t0 + r // BLOCK_H
        q_rows = q_ptr + b * s_qb + tr.to(tl.int64) * s_qt
        w_rows = w_ptr + b * s_wb + tr.to(tl.int64) * s_wt
        total = tl.zeros((BLOCK_T, BLOCK_S), dtype=tl.float32)
        for h0 in range(0, HI, BLOCK_H):
            hr = h0 + r % BLOCK_H
            ok = (tr < T) & (hr < HI)
            qt = tl.load(q_rows[:, None] + (hr * DI)[:, None] + cols[None, :],
                         mask=ok[:, None] & (cols < DI)[None, :], other=0.0)
            if DOT_F32:
                qt = qt.to(tl.float32)
            wt = tl.load(w_rows + hr, mask=ok, other=0.0).to(tl.float32) * weight_scale
            sc = tl.maximum(_mm(qt, tl.trans(k.to(qt.dtype)), DOT_F32), 0.0) * score_scale * wt[:, None]
            total += tl.sum(tl.reshape(sc, (BLOCK_T, BLOCK_H, BLOCK_S)), axis=1)
        total = total + 0.0  # -0.0 -> +0.0: equal scores get equal keys
        total = tl.where(s[None, :] < vis_t[:, None], total, float("-inf"))
        bits = total.to(tl.int32, bitcast=True)
        skey = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 order == fp32 order
        packed = (skey.to(tl.int64) << 32) | (0x7FFFFFFF - s).to(tl.int64)[None, :]  # ties: lower index first
        tl.store(out_ptr + b * s_ob + tt.to(tl.int64)[:, None] * s_ot + s[None, :], packed,
                 mask=(tt < T)[:, None] & (s < NC)[None, :])


@triton.jit
def _topk_kernel(src_ptr, pos_ptr, out_ptr, T, N, ratio, TOPK, s_sb, s_st, s_pb, s_ob, s_ot,
                 USE_POS: tl.constexpr, FINAL: tl.constexpr, SPLIT: tl.constexpr,
                 KPAD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Top-KPAD packed keys of row (b, t)'s first n entries (n = its visible count with USE_POS),
    this split's share.  FINAL: decode indices (-1 for masked / missing entries) into
    out[b, t, :TOPK]; else: write the KPAD candidates to out[b, t, split*KPAD ...]."""
    b = (tl.program_id(0) // T).to(tl.int64)
    t = (tl.program_id(0) % T).to(tl.int64)
    sp = tl.program_id(1)
    n = N
    if USE_POS:
        p = tl.load(pos_ptr + b * s_pb + t).to(tl.int32)
        n = tl.minimum(tl.maximum(p + 1, 0) // ratio, N)
    chunk = tl.cdiv(tl.cdiv(n, SPLIT), BLOCK_S) * BLOCK_S
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)
    buf = tl.full((KPAD,), INT64_MIN, dtype=tl.int64)  # sorted descending
    o = tl.arange(0, BLOCK_S)
    for s0 in range(lo, hi, BLOCK_S):
        tile = tl.load(src_ptr + b * s_sb + t * s_st + s0 + o, mask=s0 + o < hi, other=INT64_MIN)
        if tl.max(tile) > tl.min(buf):
            asc = tl.sort(tile)
            top = tl.max(tl.reshape(asc, (BLOCK_S // KPAD, KPAD)), axis=0)  # the tile's top KPAD, ascending
            buf = tl.sort(tl.maximum(buf, top), descending=True)  # max(desc, asc) = top KPAD of the union
    k = tl.arange(0, KPAD)
    if FINAL:
        idx = tl.where((buf >> 32) > NEG_INF_KEY, 0x7FFFFFFF - (buf & 0xFFFFFFFF), -1)
        tl.store(out_ptr + b * s_ob + t * s_ot + k, idx, mask=k < TOPK)
    else:
        tl.store(out_ptr + b * s_ob + t * s_ot + sp * KPAD + k, buf)


# ---- host side --------------------------------------------------------------------------------

_ATTN_META = {"BLOCK_T": (1, 2, 4, 8), "BLOCK_H": (16, 32, 64), "BLOCK_N": (16, 32, 64, 128),
              "SPLIT_K": (1, 2, 4, 8, 16), "BLOCK_R": (8, 16, 32), "num_warps": (4, 8), "num_stages": (1, 2, 3)}
_ATTN_DEFAULT = {"BLOCK_T": 2, "BLOCK_H": 16, "BLOCK_N": 32, "SPLIT_K": 4, "BLOCK_R": 16, "num_warps": 4,
                 "num_stages": 2}
META = {
    # BLOCK_T: query tokens per program in prefill (CSA uses 1); SPLIT_K: splits of the compressed
    # keys in decode (T == 1; sliding layers and prefill use 1); BLOCK_R: tokens per program of the
    # quantise / ring-append kernels.  BLOCK_H never exceeds the (power-of-two padded) head count.
    "sparse_attention": dict(_ATTN_META),
    "attention": dict(_ATTN_META),
    "window_append": {"BLOCK_R": (8, 16, 32), "num_warps": (1, 2, 4)},
    # BLOCK_M / BLOCK_K: the projections' tiles (the q GEMM's N tile is one head, the weight GEMM's
    # all heads); BLOCK_T x BLOCK_H query rows x BLOCK_S keys per scores program; the top-k tile is
    # TOPK_TILE * next_pow2(topk) keys; TOPK_SPLIT programs per token in decode (T == 1).
    "indexer": {"BLOCK_M": (16, 32, 64), "BLOCK_K": (32, 64, 128), "BLOCK_T": (1, 2, 4, 8),
                "BLOCK_H": (16, 32, 64), "BLOCK_S": (16, 32, 64, 128), "TOPK_TILE": (1, 2, 4),
                "TOPK_SPLIT": (1, 2, 4, 8), "num_warps": (4, 8), "num_stages": (1, 2, 3)},
}
DEFAULT_META = {
    "sparse_attention": dict(_ATTN_DEFAULT),
    "attention": dict(_ATTN_DEFAULT),
    "window_append": {"BLOCK_R": 16, "num_warps": 4},
    "indexer": {"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_T": 2, "BLOCK_H": 32, "BLOCK_S": 64, "TOPK_TILE": 2,
                "TOPK_SPLIT": 4, "num_warps": 4, "num_stages": 2},
}

SMEM_BYTES = 200 * 1024  # under the ~227 KiB a Hopper block may use, with room for the compiler
MAX_ACC_REGS = 128  # fp32 accumulator values per thread before spills get likely
SCORE_SCRATCH_BYTES = 1 << 28  # the indexer's score scratch per launch; longer calls are chunked


def _pow2_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and (v & (v - 1)) == 0


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _dim(shapes, i, j):
    try:
        v = shapes[i][j]
    except (IndexError, TypeError, KeyError):
        return None
    return v if isinstance(v, int) else None


def constraints(op, meta, shapes):
    """Why ``meta`` cannot run ``op`` on ``shapes``, or None.  ``shapes``: the op's input shapes in
    the reference's argument order, or a dict {"inputs": [...], "attrs": {...}, "dtype": ...};
    symbolic (non-int) dims are allowed where they do not matter."""
    if op not in META:
        return f"attention: no kernel for {op}"
    attrs, dtype = {}, None
    if isinstance(shapes, dict):
        attrs, dtype = shapes.get("attrs", {}) or {}, shapes.get("dtype")
        shapes = list(shapes.get("inputs", []))
    shapes = list(shapes or [])
    m = {**DEFAULT_META[op], **(meta or {})}
    for name, v in m.items():
        if name in ("num_warps", "num_stages"):
            if not (isinstance(v, int) and v >= 1):
                return f"{name}={v} must be a positive int"
        elif not _pow2_int(v):
            return f"{name}={v} must be a power of two"
    eb = 4 if str(dtype) in ("f32", "float32", "torch.float32") else 2
    if op == "window_append":
        return None
    warps, stages = m["num_warps"], m["num_stages"]
    if op in ("sparse_attention", "attention"):
        for name in ("BLOCK_H", "BLOCK_N"):
            if m[name] < 16:
                return f"{name}={m[name]}: tl.dot needs at least 16 rows / columns"
        d = _dim(shapes, 0, 3)
        if d is None:
            return None
        if d < 16 or d % 2:
            return f"head dim {d}: needs an even width >= 16"
        bd = _np2(d)
        rows = m["BLOCK_T"] * m["BLOCK_H"]
        regs = rows * bd // (32 * warps)
        if regs > MAX_ACC_REGS:
            return (f"a {rows}x{bd} fp32 accumulator (BLOCK_T*BLOCK_H x head dim) is {regs} registers per thread "
                    f"with {warps} warps (> {MAX_ACC_REGS})")
        smem = stages * m["BLOCK_N"] * bd * eb + rows * bd * eb + rows * m["BLOCK_N"] * eb
        if smem > SMEM_BYTES:
            return (f"{stages} stages of {m['BLOCK_N']}x{bd} key tiles plus the query and probability tiles need "
                    f"{smem // 1024} KiB of shared memory (> {SMEM_BYTES // 1024} KiB)")
        rope = attrs.get("rope_dim")
        if isinstance(rope, int) and not (rope % 2 == 0 and 0 <= rope <= d):
            return f"rope_dim={rope} must be even and at most the head dim {d}"
        return None
    # indexer
    for name in ("BLOCK_M", "BLOCK_K", "BLOCK_S"):
        if m[name] < 16:
            return f"{name}={m[name]}: tl.dot needs at least 16"
    if m["BLOCK_T"] * m["BLOCK_H"] < 16:
        return f"BLOCK_T*BLOCK_H={m['BLOCK_T'] * m['BLOCK_H']}: tl.dot needs at least 16 query rows"
    shape = attrs.get("shape")
    di = shape[-1] if shape and isinstance(shape[-1], int) else None
    if di is None:
        return None
    if not _pow2_int(di) or di < 16:
        return f"indexer head dim {di} must be a power of two >= 16 (one head per GEMM tile, Hadamard size)"
    if attrs.get("key_format") == "mxfp4" and di % 32:
        return f"indexer head dim {di}: MXFP4 needs a multiple of 32"
    regs = m["BLOCK_M"] * di // (32 * warps)
    if regs > MAX_ACC_REGS:
        return f"a {m['BLOCK_M']}x{di} GEMM accumulator is {regs} registers per thread with {warps} warps"
    smem = stages * (m["BLOCK_M"] + di) * m["BLOCK_K"] * eb
    if smem > SMEM_BYTES:
        return f"{stages} stages of the projection tiles need {smem // 1024} KiB of shared memory"
    rows = m["BLOCK_T"] * m["BLOCK_H"]
    if rows * m["BLOCK_S"] // (32 * warps) > MAX_ACC_REGS:
        return f"a {rows}x{m['BLOCK_S']} score tile is too many registers per thread with {warps} warps"
    return None





def _dot_f32(dtype) -> bool:
    """fp32 (ieee) dots for fp32 models, and for bf16 under the interpreter (its bf16 dot is wrong)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _last_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class _KVLayout:
    """How rows of width ``d`` are stored: plain, or fp8_ds (n nope bytes, 2r RoPE bytes, scales)."""

    def __init__(self, d, kv_format, kv_rope_dim):
        self.fp8 = kv_format == "fp8_ds"
        self.rope = int(kv_rope_dim) if self.fp8 else 0
        self.nope = d - self.rope if self.fp8 else 0
        self.sblock = math.gcd(64, self.nope) if self.fp8 else 1
        self.round_new = {"f16": 1, "bf16": 2}.get(kv_format, 0)


def _quantize_kv(kv, lay, row, block_r, warps):
    """This call's rows in the fp8_ds layout [B, T, row] (the scratch the attention reads back)."""
    b, t, d = kv.shape
    out = torch.empty((b, t, row), dtype=torch.uint8, device=kv.device)
    if b * t == 0:
        return out
    x2 = kv.reshape(b * t, d)
    x2 = _last_contiguous(x2)
    bd = _np2(d)
    sblock = min(lay.sblock, bd)  # no nope dims: any block shape works
    pad = row - (lay.nope + 2 * lay.rope + lay.nope // lay.sblock)
    _kv_quant_kernel[(triton.cdiv(b * t, block_r),)](
        x2, out.view(b * t, row), b * t, d, row, x2.stride(0), row,
        NOPE=lay.nope, KV_ROPE=lay.rope, SBLOCK=sblock, BLOCK_R=block_r, BLOCK_D=bd, BLOCK_P=_np2(max(pad, 1)),
        num_warps=warps)
    return out


def _append(src, pos, ring, ring_pos, block_r, warps):
    b, t = pos.shape
    w, c = ring.shape[1], ring.shape[2]
    if b * t == 0:
        return
    assert ring.stride(-1) == 1 and ring_pos.stride(-1) == 1, "window ring buffers must have unit last stride"
    src = _last_contiguous(src)
    _ring_append_kernel[(b, triton.cdiv(t, block_r))](
        src, pos, ring, ring_pos, t, w, c,
        src.stride(0), src.stride(1), pos.stride(0), ring.stride(0), ring.stride(1), ring_pos.stride(0),
        BLOCK_R=block_r, BLOCK_C=_np2(c), num_warps=warps)


def _attend(op, q, kv, ring, ring_pos, sinks, pos, rows, idx, *, kind, window, ratio, scale, kv_format,
            kv_rope_dim, derotate, meta, append):
    meta = {**DEFAULT_META[op], **(meta or {})}
    _check(op, meta, constraints(op, meta, {"inputs": [tuple(q.shape)], "attrs": {"rope_dim": derotate[0]},
                                            "dtype": str(q.dtype)}))
    kind_id = {"sliding": 0, "hca": 1, "csa": 2}[kind]
    b, t, h, d = q.shape
    w = ring.shape[1]
    assert w == window, f"{op}: ring rows {w} vs window {window}"
    lay = _KVLayout(d, kv_format, kv_rope_dim)
    q, pos, sinks = _last_contiguous(q), _last_contiguous(pos), sinks.contiguous()
    assert ring.stride(-1) == 1 and ring_pos.stride(-1) == 1, f"{op}: the ring buffers need unit last stride"
    new = _quantize_kv(kv, lay, ring.shape[2], meta["BLOCK_R"], meta["num_warps"]) if lay.fp8 else kv
    new = _last_contiguous(new)
    out = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)

    if b * t:
        block_h = min(meta["BLOCK_H"], max(16, _np2(h)))
        block_t = 1 if (kind_id == 2 or t == 1) else min(meta["BLOCK_T"], _np2(t))
        split = meta["SPLIT_K"] if (t == 1 and kind_id != 0) else 1
        if rows is None or rows.shape[1] == 0:
            rows_t, nc, s_cb, s_cn = ring, 0, 0, 0
        else:
            rows_t = rows
            assert rows.stride(-1) == 1, f"{op}: compressed rows need unit last stride"
            nc, s_cb, s_cn = rows.shape[1], rows.stride(0), rows.stride(1)
        if idx is None:
            idx_t, nidx, s_ib, s_it = pos, 0, 0, 0
        else:
            idx_t, nidx, s_ib, s_it = _last_contiguous(idx), idx.shape[2], idx.stride(0), idx.stride(1)
        rope_dim, theta, yarn = derotate
        inv = _rope_inv_freq(rope_dim, theta, yarn, q.device) if rope_dim else out
        bd = _np2(d)
        if split > 1:
            part_m = torch.empty((b * t * split * h,), dtype=torch.float32, device=q.device)
            part_l = torch.empty_like(part_m)
            part_acc = torch.empty((b * t * split * h, d), dtype=torch.float32, device=q.device)
        else:
            part_m = part_l = part_acc = out
        grid = (b * triton.cdiv(t, block_t), triton.cdiv(h, block_h), split)
        _attn_kernel[grid](
            q, new, ring, ring_pos, sinks, pos, rows_t, idx_t, inv, out, part_m, part_l, part_acc,
            t, h, d, w, nc, nidx, int(ratio or 1), float(scale),
            q.stride(0), q.stride(1), q.stride(2), new.stride(0), new.stride(1), ring.stride(0), ring.stride(1),
            ring_pos.stride(0), pos.stride(0), s_cb, s_cn, s_ib, s_it, out.stride(0), out.stride(1), out.stride(2),
            KIND=kind_id, FP8=lay.fp8, NOPE=lay.nope, KV_ROPE=lay.rope, SBLOCK=lay.sblock,
            ROUND_NEW=lay.round_new, ROPE_DIM=rope_dim, DOT_F32=_dot_f32(q.dtype),
            BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_N=meta["BLOCK_N"], BLOCK_D=bd, SPLIT_K=split,
            num_warps=meta["num_warps"], num_stages=meta["num_stages"])
        if split > 1:
            _attn_combine_kernel[(b * t, triton.cdiv(h, block_h))](
                part_m, part_l, part_acc, sinks, pos, inv, out, t, h, d, pos.stride(0),
                out.stride(0), out.stride(1), out.stride(2),
                ROPE_DIM=rope_dim, SPLIT_K=split, BLOCK_H=block_h, BLOCK_D=bd, num_warps=meta["num_warps"])
    if append:
        _append(new, pos, ring, ring_pos, meta["BLOCK_R"], meta["num_warps"])
    return out


def sparse_attention(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, scale, rope_dim,
                     theta, yarn=None, ratio=0, kv_format=None, kv_rope_dim=0, meta=None):
    """Attention over window + compressed rows with the sink, output de-rotation and ring append."""
    o = _attend("sparse_attention", q, kv, ring, ring_pos, sinks, pos, rows, idx, kind=kind, window=window,
                ratio=ratio, scale=scale, kv_format=kv_format, kv_rope_dim=kv_rope_dim,
                derotate=(rope_dim, theta, yarn), meta=meta, append=True)
    return o, ring, ring_pos


def attention(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, scale, ratio=0,
              kv_format=None, kv_rope_dim=0, meta=None):
    """The unfused attention op: no de-rotation, the ring left as it is."""
    return _attend("attention", q, kv, ring, ring_pos, sinks, pos, rows, idx, kind=kind, window=window,
                   ratio=ratio, scale=scale, kv_format=kv_format, kv_rope_dim=kv_rope_dim, derotate=(0, 0.0, None),
                   meta=meta, append=False)


def window_append(ring, ring_pos, kv, pos, *, kv_format=None, kv_rope_dim=0, meta=None):
    meta = {**DEFAULT_META["window_append"], **(meta or {})}
    _check("window_append", meta, constraints("window_append", meta, []))
    lay = _KVLayout(kv.shape[2], kv_format, kv_rope_dim)
    src = _quantize_kv(kv, lay, ring.shape[2], meta["BLOCK_R"], meta["num_warps"]) if lay.fp8 else kv
    _append(src, pos, ring, ring_pos, meta["BLOCK_R"], meta["num_warps"])
    return ring, ring_pos


def _index_proj(x2, w, out2, pos1, inv, *, head, rope_dim, mxfp4, dot_f32, meta, block_n):
    m_rows, k = x2.shape
    n = w.shape[0]
    grid = (triton.cdiv(m_rows, meta["BLOCK_M"]), triton.cdiv(n, block_n))
    _index_proj_kernel[grid](
        x2, w, out2, pos1, inv, m_rows, n, k, x2.stride(0), w.stride(0), out2.stride(0), float(head) ** -0.5,
        HEAD=head, ROPE_DIM=rope_dim, MXFP4=mxfp4, LOG2_HEAD=max(head.bit_length() - 1, 0), DOT_F32=dot_f32,
        BLOCK_M=meta["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=meta["BLOCK_K"],
        num_warps=meta["num_warps"], num_stages=meta["num_stages"])


def indexer(cq, h, wq, ww, keys, pos, *, shape, rope_dim, theta, topk, ratio, score_scale, weight_scale, yarn=None,
            key_format=None, meta=None):
    """Lightning indexer: top-k compressed rows per token ([B, T, topk] int64, -1 padded)."""
    meta = {**DEFAULT_META["indexer"], **(meta or {})}
    _check("indexer", meta, constraints("indexer", meta, {"inputs": [tuple(cq.shape)], "dtype": str(cq.dtype),
                                                          "attrs": {"shape": list(shape), "key_format": key_format}}))
    b, t = pos.shape
    hi, di = int(shape[-2]), int(shape[-1])
    nc = keys.shape[1]
    out = torch.full((b, t, topk), -1, dtype=torch.int64, device=cq.device)
    if b * t == 0 or nc == 0:
        return out
    kfmt = {"fp8": 1, "mxfp4": 2}.get(key_format, 0)
    dot_f32 = _dot_f32(cq.dtype) or (kfmt == 0 and keys.dtype == torch.float32)
    pos = _last_contiguous(pos)
    pos1 = pos.reshape(-1)
    # 1. queries: GEMM + RoPE (+ Hadamard / FP4 round trip) in the epilogue, one head per N tile
    x2 = _last_contiguous(cq.reshape(b * t, cq.shape[-1]))
    q2 = torch.empty((b * t, hi * di), dtype=cq.dtype, device=cq.device)
    inv = _rope_inv_freq(rope_dim, theta, yarn, cq.device) if rope_dim else q2
    _index_proj(x2, _last_contiguous(wq), q2, pos1, inv, head=di, rope_dim=rope_dim, mxfp4=kfmt == 2,
                dot_f32=dot_f32, meta=meta, block_n=di)
    # 2. head weights
    h2 = _last_contiguous(h.reshape(b * t, h.shape[-1]))
    w2 = torch.empty((b * t, hi), dtype=h.dtype, device=h.device)
    _index_proj(h2, _last_contiguous(ww), w2, pos1, w2, head=hi, rope_dim=0, mxfp4=False,
                dot_f32=_dot_f32(h.dtype), meta=meta, block_n=max(16, _np2(hi)))
    # 3 + 4. scores as sortable keys, then top-k, over (batch, token) chunks whose score scratch
    # [Bc, Tc, NC] stays under SCORE_SCRATCH_BYTES (NC is the cache's capacity, not the context)
    keys = _last_contiguous(keys)
    q3, w3 = q2.view(b, t, hi * di), w2.view(b, t, hi)
    rows = max(1, SCORE_SCRATCH_BYTES // (8 * nc))
    t_step = min(t, rows)
    b_step = max(1, rows // t) if t_step == t else 1
    b_step = min(b, b_step)
    scratch = torch.empty((b_step, t_step, nc), dtype=torch.int64, device=cq.device)
    for b0 in range(0, b, b_step):
        for t0 in range(0, t, t_step):
            bc, tc = min(b_step, b - b0), min(t_step, t - t0)
            _index_scores_topk(q3[b0:b0 + bc, t0:t0 + tc], w3[b0:b0 + bc, t0:t0 + tc], keys[b0:b0 + bc],
                               pos[b0:b0 + bc, t0:t0 + tc], scratch[:bc, :tc], out[b0:b0 + bc, t0:t0 + tc],
                               hi=hi, di=di, kfmt=kfmt, dot_f32=dot_f32, topk=topk, ratio=int(ratio),
                               score_scale=float(score_scale), weight_scale=float(weight_scale), meta=meta,
                               decode=t == 1)
    return out


def _index_scores_topk(q3, w3, keys, pos, scores, out, *, hi, di, kfmt, dot_f32, topk, ratio, score_scale,
                       weight_scale, meta, decode):
    """Scores then top-k for one chunk: q3 [Bc, Tc, HI*DI], w3 [Bc, Tc, HI], scores [Bc, Tc, NC] scratch,
    out [Bc, Tc, topk] (views of the whole call's tensors)."""
    b, t, nc = scores.shape
    block_t = min(meta["BLOCK_T"], _np2(t))
    block_h = min(meta["BLOCK_H"], max(16 // block_t, _np2(hi)))
    _index_scores_kernel[(b * triton.cdiv(t, block_t), triton.cdiv(nc, meta["BLOCK_S"]))](
        q3, w3, keys, pos, scores, t, hi, di, nc, ratio, score_scale, weight_scale,
        q3.stride(0), q3.stride(1), w3.stride(0), w3.stride(1), keys.stride(0), keys.stride(1), pos.stride(0),
        scores.stride(0), scores.stride(1),
        KFMT=kfmt, DOT_F32=dot_f32, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_S=meta["BLOCK_S"], BLOCK_DI=_np2(di),
        num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    # one streaming program per token, or (decode) TOPK_SPLIT of them + a merge of their candidates
    kpad = max(2, _np2(topk))
    block_s = kpad * meta["TOPK_TILE"]
    split = meta["TOPK_SPLIT"] if decode else 1
    split = max(1, min(split, triton.cdiv(nc, block_s)))
    warps = meta["num_warps"]
    if split == 1:
        _topk_kernel[(b * t, 1)](scores, pos, out, t, nc, ratio, topk, scores.stride(0), scores.stride(1),
                                 pos.stride(0), out.stride(0), out.stride(1),
                                 USE_POS=True, FINAL=True, SPLIT=1, KPAD=kpad, BLOCK_S=block_s, num_warps=warps)
    else:
        cand = torch.empty((b, t, split * kpad), dtype=torch.int64, device=scores.device)
        _topk_kernel[(b * t, split)](scores, pos, cand, t, nc, ratio, topk, scores.stride(0), scores.stride(1),
                                     pos.stride(0), cand.stride(0), cand.stride(1),
                                     USE_POS=True, FINAL=False, SPLIT=split, KPAD=kpad, BLOCK_S=block_s,
                                     num_warps=warps)
        _topk_kernel[(b * t, 1)](cand, pos, out, t, split * kpad, ratio, topk, cand.stride(0), cand.stride(1),
                                 pos.stride(0), out.stride(0), out.stride(1),
                                 USE_POS=False, FINAL=True, SPLIT=1, KPAD=kpad, BLOCK_S=kpad, num_warps=warps)


KERNELS = {"sparse_attention": sparse_attention, "attention": attention, "window_append": window_append,
           "indexer": indexer}
