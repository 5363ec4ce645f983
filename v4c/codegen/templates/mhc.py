"""mHC (manifold-constrained hyper-connection) kernels: stream expansion, the pre-mix, the fused
post-mix + pre-mix between sublayers, and the head's final collapse.

Every kernel runs one program per block of ``BLOCK_T`` tokens and walks the hidden dim in
``BLOCK_D`` chunks, so a token's ``n * D`` stream values never have to fit on chip at once.
The pre-mix of a token block takes three sweeps over D:

1. stream values -> sum of squares (the unweighted RMS) and the mixing logits ``X @ fn^T``
   (one ``tl.dot`` per stream and chunk against the matching ``fn`` columns, fp32 accumulate);
2. the logits -> pre / post / comb weights and the Sinkhorn iterations, all in registers;
   then ``u = sum_j pre_j X_j`` per chunk, rounded to the activation dtype and parked in the
   output ``h`` while its sum of squares accumulates;
3. ``h = w * u * rsqrt(mean(u^2) + eps)``, reading the parked ``u`` back.

Register layout of the logits: ``(n + 2) * n`` values per token, viewed as ``NR x NP`` (rows
padded to powers of two): row 0 = pre, row 1 = post, rows 2 .. n+1 = the comb matrix, so
logit ``(r, c)`` is row ``r * n + c`` of ``fn`` and the comb block is already a matrix.
All arithmetic is fp32 (the dot inputs too, so bf16 never reaches ``tl.dot``); activations are
fp32, fp16 or bf16 and the mHC parameters fp32. Values the reference rounds to the activation
dtype (the post-mixed streams, ``u``, ``h``) are rounded at the same points here.

The stream loops are ``range(N)`` rather than ``tl.static_range``: unrolled, the compiler front-loads
every stream's tiles and spills (ptxas for sm_90 at the defaults: no spills rolled, 116-1500
bytes of spills unrolled).
"""
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---- shared pieces -------------------------------------------------------------------------

@triton.jit
def _cast(x, dt: tl.constexpr, FIX_BF16: tl.constexpr):
    """``x.to(dt)`` rounding to nearest even. The interpreter truncates fp32 -> bf16, so there
    (``FIX_BF16``) the rounding is done on the bits first and the cast is then exact."""
    if FIX_BF16 and dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dt)


@triton.jit
def _stream(x_ptr, y_ptr, post_ptr, comb_ptr, tok, tmask, d, k, D, N: tl.constexpr,
            MIX: tl.constexpr, FIX_BF16: tl.constexpr):
    """fp32 tile ``[BLOCK_T, BLOCK_D]`` of stream ``k`` at hidden columns ``d``; with ``MIX`` the
    post-mixed stream ``X'_k = post_k * y + sum_j comb[j, k] X_j``, rounded where the reference
    (which computes in the activation dtype) rounds: the weights, both terms and their sum."""
    dt = x_ptr.dtype.element_ty
    dmask = tmask[:, None] & (d[None, :] < D)
    if MIX:
        mixed = tl.zeros(dmask.shape, dtype=tl.float32)
        for j in range(N):
            c = tl.load(comb_ptr + tok * (N * N) + j * N + k, mask=tmask, other=0.0)
            xj = tl.load(x_ptr + tok[:, None] * (N * D) + j * D + d[None, :], mask=dmask, other=0.0)
            mixed += _cast(c, dt, FIX_BF16).to(tl.float32)[:, None] * xj.to(tl.float32)
        post = tl.load(post_ptr + tok * N + k, mask=tmask, other=0.0)
        y = tl.load(y_ptr + tok[:, None] * D + d[None, :], mask=dmask, other=0.0).to(tl.float32)
        scaled = _cast(_cast(post, dt, FIX_BF16).to(tl.float32)[:, None] * y, dt, FIX_BF16)
        s = _cast(scaled.to(tl.float32) + _cast(mixed, dt, FIX_BF16).to(tl.float32), dt, FIX_BF16)
    else:
        s = tl.load(x_ptr + tok[:, None] * (N * D) + k * D + d[None, :], mask=dmask, other=0.0)
    return s.to(tl.float32)


