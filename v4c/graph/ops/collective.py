"""Collectives of a sharded graph: expert-parallel dispatch / combine (all-to-all), the local expert
selection of tensor-parallel ranks, and the all-reduce of partial sums.

The references run on ``torch.distributed``'s default process group (gloo on CPU, NCCL on CUDA). With
one rank (or no process group and ``world == 1``) they reduce to their single-process meaning, so a
graph sharded for one rank runs anywhere. Costs are the bytes each rank *sends* over the interconnect
in one execution, assuming balanced routing; the symbolic dim ``A`` (expert assignments a rank
receives) is bound to ``B*T*topk`` for that accounting.
"""
from __future__ import annotations

import torch

from ...errors import V4CError
from ..registry import Cost, expect, expect_int, expect_rank, register
from ..types import TensorType

ASSIGNED = "A"  # dim: assignments received by this rank, known only at run time


def _world(expected: int) -> int:
    """The running world size, checked against the one the graph was sharded for."""
    import torch.distributed as dist
    running = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if running != expected:
        raise V4CError(f"graph sharded for {expected} ranks runs in a world of {running} "
                       f"(start it with torchrun --nproc-per-node {expected} or v4c run --world-size {expected})")
    return running


def _a2a(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    import torch.distributed as dist
    dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits)
    return out


# ---- all_reduce -----------------------------------------------------------------------------

def _same_infer(ins, a):
    expect(a["world"] >= 1, f"all_reduce: world {a['world']} < 1")
    return [ins[0]]


