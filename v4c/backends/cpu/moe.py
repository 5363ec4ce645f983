"""Routed experts over the expert-sorted assignments: one gather of the tokens, each expert's two
GEMMs on a contiguous slice of shared buffers, one activation over all rows, one weighted
scatter-add back.

The reference gathers and scatters per expert; here the permutation from ``moe_router`` is used
as the schedule it is meant to be, so a prefill pays two data movements, not two per expert.

A decode step (a few tokens) is bound by per-call overhead and by streaming the weights of the
experts hit, not by FLOPs: its path visits only those experts, runs the shared expert as one more
group of rows through the same GEMM lists and activation, multiplies by cached transposed views
(``torch.mm``, no per-call view ops). Every product takes torch's own kernel choice for its shape:
no process-wide switch (oneDNN's) is flipped per call, which would change the kernels under the
other threads' sessions mid-call and so their results.
"""
from __future__ import annotations

from bisect import bisect_right

import torch
import torch.nn.functional as F

from ...graph.weights import linear
from . import native


def _swiglu_(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp_(max=limit), inplace=True).mul_(up.clamp_(min=-limit, max=limit))


# Five implementations, chosen per node and phase by the cpu backend (``registry``): a decode
# step's C path (fp32, bf16 or fp16 on AVX2 + FMA / AVX-512; offsets checked there), its C path for quantised
# experts (MXFP4 / FP8, AVX2 + FMA), a decode step's PyTorch path (only the experts hit), a
# prefill's grouped GEMMs (plain weights), and one expert at a time through ``weights.linear``
# (quantised weights otherwise). ``views`` holds the model's re-layouts of its weights (``WeightViews``).

def _c_moe(kernel: str, doc: str):
    """The op around one of the C MoE kernels (``native.<kernel>``): token rows flattened, dense."""
    def run(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit, views=None):
        if h.numel() == 0:  # an expert-parallel rank that received no tokens this call
            return torch.zeros_like(h)
        shared = (sg, su, sd) if sg is not None else ()
        # the kernel takes [..., D] rows and routing tensors of any shape as they are (contiguous() returns a
        # contiguous tensor itself, as the router's are): no view ops in a decode step
        return getattr(native, kernel)(h.contiguous(), w.contiguous(), perm.contiguous(), offsets.contiguous(), w13,
                                       w2, shared, k=idx.shape[-1], limit=limit)
    run.__doc__ = doc
    return run


moe_native = _c_moe("moe_decode", "fp32, bf16 or fp16 experts: native/moe.c.")
moe_native_q = _c_moe("moe_decode_q", """Quantised routed experts (MXFP4 as released, or FP8), the shared expert
    quantised or plain in the activations' dtype: native/quant.c, the weights read as stored.""")


# A prefill call takes the C kernel up to this many tokens: it streams each hit expert's weights once for
# all of the call's rows, 2.5x the widened grouped GEMMs on a 256-token bf16 chunk here (1.7x in fp32),
# still ahead at 1,024 tokens in bf16, even in fp32 there; the grouped GEMMs beyond.
NATIVE_PREFILL_TOKENS = 1024
# The same for bf16 on a CPU with AVX512-BF16, where PyTorch's bf16 GEMMs run at the machine's bf16 rate: the C
# kernel still leads up to about this many tokens (a Zen 4, the MoE call alone, hidden 512 / 32 experts and
# hidden 1,024 / 64 experts, top-6, bf16: 8-10x at 4-16 tokens, 1.5-2x at 128, 1.1-1.4x at 512, even at 768-1,024,
# behind at 2,048-4,096).
NATIVE_BF16_PREFILL_TOKENS = 512


def moe_prefill(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit, views, mm=None,
                lin=linear, native_tokens=None):
    if h.numel() // h.shape[-1] <= (NATIVE_PREFILL_TOKENS if native_tokens is None else native_tokens):
        return moe_native(h, idx, w, perm, offsets, w13, w2, sg, su, sd, limit=limit)
    return moe_grouped(h, idx, w, perm, offsets, w13, w2, sg, su, sd, limit=limit, views=views, mm=mm, lin=lin)


