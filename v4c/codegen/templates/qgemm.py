"""GEMMs on the official release's quantised weights, kept quantised: nothing is dequantised to a full
weight in memory; tiles are decoded in registers and the scales are applied in the fp32 accumulator.

Formats (``v4c/graph/weight_formats.py`` is the reference): FP8 e4m3 weights with one UE8M0 scale per
128x128 block; MXFP4 expert weights (e2m1 codes packed two per byte along K, low nibble first) with one
UE8M0 scale per 1x32 block; activations quantised per 1x128 block along K to e4m3 with a power-of-two
scale, as the official inference does before its FP8 and FP4 GEMMs. Scales reach the kernels as their raw
exponent bytes (``scale.view(torch.uint8)``) and are applied as ``2**(e - 127)``.

Ops (launchers take the unquantised op's arguments plus each weight's scale right after it):
  * ``act_quant_fp8``: ``x [..., K]`` -> (e4m3 ``[..., K]``, float32 scales ``[..., ceil(K/128)]``).
  * ``fp8_linear``, ``fp8_linear_rms_norm``, ``fp8_q_proj``, ``fp8_kv_proj``, ``fp8_o_proj``: the dense
    projections of ``templates/gemm.py`` (same epilogues: RMSNorm, norm weight, interleaved RoPE) on FP8
    weights. The activation is quantised by ``act_quant_fp8`` first (one small launch; the o_proj's grouped
    input per group, as an FP8 grouped einsum does), then each K step multiplies e4m3 tiles and adds
    ``partial * x_scale[row] * w_scale[col]`` to the accumulator; ``BLOCK_K`` divides 128, so a step never
    straddles a scale block.
  * ``moe_ffn_fp4``: ``moe_ffn`` with MXFP4 routed experts and an FP8 shared expert: the token activations
    are quantised once, the gate/up grouped GEMM fuses the clamped SwiGLU and quantises its output per
    1x128 in the epilogue (``BLOCK_N`` is a multiple of 128), the down GEMM applies the routing weight and
    scatter-adds in fp32 (the weight multiplies the output, as in ``moe_ffn``'s reference).

The norm epilogues (RMSNorm over a norm group: the whole row, or one head) cover the group BLOCK_N
columns at a time: with a group wider than the tile the program parks the rounded GEMM output in the output
tensor while the sums of squares build up, then normalises it in place (any group width that is a multiple
of the tile, V4-Pro's 1536 included). RoPE rotates the group's tail in place afterwards.

How a tile is multiplied (constexpr switches the launchers pick from the target; tests force each). FP8
data (weights and activation codes) always reaches the kernels as bytes (uint8 views): sm80/86 have no
fp8 type, and a kernel taking an fp8 pointer does not compile for them.
  * ``DOT_MODE`` for e4m3 x e4m3: 2 native fp8 ``tl.dot`` on the bytes reinterpreted (sm89+), 1 both decoded
    to fp16 in registers with integer ops (exact; sm80/86), 0 both decoded to fp32 with ieee products (the
    interpreter).
  * ``DOT_SCALED`` for e4m3 x MXFP4: ``tl.dot_scaled`` with the packed codes and their 1x32 scales (sm100+,
    where it is a native block-scaled MMA); otherwise the codes are unpacked in registers, multiplied by their
    1x32 scale (exact in bf16: e2m1 has two significant bits) and fed with the e4m3 activations upcast to
    bf16 (fp32 under the interpreter, whose bf16 dot is wrong) to an ordinary ``tl.dot``.

``constraints`` estimates what a config keeps live (registers per thread, shared memory per block; see
``_gemm_usage`` and ``_moe_usage``), calibrated against Triton's compiler for sm80, sm90 and sm100, and
judges shared memory against the launch device's limit where it is known (163 KiB sm80, 99 KiB sm86/89/120,
227 KiB sm90/100).

Self-contained (torch + triton only): a rendered copy runs from inside compiled artifacts.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .prelude import _capability, _mma_warps, _per_thread, _check, _cos_sin, _e4m3_byte, _e4m3_f16, _e4m3_nan, _e4m3_value, _interpreting, _pow2, _rope_inv_freq, _round_to, _ue8m0_exponent  # v4c: inline prelude

QBLOCK = 128  # FP8 weight blocks (128x128) and activation blocks (1x128)
FP4_BLOCK = 32  # MXFP4 scale block along K
AMAX_MIN = 1e-4  # the official act_quant's lower clamp of a block's amax
E4M3_THRESH, E4M3_QEXP = 0x600000, 8  # 448 = 1.75 * 2**8, for _ue8m0_exponent


# ---- shared jit helpers -------------------------------------------------------------------------

@triton.jit
def _quant_e4m3(x, amax):
    """e4m3 code bytes and power-of-two scales of ``x`` given its block amax (any shape that broadcasts):
    s = smallest 2**e >= max(amax, AMAX_MIN) / 448, codes = e4m3(x * 2**-e) (exact scaling, RNE)."""
    e = _ue8m0_exponent(tl.maximum(amax, 1e-4), 0x600000, 8)
    return _e4m3_byte(x * _pow2(-e)), _pow2(e)


@triton.jit
def _ue8m0(byte):
    """fp32 2**(byte - 127) for UE8M0 scale bytes."""
    return _pow2(byte.to(tl.int32) - 127)


@triton.jit
def _e4m3_operand(code, DOT_MODE: tl.constexpr):
    """e4m3 bytes as a ``tl.dot`` operand: reinterpreted as fp8 (2, sm89+), decoded to fp16 (1, sm80/86,
    which have no fp8 type), decoded to fp32 (0, the interpreter). Every mode holds the exact value."""
    if DOT_MODE == 2:
        v = code.to(tl.float8e4nv, bitcast=True)
    elif DOT_MODE == 1:
        v = _e4m3_nan(code, _e4m3_f16(code) * 256.0)  # exact in fp16: |v| <= 448
    else:
        v = _e4m3_value(code)
    return v


@triton.jit
def _dot_e4m3(a, b, DOT_MODE: tl.constexpr):
    """fp32 [M, N] = a [M, K] @ b [K, N] for operands from ``_e4m3_operand`` (every product is exact in fp32)."""
    if DOT_MODE == 0:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _fp8_tile(a, x_scale, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, cmask, k0, K,
              BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr):
    """One K step against an FP8 128x128-block-scaled weight (bytes) with rows ``cols``: the activation
    operand ``a`` [BM, BK] (``_e4m3_operand``; scale ``x_scale`` [BM]) times w[cols, k0:k0+BK]^T, scales
    applied, fp32 [BM, BN]."""
    ks = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None],
                mask=cmask[None, :] & (ks < K)[:, None], other=0)
    w_scale = _ue8m0(tl.load(ws_ptr + (cols // 128) * stride_wsn + k0 // 128, mask=cmask, other=127))
    return _dot_e4m3(a, _e4m3_operand(w, DOT_MODE), DOT_MODE) * x_scale[:, None] * w_scale[None, :]


@triton.jit
def _e2m1_value(code):
    """fp32 value of e2m1 nibbles (sign << 3 | magnitude code; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6)."""
    m = code & 7
    mag = tl.where(m < 2, m.to(tl.float32) * 0.5, (1.0 + (m & 1).to(tl.float32) * 0.5) * _pow2((m >> 1) - 1))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _fp4_tile(a, a_op, x_scale, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, cmask, k0, K,
              BLOCK_K: tl.constexpr, DOT_SCALED: tl.constexpr, UNPACK_TY: tl.constexpr):
    """One K step against an MXFP4 weight (packed [N, K/2], scales [N, K/32]) with rows ``cols``: the e4m3
    activation [BM, BK] (bytes ``a`` for ``tl.dot_scaled``, else ``a_op`` in UNPACK_TY; scale ``x_scale``
    [BM]) times the decoded w[cols, k0:k0+BK]^T, fp32 [BM, BN]."""
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // 32
    kb = k0 // 2 + tl.arange(0, HALF)
    kg = k0 // 32 + tl.arange(0, GROUPS)
    w_scale = tl.load(ws_ptr + cols[:, None].to(tl.int64) * stride_wsn + kg[None, :],
                      mask=cmask[:, None] & (kg < K // 32)[None, :], other=127)
    if DOT_SCALED:
        packed = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wn + kb[:, None],
                         mask=cmask[None, :] & (kb < K // 2)[:, None], other=0)
        c = tl.dot_scaled(a, None, "e4m3", packed, w_scale, "e2m1")
    else:
        packed = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wn + kb[None, :],
                         mask=cmask[:, None] & (kb < K // 2)[None, :], other=0)
        BN: tl.constexpr = packed.shape[0]
        # low nibble is element 2j, high nibble 2j+1: join on a new last axis, then flatten
        codes = tl.reshape(tl.join(packed & 0xF, (packed >> 4) & 0xF), (BN, BLOCK_K))
        vals = tl.reshape(_e2m1_value(codes.to(tl.int32)), (BN, GROUPS, 32))
        w = tl.reshape(vals * _ue8m0(w_scale)[:, :, None], (BN, BLOCK_K)).to(UNPACK_TY)
        c = tl.dot(a_op, tl.trans(w), input_precision="ieee" if UNPACK_TY == tl.float32 else "tf32")
    return c * x_scale[:, None]


# ---- act_quant_fp8 ------------------------------------------------------------------------------

@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, BLOCK_M: tl.constexpr):
    """One program per (BLOCK_M rows, one 128-wide block): e4m3 codes and the block's scale per row."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    ks = kb * 128 + tl.arange(0, 128)
    mask = (rows < M)[:, None] & (ks < K)[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = _quant_e4m3(x, tl.max(tl.abs(x), axis=1)[:, None])
    tl.store(q_ptr + r64[:, None] * stride_qm + ks[None, :], q, mask=mask)
    tl.store(s_ptr + r64 * stride_sm + kb, tl.sum(s, axis=1), mask=rows < M)


def _act_quant_2d(x2, block_m, num_warps=4):
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    s = torch.empty((m, triton.cdiv(k, QBLOCK)), dtype=torch.float32, device=x2.device)
    if m and k:
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        _act_quant_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, QBLOCK))](
            x2, q.view(torch.uint8), s, m, k, x2.stride(0), q.stride(0), s.stride(0), BLOCK_M=block_m,
            num_warps=num_warps)
    return q, s


