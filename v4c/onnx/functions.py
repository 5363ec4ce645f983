"""Fused ops as ``ai.v4c`` functions whose bodies are standard ONNX.

A fused op is a recipe over unfused ops (``v4c/graph/ops/fused.py``); running the recipe with a
tracer that lowers each part writes the body, so the function computes what the recipe does.
``moe_router`` and ``moe_ffn`` have hand-written references (the expert-sorted schedule), so their
bodies are written here from the same parts. A body is specialised to its attributes and input
types; nodes with equal ones share a function (an ``overload`` per variant).
"""
from __future__ import annotations

import inspect
import json

import onnx
from onnx import helper

from ..graph.ops import fused
from ..graph.registry import get_op
from ..graph.types import TensorType
from .emit import DOMAIN, OPSET, Emitter, Val
from .lower_moe import experts, permutation
from .lowering import lower


class Tracer:
    """The ``k`` a recipe calls: lowers each part into one function body."""

    def __init__(self, e: Emitter):
        self.e = e

    def __call__(self, op: str, *args: Val, **attrs):
        types = list(get_op(op).infer([a.type for a in args], attrs))
        outs = lower(self.e, op, list(args), [self.e.fresh(op + ".") for _ in types], attrs)
        return outs[0] if len(outs) == 1 else tuple(outs)


def _moe_router(k: Tracer, h, w, table_or_bias, ids=None, *, scaling, hash=False, topk=None):
    logits = k("linear", h, w)
    if hash:
        idx, wts = k("moe_hash_route", logits, table_or_bias, ids, scaling=scaling)
    else:
        idx, wts = k("moe_route", logits, table_or_bias, topk=topk, scaling=scaling)
    perm, offsets = k.e.fresh("perm"), k.e.fresh("offsets")
    permutation(k.e, idx.name, w.type.shape[0], perm, offsets)
    shape = idx.type
    return idx, wts, Val(perm, shape), Val(offsets, TensorType((w.type.shape[0] + 1,), "i64"))


def _moe_ffn(k: Tracer, h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit):
    # perm/offsets are the GPU kernel's schedule; the sum over each token's experts needs no order
    y = Val(experts(k.e, h, idx.name, w, w13, w2, limit), h.type)
    if sg is not None:
        act = k("swiglu", k("linear", h, sg), k("linear", h, su), limit=limit)
        y = k("add", y, k("linear", act, sd))
    return y


RECIPES = {
    "hc_pre": fused.hc_pre, "hc_post_pre": fused.hc_post_pre, "hc_head": fused.hc_head,
    "linear_rms_norm": fused.linear_rms_norm, "q_proj": fused.q_proj, "kv_proj": fused.kv_proj,
    "o_proj": fused.o_proj, "compressor": fused.compressor, "indexer": fused.indexer,
    "sparse_attention": fused.sparse_attention, "moe_router": _moe_router, "moe_ffn": _moe_ffn,
}
_EXTRA = {"sparse_attention": ("rows", "idx")}  # names of a recipe's optional positional inputs


def _input_names(op: str, n: int) -> list[str]:
    params = [p for p in inspect.signature(RECIPES[op]).parameters.values()][1:]
    names = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] + list(_EXTRA.get(op, ()))
    return names[:n]


def trace_function(op: str, in_types: list[TensorType], attrs: dict, overload: str) -> onnx.FunctionProto:
    """The body of fused ``op`` for these input types and attributes."""
    e = Emitter()
    names = _input_names(op, len(in_types))
    args = [Val(n, t) for n, t in zip(names, in_types)]
    res = RECIPES[op](Tracer(e), *args, **attrs)
    res = res if isinstance(res, tuple) else (res,)
    outs = [f"out{i}" for i in range(len(res))]
    for r, o in zip(res, outs):
        e("Identity", r.name, out=o)  # function outputs need names of their own
    fn = helper.make_function(DOMAIN, op, names, outs, e.nodes, [helper.make_opsetid("", OPSET)],
                              doc_string=get_op(op).doc, overload=overload)
    return fn


class FunctionLibrary:
    """One function per distinct (op, attributes, input types); ``call`` returns its overload."""

    def __init__(self):
        self.functions: list[onnx.FunctionProto] = []
        self._keys: dict[tuple, str] = {}
        self._count: dict[str, int] = {}

    def call(self, op: str, in_types: list[TensorType], attrs: dict) -> str:
        key = (op, json.dumps(attrs, sort_keys=True), tuple(str(t) for t in in_types))
        if key not in self._keys:
            n = self._count.get(op, 0)
            self._count[op] = n + 1
            self._keys[key] = f"v{n}"
            self.functions.append(trace_function(op, in_types, attrs, f"v{n}"))
        return self._keys[key]
