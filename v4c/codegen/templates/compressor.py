"""Compressor kernels (CSA / HCA): projections, gated pooling into cache rows, pending-slot update.

IR ops:
  ``compressor`` (fused): h [B,T,D], wkv [c*d,D], wgate [c*d,D], ape [m,c*d], norm_w [d], rows [B,Nc,row],
      pend_kv [B,c*m,c*d], pend_gate [B,c*m,c*d], pos [B,T]; rows and the pending buffers are updated in place.
  ``compress`` (unfused): the same with the projections kv [B,T,c*d] and gate [B,T,c*d] already computed.

Three launches per call, in stream order:
  1. ``_proj_kernel`` (compressor only): one GEMM over the logically concatenated weights [wkv; wgate]
     (each N block lies in one half, so the weights are never copied); the result is rounded to the
     activation dtype (what ``linear`` returns), and the gate half gets ``ape[pos % m]`` added in fp32.
     Output: fp32 scratch ``proj [B, T, 2*c*d]`` (kv half, then gate half).
  2. ``_pool_kernel``: one program per (row b, i-th window closing in this call).  The window's c*m
     slots (CSA: the previous window's channels [0,d) and this window's channels [d,2d)) come from the
     pending buffers (positions before p0, slot = position % (c*m)) or from this call's tokens; an
     online per-channel softmax over the slots (BLOCK_S at a time), the weighted sum, RMSNorm over the
     d channels (BLOCK_D >= d: one pass; BLOCK_D < d: a first pass for the sum of squares, then a
     second pass that recomputes each channel block; fp8 / mxfp4 rows always take the whole row), RoPE on
     the last rope_dim dims at position w*m (sin / cos by a local polynomial: libdevice's large-argument
     path keeps a table in local memory, which made ptxas spill), and the encode into the row format:
        plain (None / "f32" / "bf16" / "f16"): cast to the rows dtype;
        "fp8_ds": e4m3 nope values with one UE8M0 power-of-two scale per block of gcd(64, d-rope) values,
                  bf16 RoPE values (little-endian), the scale bytes, zero padding to a multiple of 8;
        "fp8":    e4m3 codes with one float32 power-of-two scale for the row (indexer keys);
        "mxfp4":  orthonormal Walsh-Hadamard rotation (butterflies in the reference's order), then e2m1
                  nibbles (round to nearest, ties to even code) with a UE8M0 scale per 32 values.
     All encoders run in Triton.  The e4m3 and bf16 roundings are done with integer arithmetic on the fp32
     bits (nearest-even, bit-identical to torch's casts): Triton's interpreter truncates fp32->bf16 and
     mis-rounds some fp32->float8e4nv casts, and this way the interpreter and GPUs agree.
  3. ``_pending_kernel``: the last min(n, c*m) tokens of each row go to pending slots (p0+j) % (c*m).
     It must run after the pooling kernel, which reads the slots it overwrites.

Each program finds its row's extent (first position p0 and valid-token count n) itself by a binary
search over ``pos`` (valid tokens come first), so nothing is read back to the host.  Offsets that scale
with the batch row or the token index are formed in int64: at 1M context a batch row of cache rows is
~150 MB and a long call's projections pass 2**31 elements.  Host glue: the
RoPE inverse-frequency table (rope_dim/2 constants of the attributes, computed once per attribute set
exactly as the reference computes them), scratch allocation and grids.
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .prelude import _e4m3_byte, _rope_inv_freq  # v4c: inline prelude

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_STORE_CODES = {None: 0, "f32": 0, "bf16": 0, "f16": 0, "fp8_ds": 1, "fp8": 2, "mxfp4": 3}
_WHOLE_ROW = ("fp8", "mxfp4")  # encoders that need the whole row at once (row scale / Hadamard)
_PLAIN_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
_E4M3_MAX = 448.0


# ------------------------------------------------------------------------------------------- jit helpers

@triton.jit
def _row_extent(pos_row, T, NSTEPS):
    """(first position, number of valid tokens) of one row: valid tokens (pos >= 0) form a prefix.  Positions
    fit int32 (context <= 2**31); int32 keeps the window / slot arithmetic out of 64-bit registers."""
    p0 = tl.load(pos_row).to(tl.int32)
    lo = tl.full([], 0, tl.int32)
    hi = lo + T
    for _ in range(NSTEPS):
        mid = (lo + hi) // 2
        v = tl.load(pos_row + mid, mask=mid < T, other=-1)
        live = lo < hi
        lo = tl.where(live & (v >= 0), mid + 1, lo)
        hi = tl.where(live & (v < 0), mid, hi)
    return p0, lo


@triton.jit
def _exp2i(e):
    """float32 2**e for int32 e in [-127, 127], built from the bit pattern (2**-127 is subnormal)."""
    bits = tl.where(e >= -126, (e + 127) << 23, 1 << 22)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pow2_exponent(amax, QE: tl.constexpr, QMANT: tl.constexpr):
    """Smallest e with qmax * 2**e >= amax (qmax = (1 + QMANT/2**23) * 2**QE), clamped to [-127, 127];
    0 where amax == 0.  Exact integer arithmetic on the float32 bits."""
    bits = amax.to(tl.int32, bitcast=True)
    ex = (bits >> 23) & 0xFF
    man = bits & 0x7FFFFF
    e = ex - 127 - QE + (man > QMANT).to(tl.int32)
    e = tl.where(ex == 0, -127, e)           # subnormal amax: below 2**-127 * qmax
    e = tl.minimum(tl.maximum(e, -127), 127)
    return tl.where(amax == 0, 0, e)


@triton.jit
def _sincos(x):
    """(sin x, cos x) for fp32 x >= 0 up to ~2**22, within ~2 ulp, with no local memory: libdevice's sinf /
    cosf carry a large-argument path with a local table that makes ptxas spill in this kernel.  x = q*pi/2 + r
    (pi/2 in three fp32 parts, fma), Cephes' minimax polynomials on |r| <= pi/4, then the quadrant."""
    q = tl.floor(x * 0.6366197723675814 + 0.5)
    r = tl.fma(q, -1.5707963705062866, x)
    r = tl.fma(q, 4.371138828673793e-08, r)
    r = tl.fma(q, 1.7151245100058819e-15, r)
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    k = q.to(tl.int32) & 3
    sn = tl.where(k == 0, s, tl.where(k == 1, c, tl.where(k == 2, -s, -c)))
    cs = tl.where(k == 0, c, tl.where(k == 1, -s, tl.where(k == 2, -c, s)))
    return sn, cs


