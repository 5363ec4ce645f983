"""Memory per GPU of a deployment: weights and KV cache exactly as `v4c inspect --json` counts them for
rank 0 of the layout (its ``ranks`` entry; on one GPU its ``weights.total_bytes`` and ``kv_cache``), the
MTP block when speculation is on, and the activations' peak; and the most sequences that fit."""
from __future__ import annotations

from ..graph.ir import Graph
from ..graph.ops.collective import ASSIGNED
from ..graph.registry import get_op
from ..model.memory import USABLE
from .pool import Pool


def peak_activation_bytes(g: Graph, batch: int, tokens: int, context: int, topk: int) -> int:
    """Most bytes of intermediate values alive at once during one call (``batch`` x ``tokens``), walking the
    nodes in order: a value lives from the node that makes it to its last reader. Params and state
    buffers (updated in place) are not activations, nor the graph's logits output: serving stacks keep
    the last token's row only."""
    bind = {"B": batch, "T": tokens, "L": max(context, 1), ASSIGNED: batch * tokens * topk}
    last = {}
    for i, n in enumerate(g.nodes):
        for v in n.inputs:
            last[v] = i
    live, peak, size = 0, 0, {}
    for i, n in enumerate(g.nodes):
        state_outs = {o for _, o in get_op(n.op).state_io}
        for j, (v, t) in enumerate(zip(n.outputs, n.types)):
            if j not in state_outs and v in last:  # a value nobody reads is a view or dropped at once
                size[v] = t.nbytes(bind)
                live += size[v]
        peak = max(peak, live)
        for v in n.inputs:
            if last.get(v) == i and v in size:
                live -= size.pop(v)
    return peak


def memory_per_gpu(pool: Pool, sequences: int, context: int, *, chunk: int, tokens: int, mtp: bool) -> dict:
    """Bytes on rank 0 serving ``sequences`` sequences (over the pool) of up to ``context`` tokens, decoding
    ``tokens`` tokens per step and prefilling in chunks of ``chunk`` tokens."""
    per_rank = pool.sequences_on_rank0(sequences)
    weights = pool.weight_bytes()
    kv = pool.kv_bytes_per_sequence(context) * per_rank
    mtp_bytes = pool.mtp_bytes(per_rank) if mtp else 0
    peak = lambda b, t: pool._memo(("act", b, t, context),  # noqa: E731
                                   lambda: peak_activation_bytes(pool.graph, b, t, context, pool.topk))
    act = max(peak(1, chunk), peak(max(per_rank, 1), tokens))
    total = weights + kv + mtp_bytes + act
    return {"weight_bytes": weights, "kv_bytes": kv, "mtp_bytes": mtp_bytes, "activation_bytes": act,
            "total_bytes": total, "usable_bytes": int(USABLE * pool.gpu.memory), "memory_bytes": int(pool.gpu.memory),
            "sequences_on_gpu": per_rank, "fits": total <= USABLE * pool.gpu.memory}


def max_concurrency(pool: Pool, context: int, *, chunk: int, tokens: int, mtp: bool, limit: int = 1 << 20) -> int:
    """The most sequences of ``context`` tokens that fit (0: not even one). Rank 0 holds the most; each of
    its sequences adds a near-constant number of bytes, so a straight line through one and two sequences
    lands next to the answer, which exact checks then settle."""
    per = pool.layout.world if pool.layout.attn == "dp" else 1  # sequences of the pool per sequence of rank 0
    mem = lambda n: memory_per_gpu(pool, n * per, context, chunk=chunk, tokens=tokens, mtp=mtp)  # noqa: E731
    if not mem(1)["fits"]:
        return 0
    one, two = mem(1)["total_bytes"], mem(2)["total_bytes"]
    guess = max(1, min(limit, 1 + int((mem(1)["usable_bytes"] - one) // max(two - one, 1))))
    lo, hi, step = guess, guess, 1  # gallop to a bracket: fits(lo), not fits(hi)
    while lo > 1 and not mem(lo)["fits"]:
        hi, lo, step = lo, max(1, lo - step), step * 2
    if hi == lo:
        step = 1
        while hi < limit and mem(hi)["fits"]:
            lo, hi, step = hi, min(limit, hi + step), step * 2
        if mem(hi)["fits"]:
            return hi * per
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if mem(mid)["fits"] else (lo, mid)
    return lo * per