@triton.jit
def _logits_step(acc, s, fn_ptr, d, k, D, N: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
                 ROWS: tl.constexpr, PRECISION: tl.constexpr):
    """``acc += s @ fn[:, k*D + d]^T`` for stream ``k``'s tile ``s``; ``acc`` is ``[BLOCK_T, NR * NP]`` in
    the (row, column) logit layout, of which ``ROWS`` rows of ``n`` logits are real."""
    ll = tl.arange(0, NR * NP)  # flattened (logit row, logit column)
    r = ll // NP
    c = ll % NP
    fmask = (d < D)[:, None] & ((r < ROWS) & (c < N))[None, :]
    f = tl.load(fn_ptr + (r * N + c)[None, :] * (N * D) + (k * D + d)[:, None], mask=fmask, other=0.0)
    return tl.dot(s, f, acc, input_precision=PRECISION)


@triton.jit
def _logit_grid(acc, rstd, base_ptr, N: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
                ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """The accumulated logits as ``[BLOCK_T, NR, NP]``, RMS-scaled, with their bias and row indices."""
    m = tl.reshape(acc, (BLOCK_T, NR, NP)) * rstd[:, None, None]
    r = tl.arange(0, NR)[None, :, None]
    c = tl.arange(0, NP)[None, None, :]
    valid = (r < ROWS) & (c < N)
    base = tl.load(base_ptr + r * N + c, mask=valid, other=0.0)
    return m, base, r, c, valid


@triton.jit
def _mix_weights(acc, rstd, base_ptr, scale_ptr, hc_eps, iters, N: tl.constexpr, NP: tl.constexpr,
                 NR: tl.constexpr, BLOCK_T: tl.constexpr):
    """pre ``[BLOCK_T, NP]`` = sigmoid + eps, post = 2 sigmoid, comb ``[BLOCK_T, NR, NP]`` (rows 2..n+1) =
    row softmax + eps, then Sinkhorn: a column normalisation and ``iters - 1`` (row, column) rounds."""
    m, base, r, c, valid = _logit_grid(acc, rstd, base_ptr, N, NP, NR, N + 2, BLOCK_T)
    scale = tl.where(r == 0, tl.load(scale_ptr), tl.where(r == 1, tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)))
    z = m * scale + base
    sig = tl.sigmoid(z)
    pre = tl.sum(tl.where(valid & (r == 0), sig, 0.0), axis=1) + hc_eps
    post = 2.0 * tl.sum(tl.where(valid & (r == 1), sig, 0.0), axis=1)
    cmask = valid & (r >= 2)
    zc = tl.where(cmask, z, -1e30)  # finite: padded rows stay NaN-free
    e = tl.exp(zc - tl.max(zc, axis=2, keep_dims=True))
    comb = tl.where(cmask, e / tl.sum(e, axis=2, keep_dims=True) + hc_eps, 0.0)
    comb = comb / (tl.sum(comb, axis=1, keep_dims=True) + hc_eps)
    for _ in range(iters - 1):
        comb = comb / (tl.sum(comb, axis=2, keep_dims=True) + hc_eps)
        comb = comb / (tl.sum(comb, axis=1, keep_dims=True) + hc_eps)
    return pre, post, comb


@triton.jit
def _store_weights(post_ptr, comb_ptr, post, comb, tok, tmask, N: tl.constexpr, NP: tl.constexpr,
                   NR: tl.constexpr):
    """post -> ``[tokens, n]``, comb rows 2..n+1 -> ``[tokens, n, n]`` (both fp32)."""
    k = tl.arange(0, NP)[None, :]
    tl.store(post_ptr + tok[:, None] * N + k, post, mask=tmask[:, None] & (k < N))
    r = tl.arange(0, NR)[None, :, None]
    c = tl.arange(0, NP)[None, None, :]
    cmask = tmask[:, None, None] & (r >= 2) & (r < N + 2) & (c < N)
    tl.store(comb_ptr + tok[:, None, None] * (N * N) + (r - 2) * N + c, comb, mask=cmask)