@triton.jit
def _bf16_bits(x):
    """int32 holding the bf16 bit pattern of fp32 ``x``, round-to-nearest-even (finite inputs).  Integer
    arithmetic, so the interpreter (whose fp32->bf16 cast truncates) and GPUs give the same bits."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def _cast_rne(x, DT: tl.constexpr):
    """``x.to(DT)`` rounding to nearest-even also for bf16 in the interpreter."""
    if DT == tl.bfloat16:
        return _bf16_bits(x.to(tl.float32)).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def _pool_block(kv_ptr, gate_ptr, s_kb, s_kt, s_gb, s_gt,
                pk_ptr, pg_ptr, s_pkb, s_pks, s_pgb, s_pgs,
                ape_ptr, s_ape, b, w, p0, c0,
                M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, ADD_APE: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Softmax-gated pooled values of window ``w`` for channels [c0, c0+BLOCK_D) (fp32; 0 past d)."""
    SLOTS: tl.constexpr = C * M
    ch = c0 + tl.arange(0, BLOCK_D)
    chm = ch < D
    run_max = tl.full([BLOCK_D], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_D], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, SLOTS, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        q = (w - (C - 1)) * M + s                    # absolute position of the slot's token
        col = (s // M) * D                           # CSA: previous window -> [0,d), this window -> [d,2d)
        cols = col[:, None] + ch[None, :]
        live = s < SLOTS
        old = live & (q >= 0) & (q < p0)             # before this call: from the pending slots
        new = live & (q >= p0)                       # this call's token q - p0
        slot = tl.where(old, q, 0) % SLOTS
        tok = tl.where(new, q - p0, 0)
        m_old = old[:, None] & chm[None, :]
        m_new = new[:, None] & chm[None, :]
        tok = tok.to(tl.int64)  # token * stride passes 2**31 in calls of >= 2**31 / (2*c*d) tokens
        kv = tl.load(pk_ptr + b * s_pkb + slot[:, None] * s_pks + cols, mask=m_old, other=0.0).to(tl.float32)
        kv += tl.load(kv_ptr + b * s_kb + tok[:, None] * s_kt + cols, mask=m_new, other=0.0).to(tl.float32)
        g_old = tl.load(pg_ptr + b * s_pgb + slot[:, None] * s_pgs + cols, mask=m_old, other=0.0).to(tl.float32)
        g_new = tl.load(gate_ptr + b * s_gb + tok[:, None] * s_gt + cols, mask=m_new, other=0.0).to(tl.float32)
        if ADD_APE:
            g_new += tl.load(ape_ptr + (tl.where(new, q, 0) % M)[:, None] * s_ape + cols, mask=m_new,
                             other=0.0).to(tl.float32)
        g = tl.where(m_old, g_old, tl.where(m_new, g_new, float("-inf")))
        new_max = tl.maximum(run_max, tl.max(g, axis=0))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(run_max - safe)
        p = tl.exp(g - safe[None, :])
        run_sum = run_sum * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p * kv, axis=0)
        run_max = new_max
    return tl.where(chm, acc / tl.where(chm, run_sum, 1.0), 0.0)


