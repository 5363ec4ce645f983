"""Manifold-constrained hyper-connections (mHC): n residual streams mixed per sublayer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Cost, expect, expect_rank, io_bytes_cost, register, same_dim
from ..types import TensorType


def _expand_infer(ins, a):
    x = ins[0]
    expect_rank(x, 3, "hc_expand input")
    return [TensorType((x.shape[0], x.shape[1], a["n"], x.shape[2]), x.dtype)]


@register("hc_expand", infer=_expand_infer, operands=("x",), attrs=("n:int",),
          cost=lambda i, o, a, c: Cost(0, i[0].nbytes + o[0].nbytes))
def hc_expand(x, n):
    """Copy one stream into ``n`` identical residual streams."""
    return x.unsqueeze(2).expand(-1, -1, n, -1).contiguous()


def _logits_infer(ins, a):
    x, fn = ins
    expect_rank(x, 4, "hc_logits streams")
    expect_rank(fn, 2, "hc_logits fn")
    expect(isinstance(x.shape[2], int) and isinstance(x.shape[3], int), f"hc_logits: stream dims must be static: {x}")
    same_dim(x.shape[2] * x.shape[3], fn.shape[1], "hc_logits: n*D vs fn columns")
    return [TensorType((x.shape[0], x.shape[1], fn.shape[0]), "f32")]


def _logits_cost(ins, outs, a, ctx):
    x, fn = ins
    tokens = x.shape[0] * x.shape[1]
    return Cost(2 * tokens * fn.numel + 3 * x.numel, x.nbytes + fn.nbytes + outs[0].nbytes)


@register("hc_logits", infer=_logits_infer, cost=_logits_cost, operands=("x", "fn:weight"), attrs=("eps:float",))
def hc_logits(x, fn, eps):
    """Unweighted RMS over the flattened streams, then the linear map to the mixing logits."""
    xf = x.flatten(2).float()
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return F.linear(xf, fn.float())


def _weights_infer(ins, a):
    m, base, scale = ins
    n = a["n"]
    same_dim(m.shape[-1], (n + 2) * n, "hc_weights: logits vs (n+2)*n")
    same_dim(base.shape[0], (n + 2) * n, "hc_weights: base")
    same_dim(scale.shape[0], 3, "hc_weights: scale")
    b, t = m.shape[:2]
    return [TensorType((b, t, n), "f32"), TensorType((b, t, n), "f32"), TensorType((b, t, n, n), "f32")]


@register("hc_weights", infer=_weights_infer, cost=io_bytes_cost(8), operands=("m", "base:weight", "scale:weight"),
          attrs=("n:int", "eps:float"))
def hc_weights(m, base, scale, n, eps):
    """Split the logits into pre (sigmoid + eps), post (2*sigmoid) and comb (row softmax + eps)."""
    pre_w, post_w, comb_w = m.split([n, n, n * n], dim=-1)
    base = base.float()
    pre = torch.sigmoid(pre_w * scale[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(post_w * scale[1] + base[n:2 * n])
    comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n), dim=-1) + eps
    return pre, post, comb


def _sinkhorn_infer(ins, a):
    c = ins[0]
    same_dim(c.shape[-1], c.shape[-2], "sinkhorn: square matrices")
    return [c]


@register("sinkhorn", infer=_sinkhorn_infer, operands=("comb",), attrs=("iters:int", "eps:float"),
          cost=lambda i, o, a, c: Cost(4 * a["iters"] * i[0].numel, i[0].nbytes + o[0].nbytes))
def sinkhorn(comb, iters, eps):
    """Column normalisation, then ``iters - 1`` (row, column) rounds; each divides by sum + eps."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def _collapse_infer(ins, a):
    x, pre = ins
    same_dim(x.shape[2], pre.shape[2], "hc_collapse: streams")
    return [TensorType((x.shape[0], x.shape[1], x.shape[3]), x.dtype)]


@register("hc_collapse", infer=_collapse_infer, cost=io_bytes_cost(2), operands=("x", "pre"))
def hc_collapse(x, pre):
    """Weighted sum of the streams: ``u = sum_j pre_j * X_j``."""
    return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)


def _head_infer(ins, a):
    m, base, scale = ins
    same_dim(m.shape[-1], base.shape[0], "hc_head_weights: base")
    return [m]


@register("hc_head_weights", infer=_head_infer, cost=io_bytes_cost(3), operands=("m", "base:weight", "scale:weight"),
          attrs=("eps:float",))
def hc_head_weights(m, base, scale, eps):
    """Final collapse weights: ``sigmoid(scale * m + base) + eps`` (no Sinkhorn)."""
    return torch.sigmoid(m * scale.float() + base.float()) + eps


def _mix_infer(ins, a):
    x, y, post, comb = ins
    expect_rank(x, 4, "hc_expand_mix streams")
    same_dim(x.shape[3], y.shape[2], "hc_expand_mix: hidden")
    same_dim(x.shape[2], post.shape[2], "hc_expand_mix: post streams")
    same_dim(x.shape[2], comb.shape[3], "hc_expand_mix: comb streams")
    return [x]


def _mix_cost(ins, outs, a, ctx):
    x = ins[0]
    n = x.shape[2]
    return Cost(2 * x.numel * (n + 1), sum(i.nbytes for i in ins) + outs[0].nbytes)


@register("hc_expand_mix", infer=_mix_infer, cost=_mix_cost, operands=("x", "y", "post", "comb"))
def hc_expand_mix(x, y, post, comb):
    """New streams ``X'_k = post_k * y + sum_j comb[j, k] * X_j``."""
    dt = x.dtype
    return post.to(dt).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(dt).transpose(-1, -2), x)