def act_quant_fp8(x, *, meta=None):
    """(e4m3 codes, float32 scales) of ``x [..., K]``, per 1x128 block; equal to ``quantize_act_fp8``."""
    meta = {**DEFAULT_META["act_quant_fp8"], **(meta or {})}
    _check("act_quant_fp8", meta, constraints("act_quant_fp8", meta, [tuple(x.shape)]))
    q, s = _act_quant_2d(x.reshape(-1, x.shape[-1]), meta["BLOCK_M"], meta["num_warps"])
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[-1])


# ---- dense FP8 GEMM -----------------------------------------------------------------------------

@triton.jit
def _fp8_acc(x_rows, s_ptrs, mask_m, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, mask_n, K,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr):
    """fp32 [BM, BN]: the activation rows starting at ``x_rows`` [BM] (bytes, scales at ``s_ptrs``) times
    weight rows ``cols``. The [BM, BK] pointers are built per step from the row starts: kept whole across
    an outer loop (the norm groups' tiles) they would hold two registers per element."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_rows[:, None] + (k0 + ks)[None, :], mask=mask_m[:, None] & (ks < K - k0)[None, :], other=0)
        x_scale = tl.load(s_ptrs + k0 // 128, mask=mask_m, other=1.0)
        acc += _fp8_tile(_e4m3_operand(a, DOT_MODE), x_scale, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, mask_n,
                         k0, K, BLOCK_K, DOT_MODE)
    return acc


@triton.jit
def _rms_scale(acc, rstd, c0, norm_w_ptr, NORM_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, ACT_TY: tl.constexpr):
    """A [BM, BN] tile at column ``c0`` of its norm group, normalised by the group's 1/RMS ``rstd`` [BM],
    weighed, and rounded to the activation dtype (as the reference's RMSNorm returns it)."""
    acc = acc * rstd[:, None]
    if NORM_WEIGHT:
        acc = acc * tl.load(norm_w_ptr + c0 + tl.arange(0, BLOCK_N)).to(tl.float32)[None, :]
    return _round_to(acc, ACT_TY)


@triton.jit
def _rope_tail(row_ptrs, mask_m, pos, inv_freq_ptr, ROPE_DIM: tl.constexpr, ROPE_PAD: tl.constexpr):
    """Rotate the interleaved pairs of the ROPE_DIM columns at ``row_ptrs`` [BM] (the end of a norm group,
    already normalised and stored): even and odd columns are loaded apart, so the registers hold the tail
    only, not a split copy of the whole tile."""
    j = tl.arange(0, ROPE_PAD)
    ptrs = row_ptrs[:, None] + 2 * j[None, :]
    mask = mask_m[:, None] & (j < ROPE_DIM // 2)[None, :]
    x_even = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    x_odd = tl.load(ptrs + 1, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + j, mask=j < ROPE_DIM // 2, other=0.0)
    cos, sin = _cos_sin(pos[:, None] * inv_freq[None, :])
    act_ty = row_ptrs.dtype.element_ty
    tl.store(ptrs, _round_to(x_even * cos - x_odd * sin, act_ty).to(act_ty), mask=mask)
    tl.store(ptrs + 1, _round_to(x_odd * cos + x_even * sin, act_ty).to(act_ty), mask=mask)


@triton.jit
def _fp8_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, norm_w_ptr, pos_ptr, inv_freq_ptr,
    M, N, K,                                   # per group: out[M, N] = dq(xq[M, K]) @ dq(w[N, K]).T
    stride_xm, stride_sm, stride_sg, stride_wn, stride_wsn, stride_om,
    eps,
    NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr, ROPE_DIM: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPAN_N: tl.constexpr, ROPE_PAD: tl.constexpr,
):
    """gemm.py's kernel on e4m3 operands (bytes). Group ``grp`` (grid axis 1) reads columns [grp*K, (grp+1)*K)
    of xq with scales ``xs[:, grp, :]``, weight rows [grp*N, (grp+1)*N) and writes those output columns.
    A program covers SPAN_N columns: one BLOCK_N tile, or with NORM one norm group of SPAN_N / BLOCK_N tiles."""
    pid = tl.program_id(0)
    grp = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, SPAN_N)
    per_sweep = GROUP_M * tiles_n  # GROUP_M row tiles share each column sweep (weight tiles reused from L2)
    first_m = (pid // per_sweep) * GROUP_M
    sweep_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_sweep) % sweep_m
    pid_n = (pid % per_sweep) // sweep_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)  # row * stride passes 2**31 in long prefill
    x_rows = xq_ptr + rows * stride_xm + grp * K
    s_ptrs = xs_ptr + rows * stride_sm + grp * stride_sg
    act_dtype = out_ptr.dtype.element_ty

    if SPAN_N == BLOCK_N:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        cols = grp * N + offs_n  # weight row / output column across groups
        acc = _fp8_acc(x_rows, s_ptrs, mask_m, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, mask_n, K,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE)
        if NORM:  # the tile is exactly one norm group: RMS over its columns
            acc = _round_to(acc, act_dtype)  # the reference's GEMM output, in the activation dtype
            rstd = tl.rsqrt(tl.sum(acc * acc, axis=1) / BLOCK_N + eps)
            acc = _rms_scale(acc, rstd, 0, norm_w_ptr, NORM_WEIGHT, BLOCK_N, act_dtype)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], _round_to(acc, act_dtype).to(act_dtype),
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        # a norm group wider than the tile: the GEMM output (rounded to the activation dtype, as the
        # reference has it) is parked in ``out`` tile by tile while the row's sum of squares builds up,
        # then read back (same program, L2-hot), normalised and stored over it. The registers hold one
        # tile, not the group, and the group width need not be a power of two (V4-Pro's q_a: 1536).
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, SPAN_N, BLOCK_N):
            cols = pid_n * SPAN_N + c0 + tl.arange(0, BLOCK_N)
            acc = _fp8_acc(x_rows, s_ptrs, mask_m, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, cols < N, K,
                           BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE)
            acc = _round_to(acc, act_dtype)
            sum_sq += tl.sum(acc * acc, axis=1)
            tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(act_dtype),
                     mask=mask_m[:, None] & (cols < N)[None, :])
        tl.debug_barrier()  # the parked tiles are read back by other threads of this program
        rstd = tl.rsqrt(sum_sq / SPAN_N + eps)
        for c0 in range(0, SPAN_N, BLOCK_N):
            cols = pid_n * SPAN_N + c0 + tl.arange(0, BLOCK_N)
            ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :]
            omask = mask_m[:, None] & (cols < N)[None, :]
            acc = tl.load(ptrs, mask=omask, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(ptrs, _rms_scale(acc, rstd, c0, norm_w_ptr, NORM_WEIGHT, BLOCK_N, act_dtype).to(act_dtype),
                     mask=omask)
    if ROPE_DIM > 0:
        # the group's RoPE tail, rotated in place once the normalised group is stored
        tl.debug_barrier()
        pos = tl.maximum(tl.load(pos_ptr + rows, mask=mask_m, other=0), 0).to(tl.float32)
        tail = out_ptr + rows * stride_om + (pid_n * SPAN_N + SPAN_N - ROPE_DIM)
        _rope_tail(tail, mask_m, pos, inv_freq_ptr, ROPE_DIM, ROPE_PAD)


def _scale_bytes(scale, what):
    """UE8M0 scales as their raw uint8 exponent bytes (accepts float8_e8m0fnu or uint8)."""
    if scale.dtype not in (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8)):
        raise ValueError(f"{what}: scale must be float8_e8m0fnu or its uint8 bytes, got {scale.dtype}")
    scale = scale if scale.is_contiguous() else scale.contiguous()
    return scale.view(torch.uint8)


