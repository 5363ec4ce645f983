"""Mixture-of-experts kernels: the router (GEMM, sqrt-softplus scores, top-k or hash selection, weights,
and the expert-sorted assignment permutation) and the expert FFN (grouped GEMMs with the clamped SwiGLU
fused into the first and the weighted scatter-add into the second, shared expert included).

Self-contained template (torch + triton only); see ``templates/__init__.py`` for the contract.

Vocabulary. M tokens each pick K experts out of E; assignment ``a = token * K + slot``. The router's
``perm`` lists the A = M*K assignments sorted by expert (stable) and ``offsets[e]:offsets[e+1]`` is expert
e's segment of it. The FFN treats the shared expert as one more segment, number E, whose rows are all M
tokens in order; its intermediate rows live after the routed ones, at A + token, in the activation buffer.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .prelude import _mma_warps, _per_thread  # v4c: inline prelude

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_SMEM_BYTES = 227 * 1024  # the largest per-block shared memory of the targets (sm90, sm100)


# ---- shared helpers -----------------------------------------------------------------------------

@triton.jit
def _dot_operands(a, b, UPCAST: tl.constexpr):
    """bf16 tiles are upcast before tl.dot under the interpreter, where bf16 dots are wrong."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _round_rtne(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in DTYPE. For bf16 the rounding is done on the bits: the
    interpreter's fp32 -> bf16 cast truncates (a GPU's rounds to nearest-even, the same as this)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


# ---- moe_router: GEMM + scores + selection + weights + per-block expert counts -----------------