def _all_reduce_cost(ins, outs, a, ctx):
    w = a["world"]  # ring all-reduce: every rank sends 2(W-1)/W of the tensor
    return Cost(ins[0].numel * (w - 1), 2 * (w - 1) * ins[0].nbytes // w)


@register("all_reduce", infer=_same_infer, cost=_all_reduce_cost, operands=("x",), attrs=("world:int",))
def all_reduce(x, world):
    """Sum of ``x`` over all ranks (the partial outputs of a tensor-parallel or expert-parallel layer)."""
    if _world(world) == 1:
        return x
    import torch.distributed as dist
    out = x.contiguous().clone() if not x.is_contiguous() else x
    dist.all_reduce(out)
    return out


# ---- expert parallelism: tokens replicated on every rank (attention tensor-parallel) ---------

def _select_infer(ins, a):
    idx, w = ins
    expect_int(idx, "ep_select experts")
    expect_rank(idx, 3, "ep_select experts")
    start, stop = a["experts"]
    expect(0 <= start < stop, f"ep_select: empty expert range [{start}, {stop})")
    return [idx, TensorType(w.shape, "f32"), TensorType(idx.shape, "i64"), TensorType((stop - start + 1,), "i64")]


def _io_cost(ins, outs, a, ctx):
    return Cost(0, sum(i.nbytes for i in ins) + sum(o.nbytes for o in outs))


@register("ep_select", infer=_select_infer, cost=_io_cost, operands=("idx", "w"), attrs=("experts:tuple",))
def ep_select(idx, w, experts):
    """This rank's share of the routing: local expert ids, weights zeroed for other ranks' experts, and the
    assignment permutation with per-local-expert offsets (other ranks' assignments sort last, unread)."""
    start, stop = experts
    mine = (idx >= start) & (idx < stop)
    local = torch.where(mine, idx - start, torch.zeros_like(idx))
    flat = torch.where(mine, idx - start, torch.full_like(idx, stop - start)).reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(stop - start + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.bincount(flat, minlength=stop - start + 1)[: stop - start].cumsum(0)
    return local, torch.where(mine, w.float(), torch.zeros_like(w, dtype=torch.float32)), perm.view(idx.shape), offsets


# ---- expert parallelism: each rank owns its tokens (attention data-parallel) -----------------

def _dispatch_infer(ins, a):
    h, idx, w = ins
    expect_rank(h, 3, "ep_dispatch input")
    expect_int(idx, "ep_dispatch experts")
    bounds, rank = a["bounds"], a["rank"]
    expect(len(bounds) >= 2 and 0 <= rank < len(bounds) - 1, f"ep_dispatch: rank {rank} vs bounds {bounds}")
    expect(all(x < y for x, y in zip(bounds, bounds[1:])), f"ep_dispatch: bounds {bounds} must increase")
    n_local, world = bounds[rank + 1] - bounds[rank], len(bounds) - 1
    rows = (1, ASSIGNED)
    return [TensorType((*rows, h.shape[2]), h.dtype), TensorType((*rows, 1), "i64"), TensorType((*rows, 1), "f32"),
            TensorType((*rows, 1), "i64"), TensorType((n_local + 1,), "i64"), TensorType(idx.shape, "i64"),
            TensorType((2, world), "i64")]


def _dispatch_cost(ins, outs, a, ctx):
    h, idx, _ = ins
    world = len(a["bounds"]) - 1
    row = h.nbytes // max(h.shape[0] * h.shape[1], 1) + 8 + 4  # hidden row, expert id, weight
    return Cost(0, idx.numel * row * (world - 1) // world + 8 * world)  # 1/W of the assignments stay local


@register("ep_dispatch", infer=_dispatch_infer, cost=_dispatch_cost, operands=("h", "idx", "w"),
          attrs=("bounds:tuple", "rank:int"))
def ep_dispatch(h, idx, w, bounds, rank):
    """All-to-all: each token row goes to the ranks owning its selected experts (``bounds``: first expert of
    each rank, then the count). Returns the received rows, their local expert ids and weights, the local
    permutation and offsets for the grouped GEMM, and the send order and counts that ``ep_combine`` reverses."""
    world = _world(len(bounds) - 1)
    d, k = h.shape[-1], idx.shape[-1]
    flat, e, wt = h.reshape(-1, d), idx.reshape(-1), w.reshape(-1).float()
    edges = torch.tensor(bounds, dtype=torch.int64, device=idx.device)
    owner = torch.bucketize(e, edges[1:-1], right=True)  # rank that owns each assignment's expert
    order = torch.sort(owner, stable=True).indices  # assignments grouped by destination rank
    send = torch.bincount(owner, minlength=world)
    if world == 1:
        recv, rx, re_, rw = send, flat[order // k], e[order], wt[order]
    else:
        recv = _a2a(torch.empty_like(send), send, [1] * world, [1] * world)
        sl, rl = send.tolist(), recv.tolist()
        n = sum(rl)
        rx = _a2a(flat.new_empty(n, d), flat[order // k], rl, sl)
        re_ = _a2a(e.new_empty(n), e[order], rl, sl)
        rw = _a2a(wt.new_empty(n), wt[order], rl, sl)
    local = re_ - bounds[rank]
    n_local = bounds[rank + 1] - bounds[rank]
    perm = torch.sort(local, stable=True).indices
    offsets = torch.zeros(n_local + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.bincount(local, minlength=n_local).cumsum(0)
    n = local.shape[0]
    return (rx.view(1, n, d), local.view(1, n, 1), rw.view(1, n, 1), perm.view(1, n, 1), offsets,
            order.view(idx.shape), torch.stack([send, recv]))


def _combine_infer(ins, a):
    y, order, counts = ins
    expect_rank(y, 3, "ep_combine expert outputs")
    expect_int(order, "ep_combine order")
    return [TensorType((*order.shape[:2], y.shape[2]), y.dtype)]


def _combine_cost(ins, outs, a, ctx):
    y, order, counts = ins
    world = counts.shape[1]
    return Cost(order.numel * y.shape[2], y.nbytes * (world - 1) // world)


@register("ep_combine", infer=_combine_infer, cost=_combine_cost, operands=("y", "order", "counts"))
def ep_combine(y, order, counts):
    """All-to-all back: the weighted expert outputs return to their tokens' ranks and are summed per token."""
    world = _world(counts.shape[1])
    d, k = y.shape[-1], order.shape[-1]
    rows = y.reshape(-1, d)
    if world > 1:
        send, recv = counts.tolist()
        rows = _a2a(rows.new_empty(sum(send), d), rows, send, recv)
    out = torch.zeros(order.shape[0] * order.shape[1], d, dtype=y.dtype, device=y.device)
    out.index_add_(0, order.reshape(-1) // k, rows)
    return out.view(*order.shape[:2], d)
