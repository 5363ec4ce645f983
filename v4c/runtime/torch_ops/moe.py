"""Routed experts over the expert-sorted assignments: one gather of the tokens, each expert's two
GEMMs on a contiguous slice, one weighted scatter-add back.

The reference gathers and scatters per expert; here the permutation from ``moe_router`` is used
as the schedule it is meant to be, so a prefill pays two data movements, not two per expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...graph.weights import linear


def _swiglu_(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp_(max=limit), inplace=True).mul_(up.clamp_(min=-limit, max=limit))


def moe_ffn(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit):
    shape = h.shape
    flat = h.reshape(-1, shape[-1])
    k = idx.shape[-1]
    bounds = offsets.tolist()
    order = perm.reshape(-1)[bounds[0]:bounds[-1]]  # assignments past the last offset are not ours (EP)
    bounds = [x - bounds[0] for x in bounds]  # each expert's rows of `order`
    tok = order // k
    xs = flat.index_select(0, tok)  # the assignments' tokens, grouped by expert
    ys = torch.empty_like(xs)
    for e, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if a == b:
            continue
        gate, up = linear(xs[a:b], w13[e]).chunk(2, dim=-1)
        ys[a:b] = linear(_swiglu_(gate, up, limit), w2[e])
    ys.mul_(w.reshape(-1).index_select(0, order)[:, None].to(ys.dtype))
    if sg is not None:
        out = linear(_swiglu_(linear(flat, sg), linear(flat, su), limit), sd)
    else:
        out = torch.zeros_like(flat)
    out.index_add_(0, tok, ys)
    return out.view(shape)