@triton.jit
def _router_kernel(h_ptr, w_ptr, bias_ptr, table_ptr, ids_ptr, idx_ptr, wts_ptr, counts_ptr,
                   M, D, E, stride_h, stride_w, stride_table, stride_ids, scaling,
                   K: tl.constexpr, HASH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, K_PAD: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):
    """One program per BLOCK_M tokens, all experts at once: logits, scores, the K chosen experts and their
    renormalised weights, and the block's histogram of chosen experts (for the sort kernel)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    r64 = rows.to(tl.int64)  # row * stride passes 2**31 from 524,288 tokens of 4096
    experts = tl.arange(0, BLOCK_E)
    emask = experts < E
    ks = tl.arange(0, BLOCK_K)
    act_ty = h_ptr.dtype.element_ty

    # logits = h @ w^T, fp32 accumulation
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for k0 in tl.range(0, D, BLOCK_K, num_stages=NUM_STAGES):
        kmask = k0 + ks < D
        x = tl.load(h_ptr + r64[:, None] * stride_h + (k0 + ks)[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + experts[:, None] * stride_w + (k0 + ks)[None, :],
                    mask=emask[:, None] & kmask[None, :], other=0.0).to(act_ty)
        x, w = _dot_operands(x, w, UPCAST)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    # the reference's router linear returns the activation dtype: round the same way
    logits = _round_rtne(acc, act_ty).to(tl.float32)

    # sqrt(softplus(l)); softplus = l above 20 (torch's threshold), else log1p(exp(l)), with log1p
    # computed accurately for small exp(l) as log(u) * y / (u - 1), u = 1 + y
    y = tl.exp(tl.minimum(logits, 20.0))
    u = 1.0 + y
    log1p = tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))
    # padding experts score -inf: never selected, and they need no mask of their own below
    scores = tl.where(emask[None, :], tl.sqrt(tl.where(logits > 20.0, logits, log1p)), float("-inf"))

    slots = tl.arange(0, K_PAD)
    smask = slots < K
    if HASH:
        # experts fixed per token id (negative ids clamp to row 0)
        tok_id = tl.maximum(tl.load(ids_ptr + r64 * stride_ids, mask=rmask, other=0), 0)
        chosen = tl.load(table_ptr + tok_id[:, None].to(tl.int64) * stride_table + slots[None, :],
                         mask=rmask[:, None] & smask[None, :], other=0).to(tl.int32)
        picked = tl.gather(scores, chosen, 1)
    else:
        # top-K of score + bias, one argmax at a time (the bias picks, the score weighs). Only the
        # scores stay live across the loop (a chosen expert's score becomes -inf); the biased copy is
        # rebuilt per step, so the register file holds one [BLOCK_M, BLOCK_E] tile, not two.
        bias = tl.load(bias_ptr + experts, mask=emask, other=0.0).to(tl.float32)
        chosen = tl.zeros([BLOCK_M, K_PAD], dtype=tl.int32)
        picked = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
        for j in tl.static_range(K):
            best = tl.argmax(scores + bias[None, :], axis=1).to(tl.int32)
            hit = experts[None, :] == best[:, None]
            score_j = tl.sum(tl.where(hit, scores, 0.0), axis=1)
            chosen = tl.where(slots[None, :] == j, best[:, None], chosen)
            picked = tl.where(slots[None, :] == j, score_j[:, None], picked)
            scores = tl.where(hit, float("-inf"), scores)

    valid = rmask[:, None] & smask[None, :]
    picked = tl.where(valid, picked, 0.0)
    weights = picked / (tl.sum(picked, axis=1)[:, None] + 1e-20) * scaling
    out = r64[:, None] * K + slots[None, :]
    tl.store(idx_ptr + out, chosen.to(tl.int64), mask=valid)
    tl.store(wts_ptr + out, weights, mask=valid)

    # histogram of this block's choices; padding lanes are counted as expert 0 and taken back out
    flat = tl.reshape(tl.where(valid, chosen, 0), [BLOCK_M * K_PAD])
    hist = tl.histogram(flat, BLOCK_E)
    n_pad = BLOCK_M * K_PAD - tl.sum(valid.to(tl.int32))
    hist = hist - tl.where(experts == 0, n_pad, 0)
    tl.store(counts_ptr + pid * E + experts, hist, mask=emask)


# ---- moe_router: counting sort of the assignments by expert -------------------------------------

@triton.jit
def _route_sort_kernel(idx_ptr, counts_ptr, perm_ptr, offsets_ptr, A, E, n_blocks, per_block,
                       BINS: tl.constexpr, SCAN_ROWS: tl.constexpr, SORT_BLOCK: tl.constexpr):
    """One program per router block: its assignments go to offsets[e] + (earlier blocks' count of e)
    + (earlier assignments of e in this block), which is the stable sort by expert."""
    pid = tl.program_id(0)
    bins = tl.arange(0, BINS)
    bmask = bins < E

    # per-expert totals, and how many assignments of each expert earlier blocks hold
    total = tl.zeros([BINS], dtype=tl.int32)
    before = tl.zeros([BINS], dtype=tl.int32)
    for q0 in range(0, n_blocks, SCAN_ROWS):
        q = q0 + tl.arange(0, SCAN_ROWS)
        c = tl.load(counts_ptr + q[:, None] * E + bins[None, :],
                    mask=(q < n_blocks)[:, None] & bmask[None, :], other=0)
        total += tl.sum(c, axis=0)
        before += tl.sum(tl.where((q < pid)[:, None], c, 0), axis=0)
    starts = tl.cumsum(total, axis=0) - total
    if pid == 0:
        tl.store(offsets_ptr + bins, starts.to(tl.int64), mask=bmask)
        tl.store(offsets_ptr + E, A)

    cursor = starts + before  # where this block's next assignment of each expert goes
    lane = tl.arange(0, SORT_BLOCK)
    earlier = lane[None, :] < lane[:, None]
    a_end = tl.minimum(pid * per_block + per_block, A)
    for a0 in range(pid * per_block, a_end, SORT_BLOCK):
        a = a0 + lane
        amask = a < a_end
        e = tl.load(idx_ptr + a, mask=amask, other=0).to(tl.int32)
        # padding lanes (expert 0) sit after every real lane of the last chunk, so they shift nothing
        rank = tl.sum(((e[None, :] == e[:, None]) & earlier).to(tl.int32), axis=1)
        tl.store(perm_ptr + tl.gather(cursor, e, 0) + rank, a.to(tl.int64), mask=amask)
        cursor += tl.histogram(e, BINS)


def moe_router(h, w, table_or_bias, ids=None, *, scaling, hash=False, topk=None, meta=None):
    """Launcher with the signature of ``moe_router``'s reference: (idx, weights, perm, offsets)."""
    meta = {**DEFAULT_META["moe_router"], **(meta or {})}
    B, T, D = h.shape
    E = w.shape[0]
    M = B * T
    K = table_or_bias.shape[1] if hash else int(topk)
    dev = h.device
    idx = torch.empty((B, T, K), dtype=torch.int64, device=dev)
    wts = torch.empty((B, T, K), dtype=torch.float32, device=dev)
    perm = torch.empty((B, T, K), dtype=torch.int64, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int64, device=dev)
    if M == 0:
        offsets.zero_()
        return idx, wts, perm, offsets
    x = h.reshape(M, D)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    if hash:
        table = table_or_bias if table_or_bias.stride(-1) == 1 else table_or_bias.contiguous()
        ids_flat = ids.reshape(M)  # may be a strided view (a decode step's column of the ids)
        bias = w  # unused
    else:
        table, ids_flat, bias = idx, idx, table_or_bias  # table/ids unused
    block_m = meta["BLOCK_M"]
    n_blocks = triton.cdiv(M, block_m)
    block_e = max(16, triton.next_power_of_2(E))  # tl.dot wants N >= 16
    counts = torch.empty((n_blocks, E), dtype=torch.int32, device=dev)
    upcast = _INTERPRET and (h.dtype == torch.bfloat16 or w.dtype == torch.bfloat16)
    _router_kernel[(n_blocks,)](
        x, w, bias, table, ids_flat, idx, wts, counts,
        M, D, E, x.stride(0), w.stride(0), table.stride(0), ids_flat.stride(0), float(scaling),
        K=K, HASH=bool(hash), BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_K=meta["BLOCK_K"],
        K_PAD=triton.next_power_of_2(K), UPCAST=upcast,
        DOT_PRECISION="ieee" if h.dtype == torch.float32 else "tf32", NUM_STAGES=meta["num_stages"],
        num_warps=meta["num_warps"])
    _route_sort_kernel[(n_blocks,)](
        idx, counts, perm, offsets, M * K, E, n_blocks, block_m * K,
        BINS=block_e, SCAN_ROWS=max(1, 4096 // block_e), SORT_BLOCK=meta["SORT_BLOCK"],
        num_warps=meta["num_warps"])
    return idx, wts, perm, offsets


# ---- moe_ffn: grouped GEMMs over the expert segments --------------------------------------------

@triton.jit
def _segment_tile(pid, offsets_ptr, E, shared_rows, BLOCK_M: tl.constexpr, SEGS: tl.constexpr):
    """Map program ``pid`` to (segment, first row, end row): segments are the E experts' slices of the
    permutation plus the shared expert (segment E, ``shared_rows`` rows starting at A = offsets[E]),
    each cut into BLOCK_M-row tiles, laid end to end. Past the last tile the segment is > E."""
    s = tl.arange(0, SEGS)
    start = tl.load(offsets_ptr + s, mask=s <= E, other=0)
    end = tl.load(offsets_ptr + s + 1, mask=s < E, other=0)
    end = tl.where(s == E, start + shared_rows, end)
    tiles = tl.where(s <= E, tl.cdiv(end - start, BLOCK_M), 0)
    last = tl.cumsum(tiles, axis=0)  # tiles up to and including each segment
    seg = tl.sum((last <= pid).to(tl.int32), axis=0)
    hit = s == seg
    first_tile = tl.sum(tl.where(hit, last - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(hit, start, 0), axis=0) + (pid - first_tile) * BLOCK_M
    return seg, row0, tl.sum(tl.where(hit, end, 0), axis=0)


@triton.jit
def _gate_up_tile(x_ptr, tok, rmask, stride_x, wg_ptr, wu_ptr, stride_w, cols, cmask, D,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):
    """gate and up tiles [BLOCK_M, BLOCK_N] of x[tok] @ W^T for weights with rows ``cols``."""
    ks = tl.arange(0, BLOCK_K)
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    act_ty = x_ptr.dtype.element_ty
    for k0 in tl.range(0, D, BLOCK_K, num_stages=NUM_STAGES):
        kmask = k0 + ks < D
        x = tl.load(x_ptr + tok[:, None] * stride_x + (k0 + ks)[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = cmask[:, None] & kmask[None, :]
        wg = tl.load(wg_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=wmask, other=0.0).to(act_ty)
        wu = tl.load(wu_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :], mask=wmask, other=0.0).to(act_ty)
        xg, wg = _dot_operands(x, wg, UPCAST)
        xu, wu = _dot_operands(x, wu, UPCAST)
        gate = tl.dot(xg, tl.trans(wg), gate, input_precision=DOT_PRECISION)
        up = tl.dot(xu, tl.trans(wu), up, input_precision=DOT_PRECISION)
    return gate, up


@triton.jit
def _gate_up_kernel(x_ptr, perm_ptr, offsets_ptr, w13_ptr, sg_ptr, su_ptr, act_ptr,
                    D, I, S, E, K, shared_rows, stride_x, stride_we, stride_wr, stride_s, stride_act, limit,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEGS: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):
    """act[row, n] = silu(min(gate, limit)) * clamp(up, -limit, limit) for one (segment row tile, n tile);
    rows of routed segments are permutation positions (token = perm // K), shared rows are A + token."""
    seg, row0, row_end = _segment_tile(tl.program_id(0), offsets_ptr, E, shared_rows, BLOCK_M, SEGS)
    routed = seg < E
    width = tl.where(routed, I, S)
    n0 = tl.program_id(1) * BLOCK_N
    if (seg <= E) & (n0 < width):
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < width
        # the routed expert or the shared one is picked before the K loop, so the kernel has one
        # pipelined loop (one set of shared-memory stages), not one per branch
        if routed:
            tok = tl.load(perm_ptr + rows, mask=rmask, other=0) // K
            wg = w13_ptr + seg.to(tl.int64) * stride_we
            wu = wg + I * stride_wr
        else:
            tok = rows - tl.load(offsets_ptr + E)
            wg = sg_ptr
            wu = su_ptr
        stride_w = tl.where(routed, stride_wr, stride_s)
        gate, up = _gate_up_tile(x_ptr, tok.to(tl.int64), rmask, stride_x, wg, wu, stride_w, cols, cmask,
                                 D, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION, NUM_STAGES)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        act = gate * tl.sigmoid(gate) * up
        tl.store(act_ptr + rows[:, None].to(tl.int64) * stride_act + cols[None, :],
                 _round_rtne(act, act_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _down_tile(act_ptr, rows, rmask, stride_act, w_ptr, stride_w, cols, cmask, inner,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):
    """act[rows, :inner] @ W[cols, :inner]^T as a [BLOCK_M, BLOCK_N] fp32 tile."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    act_ty = act_ptr.dtype.element_ty
    for k0 in tl.range(0, inner, BLOCK_K, num_stages=NUM_STAGES):
        kmask = k0 + ks < inner
        a = tl.load(act_ptr + rows[:, None].to(tl.int64) * stride_act + (k0 + ks)[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + (k0 + ks)[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0).to(act_ty)
        a, w = _dot_operands(a, w, UPCAST)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _down_kernel(act_ptr, perm_ptr, offsets_ptr, wts_ptr, w2_ptr, sd_ptr, out_ptr,
                 D, I, S, E, K, shared_rows, stride_act, stride_we, stride_wr, stride_s, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEGS: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):
    """out[token, n] += weight * (act @ W2^T)[row, n] for one (segment row tile, n tile), by atomic add."""
    seg, row0, row_end = _segment_tile(tl.program_id(0), offsets_ptr, E, shared_rows, BLOCK_M, SEGS)
    routed = seg < E
    if seg <= E:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        # as in _gate_up_kernel: choose the weight before the loop, so there is one pipelined loop
        if routed:
            assignment = tl.load(perm_ptr + rows, mask=rmask, other=0)
            tok = assignment // K
            scale = tl.load(wts_ptr + assignment, mask=rmask, other=0.0).to(tl.float32)
            w_ptr = w2_ptr + seg.to(tl.int64) * stride_we
        else:
            tok = rows - tl.load(offsets_ptr + E)
            scale = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            w_ptr = sd_ptr
        stride_w = tl.where(routed, stride_wr, stride_s)
        inner = tl.where(routed, I, S)
        y = _down_tile(act_ptr, rows, rmask, stride_act, w_ptr, stride_w, cols, cmask, inner,
                       BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, DOT_PRECISION, NUM_STAGES)
        tl.atomic_add(out_ptr + tok[:, None].to(tl.int64) * stride_out + cols[None, :], y * scale[:, None],
                      mask=rmask[:, None] & cmask[None, :])


def moe_ffn(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit, meta=None):
    """Launcher with the signature of ``moe_ffn``'s reference."""
    meta = {**DEFAULT_META["moe_ffn"], **(meta or {})}
    shape = h.shape
    D = shape[-1]
    M = h.numel() // D
    K = idx.shape[-1]
    E, two_i, _ = w13.shape
    I = two_i // 2
    A = M * K
    shared = sg is not None
    S = sg.shape[0] if shared else 0
    # fp32 accumulator for the atomic scatter-add (bf16 atomics are not portable), cast back at the end
    acc = torch.zeros((M, D), dtype=torch.float32, device=h.device)
    if M == 0:
        return acc.to(h.dtype).view(shape)
    x = h.reshape(M, D)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w13 = w13 if w13.is_contiguous() else w13.contiguous()
    w2 = w2 if w2.is_contiguous() else w2.contiguous()
    if shared:
        sg, su, sd = (t if t.is_contiguous() else t.contiguous() for t in (sg, su, sd))
        if sg.dtype != w13.dtype:  # one pointer type for both weight sets (the kernels pick one before the
            wide = torch.promote_types(sg.dtype, w13.dtype)  # loop); the cast is exact (to a wider type)
            w13, w2, sg, su, sd = (t.to(wide) for t in (w13, w2, sg, su, sd))
    else:
        sg, su, sd = w13, w13, w2  # never read: the shared segment has no rows
    perm_flat = perm.reshape(A).contiguous()
    wts = w.reshape(A).contiguous()
    width = max(I, S)
    act = torch.empty((A + (M if shared else 0), width), dtype=h.dtype, device=h.device)

    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    # an upper bound on the row tiles: every non-empty expert wastes at most one partial tile
    row_tiles = triton.cdiv(A, bm) + min(E, A) + (triton.cdiv(M, bm) if shared else 0)
    bf16 = torch.bfloat16 in (h.dtype, w13.dtype, w2.dtype, sg.dtype, sd.dtype)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SEGS=triton.next_power_of_2(E + 1),
                  UPCAST=_INTERPRET and bf16, DOT_PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
                  NUM_STAGES=meta["num_stages"], num_warps=meta["num_warps"])
    shared_rows = M if shared else 0
    _gate_up_kernel[(row_tiles, triton.cdiv(width, bn))](
        x, perm_flat, offsets, w13, sg, su, act,
        D, I, S, E, K, shared_rows, x.stride(0), w13.stride(0), w13.stride(1), sg.stride(0), act.stride(0),
        float(limit), **common)
    _down_kernel[(row_tiles, triton.cdiv(D, bn))](
        act, perm_flat, offsets, wts, w2, sd, acc,
        D, I, S, E, K, shared_rows, act.stride(0), w2.stride(0), w2.stride(1), sd.stride(0), acc.stride(0),
        **common)
    return (acc if h.dtype == torch.float32 else acc.to(h.dtype)).view(shape)


# ---- the template contract ------------------------------------------------------------------------

KERNELS = {"moe_router": moe_router, "moe_ffn": moe_ffn}

META = {
    "moe_router": {"BLOCK_M": (16, 32, 64), "BLOCK_K": (32, 64, 128), "SORT_BLOCK": (32, 64, 128, 256),
                   "num_warps": (4, 8), "num_stages": (2, 3, 4)},
    "moe_ffn": {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (32, 64, 128), "BLOCK_K": (32, 64, 128),
                "num_warps": (4, 8), "num_stages": (2, 3, 4)},
}

DEFAULT_META = {
    # 16 x 512 logits (V4-Pro's 384 experts, padded) at 8 warps; 3 stages of 32-wide K steps fit 99 KiB parts
    "moe_router": {"BLOCK_M": 16, "BLOCK_K": 32, "SORT_BLOCK": 64, "num_warps": 8, "num_stages": 3},
    "moe_ffn": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
}


def _dim(shapes, i, j, default):
    """Dim ``j`` of input ``i``: ``shapes`` is the list of input shapes, or a dict with "inputs"."""
    if isinstance(shapes, dict) and "inputs" in shapes:
        shapes = shapes["inputs"]
    try:
        return int(shapes[i][j])
    except (TypeError, IndexError, KeyError, ValueError):
        return default


# ---- what a config costs: registers and shared memory, as Triton's compiler allocates them ----------
# Calibrated against AOT compiles for sm80, sm90 and sm100 (ptxas registers, kernel shared bytes); the
# estimate must hold on every target, as constraints() does not know which one it judges for.

REG_BUDGET = 224  # estimated registers per thread that still compile without spills (of 255)


def _operand_regs(bm, bn, bk, warps, b_tiles=1):
    """Registers of each warp's share of one K step's [bm, bk] and ``b_tiles`` [bn, bk] operand tiles."""
    wm, wn = _mma_warps(bm, bn, warps)
    return (3 * ((bm // wm + b_tiles * (bn // wn)) * bk // 32)) // 10


def _buffers(bm, stages):
    """Operand buffers a pipelined K loop allocates: num_stages - 1 in flight, one more where Hopper and
    Blackwell MMAs (BLOCK_M >= 64) read both operands from shared memory."""
    return stages if bm >= 64 else max(1, stages - 1)


def _elem_bytes(shapes):
    dtype = shapes.get("dtype") if isinstance(shapes, dict) else None
    return 4 if str(dtype) in ("f32", "float32", "torch.float32") else 2


def _router_usage(meta, experts, elem_bytes=2):
    """(registers, shared bytes) of ``_router_kernel``: the [BLOCK_M, experts] logits (the GEMM's
    accumulator, then the scores) plus a temporary of the same size in each top-k step, the operand tiles of
    a K step, ~48 for addresses and loop state; the K loop's stages of both operand tiles."""
    bm, bk, warps = meta["BLOCK_M"], meta["BLOCK_K"], meta["num_warps"]
    regs = 48 + 2 * _per_thread(bm * experts, warps) + _operand_regs(bm, experts, bk, warps)
    smem = _buffers(bm, meta["num_stages"]) * (bm + experts) * bk * elem_bytes
    return regs, smem


def _ffn_usage(meta, elem_bytes=2):
    """(registers, shared bytes) of the heavier of ``_gate_up_kernel`` and ``_down_kernel``. Gate/up: two
    fp32 accumulators (4 per element with the SwiGLU epilogue's temporaries) and a step's activation tile and
    two weight tiles; down: one accumulator, but its scatter-add holds a 64-bit address, the value and the
    mask per element (5). Shared memory: each kernel's one pipelined K loop (routed and shared experts share
    it)."""
    bm, bn, bk, warps = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["num_warps"]
    acc = _per_thread(bm * bn, warps)
    up = 48 + 4 * acc + _operand_regs(bm, bn, bk, warps, 2)
    down = 48 + 5 * acc + _operand_regs(bm, bn, bk, warps, 1)
    smem = _buffers(bm, meta["num_stages"]) * (bm + 2 * bn) * bk * elem_bytes
    return max(up, down), smem


def constraints(op, meta, shapes):
    """Why ``meta`` cannot run ``op`` (with inputs of ``shapes``, in the op's input order), or None: the
    estimated registers per thread (``_router_usage``/``_ffn_usage``) must stay within REG_BUDGET and the
    shared memory within the largest per-block limit of the targets (the AOT compile checks each
    target's own); operand bytes follow the activation dtype when ``shapes`` names it (bf16 otherwise)."""
    if op not in DEFAULT_META:
        return f"unknown op {op!r}"
    meta = {**DEFAULT_META[op], **meta}
    threads = 32 * meta["num_warps"]
    eb = _elem_bytes(shapes)
    if op == "moe_router":
        experts = max(16, triton.next_power_of_2(_dim(shapes, 1, 0, 256)))
        regs, smem = _router_usage(meta, experts, eb)
        if regs > REG_BUDGET:
            return (f"router tile {meta['BLOCK_M']}x{experts} (logits, scores and operands) needs an estimated "
                    f"{regs} registers per thread at {meta['num_warps']} warps (budget {REG_BUDGET})")
        if smem > _SMEM_BYTES:
            return f"router pipeline needs {smem} B of shared memory (> {_SMEM_BYTES})"
        # the rank step holds a SORT_BLOCK^2 comparison matrix (128^2 at 8 warps already takes all 255
        # registers on sm86/89; 64^2 stays under 64)
        if meta["SORT_BLOCK"] ** 2 > 32 * threads:
            return f"sort rank matrix {meta['SORT_BLOCK']}^2 too large for {meta['num_warps']} warps"
        return None
    if op == "moe_ffn":
        regs, smem = _ffn_usage(meta, eb)
        if regs > REG_BUDGET:
            return (f"gate+up accumulators 2x{meta['BLOCK_M']}x{meta['BLOCK_N']} and their operands need an "
                    f"estimated {regs} registers per thread at {meta['num_warps']} warps (budget {REG_BUDGET})")
        if smem > _SMEM_BYTES:
            return f"gate/up pipeline needs {smem} B of shared memory (> {_SMEM_BYTES})"
        return None
    return f"unknown op {op!r}"