def _check_fp8_weight(w, scale, what):
    if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
        raise ValueError(f"{what}: FP8 weight must be float8_e4m3fn [N, K], got {w.dtype} {tuple(w.shape)}")
    want = (triton.cdiv(w.shape[0], QBLOCK), triton.cdiv(w.shape[1], QBLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"{what}: weight {tuple(w.shape)} needs a 128x128-block scale of shape {want}, "
                         f"got {tuple(scale.shape)}")
    return (w if w.stride(-1) == 1 else w.contiguous()), _scale_bytes(scale, what)


def _dot_mode(device, meta):
    """2 native fp8 dot (sm89+), 1 fp16 upcast (older GPUs), 0 fp32 upcast (the interpreter)."""
    if meta.get("DOT_MODE") is not None:
        return int(meta["DOT_MODE"])
    cap = _capability(device)
    if cap is None:
        return 0
    return 2 if cap >= (8, 9) else 1


def _fp8_launch(xq, xs, w, ws, out2, *, groups=1, meta, block_n, block_k, span_n=None, norm=False, norm_w=None,
                pos=None, inv_freq=None, rope_dim=0, eps=0.0):
    """out2[M, groups*N] = per-group dq(xq) @ dq(w).T; ``xs`` is [M, groups, ceil(K/128)]. With ``norm``,
    ``span_n`` is the norm group width (a multiple of ``block_n``). FP8 data reaches the kernel as bytes."""
    m_rows = xq.shape[0]
    k = xq.shape[1] // groups
    n = w.shape[0] // groups
    if m_rows == 0:
        return out2
    span_n = span_n or block_n
    bm = meta["BLOCK_M"]
    grid = (triton.cdiv(m_rows, bm) * triton.cdiv(n, span_n), groups)
    dummy = out2  # pointer arguments an epilogue does not read
    _fp8_gemm_kernel[grid](
        xq.view(torch.uint8), xs, w.view(torch.uint8), ws, out2, norm_w if norm_w is not None else dummy,
        pos if pos is not None else dummy, inv_freq if inv_freq is not None else dummy,
        m_rows, n, k, xq.stride(0), xs.stride(0), xs.stride(1), w.stride(0), ws.stride(0), out2.stride(0),
        float(eps),
        NORM=norm, NORM_WEIGHT=norm_w is not None, ROPE_DIM=rope_dim, DOT_MODE=_dot_mode(xq.device, meta),
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=meta["GROUP_M"], SPAN_N=span_n,
        ROPE_PAD=triton.next_power_of_2(max(rope_dim // 2, 1)),
        num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    return out2


def _quantized_rows(x, groups=1, block_m=32):
    """x [..., G*K] -> (e4m3 [M, G*K], scales [M, G, ceil(K/128)]): each group quantised on its own."""
    m = x.numel() // x.shape[-1]
    q, s = _act_quant_2d(x.reshape(m * groups, x.shape[-1] // groups), block_m)
    return q.view(m, x.shape[-1]), s.view(m, groups, s.shape[-1])


def _prepare(op, meta, shapes, device):
    """DEFAULT_META under ``meta``, checked against the shapes and the device's shared memory."""
    meta = dict(DEFAULT_META[op], **(meta or {}))
    _check(op, meta, constraints(op, meta, _with_capability(shapes, device)))
    return meta


def fp8_linear(x, w, w_scale, *, meta=None):
    w, ws = _check_fp8_weight(w, w_scale, "fp8_linear")
    meta = _prepare("fp8_linear", meta, [tuple(x.shape), tuple(w.shape)], x.device)
    out = torch.empty((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)
    xq, xs = _quantized_rows(x)
    _fp8_launch(xq, xs, w, ws, out.view(-1, w.shape[0]), meta=meta, block_n=meta["BLOCK_N"],
                block_k=meta["BLOCK_K"])
    return out


def _norm_block(meta, group):
    """The tile width of a norm epilogue: BLOCK_N capped at the norm group (None: the whole group)."""
    return group if meta["BLOCK_N"] is None else min(meta["BLOCK_N"], group)


def fp8_linear_rms_norm(x, w, w_scale, norm_w, *, eps, meta=None):
    w, ws = _check_fp8_weight(w, w_scale, "fp8_linear_rms_norm")
    n = w.shape[0]
    meta = _prepare("fp8_linear_rms_norm", meta, [tuple(x.shape), tuple(w.shape), tuple(norm_w.shape)], x.device)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    xq, xs = _quantized_rows(x)
    _fp8_launch(xq, xs, w, ws, out.view(-1, n), meta=meta, block_n=_norm_block(meta, n), span_n=n,
                block_k=meta["BLOCK_K"], norm=True, norm_w=norm_w, eps=eps)
    return out


def fp8_q_proj(x, w, w_scale, pos, *, shape, eps, rope_dim, theta, yarn=None, meta=None):
    w, ws = _check_fp8_weight(w, w_scale, "fp8_q_proj")
    heads, head_dim = shape[-2], shape[-1]
    meta = _prepare("fp8_q_proj", meta, {"inputs": [tuple(x.shape), tuple(w.shape), tuple(pos.shape)],
                                         "attrs": {"shape": list(shape), "rope_dim": rope_dim}}, x.device)
    out = torch.empty((*x.shape[:-1], heads, head_dim), dtype=x.dtype, device=x.device)
    xq, xs = _quantized_rows(x)
    _fp8_launch(xq, xs, w, ws, out.view(-1, heads * head_dim), meta=meta, block_n=_norm_block(meta, head_dim),
                span_n=head_dim, block_k=meta["BLOCK_K"], norm=True, pos=pos.reshape(-1),
                inv_freq=_rope_inv_freq(rope_dim, theta, yarn, x.device), rope_dim=rope_dim, eps=eps)
    return out


def fp8_kv_proj(x, w, w_scale, norm_w, pos, *, eps, rope_dim, theta, yarn=None, meta=None):
    w, ws = _check_fp8_weight(w, w_scale, "fp8_kv_proj")
    n = w.shape[0]
    meta = _prepare("fp8_kv_proj", meta, {"inputs": [tuple(x.shape), tuple(w.shape), tuple(norm_w.shape),
                                                     tuple(pos.shape)], "attrs": {"rope_dim": rope_dim}}, x.device)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    xq, xs = _quantized_rows(x)
    _fp8_launch(xq, xs, w, ws, out.view(-1, n), meta=meta, block_n=_norm_block(meta, n), span_n=n,
                block_k=meta["BLOCK_K"], norm=True, norm_w=norm_w, pos=pos.reshape(-1),
                inv_freq=_rope_inv_freq(rope_dim, theta, yarn, x.device), rope_dim=rope_dim, eps=eps)
    return out


def fp8_o_proj(o, wa, wa_scale, wb, wb_scale, *, shape, groups, out_shape, meta=None):
    """Grouped GEMM (each group's input quantised per 1x128 on its own), then the dense GEMM (its input,
    the grouped output in the activation dtype, quantised again)."""
    wa, wsa = _check_fp8_weight(wa, wa_scale, "fp8_o_proj (grouped weight)")
    wb, wsb = _check_fp8_weight(wb, wb_scale, "fp8_o_proj (dense weight)")
    meta = _prepare("fp8_o_proj", meta, {"inputs": [tuple(o.shape), tuple(wa.shape), tuple(wb.shape)],
                                         "attrs": {"groups": groups}}, o.device)
    n_lead = sum(isinstance(d, str) for d in shape)
    x2 = o.reshape(-1, math.prod(o.shape[n_lead:]))  # [M, G*K]: groups side by side
    rank = wa.shape[0] // groups
    z = torch.empty((x2.shape[0], groups * rank), dtype=o.dtype, device=o.device)
    xq, xs = _quantized_rows(x2, groups)
    _fp8_launch(xq, xs, wa, wsa, z, groups=groups, meta=meta, block_n=meta["BLOCK_N_A"],
                block_k=meta["BLOCK_K_A"])
    out = torch.empty((*o.shape[:n_lead], wb.shape[0]), dtype=o.dtype, device=o.device)
    zq, zs = _quantized_rows(z)
    _fp8_launch(zq, zs, wb, wsb, out.view(-1, wb.shape[0]), meta=meta, block_n=meta["BLOCK_N"],
                block_k=meta["BLOCK_K"])
    return out


# ---- grouped MXFP4 expert GEMMs -----------------------------------------------------------------

@triton.jit
def _segment_tile(pid, offsets_ptr, E, shared_rows, BLOCK_M: tl.constexpr, SEGS: tl.constexpr):
    """moe.py's row-tile map: program ``pid`` -> (segment, first row, end row) over the E expert segments of
    the permutation plus the shared expert (segment E, ``shared_rows`` rows from A = offsets[E]), each cut
    into BLOCK_M-row tiles laid end to end; past the last tile the segment is > E."""
    s = tl.arange(0, SEGS)
    start = tl.load(offsets_ptr + s, mask=s <= E, other=0)
    end = tl.load(offsets_ptr + s + 1, mask=s < E, other=0)
    end = tl.where(s == E, start + shared_rows, end)
    tiles = tl.where(s <= E, tl.cdiv(end - start, BLOCK_M), 0)
    last = tl.cumsum(tiles, axis=0)
    seg = tl.sum((last <= pid).to(tl.int32), axis=0)
    hit = s == seg
    first_tile = tl.sum(tl.where(hit, last - tiles, 0), axis=0)
    row0 = tl.sum(tl.where(hit, start, 0), axis=0) + (pid - first_tile) * BLOCK_M
    return seg, row0, tl.sum(tl.where(hit, end, 0), axis=0)


@triton.jit
def _fp4_acc(x_rows, s_ptrs, rmask, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, cmask, K, PAIR_OFF, PAIR_SOFF,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIR: tl.constexpr,
             DOT_MODE: tl.constexpr, DOT_SCALED: tl.constexpr, UNPACK_TY: tl.constexpr):
    """fp32 [BM, BN] accumulators of the activation rows at ``x_rows`` (e4m3 bytes, 1x128 scales at ``s_ptrs``)
    times MXFP4 weight rows ``cols``, and with PAIR also times the rows PAIR_OFF further (scales PAIR_SOFF):
    the gate and up halves of w13 share each activation tile."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_rows[:, None] + (k0 + ks)[None, :], mask=rmask[:, None] & (k0 + ks < K)[None, :], other=0)
        x_scale = tl.load(s_ptrs + k0 // 128, mask=rmask, other=1.0)
        a_op = _e4m3_operand(a, DOT_MODE).to(UNPACK_TY)  # unused by tl.dot_scaled, which takes the bytes
        acc += _fp4_tile(a, a_op, x_scale, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, cmask, k0, K,
                         BLOCK_K, DOT_SCALED, UNPACK_TY)
        if PAIR:
            acc2 += _fp4_tile(a, a_op, x_scale, w_ptr + PAIR_OFF, ws_ptr + PAIR_SOFF, stride_wn, stride_wsn, cols,
                              cmask, k0, K, BLOCK_K, DOT_SCALED, UNPACK_TY)
    return acc, acc2


@triton.jit
def _fp8_pair_acc(x_rows, s_ptrs, rmask, w_ptr, ws_ptr, w2_ptr, ws2_ptr, stride_wn, stride_wsn, cols, cmask, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_MODE: tl.constexpr):
    """``_fp8_acc`` against two FP8 weights of the same shape (the shared expert's gate and up)."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_rows[:, None] + (k0 + ks)[None, :], mask=rmask[:, None] & (k0 + ks < K)[None, :], other=0)
        x_scale = tl.load(s_ptrs + k0 // 128, mask=rmask, other=1.0)
        a_op = _e4m3_operand(a, DOT_MODE)
        acc += _fp8_tile(a_op, x_scale, w_ptr, ws_ptr, stride_wn, stride_wsn, cols, cmask, k0, K, BLOCK_K, DOT_MODE)
        acc2 += _fp8_tile(a_op, x_scale, w2_ptr, ws2_ptr, stride_wn, stride_wsn, cols, cmask, k0, K, BLOCK_K,
                          DOT_MODE)
    return acc, acc2


@triton.jit
def _qgate_up_kernel(xq_ptr, xs_ptr, perm_ptr, offsets_ptr, w13_ptr, w13s_ptr, sg_ptr, sgs_ptr, su_ptr, sus_ptr,
                     actq_ptr, acts_ptr,
                     D, I, S, E, K, shared_rows, stride_xq, stride_xs, stride_we, stride_wr, stride_wse, stride_wsr,
                     stride_s, stride_ss, stride_aq, stride_as, limit,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEGS: tl.constexpr,
                     DOT_MODE: tl.constexpr, DOT_SCALED: tl.constexpr, UNPACK_TY: tl.constexpr,
                     ACT_TY: tl.constexpr):
    """act = silu(min(gate, limit)) * clamp(up, -limit, limit) for one (segment row tile, n tile), rounded to
    the activation dtype and stored quantised per 1x128 (codes + one scale per row and 128 columns).
    Routed rows are permutation positions (token = perm // K), shared rows are A + token. The routed (MXFP4)
    and shared (FP8) K loops are separate, each with a loop body free of branches, so each pipelines."""
    seg, row0, row_end = _segment_tile(tl.program_id(0), offsets_ptr, E, shared_rows, BLOCK_M, SEGS)
    routed = seg < E
    width = tl.where(routed, I, S)
    n0 = tl.program_id(1) * BLOCK_N
    if (seg <= E) & (n0 < width):
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < width
        if routed:
            tok = tl.load(perm_ptr + rows, mask=rmask, other=0) // K
        else:
            tok = rows - tl.load(offsets_ptr + E)
        tok = tok.to(tl.int64)
        x_rows = xq_ptr + tok * stride_xq
        s_ptrs = xs_ptr + tok * stride_xs
        if routed:  # gate rows [0, I) and up rows [I, 2I) of the expert's stacked w13
            e64 = seg.to(tl.int64)
            gate, up = _fp4_acc(x_rows, s_ptrs, rmask, w13_ptr + e64 * stride_we, w13s_ptr + e64 * stride_wse,
                                stride_wr, stride_wsr, cols, cmask, D, I * stride_wr, I * stride_wsr,
                                BLOCK_M, BLOCK_N, BLOCK_K, True, DOT_MODE, DOT_SCALED, UNPACK_TY)
        else:
            gate, up = _fp8_pair_acc(x_rows, s_ptrs, rmask, sg_ptr, sgs_ptr, su_ptr, sus_ptr, stride_s, stride_ss,
                                     cols, cmask, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE)
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        act = _round_to(gate * tl.sigmoid(gate) * up, ACT_TY)
        act = tl.where(cmask[None, :], act, 0.0)
        NB: tl.constexpr = BLOCK_N // 128
        blocks = tl.reshape(act, (BLOCK_M, NB, 128))
        q, s = _quant_e4m3(blocks, tl.max(tl.abs(blocks), axis=2)[:, :, None])
        r64 = rows.to(tl.int64)
        tl.store(actq_ptr + r64[:, None] * stride_aq + cols[None, :], tl.reshape(q, (BLOCK_M, BLOCK_N)),
                 mask=rmask[:, None] & cmask[None, :])
        nb = n0 // 128 + tl.arange(0, NB)
        tl.store(acts_ptr + r64[:, None] * stride_as + nb[None, :], tl.max(s, axis=2),
                 mask=rmask[:, None] & (nb * 128 < width)[None, :])


@triton.jit
def _qdown_kernel(actq_ptr, acts_ptr, perm_ptr, offsets_ptr, wts_ptr, w2_ptr, w2s_ptr, sd_ptr, sds_ptr, out_ptr,
                  D, I, S, E, K, shared_rows, stride_aq, stride_as, stride_we, stride_wr, stride_wse, stride_wsr,
                  stride_s, stride_ss, stride_out,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEGS: tl.constexpr,
                  DOT_MODE: tl.constexpr, DOT_SCALED: tl.constexpr, UNPACK_TY: tl.constexpr):
    """out[token, n] += weight * (dq(act) @ dq(W2)^T)[row, n] for one (segment row tile, n tile); the routed
    (MXFP4) and shared (FP8) K loops are separate, as in _qgate_up_kernel."""
    seg, row0, row_end = _segment_tile(tl.program_id(0), offsets_ptr, E, shared_rows, BLOCK_M, SEGS)
    routed = seg < E
    if seg <= E:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        r64 = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < D
        x_rows = actq_ptr + r64 * stride_aq
        s_ptrs = acts_ptr + r64 * stride_as
        if routed:
            assignment = tl.load(perm_ptr + rows, mask=rmask, other=0)
            tok = assignment // K
            weight = tl.load(wts_ptr + assignment, mask=rmask, other=0.0)
            e64 = seg.to(tl.int64)
            acc, _ = _fp4_acc(x_rows, s_ptrs, rmask, w2_ptr + e64 * stride_we, w2s_ptr + e64 * stride_wse,
                              stride_wr, stride_wsr, cols, cmask, I, 0, 0,
                              BLOCK_M, BLOCK_N, BLOCK_K, False, DOT_MODE, DOT_SCALED, UNPACK_TY)
        else:
            tok = rows - tl.load(offsets_ptr + E)
            weight = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
            acc = _fp8_acc(x_rows, s_ptrs, rmask, sd_ptr, sds_ptr, stride_s, stride_ss, cols, cmask, S,
                           BLOCK_M, BLOCK_N, BLOCK_K, DOT_MODE)
        tl.atomic_add(out_ptr + tok[:, None].to(tl.int64) * stride_out + cols[None, :], acc * weight[:, None],
                      mask=rmask[:, None] & cmask[None, :])


def _check_fp4_experts(w, scale, what):
    if w.dtype not in (torch.int8, torch.uint8) or w.dim() != 3:
        raise ValueError(f"{what}: MXFP4 experts must be int8 [E, N, K/2], got {w.dtype} {tuple(w.shape)}")
    want = (*w.shape[:2], w.shape[2] * 2 // FP4_BLOCK)
    if tuple(scale.shape) != want:
        raise ValueError(f"{what}: experts {tuple(w.shape)} need a 1x{FP4_BLOCK} scale of shape {want}, "
                         f"got {tuple(scale.shape)}")
    w = w if w.is_contiguous() else w.contiguous()
    return w.view(torch.uint8), _scale_bytes(scale, what)


def _dot_scaled(device, meta):
    """tl.dot_scaled where the target has block-scaled MMAs (sm100+), the register unpack elsewhere."""
    if meta.get("DOT_SCALED") is not None:
        return bool(meta["DOT_SCALED"])
    cap = _capability(device)
    return cap is not None and cap >= (10, 0)


_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def moe_ffn_fp4(h, idx, w, perm, offsets, w13, w13_scale, w2, w2_scale, sg=None, sg_scale=None, su=None,
                su_scale=None, sd=None, sd_scale=None, *, limit, meta=None):
    """``moe_ffn`` with MXFP4 routed experts (w13 [E, 2I, D/2] gate rows first, w2 [E, D, I/2], scales
    [E, 2I, D/32] and [E, D, I/32]) and an optional FP8 shared expert (sg, su [S, D], sd [D, S] with
    128x128-block scales). Output in h's dtype."""
    meta = {**DEFAULT_META["moe_ffn_fp4"], **(meta or {})}
    shape = h.shape
    D = shape[-1]
    M = h.numel() // D
    K = idx.shape[-1]
    w13, w13s = _check_fp4_experts(w13, w13_scale, "moe_ffn_fp4 (w13)")
    w2, w2s = _check_fp4_experts(w2, w2_scale, "moe_ffn_fp4 (w2)")
    E, two_i, half_d = w13.shape
    I = two_i // 2
    if half_d * 2 != D or w2.shape != (E, D, I // 2):
        raise ValueError(f"moe_ffn_fp4: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit hidden size "
                         f"{D} (want [E, 2I, D/2] and [E, D, I/2])")
    shared = sg is not None
    if shared:
        (sg, sgs), (su, sus), (sd, sds) = (_check_fp8_weight(t, s, f"moe_ffn_fp4 ({n})")
                                           for t, s, n in ((sg, sg_scale, "sg"), (su, su_scale, "su"),
                                                           (sd, sd_scale, "sd")))
        S = sg.shape[0]
    else:
        S = 0
        sg = su = sd = torch.empty((1, 1), dtype=torch.float8_e4m3fn, device=h.device)  # never read
        sgs = sus = sds = torch.empty((1, 1), dtype=torch.uint8, device=h.device)
    _check("moe_ffn_fp4", meta, constraints("moe_ffn_fp4", meta, [tuple(h.shape), tuple(w13.shape)]))
    acc = torch.zeros((M, D), dtype=torch.float32, device=h.device)  # fp32 scatter-add target
    if M == 0:
        return acc.to(h.dtype).view(shape)
    A = M * K
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    xq, xs = _act_quant_2d(h.reshape(M, D), 32)
    perm_flat = perm.reshape(A).contiguous()
    wts = w.reshape(A).to(torch.float32).contiguous()
    width = max(I, S)
    rows_total = A + (M if shared else 0)
    act_q = torch.empty((rows_total, width), dtype=torch.float8_e4m3fn, device=h.device)
    act_s = torch.empty((rows_total, triton.cdiv(width, QBLOCK)), dtype=torch.float32, device=h.device)
    # an upper bound on the row tiles: every non-empty expert wastes at most one partial tile
    row_tiles = triton.cdiv(A, bm) + min(E, A) + (triton.cdiv(M, bm) if shared else 0)
    dot_scaled = _dot_scaled(h.device, meta)
    common = dict(BLOCK_M=bm, BLOCK_K=bk, SEGS=triton.next_power_of_2(E + 1), DOT_MODE=_dot_mode(h.device, meta),
                  DOT_SCALED=dot_scaled, UNPACK_TY=tl.float32 if _interpreting() else tl.bfloat16,
                  num_warps=meta["num_warps"], num_stages=meta["num_stages"])
    shared_rows = M if shared else 0
    u8 = torch.uint8  # FP8 data reaches the kernels as bytes (sm80/86 have no fp8 type)
    _qgate_up_kernel[(row_tiles, triton.cdiv(width, bn))](
        xq.view(u8), xs, perm_flat, offsets, w13, w13s, sg.view(u8), sgs, su.view(u8), sus, act_q.view(u8), act_s,
        D, I, S, E, K, shared_rows, xq.stride(0), xs.stride(0), w13.stride(0), w13.stride(1), w13s.stride(0),
        w13s.stride(1), sg.stride(0), sgs.stride(0), act_q.stride(0), act_s.stride(0), float(limit),
        BLOCK_N=bn, ACT_TY=_TL[h.dtype], **common)
    bn_down = meta["BLOCK_N_DOWN"]
    _qdown_kernel[(row_tiles, triton.cdiv(D, bn_down))](
        act_q.view(u8), act_s, perm_flat, offsets, wts, w2, w2s, sd.view(u8), sds, acc,
        D, I, S, E, K, shared_rows, act_q.stride(0), act_s.stride(0), w2.stride(0), w2.stride(1), w2s.stride(0),
        w2s.stride(1), sd.stride(0), sds.stride(0), acc.stride(0), BLOCK_N=bn_down, **common)
    return (acc if h.dtype == torch.float32 else acc.to(h.dtype)).view(shape)


# ---- the IR's ops on quantised weights ------------------------------------------------------------
# The IR keeps the unquantised op names; a quantised param reaches the op as a weight object with ``fmt``
# ("f8e4m3" or "mxfp4"), ``data`` and ``scale`` (``v4c.graph.weights.QuantizedWeight``; duck-typed here, as
# a rendered module imports nothing from v4c). QUANTIZED maps each op name to a launcher with the op
# reference's signature for the case where its weights are quantised.

def _parts(w, fmt, what):
    if getattr(w, "fmt", None) != fmt:
        raise ValueError(f"{what}: expected a {fmt} quantised weight, got {getattr(w, 'fmt', type(w).__name__)}")
    return w.data, w.scale


def _q_linear(x, w, *, meta=None):
    return fp8_linear(x, *_parts(w, "f8e4m3", "linear"), meta=meta)


def _q_linear_rms_norm(x, w, norm_w, *, eps, meta=None):
    return fp8_linear_rms_norm(x, *_parts(w, "f8e4m3", "linear_rms_norm"), norm_w, eps=eps, meta=meta)


def _q_q_proj(x, w, pos, *, meta=None, **attrs):
    return fp8_q_proj(x, *_parts(w, "f8e4m3", "q_proj"), pos, meta=meta, **attrs)


def _q_kv_proj(x, w, norm_w, pos, *, meta=None, **attrs):
    return fp8_kv_proj(x, *_parts(w, "f8e4m3", "kv_proj"), norm_w, pos, meta=meta, **attrs)


def _q_o_proj(o, wa, wb, *, meta=None, **attrs):
    return fp8_o_proj(o, *_parts(wa, "f8e4m3", "o_proj"), *_parts(wb, "f8e4m3", "o_proj"), meta=meta, **attrs)


def _q_moe_ffn(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit, meta=None):
    shared = [p for t in (sg, su, sd) if t is not None for p in _parts(t, "f8e4m3", "moe_ffn (shared expert)")]
    return moe_ffn_fp4(h, idx, w, perm, offsets, *_parts(w13, "mxfp4", "moe_ffn (w13)"),
                       *_parts(w2, "mxfp4", "moe_ffn (w2)"), *shared, limit=limit, meta=meta)


QUANTIZED = {"linear": (_q_linear, "fp8_linear"), "linear_rms_norm": (_q_linear_rms_norm, "fp8_linear_rms_norm"),
             "q_proj": (_q_q_proj, "fp8_q_proj"), "kv_proj": (_q_kv_proj, "fp8_kv_proj"),
             "o_proj": (_q_o_proj, "fp8_o_proj"), "moe_ffn": (_q_moe_ffn, "moe_ffn_fp4")}  # op -> (launcher, META key)


# ---- the template contract ----------------------------------------------------------------------

KERNELS = {"act_quant_fp8": act_quant_fp8, "fp8_linear": fp8_linear, "fp8_linear_rms_norm": fp8_linear_rms_norm,
           "fp8_q_proj": fp8_q_proj, "fp8_kv_proj": fp8_kv_proj, "fp8_o_proj": fp8_o_proj,
           "moe_ffn_fp4": moe_ffn_fp4}

# BLOCK_K divides 128 (a K step never straddles a scale block) and is >= 32 (fp8 MMAs, one MXFP4 group)
_QGEMM_META = {"BLOCK_M": (16, 32, 64, 128), "BLOCK_N": (32, 64, 128, 256), "BLOCK_K": (32, 64, 128),
               "GROUP_M": (1, 8), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
_QNORM_META = {"BLOCK_M": (16, 32, 64), "BLOCK_N": (64, 128, 256, 512, 1024), "BLOCK_K": (32, 64, 128),
               "GROUP_M": (1, 8), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
# defaults: valid on every target for V4-Flash and V4-Pro, and well under the 128 registers at which ptxas starts
# squeezing 4-warp kernels (sm86 spills ~12 B rather than hold 140)
_QNORM_DEFAULT = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}

META = {
    "act_quant_fp8": {"BLOCK_M": (1, 4, 16, 32), "num_warps": (1, 2, 4, 8)},
    "fp8_linear": dict(_QGEMM_META),
    "fp8_linear_rms_norm": dict(_QNORM_META),
    "fp8_q_proj": dict(_QNORM_META),
    "fp8_kv_proj": dict(_QNORM_META),
    "fp8_o_proj": {**_QGEMM_META, "BLOCK_N_A": (32, 64, 128, 256), "BLOCK_K_A": (32, 64, 128)},
    # BLOCK_N (gate/up) is a multiple of 128: its epilogue quantises whole 1x128 blocks of the activation
    "moe_ffn_fp4": {"BLOCK_M": (16, 32, 64), "BLOCK_N": (128, 256), "BLOCK_K": (32, 64, 128),
                    "BLOCK_N_DOWN": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)},
}
DEFAULT_META = {
    "act_quant_fp8": {"BLOCK_M": 16, "num_warps": 4},
    "fp8_linear": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
    "fp8_linear_rms_norm": dict(_QNORM_DEFAULT),
    "fp8_q_proj": dict(_QNORM_DEFAULT),
    "fp8_kv_proj": dict(_QNORM_DEFAULT),
    "fp8_o_proj": {"BLOCK_M": 32, "BLOCK_N_A": 128, "BLOCK_K_A": 32, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8,
                   "num_warps": 4, "num_stages": 3},
    "moe_ffn_fp4": {"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_N_DOWN": 64, "num_warps": 8,
                    "num_stages": 3},
}


def _pow2_ok(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and (v & (v - 1)) == 0


# ---- what a config costs in registers and shared memory --------------------------------------------
# Estimates of what is live per thread and what the pipelines keep in shared memory, for every target this
# template compiles for (sm80's fp16 decode of e4m3 bytes, sm90's fp8 MMAs, sm100's block-scaled MMAs),
# calibrated against Triton's compiler (ptxas registers, kernel metadata shared bytes) for sm80, sm90 and
# sm100 on V4-Flash and V4-Pro shapes; the epilogues' layout conversions reuse the pipelines' space.

REG_LIMIT = 255  # registers per thread, every target
REG_BUDGET = 224  # what an estimate may reach: the estimates err by up to ~10%, and ptxas spills past 255


def _smem_limit(cap) -> int:
    """Bytes of shared memory one block may use on compute capability ``cap`` (None: the largest target)."""
    if cap is None or (9, 0) <= tuple(cap) < (12, 0):
        return 227 * 1024  # sm90, sm100
    if tuple(cap) in ((8, 0), (8, 7)):
        return 163 * 1024
    return 99 * 1024  # sm86, sm89, sm120: consumer parts


def _with_capability(shapes, device):
    """``shapes`` as constraints() takes them, plus the launch device's compute capability."""
    cap = _capability(device)
    if isinstance(shapes, dict):
        return {**shapes, "capability": cap}
    return {"inputs": list(shapes or []), "capability": cap}


def _buffers(bm, stages):
    """Operand buffers a pipelined K loop allocates: num_stages - 1 in flight, one more where Hopper and
    Blackwell MMAs (BLOCK_M >= 64) read operands from shared memory."""
    return stages if bm >= 64 else max(1, stages - 1)


def _gemm_usage(bm, bn, bk, warps, stages, epilogue=""):
    """(registers per thread, shared bytes) of ``_fp8_gemm_kernel`` with one [bm, bn] tile per K loop.
    Registers: the fp32 accumulator and one K step's partial product (the scales are applied outside the
    MMA), each warp's share of both operand tiles of a step (sm80 holds them decoded to fp16), ~40 for
    addresses and masks; the norm epilogue adds its row statistics and, when a program loops over the
    tiles of a wider norm group, the outer loop's state (what the compiler keeps across both passes).
    Shared memory: the byte tiles of the pipeline."""
    wm, wn = _mma_warps(bm, bn, warps)
    acc = _per_thread(bm * bn, warps)
    operands = (bm // wm + bn // wn) * bk // 32
    regs = 40 + 2 * acc + (7 * operands) // 20 + _EPILOGUE_REGS[epilogue](acc)
    smem = _buffers(bm, stages) * (bm + bn) * bk + 4096
    return regs, smem


# extra registers of the norm epilogues over the plain GEMM, by kind: "norm" one tile per norm group,
# "group" several tiles per group (the outer loop over them); calibrated on sm80, the heaviest target
_EPILOGUE_REGS = {"": lambda acc: 0, "norm": lambda acc: 8, "group": lambda acc: 72 + acc}


def _moe_usage(m):
    """(registers per thread, shared bytes) of moe_ffn_fp4's heavier kernel. Gate/up: two fp32
    accumulators with their partial products (the MXFP4 loop's dot output is scaled before it is added) and
    the SwiGLU/quantisation epilogue's temporaries, 5 registers per element of one accumulator; the two
    decoded [BN, BK] weight tiles of a step (codes, values, bf16); the activation tile. Down: one accumulator
    with the scatter-add's 64-bit addresses, one decoded tile, and an activation tile that sm80 decodes to
    fp16 for the shared expert's FP8 loop. Shared memory: the FP8 loop's byte tiles (the larger pipeline;
    the MXFP4 loop's buffers reuse the same space)."""
    bm, bn, bk, bnd = m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"], m["BLOCK_N_DOWN"]
    warps, stages = m["num_warps"], m["num_stages"]
    a = _per_thread(bm * bk, warps)
    regs_up = 40 + 5 * _per_thread(bm * bn, warps) + (3 * _per_thread(bn * bk, warps)) // 2 + a
    regs_down = 40 + 5 * _per_thread(bm * bnd, warps) + (3 * _per_thread(bnd * bk, warps)) // 2 + (5 * a) // 2
    smem_up = _buffers(bm, stages) * (bm + 2 * bn) * bk + 2048
    smem_down = _buffers(bm, stages) * (bm + bnd) * bk + 2048
    return max(regs_up, regs_down), max(smem_up, smem_down)


def _usage_reason(what, regs, smem, limit, warps):
    if regs > REG_BUDGET:
        return (f"{what}an estimated {regs} registers per thread at {warps} warps would spill "
                f"(budget {REG_BUDGET} of {REG_LIMIT})")
    if smem > limit:
        return f"{what}an estimated {smem} B of shared memory is over the {limit} B a block may use"
    return None


def _tile_reason(bm, bn, bk, warps, stages, what="", smem_limit=None, epilogue="") -> str | None:
    """FP8 operand tiles are one byte per element."""
    for name, v, lo in (("BLOCK_M", bm, 16), ("BLOCK_N", bn, 16), ("BLOCK_K", bk, 32)):
        if not _pow2_ok(v) or v < lo:
            return f"{what}{name}={v} must be a power of two >= {lo}"
    if QBLOCK % bk:
        return f"{what}BLOCK_K={bk} must divide the 128-wide scale block (a K step may not straddle two scales)"
    regs, smem = _gemm_usage(bm, bn, bk, warps, stages, epilogue)
    return _usage_reason(what, regs, smem, smem_limit or _smem_limit(None), warps)


def constraints(op, meta, shapes):
    """Why ``meta`` cannot run ``op`` on ``shapes`` (input shapes in the launcher's order, scales left out,
    or a dict with "inputs"/"attrs", and "capability" where the launch device is known), or None. Shapes
    may be None where they do not matter. Without a capability, shared memory is judged against the
    largest target's limit (the AOT compile judges each target's)."""
    m = dict(DEFAULT_META.get(op, {}), **meta)
    if op not in DEFAULT_META:
        return f"unknown op {op!r}"
    if isinstance(shapes, dict):
        ins, attrs, cap = list(shapes.get("inputs", [])), shapes.get("attrs", {}) or {}, shapes.get("capability")
    else:
        ins, attrs, cap = list(shapes or []), {}, None
    limit = _smem_limit(cap)
    warps = m["num_warps"]
    if op == "act_quant_fp8":
        if not _pow2_ok(m["BLOCK_M"]):
            return f"BLOCK_M={m['BLOCK_M']} must be a power of two"
        if m["BLOCK_M"] * QBLOCK > 64 * 32 * warps:
            return f"a {m['BLOCK_M']}x128 tile is more than 64 values per thread at {warps} warps"
        return None
    if op == "moe_ffn_fp4":
        if m["BLOCK_N"] % QBLOCK:
            return f"BLOCK_N={m['BLOCK_N']} must be a multiple of 128 (the epilogue quantises whole 1x128 blocks)"
        d = ins[0][-1] if ins and ins[0] and isinstance(ins[0][-1], int) else None
        if d is not None and d % FP4_BLOCK:
            return f"hidden size {d} is not a multiple of the MXFP4 block {FP4_BLOCK}"
        for name, v, lo in (("BLOCK_M", m["BLOCK_M"], 16), ("BLOCK_N_DOWN", m["BLOCK_N_DOWN"], 16),
                            ("BLOCK_K", m["BLOCK_K"], 32)):
            if not _pow2_ok(v) or v < lo:
                return f"{name}={v} must be a power of two >= {lo}"
        if QBLOCK % m["BLOCK_K"]:
            return f"BLOCK_K={m['BLOCK_K']} must divide the 128-wide scale block"
        regs, smem = _moe_usage(m)
        return _usage_reason("", regs, smem, limit, warps)
    if not (isinstance(m.get("GROUP_M"), int) and m["GROUP_M"] >= 1):
        return f"GROUP_M={m.get('GROUP_M')} must be a positive int"
    bm, bk, stages = m["BLOCK_M"], m["BLOCK_K"], m["num_stages"]
    if op == "fp8_o_proj":
        return (_tile_reason(bm, m["BLOCK_N_A"], m["BLOCK_K_A"], warps, stages, "grouped GEMM: ", smem_limit=limit)
                or _tile_reason(bm, m["BLOCK_N"], bk, warps, stages, "dense GEMM: ", smem_limit=limit))
    if op == "fp8_linear":
        return _tile_reason(bm, m["BLOCK_N"], bk, warps, stages, smem_limit=limit)
    # the norm epilogues: a program covers one norm group, BLOCK_N columns at a time
    n = ins[1][0] if len(ins) > 1 and ins[1] and isinstance(ins[1][0], int) else None
    group = n
    if op == "fp8_q_proj":
        shape = attrs.get("shape")
        group = shape[-1] if shape and isinstance(shape[-1], int) else None
    rope = attrs.get("rope_dim")
    if group is None:
        if m["BLOCK_N"] is None:
            return None
        return _tile_reason(bm, m["BLOCK_N"], bk, warps, stages, smem_limit=limit, epilogue="norm")
    bn = group if m["BLOCK_N"] is None else min(m["BLOCK_N"], group)
    if not _pow2_ok(bn) or group % bn:
        return (f"norm group width {group} is not a multiple of a power-of-two tile (BLOCK_N={m['BLOCK_N']}; "
                f"a program normalises whole groups, BLOCK_N columns at a time)")
    if isinstance(rope, int) and rope and not (rope % 2 == 0 and 0 < rope <= group):
        return f"rope_dim={rope} must be even and within the {group}-wide norm group"
    return _tile_reason(bm, bn, bk, warps, stages, smem_limit=limit, epilogue="norm" if bn == group else "group")
