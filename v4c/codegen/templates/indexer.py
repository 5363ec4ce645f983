"""The lightning indexer: which compressed rows each token's CSA attention reads.

Ops:
  * ``indexer`` (fused): query GEMM + RoPE (+ Hadamard and FP4 round trip for MXFP4 keys) in the
    GEMM epilogue, head-weight GEMM, scores over all compressed keys, streaming top-k.
  * the same op with q_b_proj stored FP8 e4m3 with 128x128-block UE8M0 scales (as the release ships
    it): ``QUANTIZED["indexer"]``, META key ``fp8_indexer``.  Like the reference ``linear``, the query
    latent is quantised per 1x128 block to e4m3 with a power-of-two scale, in the GEMM's K loop.

Kernels (one ``@triton.jit`` kernel per job; the small ``@triton.jit`` helpers shared with the
attention family live in ``prelude.py``):
  * ``_index_proj_kernel``: ``x @ w.T`` tiled GEMM (plain weights, or FP8 weights: e4m3 x e4m3 tiles,
    scales applied per K step); epilogue: round to the activation dtype, interleaved RoPE on the last
    ``rope_dim`` dims of each head, and for MXFP4 keys the Walsh-Hadamard rotation (butterflies in the
    reference's order, so bit-exact) and the e2m1/UE8M0 quantise-dequantise of the queries.  The q
    GEMM's N tile is one head.
  * ``_index_scores_kernel``: ``I[t,s] = sum_h (w[t,h]*weight_scale) * relu(q[t,h].k[s]) *
    score_scale`` for a block of tokens x a block of keys, keys decoded in the load (fp8: e4m3
    times the row's fp32 scale; mxfp4: e2m1 nibbles times UE8M0 per 32), causal mask
    ``s < (p+1)//ratio``.  Scores are stored as sortable int64 keys (score bits << 32 | index)
    in a scratch [B, T, capacity]; key tiles no token of the block can see are skipped.  Calls
    whose scratch would exceed ``SCORE_SCRATCH_BYTES`` run in (batch, token) chunks.
  * ``_topk_kernel``: per token, streams its visible keys in tiles (tile sorted with ``tl.sort``,
    merged into a running top-k by the bitonic max trick and a bitonic merge, tiles that cannot enter
    skipped); in decode ``TOPK_SPLIT`` programs per token write candidate lists that a second launch
    of the same kernel merges.  Unused slots are -1.  Top-k is entirely in Triton.

e4m3 operands (fp8 key rows, the FP8 q GEMM) are read per target (``_dot_mode``): native fp8 on sm89+,
as bytes decoded with integer ops on sm80/86 (which have no fp8 type), exact fp32 in the interpreter.

Host glue: output / scratch allocation, grids, the chunk loop, and the RoPE inverse-frequency table
(a few scalars per (rope_dim, theta, yarn), computed as the reference does and cached).  No host
synchronisation: nothing reads device values back.

Numerics: all accumulation in fp32.  fp32 models get ``input_precision="ieee"`` dots; fp16 /
bf16 models dot in their own dtype (quantised rows decode exactly into it); the interpreter's
bf16 dot is wrong, so there bf16 tiles are upcast.  Roundings to bf16 are done on the bits
(round to nearest even), because the interpreter's fp32 -> bf16 cast truncates.

Self-contained (torch + triton only): a rendered copy runs from inside compiled artifacts.
"""
import torch
import triton
import triton.language as tl

from .prelude import _capability, _check, _constraint_args, _cos_sin, _dot_f32, _e4m3_byte, _e4m3_f16, _e4m3_value, _last_contiguous, _mm, _np2, _pow2, _pow2_int, _rope_inv_freq, _round_to, _ue8m0_exponent  # v4c: inline prelude

INT64_MIN = tl.constexpr(-9223372036854775808)  # packed key of "no entry"
NEG_INF_KEY = tl.constexpr(-2139095041)  # sortable int32 key of an fp32 -inf score (a masked entry)