@triton.jit
def _butterfly(y, H: tl.constexpr, N: tl.constexpr):
    """One Walsh-Hadamard stage: (a, b) -> (a + b, a - b) for the pairs (i, i + H) of each 2H block."""
    y3 = tl.permute(tl.reshape(y, [N // (2 * H), 2, H]), [0, 2, 1])
    a, b = tl.split(y3)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), [0, 2, 1]), [N])


@triton.jit
def _emit_block(x, rstd, c0, wpos, norm_ptr, inv_ptr, row_ptr, had_scale,
                D: tl.constexpr, ROPE: tl.constexpr, STORE: tl.constexpr, QB: tl.constexpr,
                ROW_BYTES: tl.constexpr, LOG_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """RMSNorm weight, RoPE at ``wpos`` and the encode of channels [c0, c0+BLOCK_D) into one row."""
    NOPE: tl.constexpr = D - ROPE
    ch = c0 + tl.arange(0, BLOCK_D)
    chm = ch < D
    nw = tl.load(norm_ptr + ch, mask=chm, other=0.0).to(tl.float32)
    y = nw * (x * rstd)
    if ROPE > 0:  # interleaved pairs (2i, 2i+1) of the last ROPE dims; NOPE and c0 are even
        ye, yo = tl.split(tl.reshape(y, [BLOCK_D // 2, 2]))
        che = c0 + 2 * tl.arange(0, BLOCK_D // 2)
        is_rope = (che >= NOPE) & (che < D)
        inv = tl.load(inv_ptr + tl.where(is_rope, (che - NOPE) // 2, 0), mask=is_rope, other=0.0)
        ang = wpos.to(tl.float32) * inv
        sn, cs = _sincos(ang)
        re = ye * cs - yo * sn
        ro = yo * cs + ye * sn
        y = tl.reshape(tl.join(tl.where(is_rope, re, ye), tl.where(is_rope, ro, yo)), [BLOCK_D])
    if STORE == 0:
        tl.store(row_ptr + ch, _cast_rne(y, row_ptr.dtype.element_ty), mask=chm)
    elif STORE == 1:  # fp8_ds: [NOPE e4m3][2*ROPE bf16 bytes][NOPE/QB UE8M0][zero pad]
        if NOPE > 0:
            NG: tl.constexpr = BLOCK_D // QB
            is_nope = ch < NOPE
            y2 = tl.reshape(tl.where(is_nope, y, 0.0), [NG, QB])
            e = _pow2_exponent(tl.max(tl.abs(y2), axis=1), 8, 0x600000)      # 448 = 1.75 * 2**8
            codes = _e4m3_byte(y2 * _exp2i(-e)[:, None])
            tl.store(row_ptr + ch, tl.reshape(codes, [BLOCK_D]), mask=is_nope)
            grp = c0 // QB + tl.arange(0, NG)
            tl.store(row_ptr + NOPE + 2 * ROPE + grp, (e + 127).to(tl.uint8), mask=grp * QB < NOPE)
        if ROPE > 0:
            rb = _bf16_bits(y)
            is_rope = (ch >= NOPE) & chm
            at = row_ptr + NOPE + 2 * tl.where(is_rope, ch - NOPE, 0)
            tl.store(at, (rb & 0xFF).to(tl.uint8), mask=is_rope)
            tl.store(at + 1, (rb >> 8).to(tl.uint8), mask=is_rope)
        PAD0: tl.constexpr = NOPE + 2 * ROPE + NOPE // QB
        pad = PAD0 + tl.arange(0, 8)
        tl.store(row_ptr + pad, tl.zeros([8], tl.uint8), mask=(pad < ROW_BYTES) & (c0 == 0))
    elif STORE == 2:  # fp8 index keys: [D e4m3][float32 power-of-two scale, little-endian]
        e = _pow2_exponent(tl.max(tl.abs(tl.where(chm, y, 0.0)), axis=0), 8, 0x600000)
        tl.store(row_ptr + ch, _e4m3_byte(y * _exp2i(-e)), mask=chm)
        sbits = _exp2i(e).to(tl.int32, bitcast=True)
        k = tl.arange(0, 4)
        tl.store(row_ptr + D + k, ((sbits >> (8 * k)) & 0xFF).to(tl.uint8))
    else:  # mxfp4 index keys: Hadamard, then [D/2 bytes of e2m1 pairs][D/32 UE8M0]; BLOCK_D == D here
        for k in tl.static_range(LOG_D):
            # the stride is a call argument, not a constexpr assigned in the loop (which the compiler rejects)
            y = _butterfly(y, 1 << k, BLOCK_D)
        y = y * had_scale
        y2 = tl.reshape(y, [BLOCK_D // 32, 32])
        e = _pow2_exponent(tl.max(tl.abs(y2), axis=1), 2, 0x400000)      # 6 = 1.5 * 2**2
        z = y2 * _exp2i(-e)[:, None]
        a = tl.abs(z)
        code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
                + (a > 5.0).to(tl.int32))
        nib = code | ((z.to(tl.int32, bitcast=True) < 0).to(tl.int32) << 3)
        lo, hi = tl.split(tl.reshape(nib, [BLOCK_D // 2, 2]))
        tl.store(row_ptr + tl.arange(0, BLOCK_D // 2), (lo | (hi << 4)).to(tl.uint8))
        tl.store(row_ptr + BLOCK_D // 2 + tl.arange(0, BLOCK_D // 32), (e + 127).to(tl.uint8))


# ------------------------------------------------------------------------------------------- kernels

@triton.jit
def _proj_kernel(h_ptr, wkv_ptr, wg_ptr, ape_ptr, pos_ptr, out_ptr,
                 M_ROWS, K, CD, NBH, RATIO,
                 s_hm, s_hk, s_wn, s_wk, s_ape, s_om,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[:, half*CD + n] = round_act(h @ w_half.T) (+ ape[pos % m] on the gate half), fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    is_gate = pid_n >= NBH
    if is_gate:
        w_ptr = wg_ptr
    else:
        w_ptr = wkv_ptr
    act = h_ptr.dtype.element_ty
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)  # row * K and row * 2*c*d pass 2**31 in one call of >= 2**31 / 7168 tokens
    rn = (pid_n - is_gate.to(tl.int32) * NBH) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < M_ROWS
    mn = rn < CD
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        mk = kk < K
        a = tl.load(h_ptr + rm64[:, None] * s_hm + kk[None, :] * s_hk, mask=mm[:, None] & mk[None, :], other=0.0)
        bt = tl.load(w_ptr + rn[None, :] * s_wn + kk[:, None] * s_wk, mask=mk[:, None] & mn[None, :], other=0.0)
        if bt.dtype != act:  # the reference multiplies by the weights cast to the activation dtype
            bt = _cast_rne(bt, act)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    y = _cast_rne(acc, act).to(tl.float32)  # ``linear`` returns the activation dtype
    if is_gate:
        p = tl.load(pos_ptr + rm, mask=mm, other=0)
        arow = tl.where(p >= 0, p, 0) % RATIO
        y += tl.load(ape_ptr + arow[:, None] * s_ape + rn[None, :], mask=mm[:, None] & mn[None, :], other=0.0)
    col = is_gate.to(tl.int32) * CD + rn
    tl.store(out_ptr + rm64[:, None] * s_om + col[None, :], y, mask=mm[:, None] & mn[None, :])


@triton.jit
def _pool_kernel(kv_ptr, gate_ptr, s_kb, s_kt, s_gb, s_gt,
                 pk_ptr, pg_ptr, s_pkb, s_pks, s_pgb, s_pgs,
                 ape_ptr, s_ape, pos_ptr, s_posb, T, NSTEPS,
                 norm_ptr, inv_ptr, rows_ptr, s_rb, s_rw, NC, eps, had_scale,
                 M: tl.constexpr, C: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr,
                 STORE: tl.constexpr, QB: tl.constexpr, ROW_BYTES: tl.constexpr, LOG_D: tl.constexpr,
                 ADD_APE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (row b, i-th window closing in this call): pool, normalise, rotate, encode."""
    b = tl.program_id(0).to(tl.int64)  # b * (rows per batch row) passes 2**31 (row 15 at 1M context)
    p0, n = _row_extent(pos_ptr + b * s_posb, T, NSTEPS)
    w = tl.where(n > 0, p0, 0) // M + tl.program_id(1)
    if (n > 0) & (w < (p0 + n) // M) & (w < NC):
        row_ptr = rows_ptr + b * s_rb + w.to(tl.int64) * s_rw
        wpos = w * M
        if BLOCK_D >= D:
            x = _pool_block(kv_ptr, gate_ptr, s_kb, s_kt, s_gb, s_gt, pk_ptr, pg_ptr, s_pkb, s_pks, s_pgb, s_pgs,
                            ape_ptr, s_ape, b, w, p0, 0, M, C, D, ADD_APE, BLOCK_S, BLOCK_D)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
            _emit_block(x, rstd, 0, wpos, norm_ptr, inv_ptr, row_ptr, had_scale,
                        D, ROPE, STORE, QB, ROW_BYTES, LOG_D, BLOCK_D)
        else:  # two passes: the sum of squares over all channel blocks, then recompute and emit each block
            ss = tl.zeros([BLOCK_D], tl.float32)
            for c0 in range(0, D, BLOCK_D):
                x = _pool_block(kv_ptr, gate_ptr, s_kb, s_kt, s_gb, s_gt, pk_ptr, pg_ptr, s_pkb, s_pks, s_pgb,
                                s_pgs, ape_ptr, s_ape, b, w, p0, c0, M, C, D, ADD_APE, BLOCK_S, BLOCK_D)
                ss += x * x
            rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / D + eps)
            for c0 in range(0, D, BLOCK_D):
                x = _pool_block(kv_ptr, gate_ptr, s_kb, s_kt, s_gb, s_gt, pk_ptr, pg_ptr, s_pkb, s_pks, s_pgb,
                                s_pgs, ape_ptr, s_ape, b, w, p0, c0, M, C, D, ADD_APE, BLOCK_S, BLOCK_D)
                _emit_block(x, rstd, c0, wpos, norm_ptr, inv_ptr, row_ptr, had_scale,
                            D, ROPE, STORE, QB, ROW_BYTES, LOG_D, BLOCK_D)


@triton.jit
def _pending_kernel(kv_ptr, gate_ptr, s_kb, s_kt, s_gb, s_gt,
                    pk_ptr, pg_ptr, s_pkb, s_pks, s_pgb, s_pgs,
                    ape_ptr, s_ape, pos_ptr, s_posb, T, NSTEPS, CD,
                    M: tl.constexpr, SLOTS: tl.constexpr, ADD_APE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (b, i, channel block): token j = n - SLOTS + i (if >= 0) goes to slot (p0 + j) % SLOTS."""
    b = tl.program_id(0).to(tl.int64)  # b * T * 2*c*d passes 2**31 at batch 256
    p0, n = _row_extent(pos_ptr + b * s_posb, T, NSTEPS)
    j = n - SLOTS + tl.program_id(1)
    if (n > 0) & (j >= 0):
        j64 = j.to(tl.int64)
        ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = ch < CD
        kv = tl.load(kv_ptr + b * s_kb + j64 * s_kt + ch, mask=cm, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + b * s_gb + j64 * s_gt + ch, mask=cm, other=0.0).to(tl.float32)
        if ADD_APE:
            g += tl.load(ape_ptr + ((p0 + j) % M) * s_ape + ch, mask=cm, other=0.0).to(tl.float32)
        slot = (p0 + j) % SLOTS
        tl.store(pk_ptr + b * s_pkb + slot * s_pks + ch, _cast_rne(kv, pk_ptr.dtype.element_ty), mask=cm)
        tl.store(pg_ptr + b * s_pgb + slot * s_pgs + ch, _cast_rne(g, pg_ptr.dtype.element_ty), mask=cm)


# ------------------------------------------------------------------------------------------- host side

def _next_pow2(x):
    return 1 << max(0, int(x) - 1).bit_length()


def _kv_block(d, rope_dim):
    # rows that are all RoPE dims have no scale blocks (any block works; 1 divides every BLOCK_D)
    return math.gcd(64, d - rope_dim) if d > rope_dim else 1


def _row_bytes(d, store, rope_dim):
    if store == "fp8_ds":
        n = d - rope_dim
        return (n + 2 * rope_dim + n // _kv_block(d, rope_dim) + 7) // 8 * 8
    if store == "fp8":
        return d + 4
    if store == "mxfp4":
        return d // 2 + d // 32
    return d


def _format_problem(d, store, rope_dim):
    """Why rows of width ``d`` cannot be encoded as ``store`` by these kernels, or None."""
    if store not in _STORE_CODES:
        return f"unknown row format {store!r}"
    if rope_dim % 2 or rope_dim > d:
        return f"rope_dim={rope_dim} must be even and at most d={d}"
    if (d - rope_dim) % 2:
        return f"d - rope_dim = {d - rope_dim} must be even (RoPE pairs are read two channels at a time)"
    if store == "mxfp4" and (d & (d - 1) or d < 32):
        return f"mxfp4 rows need a power-of-two d >= 32 (Hadamard, 32-value scale blocks), got {d}"
    return None


def _pool_block_d(meta, d, store):
    """Channels per pooling pass: fp8 / mxfp4 rows need the whole row in one block (one row scale, the
    Hadamard over all d), so they ignore BLOCK_D; other formats take min(BLOCK_D, d) (two passes if < d)."""
    if store in _WHOLE_ROW:
        return _next_pow2(d)
    return min(int(meta["BLOCK_D"]), _next_pow2(d))


def _pool_block_s(meta, slots):
    """Slots per pooling step: more than the window's c*m slots would only add masked rows."""
    return min(int(meta["BLOCK_S"]), _next_pow2(slots))


def _check_format(problem):
    if problem:
        raise ValueError(f"compressor kernel: {problem}")


def _launch_pool_and_update(kv, gate, add_ape, ape, norm_w, rows, pend_kv, pend_gate, pos, *,
                            ratio, overlap, eps, rope_dim, theta, yarn, store, meta):
    B, T = pos.shape
    m, c = int(ratio), 2 if overlap else 1
    cd = kv.shape[2]
    d = cd // c
    slots = c * m
    _check_format(_format_problem(d, store, rope_dim))
    want = _row_bytes(d, store, rope_dim)
    if rows.shape[2] != want:
        raise ValueError(f"compressor kernel: rows width {rows.shape[2]} != {want} for format {store!r}")
    bd = _pool_block_d(meta, d, store)
    _check_format(_pool_problem(meta, d, store, rope_dim, bd))
    if pos.stride(1) != 1:
        pos = pos.contiguous()
    for t in (kv, gate, pend_kv, pend_gate, rows, ape):
        if t.stride(-1) != 1:
            raise ValueError("compressor kernel: tensors need a unit stride in their last dim")
    nsteps = max(1, T.bit_length())
    inv = _rope_inv_freq(rope_dim, theta, yarn, kv.device)
    code = _STORE_CODES[store]
    n_win = (T + m - 1) // m          # at most this many windows close in one call
    common = (kv, gate, kv.stride(0), kv.stride(1), gate.stride(0), gate.stride(1),
              pend_kv, pend_gate, pend_kv.stride(0), pend_kv.stride(1), pend_gate.stride(0), pend_gate.stride(1),
              ape, ape.stride(0), pos, pos.stride(0), T, nsteps)
    if n_win > 0 and rows.shape[1] > 0:
        _pool_kernel[(B, n_win)](
            *common, norm_w, inv, rows, rows.stride(0), rows.stride(1), rows.shape[1], float(eps),
            float(d) ** -0.5,
            M=m, C=c, D=d, ROPE=rope_dim, STORE=code, QB=_kv_block(d, rope_dim) if code == 1 else 1,
            ROW_BYTES=rows.shape[2], LOG_D=max(0, d.bit_length() - 1), ADD_APE=add_ape,
            BLOCK_S=_pool_block_s(meta, slots), BLOCK_D=bd, num_warps=int(meta["POOL_WARPS"]))
    bc = int(meta["BLOCK_C"])
    _pending_kernel[(B, slots, triton.cdiv(cd, bc))](
        *common, cd, M=m, SLOTS=slots, ADD_APE=add_ape, BLOCK_C=bc, num_warps=int(meta["UPD_WARPS"]))


def _merge(op, meta):
    return {**DEFAULT_META[op], **(meta or {})}


def compressor(h, wkv, wgate, ape, norm_w, rows, pend_kv, pend_gate, pos, *, ratio, overlap, eps, rope_dim, theta,
               yarn=None, store=None, meta=None):
    """Fused compressor: projections GEMM, pooling into ``rows``, pending-slot update (all in place)."""
    meta = _merge("compressor", meta)
    B, T, K = h.shape
    cd = wkv.shape[0]
    if T == 0 or B == 0:
        return rows, pend_kv, pend_gate
    h2 = h.reshape(B * T, K)
    if wgate.stride() != wkv.stride():
        wkv, wgate = wkv.contiguous(), wgate.contiguous()
    pos = pos.contiguous()
    ape = ape.contiguous()
    proj = torch.empty(B, T, 2 * cd, dtype=torch.float32, device=h.device)
    bm, bn, bk = int(meta["BLOCK_M"]), int(meta["BLOCK_N"]), int(meta["BLOCK_K"])
    nbh = triton.cdiv(cd, bn)
    upcast = INTERPRET and h.dtype != torch.float32
    prec = "ieee" if (INTERPRET or h.dtype != torch.float32) else meta["DOT_PRECISION"]
    _proj_kernel[(triton.cdiv(B * T, bm), 2 * nbh)](
        h2, wkv, wgate, ape, pos, proj, B * T, K, cd, nbh, int(ratio),
        h2.stride(0), h2.stride(1), wkv.stride(0), wkv.stride(1), ape.stride(0), proj.stride(1),
        UPCAST=upcast, DOT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=int(meta["num_warps"]), num_stages=int(meta["num_stages"]))
    _launch_pool_and_update(proj[..., :cd], proj[..., cd:], False, ape, norm_w, rows, pend_kv, pend_gate, pos,
                            ratio=ratio, overlap=overlap, eps=eps, rope_dim=rope_dim, theta=theta, yarn=yarn,
                            store=store, meta=meta)
    return rows, pend_kv, pend_gate


def compress(kv, gate, ape, norm_w, rows, pend_kv, pend_gate, pos, *, ratio, overlap, eps, rope_dim, theta,
             yarn=None, store=None, meta=None):
    """Unfused compress (projections given): ``ape`` is added to the gates inside the pooling/update kernels."""
    meta = _merge("compress", meta)
    if kv.shape[0] == 0 or kv.shape[1] == 0:
        return rows, pend_kv, pend_gate
    _launch_pool_and_update(kv, gate, True, ape.contiguous(), norm_w, rows, pend_kv, pend_gate, pos.contiguous(),
                            ratio=ratio, overlap=overlap, eps=eps, rope_dim=rope_dim, theta=theta, yarn=yarn,
                            store=store, meta=meta)
    return rows, pend_kv, pend_gate


KERNELS = {"compressor": compressor, "compress": compress}

# Meta-parameters.  The three launches barely interact, so each gets a few meaningful values, listed
# best first: the cost model prices only the projection GEMM, so among configs that differ only in the
# pooling / pending parameters it keeps the grid order.
#   projection GEMM: BLOCK_M/N/K, num_warps, num_stages (the names the cost model and the generic
#     shared-memory pruning read); DOT_PRECISION matters for fp32 activations only (other dtypes always
#     dot in their own type), so elsewhere only its first value is a candidate;
#   pooling: BLOCK_S slots x BLOCK_D channels per step (BLOCK_D < d: two passes; fp8 / mxfp4 rows always
#     take the whole row), POOL_WARPS;
#   pending update: a copy of one token's 2*c*d values per program, launch-bound: not tuned.
_POOL_META = {"BLOCK_S": (8, 16, 4, 2), "BLOCK_D": (1024, 128), "POOL_WARPS": (4, 8),
              "BLOCK_C": (512,), "UPD_WARPS": (4,)}
META = {
    "compressor": {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (32, 64, 128), "BLOCK_K": (32, 64, 128),
                   "num_warps": (4, 8), "num_stages": (2, 3, 4), "DOT_PRECISION": ("ieee", "tf32x3"),
                   **_POOL_META},
    "compress": dict(_POOL_META),
}
_POOL_DEFAULT = {"BLOCK_S": 8, "BLOCK_D": 1024, "POOL_WARPS": 4, "BLOCK_C": 512, "UPD_WARPS": 4}
DEFAULT_META = {
    "compressor": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3,
                   "DOT_PRECISION": "ieee", **_POOL_DEFAULT},
    "compress": dict(_POOL_DEFAULT),
}

# Resource limits the estimates below are held to.  Every target has 255 registers per thread; shared memory
# per block is 99 KiB on sm86/89/120, 163 KiB on sm80 and 227 KiB on sm90/100, which the tuner's own pruning
# checks per device with the same GEMM formula (sm90/100 keep num_stages operand buffers, sm80 one fewer).
_SMEM_BYTES = 200 * 1024
_MAX_REGS = 240  # estimated registers per thread allowed: the estimates below err by up to ~10%


def _gemm_regs(bm, bn, bk, warps, eb, tf32x3):
    """Registers per thread of ``_proj_kernel`` (a fit to ptxas on sm80, the most register-hungry target:
    its mma.sync operands sit in registers): the fp32 accumulator with its epilogue copies, and the A and B
    fragments of one K step (tf32x3 splits each into a high and a low part)."""
    threads = 32 * warps
    frag = (bm + bn) * bk * eb // (4 * threads) * (2 if tf32x3 else 1)
    return 32 + 3 * (bm * bn // threads) // 2 + frag


def _pool_regs(block_s, bd, warps, two_pass):
    """Registers per thread of ``_pool_kernel`` (a fit to ptxas on sm80/sm90/sm100 at d = 128 and 512): the
    [BLOCK_S, BLOCK_D] kv / gate / pointer tiles of one pooling step, spread over the threads, and the
    per-channel softmax state; the two-pass form keeps both passes' state."""
    tile = block_s * bd // (32 * warps)
    return 48 + 7 * tile // 2 + (24 if two_pass else 0)


def _pool_problem(meta, d, store, rope_dim, bd):
    """Why the pooling launch cannot run with ``meta`` (hard limits only: what the kernel cannot do)."""
    for name in ("BLOCK_S", "BLOCK_D", "BLOCK_C", "POOL_WARPS", "UPD_WARPS"):
        v = meta[name]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
            return f"{name}={v} must be a power of two"
    if bd < 2:
        return f"BLOCK_D={bd} must be at least 2 (RoPE pairs)"
    if store == "fp8_ds" and bd % _kv_block(d, rope_dim):
        return f"BLOCK_D={bd} must be a multiple of the fp8_ds scale block {_kv_block(d, rope_dim)}"
    return None


def _canonical(op, name, meta, same):
    """For a grid value of ``name`` that behaves exactly like an earlier one (``same(a, b)``), the reason it
    is not a separate candidate; None for the first of its kind and for values off the grid."""
    grid = META[op].get(name, ())
    v = meta[name]
    if v not in grid:
        return None
    first = next(g for g in grid if same(g, v))
    return None if first == v else f"{name}={v} runs exactly as {name}={first} here"


def _shape_args(shapes, attrs):
    """(input shapes, attrs, dtype) from the list form (+ ``attrs``) or the tuner's dict form."""
    dtype = None
    if isinstance(shapes, dict):
        attrs = {**(shapes.get("attrs") or {}), **(attrs or {})}
        dtype = shapes.get("dtype")
        shapes = shapes.get("inputs") or []
    return [tuple(s) if s is not None else None for s in shapes], dict(attrs or {}), dtype


def _dim(shapes, i, j):
    try:
        v = shapes[i][j]
    except (IndexError, TypeError):
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@functools.lru_cache(maxsize=1024)  # the tuning spaces ask it once per candidate
def _guess_format(d, width):
    """(store, candidate rope dims) that explain a row width, for callers that give no attributes."""
    if width == d:
        return None, (0,)
    if width == d + 4:
        return "fp8", (0,)
    if d >= 32 and d & (d - 1) == 0 and width == d // 2 + d // 32:
        return "mxfp4", (0,)
    return "fp8_ds", tuple(r for r in range(0, d + 1, 2) if _row_bytes(d, "fp8_ds", r) == width) or (0,)


def constraints(op, meta, shapes, attrs=None):
    """Why ``meta`` cannot run ``op`` on ``shapes``, or None.  ``shapes``: the input shapes in the op's order
    (with the op's attributes in ``attrs``, optional: the row format is then inferred from the rows' width),
    or the tuner's dict {"inputs": [...], "outputs": [...], "attrs": {...}, "dtype": ...}."""
    if op not in META:
        return f"compressor: no kernel for {op}"
    meta = _merge(op, meta)
    shapes, attrs, dtype = _shape_args(shapes, attrs)
    fp32 = None if dtype is None else str(dtype) in ("f32", "float32", "torch.float32")
    if op == "compressor":
        d, width = _dim(shapes, 4, 0), _dim(shapes, 5, 2)
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = meta[name]
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                return f"{name}={v}: tl.dot needs a power of two >= 16"
        for name in ("num_warps", "num_stages"):
            if not isinstance(meta[name], int) or meta[name] < 1:
                return f"{name}={meta[name]} must be a positive int"
        if meta["DOT_PRECISION"] not in ("ieee", "tf32x3", "tf32"):
            return f"DOT_PRECISION={meta['DOT_PRECISION']!r} unknown"
        if fp32 is False:
            why = _canonical(op, "DOT_PRECISION", meta, lambda a, b: True)
            if why:
                return why + f" ({dtype} activations dot in their own type)"
        bm, bn, bk, warps = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["num_warps"]
        eb = 4 if fp32 else 2
        regs = _gemm_regs(bm, bn, bk, warps, eb, fp32 is not False and meta["DOT_PRECISION"] == "tf32x3")
        if regs > _MAX_REGS:
            return (f"the projection's {bm}x{bn} accumulator and {bk}-deep operand tiles need ~{regs} registers "
                    f"per thread with {warps} warps (> {_MAX_REGS}: spills)")
        smem = meta["num_stages"] * (bm + bn) * bk * eb
        if smem > _SMEM_BYTES:
            return (f"{meta['num_stages']} stages of {bm}x{bk} + {bn}x{bk} GEMM operands need {smem // 1024} KiB of "
                    f"shared memory")
    else:
        d, width = _dim(shapes, 3, 0), _dim(shapes, 4, 2)
    if d is None or width is None:
        return None
    ape = 3 if op == "compressor" else 2
    m, cd = _dim(shapes, ape, 0), _dim(shapes, ape, 1)
    slots = m * cd // d if m and cd else None
    bs = _pool_block_s(meta, slots) if slots else meta["BLOCK_S"]
    if slots:
        why = _canonical(op, "BLOCK_S", meta, lambda a, b: _pool_block_s({"BLOCK_S": a}, slots)
                         == _pool_block_s({"BLOCK_S": b}, slots))
        if why:
            return why + f" (windows of {slots} slots)"
    store, ropes = _guess_format(d, width)
    store = attrs.get("store", store)
    if isinstance(attrs.get("rope_dim"), int):
        ropes = [attrs["rope_dim"]]
    why = _canonical(op, "BLOCK_D", meta, lambda a, b: _pool_block_d({"BLOCK_D": a}, d, store)
                     == _pool_block_d({"BLOCK_D": b}, d, store))
    if why:
        return why + f" (d={d}, {store or 'plain'} rows)"
    bd = _pool_block_d(meta, d, store)
    for r in ropes:
        why = _format_problem(d, store, r) or _pool_problem(meta, d, store, r, bd)
        if why:
            return why
    regs = _pool_regs(bs, bd, meta["POOL_WARPS"], bd < d)
    if regs > _MAX_REGS:
        return (f"pool tile BLOCK_S x BLOCK_D = {bs}x{bd} needs ~{regs} registers per thread with "
                f"{meta['POOL_WARPS']} warps (> {_MAX_REGS}: spills)")
    return None
