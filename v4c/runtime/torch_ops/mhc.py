"""mHC pre/post mixes with the Sinkhorn iterations done in place.

A decode step runs ~2 mixes per layer, each ~60 tiny tensor ops; allocation-free in-place
updates keep their per-op overhead down. Same arithmetic as the references, step for step.
"""
from __future__ import annotations

import torch

from ...graph.ops.core import rms_norm
from ...graph.ops.mhc import hc_collapse, hc_expand_mix, hc_head_weights, hc_logits, hc_weights


def sinkhorn_(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    comb.div_(comb.sum(dim=-2, keepdim=True).add_(eps))
    for _ in range(iters - 1):
        comb.div_(comb.sum(dim=-1, keepdim=True).add_(eps))
        comb.div_(comb.sum(dim=-2, keepdim=True).add_(eps))
    return comb


def hc_pre(x, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    pre, post, comb = hc_weights(hc_logits(x, fn, eps=eps), base, scale, n=n, eps=hc_eps)
    comb = sinkhorn_(comb.contiguous(), iters, hc_eps)
    return rms_norm(hc_collapse(x, pre), norm_w, eps=eps), post, comb


def hc_post_pre(x, y, post, comb, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    x1 = hc_expand_mix(x, y, post, comb)
    return (x1, *hc_pre(x1, fn, base, scale, norm_w, n=n, eps=eps, hc_eps=hc_eps, iters=iters))


def hc_head(x, y, post, comb, fn, base, scale, norm_w, *, eps, hc_eps):
    x1 = hc_expand_mix(x, y, post, comb)
    pre = hc_head_weights(hc_logits(x1, fn, eps=eps), base, scale, eps=hc_eps)
    return rms_norm(hc_collapse(x1, pre), norm_w, eps=eps)