def moe_prefill_bf16(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit, views):
    """``moe_prefill`` on a CPU with bf16 arithmetic: the C kernel for calls of up to NATIVE_BF16_PREFILL_TOKENS,
    PyTorch's bf16 grouped GEMMs beyond."""
    return moe_prefill(h, idx, w, perm, offsets, w13, w2, sg, su, sd, limit=limit, views=views,
                       native_tokens=NATIVE_BF16_PREFILL_TOKENS)


def moe_decode(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit, views):
    flat = h.reshape(-1, h.shape[-1])
    shared = (sg, su, sd) if sg is not None else ()
    return _decode(flat, idx, w, perm, offsets, w13, w2, shared, limit, views).view_as(h)


def moe_grouped(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit, views, mm=None, lin=linear):
    """``mm`` / ``lin``: the routed experts' and the shared expert's products (``wide``'s for a bf16 prefill)."""
    return _general(h, idx, w, perm, offsets, w13, w2, sg, su, sd, limit,
                    lambda xs, spans: _experts(xs, spans, w13, w2, limit, views, mm), lin)


def moe_per_expert(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit, views=None):
    def experts(xs, spans):
        ys = torch.empty_like(xs)
        for e, a, b in spans:
            gate, up = linear(xs[a:b], w13[e]).chunk(2, dim=-1)
            ys[a:b] = linear(_swiglu_(gate, up, limit), w2[e])
        return ys
    return _general(h, idx, w, perm, offsets, w13, w2, sg, su, sd, limit, experts)


def _general(h, idx, w, perm, offsets, w13, w2, sg, su, sd, limit, experts, lin=linear):
    shape = h.shape
    flat = h.reshape(-1, shape[-1])
    k = idx.shape[-1]
    bounds = offsets.tolist()
    order = perm.reshape(-1)[bounds[0]:bounds[-1]]  # assignments past the last offset are not ours (EP)
    bounds = [x - bounds[0] for x in bounds]  # each expert's rows of `order`
    tok = order // k
    wts = w.reshape(-1).index_select(0, order)[:, None]
    spans = [(e, a, b) for e, (a, b) in enumerate(zip(bounds, bounds[1:])) if a < b]
    if sg is not None:
        out = lin(_swiglu_(lin(flat, sg), lin(flat, su), limit), sd)
    else:
        out = torch.zeros_like(flat)
    parts = _parts(spans)
    # index_add_ sums a bf16 / fp16 call's rows in fp32 and rounds once: in parts, the fp32 sums are kept
    # across them, so a token's result is the same bits however its experts fall into parts
    acc = out if len(parts) == 1 or out.dtype == torch.float32 else out.float()
    for part in parts:  # whole experts, in order: the same sums in the same order as in one piece
        a0, b0 = part[0][1], part[-1][2]
        xs = flat.index_select(0, tok[a0:b0])  # the assignments' tokens, grouped by expert
        ys = experts(xs, [(e, a - a0, b - a0) for e, a, b in part])
        ys.mul_(wts[a0:b0].to(ys.dtype))
        acc.index_add_(0, tok[a0:b0], ys if acc is out else ys.float())
    return (out if acc is out else acc.to(out.dtype)).view(shape)


# The experts of a long prefill run in parts of about this many assignments: each part's buffers (its
# tokens, the expert products, the activation) stay small enough for the allocator to reuse the memory
# the previous part freed; one piece of 24,576 assignments (4,096 tokens x 6) was ~140 MB of fresh pages
# a layer, ~20% of the layer's time in page faults (the 478m bf16 model on a Zen 4).
PART_ROWS = 2048


def _parts(spans: list) -> list:
    parts, cur, rows = [], [], 0
    for sp in spans:
        if cur and rows + (sp[2] - sp[1]) > PART_ROWS:
            parts.append(cur)
            cur, rows = [], 0
        cur.append(sp)
        rows += sp[2] - sp[1]
    return parts + ([cur] if cur else [])


def prepare(views, w13, w2, sg=None, su=None, sd=None) -> None:
    """Make the re-layouts the PyTorch paths read, once, when the node is bound."""
    views.transposed(w13)
    views.transposed(w2)
    if sg is not None:
        if views.rows_concat_t(sg, su) is None:
            views.transposed(sg)
            views.transposed(su)
        views.transposed(sd)


