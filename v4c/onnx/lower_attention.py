"""Hybrid attention in standard ONNX: sparse attention, the window ring, the compressor, the indexer.

What the exported model computes is a fresh sequence: positions ``0..T-1`` in every row, no
padding, empty states going in. ``attention`` and ``indexer_topk`` are written for any positions;
``window_append`` for rows without padding; ``compress`` pools the ``T // ratio`` windows a fresh
sequence completes (its pending slots hold nothing that an earlier call left).
"""
from __future__ import annotations

from ..errors import V4CError
from ..graph.storage import PLAIN
from .emit import Emitter, Val
from .lower_core import rms, rope_rotate
from .lowering import lowers

NEG_INF = float("-inf")


def _plain(fmt, what: str) -> None:
    if fmt is not None and fmt not in PLAIN:
        raise V4CError(f"export-onnx: {what} in cache format {fmt!r} has no ONNX lowering yet; compile with "
                       f"--kv-cache fp32|bf16 --indexer-cache fp32|bf16 to export")


def _round_trip(e: Emitter, x: Val, fmt) -> str:
    """What a row reads back as from a cache in ``fmt`` (a plain dtype: a cast there and back)."""
    if fmt is None or fmt == x.dtype:
        return x.name
    return e.cast(e.cast(x.name, x.dtype, fmt), fmt, x.dtype)


def _dim(e: Emitter, x: str, axis: int) -> str:
    """Size of ``x`` along ``axis`` as a 1-D int64 tensor."""
    return e.slice(e("Shape", x), 0, axis, axis + 1)


def _size(e: Emitter, x: str, axis: int) -> str:
    """Size of ``x`` along ``axis`` as an int64 scalar."""
    return e.squeeze(_dim(e, x, axis), 0)


def _take(e: Emitter, x: str, axis: int, start: str, end: str, out: str | None = None) -> str:
    """``x[start:end]`` along ``axis`` for scalar bounds computed at run time. A Gather, not a Slice:
    ONNX shape inference drops every dim of a Slice with computed bounds, a Gather keeps the others."""
    return e("Gather", x, e("Range", start, end, e.scalar(1, "i64")), axis=axis, out=out)


@lowers("attention")
def attention(e, ins, outs, types, *, kind, window, ratio=0, scale, kv_format=None, kv_rope_dim=0):
    _plain(kv_format, "the KV cache")
    q, kv, ring, ring_pos, sinks, pos = ins[:6]
    keys = e("Concat", e.f32(ring), e.cast(_round_trip(e, kv, kv_format), kv.dtype, "f32"), axis=1)
    kp = e.unsqueeze(e("Concat", ring_pos.name, pos.name, axis=1), 1)  # [B, 1, S]
    qp = e.unsqueeze(pos.name, 2)  # [B, T, 1]
    mask = e("And", e("And", e("GreaterOrEqual", kp, e.scalar(0, "i64")), e("LessOrEqual", kp, qp)),
             e("Greater", kp, e("Sub", qp, e.scalar(window, "i64"))))
    if kind != "sliding":
        rows = ins[6]
        n = _dim(e, rows.name, 1)
        ent = e("Range", e.scalar(0, "i64"), e.squeeze(n, 0), e.scalar(1, "i64"))
        if kind == "hca":  # entry w is complete once token (w+1)*ratio - 1 was seen
            cmask = e("LessOrEqual", e("Mul", e("Add", ent, e.scalar(1, "i64")), e.scalar(ratio, "i64")),
                      e("Add", qp, e.scalar(1, "i64")))
        else:  # the indexer's selection; -1 (unused slot) lands in a spare column n
            idx = ins[7].name
            safe = e("Where", e("GreaterOrEqual", idx, e.scalar(0, "i64")), idx, n)
            zeros = e("ConstantOfShape", e("Concat", e.slice(e("Shape", idx), 0, 0, 2),
                                           e("Add", n, e.ints(1)), axis=0))
            ones = e("Expand", e.const([1.0], "f32"), e("Shape", idx))
            sel = e("ScatterElements", zeros, safe, ones, axis=-1)
            cmask = e("Greater", _take(e, sel, -1, e.scalar(0, "i64"), _size(e, rows.name, 1)),
                      e.scalar(0.0, "f32"))
        keys = e("Concat", keys, e.f32(rows), axis=1)
        mask = e("Concat", mask, cmask, axis=2)
    qf = e("Transpose", e.f32(q), perm=[0, 2, 1, 3])  # [B, H, T, d]
    s = e("Mul", e("MatMul", qf, e.unsqueeze(e("Transpose", keys, perm=[0, 2, 1]), 1)), e.scalar(scale, "f32"))
    s = e("Where", e.unsqueeze(mask, 1), s, e.scalar(NEG_INF, "f32"))
    sink = e("Expand", e("Reshape", e.f32(sinks), e.ints(1, -1, 1, 1)),
             e("Concat", e.slice(e("Shape", s), 0, 0, 3), e.ints(1), axis=0))
    probs = e.slice(e("Softmax", e("Concat", s, sink, axis=-1), axis=-1), -1, 0, -1)  # the sink takes mass only
    o = e("Transpose", e("MatMul", probs, e.unsqueeze(keys, 1)), perm=[0, 2, 1, 3])
    e.cast(o, "f32", q.dtype, out=outs[0])


