"""Dense projections: one tiled GEMM kernel ``out = x @ w.T`` with constexpr epilogues.

Ops: ``linear``, ``linear_rms_norm``, ``q_proj``, ``kv_proj`` and ``o_proj`` (two launches of the
same kernel: the block-diagonal grouped GEMM, then the dense one).

Epilogue switches of ``_gemm_kernel`` (applied to the fp32 accumulator tile, in this order):
  * ``NORM``: RMSNorm of every row of the tile. The tile's N extent *is* the norm group
    (``BLOCK_N`` == the head width for ``q_proj``, == the row width for ``kv_proj`` and
    ``linear_rms_norm``), so the sum of squares is a plain row reduction in registers.
  * ``NORM_WEIGHT``: multiply by the norm weight (fp32, one per column).
  * ``ROPE_DIM`` > 0: interleaved RoPE on the last ``ROPE_DIM`` columns of the tile at each
    row's position (padding positions < 0 use position 0, as the reference does).
Between the stages the tile is rounded to the activation dtype, as the unfused reference
stores its intermediates in that dtype (a no-op for fp32).

A third launch-grid axis runs independent groups (block-diagonal weights): group ``g``
reads columns ``[g*K, (g+1)*K)`` of ``x``, rows ``[g*N, (g+1)*N)`` of ``w`` and writes
columns ``[g*N, (g+1)*N)`` of ``out``; plain GEMMs have one group.

Self-contained (torch + triton only): a rendered copy runs from inside compiled artifacts.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .prelude import MAX_ACC_REGS, SMEM_BYTES, _check, _cos_sin, _interpreting, _np2, _pow2_int, _rope_inv_freq  # v4c: inline prelude

# ---- the kernel ---------------------------------------------------------------------------


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, out_ptr, norm_w_ptr, pos_ptr, inv_freq_ptr,
    M, N, K,                                   # per group: out[M, N] = x[M, K] @ w[N, K].T
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    eps,
    NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr, ROPE_DIM: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # GROUP_N: the columns one tile covers (the norm group for the epilogue ops, whatever its width;
    # == BLOCK_N otherwise); BLOCK_N is it rounded up to a power of two, the extra columns masked
    # tile order: GROUP_M row tiles share each column sweep, so w tiles are reused from L2
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, GROUP_N)
    per_sweep = GROUP_M * tiles_n
    first_m = (pid // per_sweep) * GROUP_M
    sweep_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_sweep) % sweep_m
    pid_n = (pid % per_sweep) // sweep_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_group = tl.arange(0, BLOCK_N)
    offs_n = pid_n * GROUP_N + in_group
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = (offs_n < N) & (in_group < GROUP_N)
    rows = offs_m.to(tl.int64)
    cols = (grp * N + offs_n).to(tl.int64)  # output / weight-row index across groups

    x_ptrs = x_ptr + rows[:, None] * stride_xm + (grp * K + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N] view of w.T
    act_dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(act_dtype)  # ref: w.to(x.dtype)
        if UPCAST:  # the interpreter's bf16 dot is wrong: multiply exact fp32 copies instead
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if NORM or ROPE_DIM > 0:
        acc = acc.to(act_dtype).to(tl.float32)  # the reference's GEMM output, in the activation dtype
    if NORM:  # the tile is exactly one norm group: RMS over its columns
        mean_sq = tl.sum(acc * acc, axis=1) / GROUP_N  # masked columns are zero
        acc = acc * tl.rsqrt(mean_sq + eps)[:, None]
        if NORM_WEIGHT:
            acc = acc * tl.load(norm_w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc = acc.to(act_dtype).to(tl.float32)
    if ROPE_DIM > 0:
        # interleaved pairs (2i, 2i+1) of the tile; pairs before the RoPE tail get frequency 0,
        # i.e. cos 1 and sin 0, which leaves them exactly unchanged
        HALF: tl.constexpr = BLOCK_N // 2
        x_even, x_odd = tl.split(tl.reshape(acc, (BLOCK_M, HALF, 2)))
        pair = tl.arange(0, HALF) - (GROUP_N - ROPE_DIM) // 2
        inv_freq = tl.load(inv_freq_ptr + pair, mask=(pair >= 0) & (pair < ROPE_DIM // 2), other=0.0)
        pos = tl.load(pos_ptr + rows, mask=mask_m, other=0)
        pos = tl.maximum(pos, 0).to(tl.float32)
        cos, sin = _cos_sin(pos[:, None] * inv_freq[None, :])
        y_even = x_even * cos - x_odd * sin
        y_odd = x_odd * cos + x_even * sin
        acc = tl.reshape(tl.join(y_even, y_odd), (BLOCK_M, BLOCK_N))

    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ---- host side ----------------------------------------------------------------------------

_GEMM_META = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (32, 64, 128, 256), "BLOCK_K": (32, 64, 128),
              "GROUP_M": (1, 8), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
# epilogue ops: the tile's N extent is the norm group's width, whatever it is (None: "that width"), so
# BLOCK_N is not searched: any other value could never run
_NORM_META = {"BLOCK_M": (16, 32, 64), "BLOCK_N": (None,), "BLOCK_K": (32, 64, 128),
              "GROUP_M": (1, 8), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
# linear_rms_norm's group is a whole row: one wider than 1024 (V4-Pro's q_lora_rank 1536, padded to 2048)
# only fits the registers with 16 warps and shared memory with 16-wide K steps. The per-head norms
# (q_proj, kv_proj: 512 wide) keep the smaller space, whose wide-warp tiles only spill there.
_ROW_NORM_META = {**_NORM_META, "BLOCK_K": (16, 32, 64, 128), "num_warps": (4, 8, 16), "num_stages": (1, 2, 3, 4)}
_NORM_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": None, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 2}

META = {
    "linear": dict(_GEMM_META),
    "linear_rms_norm": dict(_ROW_NORM_META),
    "q_proj": dict(_NORM_META),
    "kv_proj": dict(_NORM_META),
    # o_proj: BLOCK_*_A tile the grouped GEMM (its N is the rank per group), BLOCK_N/K the dense one
    "o_proj": {**_GEMM_META, "BLOCK_N_A": (32, 64, 128, 256), "BLOCK_K_A": (32, 64, 128)},
}
DEFAULT_META = {
    "linear": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    "linear_rms_norm": dict(_NORM_DEFAULT),
    "q_proj": dict(_NORM_DEFAULT),
    "kv_proj": dict(_NORM_DEFAULT),
    "o_proj": {"BLOCK_M": 64, "BLOCK_N_A": 64, "BLOCK_K_A": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
               "num_warps": 4, "num_stages": 3},
}


def _tile_reason(bm, bn, bk, warps, stages, elem_bytes, what="", epilogue=False) -> str | None:
    """``epilogue``: the tile goes through the RMSNorm / RoPE epilogue, which keeps about twice the
    accumulator live again (its even/odd halves, cos/sin, the rounded copies): measured with ptxas, a
    64-register accumulator then compiles without spills (8 warps, 512-wide tiles) and 128 spills ~1.2 KB."""
    for name, v, lo in (("BLOCK_M", bm, 16), ("BLOCK_N", bn, 16), ("BLOCK_K", bk, 16)):
        if not _pow2_int(v) or v < lo:
            return f"{what}{name}={v} must be a power of two >= {lo} (tl.arange / tl.dot)"
    smem = stages * (bm + bn) * bk * elem_bytes
    if smem > SMEM_BYTES:
        return (f"{what}{stages} stages of {bm}x{bk} + {bn}x{bk} tiles need {smem // 1024} KiB of shared memory "
                f"(> {SMEM_BYTES // 1024} KiB)")
    regs = bm * bn // (32 * warps)
    limit = MAX_ACC_REGS // 2 if epilogue else MAX_ACC_REGS
    if regs > limit:
        return (f"{what}a {bm}x{bn} fp32 accumulator is {regs} registers per thread with {warps} warps "
                f"(> {limit}{' with the norm/RoPE epilogue' if epilogue else ''})")
    return None


_BYTES = {"f32": 4, "float32": 4, "torch.float32": 4, "bf16": 2, "bfloat16": 2, "torch.bfloat16": 2,
          "f16": 2, "float16": 2, "torch.float16": 2}


def constraints(op, meta, shapes):
    """Why ``meta`` cannot run ``op`` on ``shapes``, or None.

    ``shapes``: the op's input shapes in the reference's argument order, optionally followed by
    its output shapes; or a dict {"inputs": [...], "outputs": [...], "attrs": {...}, "dtype": ...}.
    ``q_proj`` needs its output shape [B,T,H,Dh] (or attrs["shape"]) to know the head width.
    Symbolic (non-int) dims are allowed where they do not matter (the token dims)."""
    if isinstance(shapes, dict):
        ins, outs = list(shapes.get("inputs", [])), list(shapes.get("outputs", []))
        attrs, dtype = shapes.get("attrs", {}), shapes.get("dtype")
    else:
        n_in = {"linear": 2, "linear_rms_norm": 3, "q_proj": 3, "kv_proj": 4, "o_proj": 3}[op]
        ins, outs, attrs, dtype = list(shapes[:n_in]), list(shapes[n_in:]), {}, None
    eb = _BYTES.get(str(dtype), 2)  # production activations are 16-bit
    m = dict(DEFAULT_META[op], **meta)
    bm, bk, warps, stages = m["BLOCK_M"], m["BLOCK_K"], m["num_warps"], m["num_stages"]
    if not (isinstance(m["GROUP_M"], int) and m["GROUP_M"] >= 1):
        return f"GROUP_M={m['GROUP_M']} must be a positive int"

    if op == "o_proj":
        why = _tile_reason(bm, m["BLOCK_N_A"], m["BLOCK_K_A"], warps, stages, eb, "grouped GEMM: ")
        return why or _tile_reason(bm, m["BLOCK_N"], bk, warps, stages, eb, "dense GEMM: ")
    if op == "linear":
        return _tile_reason(bm, m["BLOCK_N"], bk, warps, stages, eb)

    n = ins[1][0] if len(ins) > 1 else None  # weight rows
    group = n  # linear_rms_norm, kv_proj: the norm covers the whole row
    if op == "q_proj":
        head = attrs.get("shape", [None])[-1] if attrs.get("shape") else (outs[0][-1] if outs else None)
        group = head if isinstance(head, int) else None
    if isinstance(group, int) and isinstance(attrs.get("rope_dim"), int) and group % 2:
        return f"norm group width {group} is odd (RoPE rotates pairs of columns)"
    if group is None:  # q_proj without its head width: only a chosen BLOCK_N can be checked
        bn = m["BLOCK_N"]
        if bn is not None and isinstance(n, int) and n % bn:
            return f"BLOCK_N={bn} must divide N={n}"
        return None if bn is None else _tile_reason(bm, bn, bk, warps, stages, eb)
    bn = m["BLOCK_N"] if m["BLOCK_N"] is not None else group
    if bn != group:
        return f"BLOCK_N={bn} must equal the norm group width {group} (the RMSNorm epilogue reduces one tile's row)"
    bn = _np2(bn)  # the tile is the group rounded up to a power of two
    rope = attrs.get("rope_dim")
    if op in ("q_proj", "kv_proj") and isinstance(rope, int) and not (rope % 2 == 0 and 0 < rope <= bn):
        return f"rope_dim={rope} must be even and within the {bn}-wide tile"
    return _tile_reason(bm, bn, bk, warps, stages, eb, epilogue=True)





def _launch(x2, w, out2, *, groups=1, meta, block_n, block_k, norm=False, norm_w=None, pos=None, inv_freq=None,
            rope_dim=0, eps=0.0):
    """out2[M, groups*N] = per-group x2[M, groups*K] @ w[groups*N, K].T, with the chosen epilogue; a tile
    covers ``block_n`` columns (one norm group for the epilogue ops, of any width)."""
    m_rows = x2.shape[0]
    k = x2.shape[1] // groups
    n = w.shape[0] // groups
    if m_rows == 0:
        return out2
    bm = meta["BLOCK_M"]
    grid = (triton.cdiv(m_rows, bm) * triton.cdiv(n, block_n), groups)
    group_n, block_n = block_n, _np2(block_n)
    dummy = out2  # pointer arguments an epilogue does not read
    _gemm_kernel[grid](
        x2, w, out2,
        norm_w if norm_w is not None else dummy, pos if pos is not None else dummy,
        inv_freq if inv_freq is not None else dummy,
        m_rows, n, k,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), out2.stride(0), out2.stride(1),
        float(eps),
        NORM=norm, NORM_WEIGHT=norm_w is not None, ROPE_DIM=rope_dim,
        UPCAST=_interpreting() and x2.dtype != torch.float32,
        PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",  # fp32 models get true fp32 products
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=meta["GROUP_M"], GROUP_N=group_n,
        num_warps=meta["num_warps"], num_stages=meta["num_stages"],
    )
    return out2


def _rows(x):
    return x.reshape(-1, x.shape[-1])


def linear(x, w, *, meta=None):
    meta = dict(DEFAULT_META["linear"], **(meta or {}))
    _check("linear", meta, constraints("linear", meta, [tuple(x.shape), tuple(w.shape)]))
    x2 = _rows(x)
    out = torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)
    _launch(x2, w, _rows(out), meta=meta, block_n=meta["BLOCK_N"], block_k=meta["BLOCK_K"])
    return out


def _norm_meta(op, meta, shapes):
    meta = dict(DEFAULT_META[op], **(meta or {}))
    _check(op, meta, constraints(op, meta, shapes))
    return meta


def linear_rms_norm(x, w, norm_w, *, eps, meta=None):
    n = w.shape[0]
    meta = _norm_meta("linear_rms_norm", meta, [tuple(x.shape), tuple(w.shape), tuple(norm_w.shape)])
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _launch(_rows(x), w, _rows(out), meta=meta, block_n=n, block_k=meta["BLOCK_K"], norm=True, norm_w=norm_w,
            eps=eps)
    return out


def q_proj(x, w, pos, *, shape, eps, rope_dim, theta, yarn=None, meta=None):
    heads, head_dim = shape[-2], shape[-1]
    meta = _norm_meta("q_proj", meta, {"inputs": [tuple(x.shape), tuple(w.shape), tuple(pos.shape)],
                                       "attrs": {"shape": list(shape), "rope_dim": rope_dim}})
    out = torch.empty((*x.shape[:-1], heads, head_dim), dtype=x.dtype, device=x.device)
    _launch(_rows(x), w, out.view(-1, heads * head_dim), meta=meta, block_n=head_dim, block_k=meta["BLOCK_K"],
            norm=True, pos=pos.reshape(-1), inv_freq=_rope_inv_freq(rope_dim, theta, yarn, x.device),
            rope_dim=rope_dim, eps=eps)
    return out


def kv_proj(x, w, norm_w, pos, *, eps, rope_dim, theta, yarn=None, meta=None):
    n = w.shape[0]
    meta = _norm_meta("kv_proj", meta, {"inputs": [tuple(x.shape), tuple(w.shape), tuple(norm_w.shape),
                                                   tuple(pos.shape)], "attrs": {"rope_dim": rope_dim}})
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _launch(_rows(x), w, _rows(out), meta=meta, block_n=n, block_k=meta["BLOCK_K"], norm=True, norm_w=norm_w,
            pos=pos.reshape(-1), inv_freq=_rope_inv_freq(rope_dim, theta, yarn, x.device), rope_dim=rope_dim,
            eps=eps)
    return out


def o_proj(o, wa, wb, *, shape, groups, out_shape, meta=None):
    meta = dict(DEFAULT_META["o_proj"], **(meta or {}))
    _check("o_proj", meta, constraints("o_proj", meta, [tuple(o.shape), tuple(wa.shape), tuple(wb.shape)]))
    n_lead = sum(isinstance(d, str) for d in shape)
    x2 = o.reshape(-1, math.prod(o.shape[n_lead:]))  # [M, G*K]: groups side by side
    rank = wa.shape[0] // groups
    z = torch.empty((x2.shape[0], groups * rank), dtype=o.dtype, device=o.device)  # [M, G*R] == out_shape rows
    _launch(x2, wa, z, groups=groups, meta=meta, block_n=meta["BLOCK_N_A"], block_k=meta["BLOCK_K_A"])
    out = torch.empty((*o.shape[:n_lead], wb.shape[0]), dtype=o.dtype, device=o.device)
    _launch(z, wb, _rows(out), meta=meta, block_n=meta["BLOCK_N"], block_k=meta["BLOCK_K"])
    return out


KERNELS = {"linear": linear, "linear_rms_norm": linear_rms_norm, "q_proj": q_proj, "kv_proj": kv_proj,
           "o_proj": o_proj}