def _check_offsets(offsets) -> list:
    bounds = offsets.tolist()  # the one host read: the schedule
    if bounds != sorted(bounds):  # (the bisection below needs them sorted; a C-speed check)
        raise ValueError(f"moe_ffn: expert offsets must be non-decreasing, got {bounds}")
    return bounds


def _experts(xs, spans, w13, w2, limit, views, mm=None):
    """Each expert's two GEMMs written straight into shared buffers (``out=`` slices: no copy per
    expert) and one activation over all rows between them, instead of three ops per expert."""
    up_t, down_t = views.transposed(w13), views.transposed(w2)
    gu = xs.new_empty(xs.shape[0], w13.shape[1])
    mm = mm or (lambda x, wt, out: torch.mm(x, wt, out=out))
    for e, a, b in spans:
        mm(xs[a:b], up_t[e], gu[a:b])
    gate, up = gu.chunk(2, dim=-1)
    act = torch.mul(F.silu(gate.clamp_(max=limit), inplace=True), up.clamp_(min=-limit, max=limit),
                    out=xs.new_empty(gate.shape))  # contiguous: the down GEMMs read it as plain rows
    ys = torch.empty_like(xs)
    for e, a, b in spans:
        mm(act[a:b], down_t[e], ys[a:b])
    return ys


def _products(pairs: list) -> list:
    """``x @ wt`` for each pair."""
    return [torch.mm(x, wt) for x, wt in pairs]


def _decode(flat, idx, w, perm, offsets, w13, w2, shared, limit, views):
    """Few tokens: only the experts hit, one activation over all their rows (and the shared expert's)."""
    t, dtype = flat.shape[0], flat.dtype
    bounds = _check_offsets(offsets)
    experts, counts, p, hi = [], [], bounds[0], bounds[-1]
    while p < hi:  # the experts hit, found by bisection: as many steps as experts hit, not as experts
        e = bisect_right(bounds, p) - 1
        experts.append(e)
        counts.append(bounds[e + 1] - p)
        p = bounds[e + 1]
    order = perm.reshape(-1)[bounds[0]:hi]  # assignments past the last offset are not ours (EP)
    if t == 1:  # every assignment is the one token's: no gather
        xs = [flat if c == 1 else flat.expand(c, -1) for c in counts]
    else:
        tok = order // idx.shape[-1]
        xs = flat.index_select(0, tok).split_with_sizes(counts)
    up_t, down_t = views.transposed(w13), views.transposed(w2)
    pairs = [(x, up_t[e]) for x, e in zip(xs, experts)]
    out = None
    if shared:
        sg, su, sd = shared
        gate_up_t = views.rows_concat_t(sg, su)
        if 2 * sg.shape[0] == w13.shape[1] and gate_up_t is not None:
            pairs.append((flat, gate_up_t))  # the shared expert: one more group of rows
            counts.append(t)
        else:  # another width, or no fused copy: on its own
            if gate_up_t is None:
                gate, up = _products([(flat, views.transposed(sg)), (flat, views.transposed(su))])
            else:
                gate, up = _products([(flat, gate_up_t)])[0].chunk(2, dim=-1)
            (out,) = _products([(_swiglu_(gate, up, limit), views.transposed(sd))])
    if not pairs:
        return torch.zeros_like(flat) if out is None else out
    parts = _products(pairs)
    gate, up = (torch.cat(parts) if len(parts) > 1 else parts[0]).chunk(2, dim=-1)
    acts = _swiglu_(gate, up, limit).split_with_sizes(counts)
    pairs = [(a, down_t[e]) for a, e in zip(acts, experts)]
    if len(acts) > len(experts):
        pairs.append((acts[-1], views.transposed(shared[2])))
    ys = _products(pairs)
    if len(acts) > len(experts):
        out = ys.pop()
    if not experts:
        return out
    routed = torch.cat(ys) if len(ys) > 1 else ys[0]
    if t == 1:  # the weighted sum over the assignments is one [1, n] x [n, D] product
        wrow = w.reshape(1, -1).index_select(1, order).to(dtype)
        return torch.mm(wrow, routed) if out is None else torch.addmm(out, wrow, routed)
    routed.mul_(w.reshape(-1, 1).index_select(0, order).to(dtype))
    return (torch.zeros_like(flat) if out is None else out).index_add_(0, tok, routed)