def _scatter_last(e: Emitter, buf: Val, vals: str, vals_dtype: str, pos: str, slots: int, keep: int,
                  out: str, store=None) -> str:
    """Write the last ``keep`` tokens' rows of ``vals`` into slot ``pos % slots`` of ``buf`` [B, slots, ...]."""
    t = _size(e, vals, 1)
    start = e("Max", e("Sub", t, e.scalar(keep, "i64")), e.scalar(0, "i64"))
    tail = _take(e, vals, 1, start, t)
    slot = e("Mod", _take(e, pos, 1, start, t), e.scalar(slots, "i64"))
    rows = e.cast(tail, vals_dtype, store or buf.dtype)
    if buf.rank == 2:
        return e("ScatterElements", buf.name, slot, rows, axis=1, out=out)
    return e("ScatterElements", buf.name, e("Expand", e.unsqueeze(slot, -1), e("Shape", rows)), rows, axis=1, out=out)


@lowers("window_append")
def window_append(e, ins, outs, types, *, kv_format=None, kv_rope_dim=0):
    _plain(kv_format, "the KV cache")
    ring, ring_pos, kv, pos = ins
    w = ring.type.shape[1]
    _scatter_last(e, ring, kv.name, kv.dtype, pos.name, w, w, outs[0], kv_format)
    _scatter_last(e, ring_pos, pos.name, "i64", pos.name, w, w, outs[1])


@lowers("compress")
def compress(e, ins, outs, types, *, ratio, overlap, eps, rope_dim, theta, yarn=None, store=None):
    _plain(store, "the compressed rows")
    kv, gate, ape, norm_w, rows, pend_kv, pend_gate, pos = ins
    m, c = ratio, 2 if overlap else 1
    cd = kv.type.shape[2]
    d = cd // c
    kvf = e.f32(kv)
    g = e("Add", e.f32(gate), e("Gather", e.f32(ape), e("Mod", pos.name, e.scalar(m, "i64")), axis=0))
    zero = e.scalar(0, "i64")
    nw = e("Div", _size(e, kv.name, 1), e.scalar(m, "i64"))  # windows a fresh sequence completes
    win_shape = e("Concat", e.ints(0), e.unsqueeze(nw, 0), e.ints(m, cd), axis=0)  # 0 keeps B; no -1: nw may be 0

    def windows(x):  # [B, T, cd] -> [B, nw, m, cd]
        return e("Reshape", _take(e, x, 1, zero, e("Mul", nw, e.scalar(m, "i64"))), win_shape)

    kw, gw = windows(kvf), windows(g)
    if overlap:  # the previous window's first half joins this window's second half
        def prev(x, fill):
            padded = e("Pad", x, e.ints(0, 1, 0, 0, 0, 0, 0, 0), e.scalar(fill, "f32"))
            return _take(e, padded, 1, zero, nw)

        def join(p, cur):
            return e("Concat", e.slice(p, -1, 0, d), e.slice(cur, -1, d, cd), axis=2)

        kw, gw = join(prev(kw, 0.0), kw), join(prev(gw, NEG_INF), gw)
    pooled = e.reduce("ReduceSum", e("Mul", kw, e("Softmax", gw, axis=2)), 2, keepdims=0)  # [B, nw, d]
    normed = e("Mul", e.f32(norm_w), rms(e, pooled, eps))
    at = e("Cast", e("Mul", e("Range", zero, nw, e.scalar(1, "i64")),
                     e.scalar(m, "i64")), to=1)  # RoPE at each window's start
    roped = rope_rotate(e, normed, "f32", 3, d, at, rope_dim, theta, yarn)
    new = e.cast(roped, "f32", store or rows.dtype)
    e("Concat", new, _take(e, rows.name, 1, nw, _size(e, rows.name, 1)), axis=1, out=outs[0])
    _scatter_last(e, pend_kv, kvf, "f32", pos.name, c * m, c * m, outs[1])
    _scatter_last(e, pend_gate, g, "f32", pos.name, c * m, c * m, outs[2])


@lowers("indexer_topk")
def indexer_topk(e, ins, outs, types, *, topk, ratio, score_scale, weight_scale, key_format=None):
    _plain(key_format, "the indexer keys")
    q, w, keys, pos = ins
    qf = e("Transpose", e.f32(q), perm=[0, 2, 1, 3])  # [B, H, T, d]
    s = e("Relu", e("MatMul", qf, e.unsqueeze(e("Transpose", e.f32(keys), perm=[0, 2, 1]), 1)))
    hw = e.unsqueeze(e("Transpose", e("Mul", e.f32(w), e.scalar(weight_scale, "f32")), perm=[0, 2, 1]), -1)
    total = e.reduce("ReduceSum", e("Mul", e("Mul", s, e.scalar(score_scale, "f32")), hw), 1, keepdims=0)
    visible = e.unsqueeze(e("Div", e("Add", pos.name, e.scalar(1, "i64")), e.scalar(ratio, "i64")), -1)
    n = _dim(e, keys.name, 1)
    ent = e("Range", e.scalar(0, "i64"), e.squeeze(n, 0), e.scalar(1, "i64"))
    hidden = e("GreaterOrEqual", ent, visible)
    total = e("Where", hidden, e.scalar(NEG_INF, "f32"), total)
    # topk spare -inf columns make TopK's k static even when fewer rows exist; they come back as -1
    padded = e("Pad", total, e.ints(0, 0, 0, 0, 0, topk), e.scalar(NEG_INF, "f32"))
    _, top = e("TopK", padded, e.ints(topk), axis=-1, largest=1, sorted=1, n_out=2)
    # TopK over a dynamic axis leaves ONNX shape inference without any dim: pin [B, T, topk]
    top = e("Reshape", top, e("Concat", e("Shape", pos.name), e.ints(topk), axis=0))
    e("Where", e("GreaterOrEqual", top, visible), e.scalar(-1, "i64"), top, out=outs[0])