@triton.jit
def _collapse_norm(x_ptr, y_ptr, post_ptr, comb_ptr, w_ptr, h_ptr, pre, tok, tmask, D, eps,
                   N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                   MIX: tl.constexpr, FIX_BF16: tl.constexpr):
    """``h = RMSNorm_w(u)`` with ``u = sum_j pre_j X_j`` rounded to the activation dtype; ``u`` is
    parked in ``h`` between the two sweeps (each thread block rereads only what it wrote)."""
    dt = h_ptr.dtype.element_ty
    cols = tl.arange(0, NP)[None, :]
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        u = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for k in range(N):
            pk = tl.sum(tl.where(cols == k, pre, 0.0), axis=1)
            u += pk[:, None] * _stream(x_ptr, y_ptr, post_ptr, comb_ptr, tok, tmask, d, k, D, N, MIX, FIX_BF16)
        u = _cast(u, dt, FIX_BF16)
        tl.store(h_ptr + tok[:, None] * D + d[None, :], u, mask=tmask[:, None] & (d[None, :] < D))
        uf = u.to(tl.float32)
        ss += tl.sum(uf * uf, axis=1)
    rstd = tl.rsqrt(ss / D + eps)
    tl.debug_barrier()  # the parked u is read back by other threads of this program
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = tmask[:, None] & (d[None, :] < D)
        u = tl.load(h_ptr + tok[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
        tl.store(h_ptr + tok[:, None] * D + d[None, :], _cast(w[None, :] * (u * rstd[:, None]), dt, FIX_BF16),
                 mask=mask)


@triton.jit
def _token_block(M, BLOCK_T: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    return tok.to(tl.int64), tok < M


# ---- kernels -------------------------------------------------------------------------------

@triton.jit
def _hc_expand_kernel(x_ptr, out_ptr, M, D, N: tl.constexpr, NP: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[t, k, :] = x[t, :]`` for the ``n`` streams."""
    tok, tmask = _token_block(M, BLOCK_T)
    k = tl.arange(0, NP)[None, :, None]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + tok[:, None] * D + d[None, :], mask=tmask[:, None] & (d[None, :] < D), other=0.0)
        d3 = d[None, None, :]
        tile = tl.broadcast_to(x[:, None, :], (BLOCK_T, NP, BLOCK_D))
        tl.store(out_ptr + tok[:, None, None] * (N * D) + k * D + d3, tile,
                 mask=tmask[:, None, None] & (k < N) & (d3 < D))


@triton.jit
def _hc_pre_kernel(x_ptr, fn_ptr, base_ptr, scale_ptr, w_ptr, h_ptr, post_ptr, comb_ptr,
                   M, D, eps, hc_eps, iters, N: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                   FIX_BF16: tl.constexpr):
    """mHC pre-mix of a token block: logits, weights + Sinkhorn, collapse, weighted RMSNorm."""
    tok, tmask = _token_block(M, BLOCK_T)
    acc = tl.zeros((BLOCK_T, NR * NP), dtype=tl.float32)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        for k in range(N):
            s = _stream(x_ptr, x_ptr, x_ptr, x_ptr, tok, tmask, d, k, D, N, False, FIX_BF16)
            ss += tl.sum(s * s, axis=1)
            acc = _logits_step(acc, s, fn_ptr, d, k, D, N, NP, NR, N + 2, PRECISION)
    rstd = tl.rsqrt(ss / (N * D) + eps)
    pre, post, comb = _mix_weights(acc, rstd, base_ptr, scale_ptr, hc_eps, iters, N, NP, NR, BLOCK_T)
    _store_weights(post_ptr, comb_ptr, post, comb, tok, tmask, N, NP, NR)
    _collapse_norm(x_ptr, x_ptr, x_ptr, x_ptr, w_ptr, h_ptr, pre, tok, tmask, D, eps, N, NP, BLOCK_T, BLOCK_D,
                   False, FIX_BF16)


@triton.jit
def _hc_post_pre_kernel(x_ptr, y_ptr, post_in_ptr, comb_in_ptr, fn_ptr, base_ptr, scale_ptr, w_ptr,
                        xo_ptr, h_ptr, post_ptr, comb_ptr, M, D, eps, hc_eps, iters,
                        N: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                        FIX_BF16: tl.constexpr):
    """Post-mix into new streams X' (written out), then the pre-mix of X' in the same sweeps."""
    tok, tmask = _token_block(M, BLOCK_T)
    acc = tl.zeros((BLOCK_T, NR * NP), dtype=tl.float32)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        xmask = tmask[:, None] & (d[None, :] < D)
        for k in range(N):
            s = _stream(x_ptr, y_ptr, post_in_ptr, comb_in_ptr, tok, tmask, d, k, D, N, True, FIX_BF16)
            tl.store(xo_ptr + tok[:, None] * (N * D) + k * D + d[None, :], s.to(xo_ptr.dtype.element_ty),
                     mask=xmask)  # exact: s is already rounded
            ss += tl.sum(s * s, axis=1)
            acc = _logits_step(acc, s, fn_ptr, d, k, D, N, NP, NR, N + 2, PRECISION)
    rstd = tl.rsqrt(ss / (N * D) + eps)
    pre, post, comb = _mix_weights(acc, rstd, base_ptr, scale_ptr, hc_eps, iters, N, NP, NR, BLOCK_T)
    _store_weights(post_ptr, comb_ptr, post, comb, tok, tmask, N, NP, NR)
    tl.debug_barrier()  # X' is read back below
    _collapse_norm(xo_ptr, xo_ptr, xo_ptr, xo_ptr, w_ptr, h_ptr, pre, tok, tmask, D, eps,
                   N, NP, BLOCK_T, BLOCK_D, False, FIX_BF16)


@triton.jit
def _hc_head_kernel(x_ptr, y_ptr, post_in_ptr, comb_in_ptr, fn_ptr, base_ptr, scale_ptr, w_ptr, h_ptr,
                    M, D, eps, hc_eps, N: tl.constexpr, NP: tl.constexpr, NR: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                    FIX_BF16: tl.constexpr):
    """Last post-mix, sigmoid head weights (no Sinkhorn), collapse and final RMSNorm. X' is not an
    output, so the collapse sweep recomputes it rather than writing and rereading it."""
    tok, tmask = _token_block(M, BLOCK_T)
    acc = tl.zeros((BLOCK_T, NR * NP), dtype=tl.float32)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        for k in range(N):
            s = _stream(x_ptr, y_ptr, post_in_ptr, comb_in_ptr, tok, tmask, d, k, D, N, True, FIX_BF16)
            ss += tl.sum(s * s, axis=1)
            acc = _logits_step(acc, s, fn_ptr, d, k, D, N, NP, NR, 1, PRECISION)
    rstd = tl.rsqrt(ss / (N * D) + eps)
    m, base, r, c, valid = _logit_grid(acc, rstd, base_ptr, N, NP, NR, 1, BLOCK_T)
    pre = tl.sum(tl.where(valid, tl.sigmoid(m * tl.load(scale_ptr) + base), 0.0), axis=1) + hc_eps
    _collapse_norm(x_ptr, y_ptr, post_in_ptr, comb_in_ptr, w_ptr, h_ptr, pre, tok, tmask, D, eps,
                   N, NP, BLOCK_T, BLOCK_D, True, FIX_BF16)


# ---- launchers -----------------------------------------------------------------------------

def _p2(v: int) -> int:
    # plain Python: triton.next_power_of_2 is a constexpr function, ~10x slower on the host, and the
    # tuning spaces call this millions of times
    return 1 << (max(int(v), 1) - 1).bit_length()


def _layout(n: int, rows: int):
    """(NP, NR): padded stream count and logit rows, with NR * NP >= 16 (tl.dot's minimum N)."""
    np_ = _p2(n)
    return np_, max(_p2(rows), _p2(math.ceil(16 / np_)))


def _kernel_args(meta):
    """The mixing kernels' meta-parameters as launch keywords (bf16 rounding fixed up when interpreted)."""
    return {"BLOCK_T": meta["BLOCK_T"], "BLOCK_D": meta["BLOCK_D"], "PRECISION": meta["DOT_PRECISION"],
            "FIX_BF16": INTERPRET, "num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}


def hc_expand(x, n, *, meta=None):
    meta = {**DEFAULT_META["hc_expand"], **(meta or {})}
    x = x.contiguous()
    b, t, d = x.shape
    out = torch.empty((b, t, n, d), dtype=x.dtype, device=x.device)
    m = b * t
    if m:
        grid = (triton.cdiv(m, meta["BLOCK_T"]),)
        _hc_expand_kernel[grid](x, out, m, d, N=n, NP=_p2(n), BLOCK_T=meta["BLOCK_T"], BLOCK_D=meta["BLOCK_D"],
                                num_warps=meta["num_warps"])
    return out


def hc_pre(x, fn, base, scale, norm_w, *, n, eps, hc_eps, iters, meta=None):
    meta = {**DEFAULT_META["hc_pre"], **(meta or {})}
    x = x.contiguous()
    b, t, _, d = x.shape
    m = b * t
    h = torch.empty((b, t, d), dtype=x.dtype, device=x.device)
    post = torch.empty((b, t, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((b, t, n, n), dtype=torch.float32, device=x.device)
    if m:
        np_, nr = _layout(n, n + 2)
        grid = (triton.cdiv(m, meta["BLOCK_T"]),)
        _hc_pre_kernel[grid](x, fn.contiguous(), base.contiguous(), scale.contiguous(), norm_w.contiguous(),
                             h, post, comb, m, d, float(eps), float(hc_eps), int(iters), N=n, NP=np_, NR=nr,
                             **_kernel_args(meta))
    return h, post, comb


def hc_post_pre(x, y, post, comb, fn, base, scale, norm_w, *, n, eps, hc_eps, iters, meta=None):
    meta = {**DEFAULT_META["hc_post_pre"], **(meta or {})}
    x = x.contiguous()
    b, t, _, d = x.shape
    m = b * t
    xo = torch.empty_like(x)
    h = torch.empty((b, t, d), dtype=x.dtype, device=x.device)
    post_o = torch.empty((b, t, n), dtype=torch.float32, device=x.device)
    comb_o = torch.empty((b, t, n, n), dtype=torch.float32, device=x.device)
    if m:
        np_, nr = _layout(n, n + 2)
        grid = (triton.cdiv(m, meta["BLOCK_T"]),)
        _hc_post_pre_kernel[grid](x, y.contiguous(), post.float().contiguous(), comb.float().contiguous(),
                                  fn.contiguous(), base.contiguous(), scale.contiguous(), norm_w.contiguous(),
                                  xo, h, post_o, comb_o, m, d, float(eps), float(hc_eps), int(iters),
                                  N=n, NP=np_, NR=nr, **_kernel_args(meta))
    return xo, h, post_o, comb_o


def hc_head(x, y, post, comb, fn, base, scale, norm_w, *, eps, hc_eps, meta=None):
    meta = {**DEFAULT_META["hc_head"], **(meta or {})}
    x = x.contiguous()
    b, t, n, d = x.shape
    m = b * t
    h = torch.empty((b, t, d), dtype=x.dtype, device=x.device)
    if m:
        np_, nr = _layout(n, 1)
        grid = (triton.cdiv(m, meta["BLOCK_T"]),)
        _hc_head_kernel[grid](x, y.contiguous(), post.float().contiguous(), comb.float().contiguous(),
                              fn.contiguous(), base.contiguous(), scale.contiguous(), norm_w.contiguous(), h,
                              m, d, float(eps), float(hc_eps), N=n, NP=np_, NR=nr, **_kernel_args(meta))
    return h


KERNELS = {"hc_expand": hc_expand, "hc_pre": hc_pre, "hc_post_pre": hc_post_pre, "hc_head": hc_head}

_MIX_META = {"BLOCK_T": (16, 32, 64), "BLOCK_D": (16, 32, 64, 128), "num_warps": (2, 4, 8), "num_stages": (1, 2, 3),
             "DOT_PRECISION": ("tf32x3", "ieee")}
META = {
    "hc_expand": {"BLOCK_T": (1, 4, 16, 32), "BLOCK_D": (128, 256, 512, 1024), "num_warps": (2, 4, 8)},
    "hc_pre": dict(_MIX_META),
    "hc_post_pre": dict(_MIX_META),
    "hc_head": dict(_MIX_META),
}
_MIX_DEFAULT = {"BLOCK_T": 16, "BLOCK_D": 64, "num_warps": 4, "num_stages": 2, "DOT_PRECISION": "tf32x3"}
DEFAULT_META = {
    "hc_expand": {"BLOCK_T": 4, "BLOCK_D": 512, "num_warps": 4},
    "hc_pre": dict(_MIX_DEFAULT),
    "hc_post_pre": dict(_MIX_DEFAULT),
    "hc_head": dict(_MIX_DEFAULT),
}

_SMEM_BYTES = 200 * 1024  # under the ~227 KiB a Hopper thread block may use, with room for the compiler
_PRECISIONS = ("tf32x3", "ieee")  # plain tf32 (10-bit mantissa) is too coarse for the logits


def _n_streams(shapes):
    """n from ``shapes``: a list of the op's input shapes (streams ``[B, T, n, D]`` first), a dict with
    ``"inputs"`` (and ``"attrs"``), or a dict of named sizes with ``"n"``; None when it does not say."""
    if isinstance(shapes, dict):
        n = shapes.get("n", (shapes.get("attrs") or {}).get("n"))
        if isinstance(n, int):
            return n
        shapes = shapes.get("inputs") or []
    first = tuple(shapes[0]) if shapes else ()
    return first[2] if len(first) == 4 and isinstance(first[2], int) else None


def constraints(op, meta, shapes):
    """Why ``meta`` cannot run ``op`` on ``shapes``, or None. Only the stream count matters here (it sizes
    the logit tile); see ``_n_streams`` for the accepted forms of ``shapes``."""
    if op not in META:
        return f"mhc: no kernel for {op}"
    meta = {**DEFAULT_META[op], **meta}
    bt, bd = meta["BLOCK_T"], meta["BLOCK_D"]
    for name in ("BLOCK_T", "BLOCK_D"):
        v = meta[name]
        if v < 1 or v & (v - 1):
            return f"{name}={v} must be a power of two"
    if op == "hc_expand":
        return None
    if bt < 16:
        return f"BLOCK_T={bt}: tl.dot needs at least 16 rows"
    if bd < 16:
        return f"BLOCK_D={bd}: tl.dot needs a reduction chunk of at least 16"
    if meta["DOT_PRECISION"] not in _PRECISIONS:
        return f"DOT_PRECISION={meta['DOT_PRECISION']!r}: use one of {_PRECISIONS} (fp32-accurate logits)"
    n = _n_streams(shapes) or 4
    np_, nr = _layout(n, 1 if op == "hc_head" else n + 2)
    # upper bound: both fp32 dot operands ([BLOCK_T, BLOCK_D] and [BLOCK_D, NR*NP]) in every stage
    smem = meta["num_stages"] * (bt + nr * np_) * bd * 4
    if smem > _SMEM_BYTES:
        return f"tl.dot operands need ~{smem // 1024} KiB of shared memory over {meta['num_stages']} stages"
    return None
