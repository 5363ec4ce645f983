"""Dense building blocks in standard ONNX: embedding, linear maps, norms, RoPE, elementwise ops."""
from __future__ import annotations

from ..graph.ops.core import rope_inv_freq
from .emit import Emitter, Val
from .lowering import lowers


def linear_t(e: Emitter, x: str, x_dtype: str, w: Val, out: str | None = None) -> str:
    """``x @ w.T`` with the weight in the activation dtype (weights are stored [out, in])."""
    wt = e("Transpose", e.cast(w.name, w.dtype, x_dtype), perm=[1, 0])
    return e("MatMul", x, wt, out=out)


def rms(e: Emitter, xf: str, eps: float) -> str:
    """Unweighted RMSNorm over the last dim of an fp32 value."""
    ms = e.reduce("ReduceMean", e("Mul", xf, xf), -1)
    return e("Mul", xf, e("Reciprocal", e("Sqrt", e("Add", ms, e.scalar(eps, "f32")))))


def silu(e: Emitter, x: str) -> str:
    return e("Mul", x, e("Sigmoid", x))


def swiglu_clamped(e: Emitter, gate: str, up: str, limit: float, dtype: str, out: str | None = None) -> str:
    lim = e.scalar(limit, dtype)
    g = e("Min", gate, lim)
    u = e("Clip", up, e.scalar(-limit, dtype), lim)
    return e("Mul", silu(e, g), u, out=out)


def rope_rotate(e: Emitter, x: str, dtype: str, rank: int, d: int, posf: str, rope_dim: int, theta: float, yarn,
                inverse: bool = False, out: str | None = None, head_axis: bool = False) -> str:
    """Rotate interleaved pairs of the last ``rope_dim`` dims of ``x`` by the angles at ``posf`` (fp32
    positions shaped like ``x``'s leading dims, or broadcastable to them)."""
    inv = rope_inv_freq(rope_dim, float(theta), tuple(yarn) if yarn else None)
    freqs = e("Mul", e.unsqueeze(posf, -1), e.const(inv.tolist(), "f32"))
    if head_axis:  # [B, T, r/2] against [B, T, H, r/2]
        freqs = e.unsqueeze(freqs, -2)
    cos, sin = e("Cos", freqs), e("Sin", freqs)
    if inverse:
        sin = e("Neg", sin)
    tail = e.cast(e.slice(x, -1, d - rope_dim, d), dtype, "f32")
    x1, x2 = e.slice(tail, -1, 0, rope_dim, 2), e.slice(tail, -1, 1, rope_dim, 2)
    a = e("Sub", e("Mul", x1, cos), e("Mul", x2, sin))
    b = e("Add", e("Mul", x2, cos), e("Mul", x1, sin))
    pairs = e("Concat", e.unsqueeze(a, -1), e.unsqueeze(b, -1), axis=-1)
    rot = e.cast(e("Reshape", pairs, e.ints(*([0] * (rank - 1)), rope_dim)), "f32", dtype)
    if rope_dim == d:
        return e.finish(rot, out) if out else rot
    return e("Concat", e.slice(x, -1, 0, d - rope_dim), rot, axis=-1, out=out)


@lowers("embedding")
def embedding(e, ins, outs, types, dtype=None):
    ids, table = ins
    rows = e("Gather", table.name, e("Max", ids.name, e.scalar(0, ids.dtype)), axis=0)  # padding ids read row 0
    e.cast(rows, table.dtype, types[0].dtype, out=outs[0])


@lowers("linear")
def linear(e, ins, outs, types):
    x, w = ins
    linear_t(e, x.name, x.dtype, w, out=outs[0])


@lowers("rms_norm")
def rms_norm(e, ins, outs, types, eps=1e-6):
    x = ins[0]
    y = rms(e, e.f32(x), eps)
    if len(ins) == 2:
        y = e("Mul", e.f32(ins[1]), y)
    e.cast(y, "f32", x.dtype, out=outs[0])


@lowers("reshape")
def reshape(e, ins, outs, types, shape):
    lead = sum(isinstance(d, str) for d in shape)  # symbolic leading dims are copied (0 in ONNX)
    e("Reshape", ins[0].name, e.ints(*([0] * lead), *shape[lead:]), out=outs[0])


@lowers("add")
def add(e, ins, outs, types):
    e("Add", ins[0].name, ins[1].name, out=outs[0])


@lowers("swiglu")
def swiglu(e, ins, outs, types, limit):
    swiglu_clamped(e, ins[0].name, ins[1].name, limit, ins[0].dtype, out=outs[0])


@lowers("grouped_linear")
def grouped_linear(e, ins, outs, types, groups):
    x, w = ins
    k = w.type.shape[1]
    wg = e("Reshape", e.cast(w.name, w.dtype, x.dtype), e.ints(groups, -1, k))
    wt = e("Transpose", wg, perm=[0, 2, 1])  # [G, K, R]
    y = e("MatMul", e.unsqueeze(x.name, 3), wt)  # [B, T, G, 1, K] @ [G, K, R]
    e.squeeze(y, 3, out=outs[0])


@lowers("rope")
def rope(e, ins, outs, types, rope_dim, theta, yarn=None, inverse=False):
    x, pos = ins
    posf = e("Cast", e("Max", pos.name, e.scalar(0, pos.dtype)), to=1)
    rope_rotate(e, x.name, x.dtype, x.rank, x.type.shape[-1], posf, rope_dim, theta, yarn, inverse, out=outs[0],
                head_axis=x.rank == 4)
