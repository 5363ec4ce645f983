"""Decode FLOPs split by what they pay for (spec D.2): the weights, the window, the CSA sparse core,
the CSA indexer scan and the HCA dense term over compressed rows.

Each kernel's FLOPs are attributed from its op kind and the ops' own cost functions; a fused op is
split by walking its recipe, so the terms of a kernel always add up to the cost ``v4c inspect``
reports for it. "weights" is everything whose cost does not depend on the context: the weight
GEMMs plus the per-token norms, RoPE, mHC mixing, routing and compressor pooling that ride along.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .ir import Graph
from .ops.fused import RECIPES
from .registry import Concrete, get_op
from .types import TensorType

TERMS = ("weights", "window", "sparse_core", "indexer_scan", "compressed_dense")
_COMPRESSED_TERM = {"csa": "sparse_core", "hca": "compressed_dense"}


@dataclass(frozen=True)
class KernelTerms:
    name: str
    op: str
    terms: dict  # term -> FLOPs of one decode step


def _conc(t) -> Concrete:
    return Concrete(tuple(t.shape), t.dtype)


class _Recorder:
    """Runs a fused recipe on concrete types, attributing each part's FLOPs to a term."""

    def __init__(self, ctx: int):
        self.ctx, self.terms = ctx, Counter()

    def __call__(self, op, *args, **attrs):
        outs = list(get_op(op).infer(list(args), attrs))
        self.terms.update(split_cost(op, [_conc(a) for a in args], [_conc(o) for o in outs], attrs, self.ctx))
        outs = [TensorType(o.shape, o.dtype) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)


def split_cost(op: str, ins, outs, attrs: dict, ctx: int) -> Counter:
    """FLOPs of one execution of ``op`` on concrete types, by term."""
    if op in RECIPES:
        rec = _Recorder(ctx)
        RECIPES[op](rec, *[TensorType(c.shape, c.dtype) for c in ins], **attrs)
        return rec.terms
    flops = get_op(op).cost(ins, outs, attrs, ctx).flops
    if op == "attention":
        # the window share is what the same call costs without compressed rows
        window = get_op(op).cost(ins, outs, {**attrs, "kind": "sliding"}, ctx).flops
        out = Counter(window=window)
        if attrs["kind"] != "sliding":
            out[_COMPRESSED_TERM[attrs["kind"]]] = flops - window
        return out
    if op == "indexer_topk":
        return Counter(indexer_scan=flops)
    return Counter(weights=flops)


def decode_step_terms(g: Graph, context: int, batch: int = 1) -> list[KernelTerms]:
    """The kernels of ``decode_step_kernels`` (same order, same shapes), each with its FLOPs by term."""
    bind = {"B": batch, "T": 1, "L": max(context, 1)}
    types = g.value_types()
    conc = lambda v: Concrete(types[v].concrete(bind), types[v].dtype)  # noqa: E731
    out = []
    for n in g.nodes:
        if get_op(n.op).launches == 0:
            continue
        c = split_cost(n.op, [conc(v) for v in n.inputs], [conc(v) for v in n.outputs], n.attr, context)
        out.append(KernelTerms(n.outputs[0], n.op, {t: int(c.get(t, 0)) for t in TERMS}))
    return out


def flops_by_term(g: Graph, context: int) -> dict[str, int]:
    """Decode FLOPs of one token (batch 1) at ``context`` tokens, by term; they add up to
    ``v4c inspect``'s ``flops_per_token`` at batch 1."""
    total = Counter()
    for k in decode_step_terms(g, context, 1):
        total.update(k.terms)
    return {t: int(total.get(t, 0)) for t in TERMS}