@triton.jit
def _fp8_q_step(a, x_ptr, rows, s_xm, mask_m, k0, K, w_ptr, ws_ptr, s_wn, s_wsn, cols, mask_n,
                BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr):
    """One K step of x @ w.T against an FP8 e4m3 weight with 128x128-block UE8M0 scales, x quantised as the
    reference ``linear`` does (per 1x128 block of K: e4m3 with a power-of-two scale >= max(amax, 1e-4)/448).
    ``a``: the [BLOCK_M, BLOCK_K] activation tile at k0; BLOCK_K divides 128.  fp32 [BLOCK_M, BLOCK_N]."""
    xf = a.to(tl.float32)
    if BLOCK_K == 128:
        amax = tl.max(tl.abs(xf), axis=1)
    else:  # the block's scale needs its whole 128 values (re-read from cache)
        kb = (k0 // 128) * 128 + tl.arange(0, 128)
        blk = tl.load(x_ptr + rows[:, None] * s_xm + kb[None, :], mask=mask_m[:, None] & (kb < K)[None, :], other=0.0)
        amax = tl.max(tl.abs(blk.to(tl.float32)), axis=1)
    ex = _ue8m0_exponent(tl.maximum(amax, 1e-4), 0x600000, 8)  # 448 = 1.75 * 2**8
    xq = _e4m3_byte(xf * _pow2(-ex)[:, None])
    kk = k0 + tl.arange(0, BLOCK_K)
    wq = tl.load(w_ptr + cols.to(tl.int64)[None, :] * s_wn + kk[:, None], mask=(kk < K)[:, None] & mask_n[None, :],
                 other=0)
    ew = tl.load(ws_ptr + (cols // 128) * s_wsn + k0 // 128, mask=mask_n, other=127).to(tl.int32) - 127
    if DOT_MODE == 2:  # native e4m3 MMA (sm89+)
        part = tl.dot(xq.to(tl.float8e4nv, bitcast=True), wq.to(tl.float8e4nv, bitcast=True))
    elif DOT_MODE == 1:  # sm80/86: bytes decoded to fp16 (exact), fp32 accumulation
        part = tl.dot(_e4m3_f16(xq), _e4m3_f16(wq)) * 65536.0
    else:  # the interpreter: exact fp32 values, ieee products
        part = tl.dot(_e4m3_value(xq), _e4m3_value(wq), input_precision="ieee")
    return part * _pow2(ex)[:, None] * _pow2(ew)[None, :]


@triton.jit
def _wht_stage(y, BM: tl.constexpr, N: tl.constexpr, H: tl.constexpr):
    """One Walsh-Hadamard butterfly stage on every row of y [BM, N]: (a, b) -> (a + b, a - b) for the
    pairs (i, i + H) of each 2H block, the reference's order (so the rotation is bit-exact)."""
    y4 = tl.permute(tl.reshape(y, (BM, N // (2 * H), 2, H)), (0, 1, 3, 2))
    a, b = tl.split(y4)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BM, N))


@triton.jit
def _index_proj_kernel(x_ptr, w_ptr, ws_ptr, out_ptr, pos_ptr, inv_freq_ptr, M, N, K, s_xm, s_wn, s_wsn, s_om,
                       hscale,
                       HEAD: tl.constexpr, ROPE_DIM: tl.constexpr, MXFP4: tl.constexpr, LOG2_HEAD: tl.constexpr,
                       DOT_F32: tl.constexpr, FP8_W: tl.constexpr, DOT_MODE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[M, N] = x[M, K] @ w[N, K].T in x's dtype; FP8_W: w is e4m3 bytes with 128x128-block scales
    ``ws`` and x is quantised per 1x128 (the reference's FP8 ``linear``); ROPE_DIM > 0: interleaved RoPE on
    the last ROPE_DIM of every HEAD-wide group; MXFP4 (BLOCK_N == HEAD): Hadamard + e2m1 round trip."""
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
        if FP8_W:
            acc += _fp8_q_step(a, x_ptr, rows, s_xm, mask_m, k0, K, w_ptr, ws_ptr, s_wn, s_wsn, offs_n, mask_n,
                               BLOCK_K, DOT_MODE)
        else:
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
        # orthonormal Walsh-Hadamard by butterflies (a +-1 matrix in registers would spill), then / sqrt(HEAD)
        y = acc
        for i in tl.static_range(LOG2_HEAD):
            y = _wht_stage(y, BLOCK_M, BLOCK_N, 1 << i)
        y = y * hscale
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
def _load_index_keys(base, rows, ok, stride, cols, DI, KFMT: tl.constexpr, E4M3_BYTES: tl.constexpr):
    """fp32 tile of indexer keys.  KFMT 0: plain; 1: fp8 (DI e4m3 codes + fp32 row scale, LE; E4M3_BYTES:
    decoded with integer ops, for sm80/86 where the fp8 type does not compile); 2: mxfp4 (DI/2 bytes of
    e2m1 pairs, low nibble first, + DI/32 UE8M0 scales)."""
    rp = base + rows.to(tl.int64) * stride
    m2 = ok[:, None] & (cols < DI)[None, :]
    if KFMT == 0:
        k = tl.load(rp[:, None] + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    elif KFMT == 1:
        codes = tl.load(rp[:, None] + cols[None, :], mask=m2, other=0)
        sbits = tl.zeros(rows.shape, dtype=tl.uint32)
        for i in tl.static_range(4):
            sbits = sbits | (tl.load(rp + DI + i, mask=ok, other=0).to(tl.uint32) << (8 * i))
        if E4M3_BYTES:
            kv = _e4m3_value(codes)
        else:
            kv = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        k = kv * sbits.to(tl.float32, bitcast=True)[:, None]
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
                         KFMT: tl.constexpr, E4M3_BYTES: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_T: tl.constexpr,
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
        k = _load_index_keys(keys_ptr + b * s_kb, s, s < vis_max, s_kn, cols, DI, KFMT, E4M3_BYTES)
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
def _merge_desc(x, LOG_N: tl.constexpr):
    """A bitonic sequence of 2**LOG_N int64 keys sorted descending: LOG_N half-cleaner stages on the
    [2]*LOG_N hypercube, outermost axis (stride n/2) first; the partner of each key along an axis is found
    with an xor over that axis.  (A full sort would take LOG_N*(LOG_N+1)/2 stages.)"""
    N: tl.constexpr = 1 << LOG_N
    h = tl.reshape(x, [2] * LOG_N)
    flat = tl.reshape(tl.arange(0, N), [2] * LOG_N)
    for a in tl.static_range(LOG_N):
        other = h ^ tl.xor_sum(h, a, keep_dims=True)
        first = ((flat >> (LOG_N - 1 - a)) & 1) == 0  # the lower index of the pair keeps the larger key
        h = tl.where(first, tl.maximum(h, other), tl.minimum(h, other))
    return tl.reshape(h, [N])


@triton.jit
def _emit_topk(dst, buf, k, sp, TOPK, FINAL: tl.constexpr, KPAD: tl.constexpr):
    """FINAL: the indices of ``buf``'s keys (-1 for masked / missing entries) to dst[:TOPK]; else the keys
    themselves to this split's KPAD candidate slots."""
    if FINAL:
        idx = tl.where((buf >> 32) > NEG_INF_KEY, 0x7FFFFFFF - (buf & 0xFFFFFFFF), -1)
        tl.store(dst + k, idx, mask=k < TOPK)
    else:
        tl.store(dst + sp * KPAD + k, buf)


@triton.jit
def _topk_kernel(src_ptr, pos_ptr, out_ptr, T, N, ratio, TOPK, s_sb, s_st, s_pb, s_ob, s_ot,
                 USE_POS: tl.constexpr, FINAL: tl.constexpr, SPLIT: tl.constexpr,
                 KPAD: tl.constexpr, LOG_KPAD: tl.constexpr, BLOCK_S: tl.constexpr):
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
    src = src_ptr + b * s_sb + t * s_st  # the row's base pointers, formed once
    dst = out_ptr + b * s_ob + t * s_ot
    k = tl.arange(0, KPAD)
    buf = tl.full((KPAD,), INT64_MIN, dtype=tl.int64)  # sorted descending
    floor = tl.min(buf)  # the entry a tile must beat; changes only when buf does
    # the running result is written through at every change (and once here, for a row no tile enters): then
    # no output address stays live across the loop only to be used after it, which ptxas would spill
    _emit_topk(dst, buf, k, sp, TOPK, FINAL, KPAD)
    o = tl.arange(0, BLOCK_S)
    for s0 in range(lo, hi, BLOCK_S):
        tile = tl.load(src + s0 + o, mask=s0 + o < hi, other=INT64_MIN)
        if tl.max(tile) > floor:
            asc = tl.sort(tile)
            top = tl.max(tl.reshape(asc, (BLOCK_S // KPAD, KPAD)), axis=0)  # the tile's top KPAD, ascending
            # max(desc, asc): the top KPAD of the union, as a bitonic sequence; a merge sorts it
            buf = _merge_desc(tl.maximum(buf, top), LOG_KPAD)
            floor = tl.min(buf)
            _emit_topk(dst, buf, k, sp, TOPK, FINAL, KPAD)


# ---- host side --------------------------------------------------------------------------------

# BLOCK_M / BLOCK_K: the projections' tiles (the q GEMM's N tile is one head, the weight GEMM's all heads;
# on FP8 weights BLOCK_K divides the 128-wide scale block); BLOCK_T x BLOCK_H query rows x BLOCK_S keys per
# scores program; the top-k tile is TOPK_TILE * next_pow2(topk) keys; TOPK_SPLIT programs per token in
# decode (T == 1).  Values are listed best first: the cost model prices the projection tiles and warps only,
# and keeps the grid order among configs that differ in the rest.
_META = {"BLOCK_M": (16, 32, 64), "BLOCK_K": (64, 128, 32), "BLOCK_T": (2, 4, 8, 1), "BLOCK_H": (32, 16, 64),
         "BLOCK_S": (64, 32, 128, 16), "TOPK_TILE": (2, 1, 4), "TOPK_SPLIT": (8, 4, 2, 1), "num_warps": (4, 8),
         "num_stages": (2, 3, 1)}
# the default compiles without spills for V4-Flash and V4-Pro on sm80 / sm90 / sm100 at every bucket
_DEFAULT = {"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_T": 2, "BLOCK_H": 32, "BLOCK_S": 64, "TOPK_TILE": 2,
            "TOPK_SPLIT": 8, "num_warps": 8, "num_stages": 2}
META = {"indexer": dict(_META), "fp8_indexer": dict(_META)}  # fp8_indexer: q_b_proj stored FP8 (QUANTIZED)
DEFAULT_META = {"indexer": dict(_DEFAULT), "fp8_indexer": dict(_DEFAULT)}

SCORE_SCRATCH_BYTES = 1 << 28  # the indexer's score scratch per launch; longer calls are chunked

# Resource estimates, fitted to ptxas for sm80 / sm90 / sm100 at V4's sizes (the most demanding target
# each): a config whose estimate passes these limits compiled without spills on all three.  The tuner's
# generic pruning sees only the projections' A tile, so shared memory is checked here too, against what
# every target has (sm86/89/120: 99 KiB).
_MAX_REGS = 224  # registers per thread (ptxas' limit is 255; the estimates err by up to ~10%)
_SMEM_ALL = 96 * 1024
_TOPK_KEYS_PER_THREAD = 16  # int64 keys (tile + running top-k) per thread; past that ptxas spilled


def _regs_proj(bm, bn, bk, threads, mxfp4, eb):
    """``_index_proj_kernel``: the fp32 accumulator (and, for MXFP4 queries, the butterflies' and the e2m1
    round trip's copies of it), plus one K step's operands with the weight tile as 16-bit values (bf16, or
    FP8 decoded to fp16 on sm80, where mma operands sit in registers)."""
    acc = bm * bn // threads
    frag = (bm * bk * eb + bk * bn * 2) // (4 * threads)
    return 48 + (7 if mxfp4 else 3) * acc // 2 + 5 * frag // 4


def _regs_scores(rows, bs, di, warps, eb):
    """``_index_scores_kernel``: the decoded key tile (fp32, then in the dot dtype; with more than 4 warps
    the dot's B operand is replicated, so it does not shrink further), the query and score tiles."""
    return 40 + 3 * bs * di // (64 * min(warps, 4)) + (rows * bs + rows * di * eb // 4) // (32 * warps)




def _dims(shapes, attrs):
    shape = attrs.get("shape")
    di = shape[-1] if shape and isinstance(shape[-1], int) else None
    hi = shape[-2] if shape and len(shape) > 1 and isinstance(shape[-2], int) else None
    t = None
    if shapes and shapes[0] and len(shapes[0]) > 1 and isinstance(shapes[0][1], int):
        t = shapes[0][1]
    return di, hi, t


def _same_as_earlier(m, name, same):
    """For a grid value of ``name`` that runs exactly as an earlier grid value does (``same(a, b)``), the
    reason it is no separate candidate; None for the first of its kind and for values off the grid."""
    grid = _META[name]
    if m[name] not in grid:
        return None
    first = next(g for g in grid if same(g, m[name]))
    return None if first == m[name] else f"{name}={m[name]} runs as {name}={first} here"


def constraints(op, meta, shapes):
    """Why ``meta`` cannot run ``op`` on ``shapes``, or None.  ``shapes``: the op's input shapes in
    the reference's argument order, or a dict {"inputs": [...], "attrs": {...}, "dtype": ...};
    symbolic (non-int) dims are allowed where they do not matter.  Register and shared-memory needs
    are estimated per kernel, so that the configs kept compile without spills on sm80 / sm90 / sm100,
    and a grid value that runs exactly as an earlier one at these shapes is no separate candidate."""
    return _problem(op, meta, shapes, tuning=True)


def _problem(op, meta, shapes, tuning):
    """``constraints``; ``tuning=False``: only what the kernels cannot run at all (the launcher's check)."""
    parsed = _constraint_args("indexer", op, meta, shapes, META, DEFAULT_META)
    if isinstance(parsed, str):
        return parsed
    m, shapes, attrs, eb = parsed
    warps, stages = m["num_warps"], m["num_stages"]
    threads = 32 * warps
    for name in ("BLOCK_M", "BLOCK_K", "BLOCK_S"):
        if m[name] < 16:
            return f"{name}={m[name]}: tl.dot needs at least 16"
    if m["BLOCK_T"] * m["BLOCK_H"] < 16:
        return f"BLOCK_T*BLOCK_H={m['BLOCK_T'] * m['BLOCK_H']}: tl.dot needs at least 16 query rows"
    fp8 = op == "fp8_indexer"
    if fp8 and 128 % m["BLOCK_K"]:
        return f"BLOCK_K={m['BLOCK_K']} must divide the 128-wide FP8 scale block"
    di, hi, t = _dims(shapes, attrs)
    if di is None:
        return None
    if not _pow2_int(di) or di < 16:
        return f"indexer head dim {di} must be a power of two >= 16 (one head per GEMM tile, Hadamard size)"
    mxfp4 = attrs.get("key_format") == "mxfp4"
    if mxfp4 and di % 32:
        return f"indexer head dim {di}: MXFP4 needs a multiple of 32"
    if not tuning:
        return None
    # parameters that do not change what runs at these shapes: only the first grid value is a candidate
    if t is not None:
        bt = lambda v: min(v, _np2(t))  # noqa: E731
        why = (_same_as_earlier(m, "BLOCK_T", lambda a, b: bt(a) == bt(b))
               or (t > 1 and _same_as_earlier(m, "TOPK_SPLIT", lambda a, b: True)))
        if why:
            return why
        if hi is not None:
            bh = lambda v: min(v, max(16 // bt(m["BLOCK_T"]), _np2(hi)))  # noqa: E731
            why = _same_as_earlier(m, "BLOCK_H", lambda a, b: bh(a) == bh(b))
            if why:
                return why
    # 1. the q GEMM (N tile = one head) and the head-weight GEMM (N tile = all heads)
    for what, bn, mx, q8 in (("q projection", di, mxfp4, fp8), ("head-weight projection", max(16, _np2(hi or 16)),
                                                                 False, False)):
        regs = _regs_proj(m["BLOCK_M"], bn, m["BLOCK_K"], threads, mx, eb)
        if regs > _MAX_REGS:
            return (f"the {what}'s {m['BLOCK_M']}x{bn} tile needs ~{regs} registers per thread with {warps} warps "
                    f"(> {_MAX_REGS})")
        smem = stages * (m["BLOCK_M"] * m["BLOCK_K"] * eb + m["BLOCK_K"] * bn * (1 if q8 else eb))
        if smem > _SMEM_ALL:
            return f"{stages} stages of the {what}'s tiles need {smem // 1024} KiB of shared memory"
    # 2. scores
    rows = m["BLOCK_T"] * m["BLOCK_H"]
    if t is not None and hi is not None:
        rows = min(m["BLOCK_T"], _np2(t)) * min(m["BLOCK_H"], max(16 // min(m["BLOCK_T"], _np2(t)), _np2(hi)))
    regs = _regs_scores(rows, m["BLOCK_S"], _np2(di), warps, eb)
    if regs > _MAX_REGS:
        return (f"a {rows}x{m['BLOCK_S']} score tile over {di}-wide keys needs ~{regs} registers per thread with "
                f"{warps} warps (> {_MAX_REGS})")
    smem = stages * rows * _np2(di) * eb + m["BLOCK_S"] * _np2(di) * eb
    if smem > _SMEM_ALL:
        return f"{stages} stages of {rows} query rows + {m['BLOCK_S']} keys need {smem // 1024} KiB of shared memory"
    # 3. top-k
    topk = attrs.get("topk")
    if isinstance(topk, int):
        kpad = max(2, _np2(topk))
        per_thread = kpad * (m["TOPK_TILE"] + 1) // threads
        if per_thread > _TOPK_KEYS_PER_THREAD:
            return (f"top-{topk} over tiles of {kpad * m['TOPK_TILE']} keys holds {per_thread} int64 keys per thread "
                    f"with {warps} warps (> {_TOPK_KEYS_PER_THREAD}: spills)")
    return None


def _dot_mode(device, meta):
    """How e4m3 operands are read: 2 native fp8 (sm89+), 1 bytes decoded with integer ops (sm80/86, which
    have no fp8 type), 0 exact fp32 (the interpreter); ``meta["DOT_MODE"]`` forces one (tests)."""
    if meta.get("DOT_MODE") is not None:
        return int(meta["DOT_MODE"])
    cap = _capability(device)
    if cap is None:
        return 0
    return 2 if tuple(cap) >= (8, 9) else 1


def _index_proj(x2, w, out2, pos1, inv, *, head, rope_dim, mxfp4, dot_f32, meta, block_n, ws=None, dot_mode=0):
    m_rows, k = x2.shape
    n = w.shape[0]
    grid = (triton.cdiv(m_rows, meta["BLOCK_M"]), triton.cdiv(n, block_n))
    _index_proj_kernel[grid](
        x2, w, ws if ws is not None else w, out2, pos1, inv, m_rows, n, k, x2.stride(0), w.stride(0),
        ws.stride(0) if ws is not None else 0, out2.stride(0), float(head) ** -0.5,
        HEAD=head, ROPE_DIM=rope_dim, MXFP4=mxfp4, LOG2_HEAD=max(head.bit_length() - 1, 0), DOT_F32=dot_f32,
        FP8_W=ws is not None, DOT_MODE=dot_mode,
        BLOCK_M=meta["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=meta["BLOCK_K"],
        num_warps=meta["num_warps"], num_stages=meta["num_stages"])


def _fp8_weight(w, n, k):
    """(e4m3 bytes [N, K], UE8M0 exponent bytes [ceil(N/128), ceil(K/128)]) of a quantised q_b_proj."""
    data, scale = w.data, w.scale
    if data.dtype != torch.float8_e4m3fn or tuple(data.shape) != (n, k):
        raise ValueError(f"fp8_indexer: q_b_proj must be float8_e4m3fn [{n}, {k}], got {data.dtype} "
                         f"{tuple(data.shape)}")
    want = (triton.cdiv(n, 128), triton.cdiv(k, 128))
    if tuple(scale.shape) != want or scale.dtype not in (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8)):
        raise ValueError(f"fp8_indexer: q_b_proj needs UE8M0 scales of shape {want}, got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    return _last_contiguous(data).view(torch.uint8), scale.contiguous().view(torch.uint8)


def indexer(cq, h, wq, ww, keys, pos, *, shape, rope_dim, theta, topk, ratio, score_scale, weight_scale, yarn=None,
            key_format=None, meta=None):
    """Lightning indexer: top-k compressed rows per token ([B, T, topk] int64, -1 padded)."""
    return _indexer("indexer", cq, h, wq, ww, keys, pos, shape=shape, rope_dim=rope_dim, theta=theta, topk=topk,
                    ratio=ratio, score_scale=score_scale, weight_scale=weight_scale, yarn=yarn,
                    key_format=key_format, meta=meta)


def fp8_indexer(cq, h, wq, ww, keys, pos, *, meta=None, **attrs):
    """``indexer`` with q_b_proj stored FP8 e4m3 with 128x128-block UE8M0 scales, as the release ships it:
    ``wq`` is a quantised weight (``fmt == "f8e4m3"``, ``data`` [HI*DI, Q], ``scale``).  Like the reference
    ``linear``, the query latent is quantised per 1x128 block to e4m3 (in the GEMM's K loop)."""
    if getattr(wq, "fmt", None) != "f8e4m3":
        raise ValueError(f"fp8_indexer: expected an f8e4m3 quantised q_b_proj, got "
                         f"{getattr(wq, 'fmt', type(wq).__name__)}")
    return _indexer("fp8_indexer", cq, h, wq, ww, keys, pos, meta=meta, **attrs)


def _indexer(op, cq, h, wq, ww, keys, pos, *, shape, rope_dim, theta, topk, ratio, score_scale, weight_scale,
             yarn=None, key_format=None, meta=None):
    meta = {**DEFAULT_META[op], **(meta or {})}
    forced = {"DOT_MODE": meta.pop("DOT_MODE", None)}  # a test switch, not a tuning parameter
    _check(op, meta, _problem(op, meta, {"inputs": [tuple(cq.shape)], "dtype": str(cq.dtype),
                                            "attrs": {"shape": list(shape), "key_format": key_format,
                                                      "topk": topk}}, tuning=False))
    b, t = pos.shape
    hi, di = int(shape[-2]), int(shape[-1])
    nc = keys.shape[1]
    out = torch.full((b, t, topk), -1, dtype=torch.int64, device=cq.device)
    if b * t == 0 or nc == 0:
        return out
    kfmt = {"fp8": 1, "mxfp4": 2}.get(key_format, 0)
    dot_f32 = _dot_f32(cq.dtype) or (kfmt == 0 and keys.dtype == torch.float32)
    dot_mode = _dot_mode(cq.device, forced)
    pos = _last_contiguous(pos)
    pos1 = pos.reshape(-1)
    # 1. queries: GEMM + RoPE (+ Hadamard / FP4 round trip) in the epilogue, one head per N tile
    x2 = _last_contiguous(cq.reshape(b * t, cq.shape[-1]))
    q2 = torch.empty((b * t, hi * di), dtype=cq.dtype, device=cq.device)
    inv = _rope_inv_freq(rope_dim, theta, yarn, cq.device) if rope_dim else q2
    if op == "fp8_indexer":
        wq8, ws = _fp8_weight(wq, hi * di, cq.shape[-1])
        _index_proj(x2, wq8, q2, pos1, inv, head=di, rope_dim=rope_dim, mxfp4=kfmt == 2, dot_f32=dot_f32,
                    meta=meta, block_n=di, ws=ws, dot_mode=dot_mode)
    else:
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
                               hi=hi, di=di, kfmt=kfmt, e4m3_bytes=dot_mode == 1, dot_f32=dot_f32, topk=topk,
                               ratio=int(ratio), score_scale=float(score_scale), weight_scale=float(weight_scale),
                               meta=meta, decode=t == 1)
    return out


def _index_scores_topk(q3, w3, keys, pos, scores, out, *, hi, di, kfmt, e4m3_bytes, dot_f32, topk, ratio,
                       score_scale, weight_scale, meta, decode):
    """Scores then top-k for one chunk: q3 [Bc, Tc, HI*DI], w3 [Bc, Tc, HI], scores [Bc, Tc, NC] scratch,
    out [Bc, Tc, topk] (views of the whole call's tensors)."""
    b, t, nc = scores.shape
    block_t = min(meta["BLOCK_T"], _np2(t))
    block_h = min(meta["BLOCK_H"], max(16 // block_t, _np2(hi)))
    _index_scores_kernel[(b * triton.cdiv(t, block_t), triton.cdiv(nc, meta["BLOCK_S"]))](
        q3, w3, keys, pos, scores, t, hi, di, nc, ratio, score_scale, weight_scale,
        q3.stride(0), q3.stride(1), w3.stride(0), w3.stride(1), keys.stride(0), keys.stride(1), pos.stride(0),
        scores.stride(0), scores.stride(1),
        KFMT=kfmt, E4M3_BYTES=e4m3_bytes, DOT_F32=dot_f32, BLOCK_T=block_t, BLOCK_H=block_h,
        BLOCK_S=meta["BLOCK_S"], BLOCK_DI=_np2(di), num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    # one streaming program per token, or (decode) TOPK_SPLIT of them + a merge of their candidates
    kpad = max(2, _np2(topk))
    log_kpad = kpad.bit_length() - 1
    block_s = kpad * meta["TOPK_TILE"]
    split = meta["TOPK_SPLIT"] if decode else 1
    split = max(1, min(split, triton.cdiv(nc, block_s)))
    warps = meta["num_warps"]
    if split == 1:
        _topk_kernel[(b * t, 1)](scores, pos, out, t, nc, ratio, topk, scores.stride(0), scores.stride(1),
                                 pos.stride(0), out.stride(0), out.stride(1),
                                 USE_POS=True, FINAL=True, SPLIT=1, KPAD=kpad, LOG_KPAD=log_kpad, BLOCK_S=block_s,
                                 num_warps=warps)
    else:
        cand = torch.empty((b, t, split * kpad), dtype=torch.int64, device=scores.device)
        _topk_kernel[(b * t, split)](scores, pos, cand, t, nc, ratio, topk, scores.stride(0), scores.stride(1),
                                     pos.stride(0), cand.stride(0), cand.stride(1),
                                     USE_POS=True, FINAL=False, SPLIT=split, KPAD=kpad, LOG_KPAD=log_kpad,
                                     BLOCK_S=block_s, num_warps=warps)
        _topk_kernel[(b * t, 1)](cand, pos, out, t, split * kpad, ratio, topk, cand.stride(0), cand.stride(1),
                                 pos.stride(0), out.stride(0), out.stride(1),
                                 USE_POS=False, FINAL=True, SPLIT=1, KPAD=kpad, LOG_KPAD=log_kpad, BLOCK_S=kpad,
                                 num_warps=warps)


KERNELS = {"indexer": indexer}
QUANTIZED = {"indexer": (fp8_indexer, "fp8_indexer")}  # op -> (launcher on its quantised weights, META key)
