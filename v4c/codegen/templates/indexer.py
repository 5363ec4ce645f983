"""The lightning indexer: which compressed rows each token's CSA attention reads.

Op:
  * ``indexer`` (fused): query GEMM + RoPE (+ Hadamard and FP4 round trip for MXFP4 keys) in the
    GEMM epilogue, head-weight GEMM, scores over all compressed keys, streaming top-k.

Kernels (one ``@triton.jit`` kernel per job; the small ``@triton.jit`` helpers shared with the
attention family live in ``prelude.py``):
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

from .prelude import MAX_ACC_REGS, SMEM_BYTES, _check, _constraint_args, _cos_sin, _dot_f32, _last_contiguous, _mm, _np2, _pow2, _pow2_int, _rope_inv_freq, _round_to, _ue8m0_exponent  # v4c: inline prelude

INT64_MIN = tl.constexpr(-9223372036854775808)  # packed key of "no entry"
NEG_INF_KEY = tl.constexpr(-2139095041)  # sortable int32 key of an fp32 -inf score (a masked entry)


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

META = {
    # BLOCK_M / BLOCK_K: the projections' tiles (the q GEMM's N tile is one head, the weight GEMM's
    # all heads); BLOCK_T x BLOCK_H query rows x BLOCK_S keys per scores program; the top-k tile is
    # TOPK_TILE * next_pow2(topk) keys; TOPK_SPLIT programs per token in decode (T == 1).
    "indexer": {"BLOCK_M": (16, 32, 64), "BLOCK_K": (32, 64, 128), "BLOCK_T": (1, 2, 4, 8),
                "BLOCK_H": (16, 32, 64), "BLOCK_S": (16, 32, 64, 128), "TOPK_TILE": (1, 2, 4),
                "TOPK_SPLIT": (1, 2, 4, 8), "num_warps": (4, 8), "num_stages": (1, 2, 3)},
}
DEFAULT_META = {
    "indexer": {"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_T": 2, "BLOCK_H": 32, "BLOCK_S": 64, "TOPK_TILE": 2,
                "TOPK_SPLIT": 4, "num_warps": 4, "num_stages": 2},
}

SCORE_SCRATCH_BYTES = 1 << 28  # the indexer's score scratch per launch; longer calls are chunked


def constraints(op, meta, shapes):
    """Why ``meta`` cannot run ``op`` on ``shapes``, or None.  ``shapes``: the op's input shapes in
    the reference's argument order, or a dict {"inputs": [...], "attrs": {...}, "dtype": ...};
    symbolic (non-int) dims are allowed where they do not matter."""
    parsed = _constraint_args("indexer", op, meta, shapes, META, DEFAULT_META)
    if isinstance(parsed, str):
        return parsed
    m, shapes, attrs, eb = parsed
    warps, stages = m["num_warps"], m["num_stages"]
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


KERNELS = {"indexer": indexer}
