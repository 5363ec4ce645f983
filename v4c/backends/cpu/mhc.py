"""mHC pre/post mixes: each pass over the n residual streams done once, Sinkhorn in place.

The references are written for clarity: the streams ``x [B, T, n, D]`` are converted, squared,
normalised, broadcast-multiplied and summed in separate full-size passes, and the post-mix is a
batched 4x4 matmul per token, which CPU BLAS runs poorly. Here the streams are converted to
fp32 once per mix, the RMS scale is applied to the n*D -> (n+2)*n product instead of to its
input (the map is linear), and the collapse and post-mix are n or n*n fused multiply-adds over
[B, T, D] slices. Same arithmetic as the references up to summation order.

Where the C helpers are built (``native``) every size runs there instead, one call per mix; the
PyTorch paths here are the fallback without a C compiler (or with V4C_NATIVE=0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...graph.ops.core import rms_norm
from ...graph.ops.mhc import hc_collapse, hc_expand_mix, hc_head_weights, hc_logits, hc_weights
from . import native

def _sinkhorn_one(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """One n x n matrix (a batch-1 decode step) in Python floats: 20 iterations of tensor ops cost
    ~6 dispatches each; on 16 numbers plain arithmetic is twice as fast (and rounds less)."""
    n = comb.shape[-1]
    flat = comb.reshape(-1).tolist()
    rows = [flat[i * n:(i + 1) * n] for i in range(n)]
    cols = [sum(c) + eps for c in zip(*rows)]
    rows = [[v / s for v, s in zip(r, cols)] for r in rows]
    for _ in range(iters - 1):
        rows = [[v / s for v in r] for r, s in ((r, sum(r) + eps) for r in rows)]
        cols = [sum(c) + eps for c in zip(*rows)]
        rows = [[v / s for v, s in zip(r, cols)] for r in rows]
    return comb.copy_(torch.tensor(rows, dtype=comb.dtype).view(comb.shape))


def sinkhorn_(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    if comb.numel() == comb.shape[-1] ** 2 and comb.device.type == "cpu":
        return _sinkhorn_one(comb, iters, eps)
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(eps))
    for _ in range(iters - 1):
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(eps))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(eps))
    return comb


def _logits(xf: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """``hc_logits`` on the fp32 streams: rms(x) scales the product, not the input."""
    flat = xf.flatten(2)
    inv_rms = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square_().div_(flat.shape[-1]).add_(eps))
    return F.linear(flat, fn.float()).mul_(inv_rms)


def _collapse(xf: torch.Tensor, pre: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_j pre_j * X_j`` as n fused multiply-adds."""
    out = xf[:, :, 0] * pre[:, :, 0:1]
    for j in range(1, xf.shape[2]):
        out.addcmul_(xf[:, :, j], pre[:, :, j:j + 1])
    return out.to(dtype)


def _expand_mix(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``X'_k = post_k * y + sum_j comb[j, k] * X_j`` in x's dtype, as the reference computes it."""
    dt = x.dtype
    post, comb = post.to(dt), comb.to(dt)
    out = torch.empty_like(x)
    for k in range(x.shape[2]):
        o = torch.mul(y, post[:, :, k:k + 1], out=out[:, :, k])
        for j in range(x.shape[2]):
            o.addcmul_(x[:, :, j], comb[:, :, j, k:k + 1])
    return out


# Three implementations of each mix, chosen per node and phase by the cpu backend (``registry``):
# the C helpers (``*_native``, any size), and without them the references' few large ops for a
# decode step (``*_small``: per-op overhead dominates there) or one pass per stream for a prefill
# (``*_streamed``: memory passes dominate there).

def _c(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def hc_pre_native(x, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    x, norm_w = _c(x), _c(norm_w)
    _, h, post, comb = native.hc_mix(x, None, None, None, fn, base, scale, norm_w, eps=eps, hc_eps=hc_eps, iters=iters)
    return h, post, comb


def hc_pre_small(x, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    pre, post, comb = hc_weights(hc_logits(x, fn, eps=eps), base, scale, n=n, eps=hc_eps)
    comb = sinkhorn_(comb.contiguous(), iters, hc_eps)
    return rms_norm(hc_collapse(x, pre), norm_w, eps=eps), post, comb


def hc_pre_streamed(x, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    xf = x.float()
    pre, post, comb = hc_weights(_logits(xf, fn, eps), base, scale, n=n, eps=hc_eps)
    comb = sinkhorn_(comb.contiguous(), iters, hc_eps)
    return rms_norm(_collapse(xf, pre, x.dtype), norm_w, eps=eps), post, comb


def hc_post_pre_native(x, y, post, comb, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    x, y, norm_w = _c(x), _c(y), _c(norm_w)
    return native.hc_mix(x, y, post, comb, fn, base, scale, norm_w, eps=eps, hc_eps=hc_eps, iters=iters)


def hc_post_pre_small(x, y, post, comb, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    x1 = hc_expand_mix(x, y, post, comb)
    return (x1, *hc_pre_small(x1, fn, base, scale, norm_w, n=n, eps=eps, hc_eps=hc_eps, iters=iters))


def hc_post_pre_streamed(x, y, post, comb, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    x1 = _expand_mix(x, y, post, comb)
    return (x1, *hc_pre_streamed(x1, fn, base, scale, norm_w, n=n, eps=eps, hc_eps=hc_eps, iters=iters))


def hc_head_native(x, y, post, comb, fn, base, scale, norm_w, *, eps, hc_eps):
    x, y, norm_w = _c(x), _c(y), _c(norm_w)
    return native.hc_mix(x, y, post, comb, fn, base, scale, norm_w, eps=eps, hc_eps=hc_eps, head=True)[1]


def hc_head_streamed(x, y, post, comb, fn, base, scale, norm_w, *, eps, hc_eps):
    x1 = _expand_mix(x, y, post, comb)
    xf = x1.float()
    pre = hc_head_weights(_logits(xf, fn, eps), base, scale, eps=hc_eps)
    return rms_norm(_collapse(xf, pre, x1.dtype), norm_w, eps=eps)
