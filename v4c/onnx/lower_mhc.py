"""mHC (manifold-constrained hyper-connections) in standard ONNX."""
from __future__ import annotations

from .lower_core import rms
from .lowering import lowers


@lowers("hc_expand")
def hc_expand(e, ins, outs, types, n):
    e("Expand", e.unsqueeze(ins[0].name, 2), e.ints(1, 1, n, 1), out=outs[0])


@lowers("hc_logits")
def hc_logits(e, ins, outs, types, eps):
    x, fn = ins
    n, d = x.type.shape[2], x.type.shape[3]
    xf = rms(e, e("Reshape", e.f32(x), e.ints(0, 0, n * d)), eps)
    e("MatMul", xf, e("Transpose", e.f32(fn), perm=[1, 0]), out=outs[0])


@lowers("hc_weights")
def hc_weights(e, ins, outs, types, n, eps):
    m, base, scale = ins
    b, s = e.f32(base), scale.name
    def part(x, lo, hi):  # logits split along their last dim, the base along its only one
        return e.slice(x, -1 if x == m.name else 0, lo, hi)

    sc = [e("Gather", s, e.scalar(i, "i64"), axis=0) for i in range(3)]
    one = e.scalar(eps, "f32")
    pre = e("Sigmoid", e("Add", e("Mul", part(m.name, 0, n), sc[0]), part(b, 0, n)))
    e("Add", pre, one, out=outs[0])
    post = e("Sigmoid", e("Add", e("Mul", part(m.name, n, 2 * n), sc[1]), part(b, n, 2 * n)))
    e("Mul", post, e.scalar(2.0, "f32"), out=outs[1])
    comb = e("Reshape", part(m.name, 2 * n, (n + 2) * n), e.ints(0, 0, n, n))
    cb = e("Reshape", part(b, 2 * n, (n + 2) * n), e.ints(n, n))
    e("Add", e("Softmax", e("Add", e("Mul", comb, sc[2]), cb), axis=-1), one, out=outs[2])


@lowers("sinkhorn")
def sinkhorn(e, ins, outs, types, iters, eps):
    eps_c = e.scalar(eps, "f32")
    c = ins[0].name

    def norm(c, axis, out=None):
        return e("Div", c, e("Add", e.reduce("ReduceSum", c, axis), eps_c), out=out)

    steps = [-2] + [-1, -2] * (iters - 1)  # columns first, then (row, column) rounds
    for i, axis in enumerate(steps):
        c = norm(c, axis, out=outs[0] if i == len(steps) - 1 else None)


@lowers("hc_collapse")
def hc_collapse(e, ins, outs, types):
    x, pre = ins
    y = e.reduce("ReduceSum", e("Mul", e.unsqueeze(pre.name, -1), e.f32(x)), 2, keepdims=0)
    e.cast(y, "f32", x.dtype, out=outs[0])


@lowers("hc_head_weights")
def hc_head_weights(e, ins, outs, types, eps):
    m, base, scale = ins
    s = e("Sigmoid", e("Add", e("Mul", m.name, e.f32(scale)), e.f32(base)))
    e("Add", s, e.scalar(eps, "f32"), out=outs[0])


@lowers("hc_expand_mix")
def hc_expand_mix(e, ins, outs, types):
    x, y, post, comb = ins
    dt = x.dtype
    p = e("Mul", e.unsqueeze(e.cast(post.name, post.dtype, dt), -1), e.unsqueeze(y.name, -2))
    mix = e("MatMul", e("Transpose", e.cast(comb.name, comb.dtype, dt), perm=[0, 1, 3, 2]), x.name)
    e("Add", p, mix, out=outs[0])
