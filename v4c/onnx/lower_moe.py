"""Mixture of experts in standard ONNX: routing (TopK / Gather), experts as gathered-weight MatMuls."""
from __future__ import annotations

from .emit import Emitter, Val
from .lower_core import swiglu_clamped
from .lowering import lowers


def _scores(e: Emitter, logits: Val) -> str:
    return e("Sqrt", e("Softplus", e.f32(logits)))


def _normalise(e: Emitter, scores: str, idx: str, scaling: float, out: str) -> None:
    w = e("GatherElements", scores, idx, axis=-1)
    total = e("Add", e.reduce("ReduceSum", w, -1), e.scalar(1e-20, "f32"))
    e("Mul", e("Div", w, total), e.scalar(scaling, "f32"), out=out)


@lowers("moe_route")
def moe_route(e, ins, outs, types, topk, scaling):
    logits, bias = ins
    s = _scores(e, logits)
    _, idx = e("TopK", e("Add", s, e.f32(bias)), e.ints(topk), axis=-1, n_out=2)  # the bias picks, never weighs
    e.finish(idx, outs[0])
    _normalise(e, s, outs[0], scaling, outs[1])


@lowers("moe_hash_route")
def moe_hash_route(e, ins, outs, types, scaling):
    logits, table, ids = ins
    rows = e("Gather", table.name, e("Max", ids.name, e.scalar(0, ids.dtype)), axis=0)
    e.cast(rows, table.dtype, "i64", out=outs[0])
    _normalise(e, _scores(e, logits), outs[0], scaling, outs[1])


def experts(e: Emitter, x: Val, idx: str, w: Val, w13: Val, w2: Val, limit: float, out: str | None = None) -> str:
    """Each token's k selected experts: their weights gathered per assignment, then batched MatMuls
    (only the selected experts' FLOPs; memory grows with tokens * k * expert size)."""
    dt, inter = x.dtype, w2.type.shape[2]
    w13t = e("Transpose", e.cast(w13.name, w13.dtype, dt), perm=[0, 2, 1])  # [E, D, 2I]
    w2t = e("Transpose", e.cast(w2.name, w2.dtype, dt), perm=[0, 2, 1])  # [E, I, D]
    xg = e.unsqueeze(x.name, 2, 3)  # [B, T, 1, 1, D]
    gu = e("MatMul", xg, e("Gather", w13t, idx, axis=0))  # [B, T, k, 1, 2I]
    act = swiglu_clamped(e, e.slice(gu, -1, 0, inter), e.slice(gu, -1, inter, 2 * inter), limit, dt)
    y = e.squeeze(e("MatMul", act, e("Gather", w2t, idx, axis=0)), 3)  # [B, T, k, D]
    y = e("Mul", y, e.unsqueeze(e.cast(w.name, w.dtype, dt), -1))
    return e.reduce("ReduceSum", y, 2, keepdims=0, out=out)


@lowers("moe_experts")
def moe_experts(e, ins, outs, types, limit):
    x, idx, w, w13, w2 = ins
    experts(e, x, idx.name, w, w13, w2, limit, out=outs[0])


def permutation(e: Emitter, idx: str, n_experts: int, perm_out: str, offsets_out: str) -> None:
    """Assignments sorted by expert (stable: ties keep token order) and each expert's offsets."""
    flat = e("Reshape", idx, e.ints(-1))
    n = e("Shape", flat)
    order = e("Range", e.scalar(0, "i64"), e.squeeze(n, 0), e.scalar(1, "i64"))
    key = e("Add", e("Mul", flat, e.squeeze(n, 0)), order)  # expert-major, then assignment order
    _, perm = e("TopK", key, n, axis=0, largest=0, sorted=1, n_out=2)
    e("Reshape", perm, e("Shape", idx), out=perm_out)
    counts = e("ScatterElements", e.const([0] * n_experts, "i64"), flat, e("Expand", e.ints(1), n), axis=0,
               reduction="add")
    e("Concat", e.ints(0), e("CumSum", counts, e.scalar(0, "i64")), axis=0, out=offsets_out)
