"""``moe_router`` with the fewest calls: the same arithmetic as the reference, fused into in-place steps.

The reference computes the offsets as a bincount's running sum scattered into a zeroed tensor; the
sort already yields the sorted expert ids, so one ``searchsorted`` of 0..E gives each expert's
first assignment (= the number of assignments to lower experts), the same offsets in one call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...graph.weights import QuantizedWeight, linear
from . import native

_edges: dict = {}  # (experts, device) -> arange(experts + 1)


def moe_router(h, w, table_or_bias, ids=None, *, scaling, hash=False, topk=None, lin=None):
    # a quantised router weight takes weights.linear, as the reference does; lin: a decode call's C product
    if lin is not None:
        logits = lin(h, w)
    else:
        logits = linear(h, w) if isinstance(w, QuantizedWeight) else F.linear(h, w.to(h.dtype))
    scores = F.softplus(logits.float()).sqrt_()  # sqrt(softplus) of the logits
    if hash:
        idx = table_or_bias[ids.clamp_min(0)].long()  # experts fixed per token id
    else:
        idx = torch.topk(scores + table_or_bias.float(), topk, dim=-1, sorted=False).indices  # bias picks only
    wts = scores.gather(-1, idx)
    wts.div_(wts.sum(dim=-1, keepdim=True).add_(1e-20)).mul_(scaling)
    e = w.shape[0]
    experts, perm = torch.sort(idx.reshape(-1), stable=True)
    key = (e, idx.device)
    edges = _edges.get(key)
    if edges is None:
        edges = _edges[key] = torch.arange(e + 1, device=idx.device)
    return idx, wts, perm.view_as(idx), torch.searchsorted(experts, edges)


def moe_router_c(h, w, table_or_bias, ids=None, *, scaling, hash=False, topk=None, lin):
    """A decode call's router in three calls: the product (``lin``, C), the scores as above, and the
    selection, weights and grouping in one C loop (native/route.c; the ten calls above cost more in
    dispatch than in arithmetic on a few rows)."""
    # (in C: PyTorch's softplus may round a score otherwise when the call holds more rows, see route.c)
    scores = native.sqrt_softplus_(lin(h, w).float().contiguous())
    if hash:
        return native.moe_route(scores, None, table_or_bias, ids.contiguous(), table_or_bias.shape[-1], scaling)
    return native.moe_route(scores, table_or_bias.float().contiguous(), None, None, topk, scaling)


def moe_router_step(h, w, table_or_bias, ids=None, *, scaling, hash=False, topk=None):
    """``moe_router_c`` for plain weights in one C call (native ``router_step``: the same product, scores and
    selection): a decode step's router was three calls and their Python in between, which costs ~3x its
    isolated time once the step's weight streams have pushed the interpreter out of the caches."""
    x = h if h.is_contiguous() else h.contiguous()
    if hash:
        return native.router_step(x, w, None, table_or_bias, ids.contiguous(), table_or_bias.shape[-1], scaling)
    return native.router_step(x, w, table_or_bias, None, None, topk, scaling)
