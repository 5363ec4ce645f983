"""Mixture of experts: score- and hash-routed selection, routed experts with clamped SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Cost, expect, expect_int, expect_rank, register, same_dim
from .. import weights
from ..types import TensorType


def _sqrtsoftplus(x):
    return torch.sqrt(F.softplus(x))


def _normalise(scores, idx, scaling):
    w = scores.gather(-1, idx)
    return w / (w.sum(dim=-1, keepdim=True) + 1e-20) * scaling


def _route_cost(ins, outs, a, ctx):
    return Cost(8 * ins[0].numel, sum(i.nbytes for i in ins) + sum(o.nbytes for o in outs))


def _route_infer(ins, a):
    logits, bias = ins
    expect_rank(logits, 3, "moe_route logits")
    same_dim(logits.shape[-1], bias.shape[0], "moe_route: experts vs bias")
    k = a["topk"]
    expect(1 <= k <= logits.shape[-1], f"moe_route: topk {k} vs {logits.shape[-1]} experts")
    shape = (*logits.shape[:2], k)
    return [TensorType(shape, "i64"), TensorType(shape, "f32")]


@register("moe_route", infer=_route_infer, cost=_route_cost, operands=("logits", "bias:weight"),
          attrs=("topk:int", "scaling:float"))
def moe_route(logits, bias, topk, scaling):
    """sqrt(softplus) scores; top-k of score + bias (bias picks, never weighs); renormalise and scale."""
    scores = _sqrtsoftplus(logits.float())
    idx = torch.topk(scores + bias.float(), topk, dim=-1, sorted=False).indices
    return idx, _normalise(scores, idx, scaling)


def _hash_infer(ins, a):
    logits, table, ids = ins
    expect_rank(logits, 3, "moe_hash_route logits")
    expect_int(table, "moe_hash_route tid2eid")
    expect_int(ids, "moe_hash_route ids")
    shape = (*logits.shape[:2], table.shape[1])
    return [TensorType(shape, "i64"), TensorType(shape, "f32")]


@register("moe_hash_route", infer=_hash_infer, cost=_route_cost, operands=("logits", "table:weight", "ids"),
          attrs=("scaling:float",))
def moe_hash_route(logits, table, ids, scaling):
    """Experts fixed per token id by ``tid2eid``; weights from the sqrt(softplus) scores."""
    scores = _sqrtsoftplus(logits.float())
    idx = table[ids.clamp_min(0)].long()
    return idx, _normalise(scores, idx, scaling)


def _experts_infer(ins, a):
    x, idx, w, w13, w2 = ins
    expect_rank(x, 3, "moe_experts input")
    expect_rank(w13, 3, "moe_experts gate_up")
    expect_rank(w2, 3, "moe_experts down")
    same_dim(x.shape[2], w13.shape[2], "moe_experts: hidden vs gate_up columns")
    same_dim(w13.shape[0], w2.shape[0], "moe_experts: expert counts")
    same_dim(w13.shape[1], 2 * w2.shape[2], "moe_experts: gate_up rows vs 2*intermediate")
    same_dim(x.shape[2], w2.shape[1], "moe_experts: hidden vs down rows")
    same_dim(idx.shape[2], w.shape[2], "moe_experts: topk")
    return [x]


def _experts_cost(ins, outs, a, ctx):
    x, idx, w, w13, w2 = ins
    assignments = idx.numel
    e = w13.shape[0]
    per_expert = w13.numel // e + w2.numel // e
    touched = min(e, assignments)  # experts whose weights are read at least once
    return Cost(2 * assignments * per_expert, int(touched * per_expert * w13.itemsize) + 2 * x.nbytes + idx.nbytes)


# unfused: a gate/up grouped GEMM, the activation, a down grouped GEMM with the scatter
@register("moe_experts", infer=_experts_infer, cost=_experts_cost,
          operands=("x", "idx", "w", "w13:weight/gemm", "w2:weight/gemm"), attrs=("limit:float",), launches=3)
def moe_experts(x, idx, w, w13, w2, limit):
    """Weighted sum over each token's selected experts of ``W2 swiglu_clamped(W1 x, W3 x)``."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    idx = idx.reshape(flat.shape[0], -1)
    w = w.reshape(flat.shape[0], -1)
    out = torch.zeros_like(flat)
    for e in torch.unique(idx).tolist():
        tok, slot = torch.where(idx == e)
        gate, up = weights.linear(flat[tok], w13[e]).chunk(2, dim=-1)
        h = F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)
        y = weights.linear(h, w2[e]) * w[tok, slot, None].to(flat.dtype)
        out.index_add_(0, tok, y)
    return out.view(shape)
