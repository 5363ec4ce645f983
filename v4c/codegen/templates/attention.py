"""Hybrid attention kernels: sparse attention over the window ring + compressed rows (with the
sink, the output de-rotation and the ring append).  The lightning indexer that picks the CSA rows
is its own family (``indexer.py``).

Ops:
  * ``sparse_attention`` (fused): quantise this call's KV rows (``fp8_ds`` caches only), attend,
    [combine the split-K partials], append the window ring.  Launch order matters: the attention
    reads the ring *before* the append overwrites slots a query may still need.
  * ``attention`` / ``window_append``: the same kernels, for graphs that were not fused.

Kernels (one ``@triton.jit`` kernel per job, small ``@triton.jit`` helpers shared; those the
indexer family also needs live in ``prelude.py``):
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
    Register layout (head dim 512, MQA, K = V): the head dim is split into NCH chunks of DC dims,
    one chunk a warp (``_head_chunks``), and every product is a 3-D ``tl.dot`` batched over the
    chunks: scores are the sum over chunks of key-chunk x query-chunk products, the PV product
    updates each chunk of the accumulator.  So a thread holds 1/num_warps of the query, the
    accumulator and the decoded key tile, never a whole 512-wide row (a 2-D dot over the full
    head dim gives every warp a 16 x 512 query fragment, 128 registers a thread, and spilled).
    Cached rows are decoded inside the loads: fp8_ds e4m3 bytes times ``2**(byte-127)`` (sm89+
    convert them in hardware; sm80 / sm86 have no fp8 type and decode through an fp16 with
    integer ops, exactly), RoPE dims read as bf16 words.  KV strides reach the kernel in units
    of their power-of-two alignment so the byte loads vectorise; every batch / row offset is
    int64 (a batch row of the CSA cache is L/4 x 584 bytes: 153 MB at 1M tokens).
    Decode (T == 1) splits the compressed keys over ``SPLIT_K`` programs (at most; fewer when
    the batch gives enough programs); split 0 also takes the window.  Their partial (max, sum,
    acc) go to fp32 scratch and ``_attn_combine_kernel`` merges them, a block of heads by a
    chunk of head dims a program, and runs the same epilogue.  Prefill (T > 1) uses
    ``BLOCK_T`` query tokens per program (CSA: 1, its key sets are per token) and no split.
  * ``_ring_append_kernel``: writes each batch row's last W valid tokens to slot ``pos % W``
    (token j is one of them iff token j+W is padding or beyond T), casting to the ring dtype.

Host glue: output / scratch allocation, grids, and the RoPE inverse-frequency table (a few scalars
per (rope_dim, theta, yarn), computed as the reference does and cached).  No host synchronisation:
nothing reads device values back.

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

import torch
import triton
import triton.language as tl

from .prelude import _capability, _check, _constraint_args, _cos_sin, _dot_f32, _e4m3_byte, _e4m3_f16, _e4m3_nan, _last_contiguous, _mm, _np2, _pow2, _rne_bf16, _rope_inv_freq, _round_to, _ue8m0_exponent  # v4c: inline prelude

NEG_BIG = tl.constexpr(-1.0e30)  # running max before any key: finite, so exp(m_old - m_new) is never nan


# ---- shared helpers ------------------------------------------------------------------------

@triton.jit
def _kv_tile(base, rows, ok, stride, D,
             FP8: tl.constexpr, NOPE: tl.constexpr, KV_ROPE: tl.constexpr, SBLOCK: tl.constexpr,
             NATIVE_FP8: tl.constexpr, ROW_ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, NCH: tl.constexpr,
             DC: tl.constexpr, SB: tl.constexpr):
    """fp32 tile [NCH, BLOCK_N, DC] of cached KV rows: element (c, n, d) is dim ``c*DC + d`` of row
    ``rows[n]`` (zeros where ``ok`` is false or past ``D``).  ``stride`` is in units of ROW_ALIGN
    elements, so the compiler knows rows are ROW_ALIGN-aligned and can load them in vectors.
    fp8_ds: e4m3 nope bytes times their block's UE8M0 scale (decoded in hardware where the target has
    fp8, else with integer ops), RoPE dims as bf16 read in 16-bit words.  The fp8 view is 4-D
    [NCH, N, DC // SB, SB] so each sub-block of SB dims loads its scale byte once."""
    rp = base + rows.to(tl.int64) * stride * ROW_ALIGN
    if FP8:
        NSB: tl.constexpr = DC // SB
        blk = (tl.arange(0, NCH)[:, None, None, None] * DC
               + tl.arange(0, NSB)[None, None, :, None] * SB)  # first dim of each sub-block
        col = blk + tl.arange(0, SB)[None, None, None, :]  # [NCH, 1, NSB, SB]
        r4 = rp[None, :, None, None]
        ok4 = ok[None, :, None, None]
        is_nope = col < NOPE
        codes = tl.load(r4 + col, mask=ok4 & is_nope, other=0)
        sbyte = tl.load(r4 + (NOPE + 2 * KV_ROPE) + blk // SBLOCK, mask=ok4 & (blk < NOPE), other=127)
        if NATIVE_FP8:
            v = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:  # sm80/sm86 have no fp8 type
            v = _e4m3_nan(codes, _e4m3_f16(codes).to(tl.float32) * 256.0)
        nope = v * _pow2(sbyte.to(tl.int32) - 127)
        # RoPE dims start at NOPE (even) of an even-strided row: 2-byte aligned words
        r16 = (r4 + NOPE).to(tl.pointer_type(tl.uint16))
        bits = tl.load(r16 + (col - NOPE), mask=ok4 & (col >= NOPE) & (col < D), other=0)
        rope = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        k = tl.reshape(tl.where(is_nope, nope, rope), (NCH, BLOCK_N, DC))
    else:
        col = tl.arange(0, NCH)[:, None, None] * DC + tl.arange(0, DC)[None, None, :]
        k = tl.load(rp[None, :, None] + col, mask=ok[None, :, None] & (col < D), other=0.0).to(tl.float32)
    return k


@triton.jit
def _online(qt, k, vis_t, m_i, l_i, acc, scale, DOT_F32: tl.constexpr):
    """One key tile of the online softmax.  qt [NCH, DC, M] (the query, transposed, in the dot dtype),
    k [NCH, N, DC] fp32, vis_t [N, M], acc [NCH, M, DC].  The head dim is split into NCH chunks that
    are the batch of 3-D dots: Triton gives each warp its own chunks, so no warp holds a whole
    512-wide query or key row (a 2-D dot over the full head dim keeps a 16 x 512 query fragment per
    warp, 128 registers a thread); the scores are the sum over chunks, and p is shared by every chunk
    of the PV product.  Scores are computed transposed (keys x queries) so that both products read
    the key tile untransposed, from one copy in shared memory."""
    kd = k.to(qt.dtype)
    s = tl.sum(_mm(kd, qt, DOT_F32), axis=0) * scale  # [N, M]
    s = tl.where(vis_t, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[None, :])
    l_i = l_i * alpha + tl.sum(p, 0)
    pt = tl.trans(p.to(qt.dtype))  # [M, N]
    pb = tl.broadcast_to(pt[None, :, :], (kd.shape[0], pt.shape[0], pt.shape[1]))
    acc = acc * alpha[None, :, None] + _mm(pb, kd, DOT_F32)
    return m_new, l_i, acc


@triton.jit
def _finish(acc, m_i, l_i, hh, row_ok, p_row, o_rows, sink_ptr, inv_freq_ptr, D, c0,
            ROPE_DIM: tl.constexpr):
    """Sink in the denominator, zeros for padding queries, inverse RoPE at the query position on
    the last ``ROPE_DIM`` dims, store to the row pointers ``o_rows`` [M].  ``acc`` [NCH, M, DC]
    holds dims ``c0 + c*DC + d``."""
    NCH: tl.constexpr = acc.shape[0]
    M: tl.constexpr = acc.shape[1]
    DC: tl.constexpr = acc.shape[2]
    HALF: tl.constexpr = DC // 2
    sink = tl.load(sink_ptr + hh, mask=row_ok, other=0.0).to(tl.float32)
    m_f = tl.maximum(m_i, sink)
    corr = tl.exp(m_i - m_f)
    denom = l_i * corr + tl.exp(sink - m_f)
    o = acc * (corr / denom)[None, :, None]
    o = tl.where((row_ok & (p_row >= 0))[None, :, None], o, 0.0)
    x_even, x_odd = tl.split(tl.reshape(o, (NCH, M, HALF, 2)))
    col = c0 + tl.arange(0, NCH)[:, None, None] * DC + 2 * tl.arange(0, HALF)[None, None, :]  # even dim of a pair
    if ROPE_DIM > 0:
        pair = col // 2 - (D - ROPE_DIM) // 2  # frequency index; < 0 before the RoPE tail
        inv = tl.load(inv_freq_ptr + pair, mask=(pair >= 0) & (pair < ROPE_DIM // 2), other=0.0)
        cos, sin = _cos_sin(tl.maximum(p_row, 0).to(tl.float32)[None, :, None] * inv)
        y_even = x_even * cos + x_odd * sin  # rotate by -pos
        y_odd = x_odd * cos - x_even * sin
    else:
        y_even = x_even
        y_odd = x_odd
    dt = o_rows.dtype.element_ty
    smask = row_ok[None, :, None] & (col < D)
    tl.store(o_rows[None, :, None] + col, _round_to(y_even, dt).to(dt), mask=smask)
    tl.store(o_rows[None, :, None] + col + 1, _round_to(y_odd, dt).to(dt), mask=smask)


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
    NATIVE_FP8: tl.constexpr, ROW_ALIGN: tl.constexpr, ROUND_NEW: tl.constexpr, ROPE_DIM: tl.constexpr,
    DOT_F32: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    NCH: tl.constexpr, DC: tl.constexpr, SB: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """KIND: 0 sliding, 1 hca, 2 csa.  ROUND_NEW: this call's plain rows as the ring's dtype holds
    them (0 no, 1 fp16, 2 bf16).  SPLIT_K > 1: write partials instead of the output.  The KV strides
    (s_nb, s_nt, s_rb, s_rw, s_cb, s_cn) are in units of ROW_ALIGN elements; the head dim is NCH
    chunks of DC."""
    pid = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    n_tb = tl.cdiv(T, BLOCK_T)
    b = (pid // n_tb).to(tl.int64)  # every batch offset below is int64: b * (L/4 rows * 584 B) > 2**31
    t0 = (pid % n_tb) * BLOCK_T
    M: tl.constexpr = BLOCK_T * BLOCK_H
    r = tl.arange(0, M)
    tt = t0 + r // BLOCK_H
    hh = hb * BLOCK_H + r % BLOCK_H
    row_ok = (tt < T) & (hh < H)
    p_row = tl.load(pos_ptr + b * s_pb + tt, mask=tt < T, other=-1).to(tl.int32)
    live = row_ok & (p_row >= 0)
    c3 = tl.arange(0, NCH)[:, None, None] * DC + tl.arange(0, DC)[None, None, :]  # [NCH, 1, DC] head dims
    q_rows = b * s_qb + tt.to(tl.int64) * s_qt + hh * s_qh
    q = tl.load(q_ptr + q_rows[None, :, None] + c3, mask=row_ok[None, :, None] & (c3 < D), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    qt = tl.permute(q, (0, 2, 1))  # [NCH, DC, M]

    m_i = tl.full((M,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((M,), dtype=tl.float32)
    acc = tl.zeros((NCH, M, DC), dtype=tl.float32)
    n_off = tl.arange(0, BLOCK_N)

    if split == 0:
        # window, part 1: ring rows (only the first W tokens of a call can still see the ring)
        if t0 < W:
            for n0 in range(0, W, BLOCK_N):
                j = n0 + n_off
                kpos = tl.load(ring_pos_ptr + b * s_rpb + j, mask=j < W, other=-1).to(tl.int32)
                k = _kv_tile(ring_ptr + b * s_rb * ROW_ALIGN, j, kpos >= 0, s_rw, D, FP8, NOPE, KV_ROPE, SBLOCK,
                             NATIVE_FP8, ROW_ALIGN, BLOCK_N, NCH, DC, SB)
                vis = ((kpos[:, None] >= 0) & (kpos[:, None] <= p_row[None, :])
                       & (kpos[:, None] > p_row[None, :] - W) & live[None, :])
                m_i, l_i, acc = _online(qt, k, vis, m_i, l_i, acc, scale, DOT_F32)
        # window, part 2: this call's rows that can be inside some query's window
        j_lo = tl.maximum(t0 - W + 1, 0)
        j_hi = tl.minimum(t0 + BLOCK_T, T)
        for n0 in range(j_lo, j_hi, BLOCK_N):
            j = n0 + n_off
            kpos = tl.load(pos_ptr + b * s_pb + j, mask=j < j_hi, other=-1).to(tl.int32)
            k = _kv_tile(new_ptr + b * s_nb * ROW_ALIGN, j, kpos >= 0, s_nt, D, FP8, NOPE, KV_ROPE, SBLOCK,
                         NATIVE_FP8, ROW_ALIGN, BLOCK_N, NCH, DC, SB)
            if ROUND_NEW == 1:
                k = k.to(tl.float16).to(tl.float32)
            if ROUND_NEW == 2:
                k = _rne_bf16(k)
            vis = ((kpos[:, None] >= 0) & (kpos[:, None] <= p_row[None, :])
                   & (kpos[:, None] > p_row[None, :] - W) & live[None, :])
            m_i, l_i, acc = _online(qt, k, vis, m_i, l_i, acc, scale, DOT_F32)

    if KIND == 1:  # HCA: every complete compressed row, this split's share of them
        p_max = tl.max(tl.where(row_ok, p_row, -1))
        n_vis = tl.minimum((p_max + 1) // ratio, NC)
        chunk = tl.cdiv(tl.cdiv(n_vis, SPLIT_K), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_vis)
        for n0 in range(lo, hi, BLOCK_N):
            w = n0 + n_off
            ok = w < hi
            k = _kv_tile(rows_ptr + b * s_cb * ROW_ALIGN, w, ok, s_cn, D, FP8, NOPE, KV_ROPE, SBLOCK,
                         NATIVE_FP8, ROW_ALIGN, BLOCK_N, NCH, DC, SB)
            vis = ((w[:, None] + 1) * ratio <= p_row[None, :] + 1) & ok[:, None] & live[None, :]
            m_i, l_i, acc = _online(qt, k, vis, m_i, l_i, acc, scale, DOT_F32)
    if KIND == 2:  # CSA: the rows the indexer picked for this token (BLOCK_T == 1)
        chunk = tl.cdiv(tl.cdiv(NIDX, SPLIT_K), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, NIDX)
        for n0 in range(lo, hi, BLOCK_N):
            i = n0 + n_off
            sel = tl.load(idx_ptr + b * s_ib + t0.to(tl.int64) * s_it + i, mask=i < hi, other=-1).to(tl.int32)
            ok = (sel >= 0) & (sel < NC)
            k = _kv_tile(rows_ptr + b * s_cb * ROW_ALIGN, tl.where(ok, sel, 0), ok, s_cn, D, FP8, NOPE, KV_ROPE,
                         SBLOCK, NATIVE_FP8, ROW_ALIGN, BLOCK_N, NCH, DC, SB)
            vis = ok[:, None] & live[None, :]
            m_i, l_i, acc = _online(qt, k, vis, m_i, l_i, acc, scale, DOT_F32)

    if SPLIT_K == 1:
        o_rows = out_ptr + b * s_ob + tt.to(tl.int64) * s_ot + hh * s_oh
        _finish(acc, m_i, l_i, hh, row_ok, p_row, o_rows, sink_ptr, inv_freq_ptr, D, 0, ROPE_DIM)
    else:  # partials [B*T, SPLIT_K, H] (+ [.., D]) for the combine kernel
        slot = ((b * T + tt) * SPLIT_K + split) * H + hh
        tl.store(part_m_ptr + slot, m_i, mask=row_ok)
        tl.store(part_l_ptr + slot, l_i, mask=row_ok)
        tl.store(part_acc_ptr + slot[None, :, None] * D + c3, acc, mask=row_ok[None, :, None] & (c3 < D))


@triton.jit
def _attn_combine_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, sink_ptr, pos_ptr, inv_freq_ptr, out_ptr,
                         T, H, D, s_pb, s_ob, s_ot, s_oh,
                         ROPE_DIM: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr, DC: tl.constexpr):
    """Merges the SPLIT_K partial softmax states of one token's block of heads, for DC of the head
    dims (a grid axis, so the accumulator stays small whatever the head dim), then the epilogue."""
    bt = tl.program_id(0)
    b = bt // T
    t = bt % T
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c0 = tl.program_id(2) * DC
    row_ok = hh < H
    col = c0 + tl.arange(0, DC)[None, None, :]
    m_i = tl.full((BLOCK_H,), NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((1, BLOCK_H, DC), dtype=tl.float32)
    for s in range(SPLIT_K):
        slot = (bt.to(tl.int64) * SPLIT_K + s) * H + hh
        m_s = tl.load(part_m_ptr + slot, mask=row_ok, other=NEG_BIG)
        l_s = tl.load(part_l_ptr + slot, mask=row_ok, other=0.0)
        a_s = tl.load(part_acc_ptr + slot[None, :, None] * D + col, mask=row_ok[None, :, None] & (col < D),
                      other=0.0)
        m_new = tl.maximum(m_i, m_s)
        c_old = tl.exp(m_i - m_new)
        c_new = tl.exp(m_s - m_new)
        l_i = l_i * c_old + l_s * c_new
        acc = acc * c_old[None, :, None] + a_s * c_new[None, :, None]
        m_i = m_new
    p = tl.load(pos_ptr + b.to(tl.int64) * s_pb + t).to(tl.int32)
    p_row = tl.zeros((BLOCK_H,), dtype=tl.int32) + p
    o_rows = out_ptr + b.to(tl.int64) * s_ob + t.to(tl.int64) * s_ot + hh * s_oh
    _finish(acc, m_i, l_i, hh, row_ok, p_row, o_rows, sink_ptr, inv_freq_ptr, D, c0, ROPE_DIM)


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


# ---- host side --------------------------------------------------------------------------------

# Values in the order to prefer them: the cost model cannot tell most of these apart, and ties keep
# grid order (bigger tiles first; the launcher caps SPLIT_K where the batch fills the GPU anyway).
_ATTN_META = {"SPLIT_K": (16, 8, 4, 2, 1), "BLOCK_R": (16, 8), "BLOCK_T": (2, 1), "BLOCK_H": (32, 16),
              "BLOCK_N": (64, 32, 16), "num_warps": (8, 4), "num_stages": (2, 1)}
_ATTN_DEFAULT = {"SPLIT_K": 16, "BLOCK_R": 16, "BLOCK_T": 1, "BLOCK_H": 16, "BLOCK_N": 32, "num_warps": 8,
                 "num_stages": 1}
META = {
    # BLOCK_T: query tokens per program in prefill (CSA uses 1); SPLIT_K: splits of the compressed
    # keys in decode (T == 1; sliding layers and prefill use 1), at most: fewer where the batch already
    # gives enough programs; BLOCK_R: tokens per program of the quantise / ring-append kernels.
    # BLOCK_H never exceeds the (power-of-two padded) head count.  Bigger tiles than these never fit
    # a 512-wide head (see ``constraints``); smaller head dims do not need them.
    "sparse_attention": dict(_ATTN_META),
    "attention": dict(_ATTN_META),
    "window_append": {"BLOCK_R": (8, 16, 32), "num_warps": (1, 2, 4)},
}
DEFAULT_META = {
    "sparse_attention": dict(_ATTN_DEFAULT),
    "attention": dict(_ATTN_DEFAULT),
    "window_append": {"BLOCK_R": 16, "num_warps": 4},
}

# What one _attn_kernel program may use.  The register rule is fitted to what ptxas reports for the
# V4 shapes (head dim 512, bf16 and fp32; sliding / HCA / CSA, decode and prefill) on sm80, sm90 and
# sm100, with a margin: the same config takes up to ~20% more registers on one target than another
# (sm80's integer fp8 decode, usually), prefill a few more than decode, and a kernel over 255 spills.
# The configs it keeps came out at <= 210 registers everywhere; see test_resource_model_against_ptxas.
ATTN_REG_BUDGET = 232
ATTN_SMEM_BUDGET = 162 * 1024  # sm80 gives a block 163 KiB (sm90 / sm100 227 KiB), less 1 KiB the estimate leaves out
QUANT_ROW_VALUES = 64  # fp32 row values a thread of the quantise kernel holds (a 16 x 512 tile at 4 warps)
SPLIT_PROGRAMS = 256  # decode splits the keys only while batch x head blocks x splits stays under this
# Every launch passes maxnreg: left to itself, ptxas sometimes squeezes a kernel into fewer registers
# (128 for _attn_kernel: two blocks an SM) and spills a little rather than use the 255 a thread may have.
ATTN_MAXNREG = 255


def _attn_resources(rows, block_n, bd, warps, stages, eb):
    """(registers a thread, shared bytes) _attn_kernel needs for ``rows`` query rows, BLOCK_N keys, a
    padded head dim ``bd`` and ``eb``-byte dot operands.  Each warp owns chunks of the head dim (see
    ``_head_chunks``): per thread the fp32 accumulator is acc = rows x head dims / threads (the query
    fragment and the epilogue temporaries grow with it, hence its weight 2), and a tile decodes
    tile = BLOCK_N x head dims / threads values, held as loaded bytes, fp32 and dot operands (weight
    1.3).  Software pipelining (num_stages > 1) keeps the next tile's bytes in flight: more registers
    and a staging copy in shared memory (fp8_ds: 1 code byte + 2 RoPE-word bytes a value).  Shared
    memory also holds the query once and the key tile twice (Triton swizzles it differently for the
    score and the PV product)."""
    nch, dc = _head_chunks(bd, warps)
    per_warp = max(1, nch // warps)  # chunks a warp owns; warps beyond NCH repeat a chunk
    acc = rows * dc * per_warp / 32
    tile = block_n * dc * per_warp / 32 * (2.5 if eb > 2 else 1.0)  # fp32 "ieee" dots run on FMAs, in registers
    regs = 40 + 2 * acc + 1.3 * tile
    if stages > 1:
        regs += 0.9 * tile + 25
    smem = (2 * block_n + rows) * bd * eb + (stages - 1) * block_n * bd * max(3, eb) + 2048
    return int(regs), int(smem)


def _effective(m, shapes, attrs):
    """(query rows, BLOCK_N) a launch of meta ``m`` really uses at these shapes (the launcher caps
    BLOCK_H at the padded head count and uses one token a program in decode and CSA); unknown dims
    count as the largest case."""
    t, h = _dim(shapes, 0, 1), _dim(shapes, 0, 2)
    block_h = min(m["BLOCK_H"], max(16, _np2(h))) if h else m["BLOCK_H"]
    kind = attrs.get("kind")
    block_t = 1 if (kind == "csa" or t == 1) else min(m["BLOCK_T"], _np2(t) if t else m["BLOCK_T"])
    return block_t * block_h, m["BLOCK_N"]


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
    parsed = _constraint_args("attention", op, meta, shapes, META, DEFAULT_META)
    if isinstance(parsed, str):
        return parsed
    m, shapes, attrs, eb = parsed
    warps, stages = m["num_warps"], m.get("num_stages", 1)
    kv_d = _dim(shapes, 2 if op == "window_append" else 1, 2)  # the new KV rows [B, T, D]
    if kv_d is not None and _np2(kv_d) * m["BLOCK_R"] > QUANT_ROW_VALUES * 32 * warps:
        return (f"BLOCK_R={m['BLOCK_R']} rows of {_np2(kv_d)} values are "
                f"{_np2(kv_d) * m['BLOCK_R'] // (32 * warps)} a thread with {warps} warps in the quantise kernel "
                f"(> {QUANT_ROW_VALUES})")
    if op == "window_append":
        return None
    for name in ("BLOCK_H", "BLOCK_N"):
        if m[name] < 16:
            return f"{name}={m[name]}: tl.dot needs at least 16 rows / columns"
    d = _dim(shapes, 0, 3)
    if d is None:
        return None
    if d < 16 or d % 2:
        return f"head dim {d}: needs an even width >= 16"
    bd = _np2(d)
    rows, block_n = _effective(m, shapes, attrs)
    regs, smem = _attn_resources(rows, block_n, bd, warps, stages, eb)
    if regs > ATTN_REG_BUDGET:
        nch, dc = _head_chunks(bd, warps)
        return (f"{rows} query rows x {block_n} keys over a {bd}-wide head ({nch} chunks of {dc} on {warps} warps, "
                f"{stages} stage(s)) need ~{regs} registers per thread (> {ATTN_REG_BUDGET}; the accumulator alone "
                f"is {rows * bd // (32 * warps)})")
    if smem > ATTN_SMEM_BUDGET:
        return (f"{block_n}-key tiles x {bd} dims ({stages} stage(s)) plus the {rows}-row query need "
                f"{smem // 1024} KiB of shared memory (> {ATTN_SMEM_BUDGET // 1024} KiB)")
    rope = attrs.get("rope_dim")
    if isinstance(rope, int) and not (rope % 2 == 0 and 0 <= rope <= d):
        return f"rope_dim={rope} must be even and at most the head dim {d}"
    return None


def _head_chunks(bd, warps):
    """(NCH, DC): the padded head dim ``bd`` as NCH chunks of DC dims, one chunk per warp where the
    head dim allows (the 3-D dots put every warp on the chunk axis); tl.dot needs DC >= 16."""
    dc = min(bd, max(16, bd // warps))
    return bd // dc, dc


def _combine_chunk(bd, block_h):
    """Head dims per program of the combine kernel: at most 4096 accumulator values a program."""
    return min(bd, max(16, 4096 // block_h))


def _row_align(strides):
    """The largest power of two up to 16 dividing every (non-zero) stride."""
    align = 16
    for s in strides:
        while s % align:
            align //= 2
    return align

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
        num_warps=warps, maxnreg=ATTN_MAXNREG)
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
        BLOCK_R=block_r, BLOCK_C=_np2(c), num_warps=warps, maxnreg=ATTN_MAXNREG)


def _attend(op, q, kv, ring, ring_pos, sinks, pos, rows, idx, *, kind, window, ratio, scale, kv_format,
            kv_rope_dim, derotate, meta, append):
    meta = {**DEFAULT_META[op], **(meta or {})}
    _check(op, meta, constraints(op, meta, {"inputs": [tuple(q.shape), tuple(kv.shape)],
                                            "attrs": {"rope_dim": derotate[0], "kind": kind},
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
        # decode splits the compressed keys only while the grid is small: a batch that already gives
        # enough programs would pay the partials' traffic and the combine for nothing
        hb = triton.cdiv(h, block_h)
        split = max(1, min(meta["SPLIT_K"], SPLIT_PROGRAMS // (b * hb))) if (t == 1 and kind_id != 0) else 1
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
        nch, dc = _head_chunks(bd, meta["num_warps"])
        kv_strides = (new.stride(0), new.stride(1), ring.stride(0), ring.stride(1), s_cb, s_cn)
        align = _row_align(kv_strides)
        s_nb, s_nt, s_rb, s_rw, s_cb, s_cn = (s // align for s in kv_strides)
        if lay.fp8:  # the RoPE dims are read as 16-bit words
            assert align % 2 == 0 and all(x.data_ptr() % 2 == 0 for x in (new, ring, rows_t)), \
                f"{op}: fp8_ds rows need even strides and addresses"
        cap = _capability(q.device)
        native_fp8 = cap is None or tuple(cap) >= (8, 9)  # sm80/sm86 have no fp8 conversions
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
            q.stride(0), q.stride(1), q.stride(2), s_nb, s_nt, s_rb, s_rw,
            ring_pos.stride(0), pos.stride(0), s_cb, s_cn, s_ib, s_it, out.stride(0), out.stride(1), out.stride(2),
            KIND=kind_id, FP8=lay.fp8, NOPE=lay.nope, KV_ROPE=lay.rope, SBLOCK=lay.sblock,
            NATIVE_FP8=native_fp8, ROW_ALIGN=align, ROUND_NEW=lay.round_new, ROPE_DIM=rope_dim,
            DOT_F32=_dot_f32(q.dtype), BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_N=meta["BLOCK_N"],
            NCH=nch, DC=dc, SB=min(lay.sblock, dc) if lay.fp8 else 1, SPLIT_K=split,
            num_warps=meta["num_warps"], num_stages=meta["num_stages"], maxnreg=ATTN_MAXNREG)
        if split > 1:
            dc2 = _combine_chunk(bd, block_h)
            _attn_combine_kernel[(b * t, triton.cdiv(h, block_h), bd // dc2)](
                part_m, part_l, part_acc, sinks, pos, inv, out, t, h, d, pos.stride(0),
                out.stride(0), out.stride(1), out.stride(2),
                ROPE_DIM=rope_dim, SPLIT_K=split, BLOCK_H=block_h, DC=dc2, num_warps=meta["num_warps"],
                maxnreg=ATTN_MAXNREG)
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
    _check("window_append", meta, constraints("window_append", meta,
                                              [tuple(ring.shape), tuple(ring_pos.shape), tuple(kv.shape)]))
    lay = _KVLayout(kv.shape[2], kv_format, kv_rope_dim)
    src = _quantize_kv(kv, lay, ring.shape[2], meta["BLOCK_R"], meta["num_warps"]) if lay.fp8 else kv
    _append(src, pos, ring, ring_pos, meta["BLOCK_R"], meta["num_warps"])
    return ring, ring_pos


KERNELS = {"sparse_attention": sparse_attention, "attention": attention, "window_append": window_append}
