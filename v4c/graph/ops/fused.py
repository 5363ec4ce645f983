"""Fused ops: each is one GPU kernel's worth of work, defined once as a *recipe* over the
unfused ops. The recipe gives the fused op its shape inference (run on types), its PyTorch
reference (run on tensors) and its cost (the parts' FLOPs; the parts' bytes less the
intermediates that stay on chip), so a fused op cannot drift from what it replaces.
"""
from __future__ import annotations

import torch

from ..registry import OPS, Concrete, Cost, expect_int, get_op, make_opdef, register, same_dim
from .. import weights
from ..types import TensorType
from .attention import (ATTENTION_ATTRS, ATTENTION_OPERANDS, COMPRESS_ATTRS, COMPRESS_OPERANDS, COMPRESS_STATES,
                        INDEXER_ATTRS)


class _Types:
    """Runs a recipe on TensorTypes: shape inference."""

    def __call__(self, op, *args, **attrs):
        out = get_op(op).infer(list(args), attrs)
        return out[0] if len(out) == 1 else tuple(out)


class _Tensors:
    """Runs a recipe on tensors: the reference implementation."""

    def __call__(self, op, *args, **attrs):
        return get_op(op).ref(*args, **attrs)


class _Costs:
    """Runs a recipe on concrete types, adding up the parts' costs. An intermediate (produced by one part,
    read by the next) never goes to memory: its write and each of its reads are taken off the sum. A part
    that costs nothing (a reshape) makes a view: its output is its operand, not a new intermediate."""

    def __init__(self, ctx: int, inputs):
        self.ctx, self.total = ctx, Cost(0, 0)
        self.external = {id(t) for t in inputs}
        self.root: dict[int, int] = {}  # id(view) -> id(the tensor it views)
        self.written: dict[int, int] = {}  # id(intermediate) -> the bytes its producer counted writing it
        self.reads = 0  # bytes of intermediate reads the parts counted
        self.alive = list(inputs)  # every type seen, so that no id is reused while the recipe runs

    def _root(self, t) -> int:
        return self.root.get(id(t), id(t))

    def __call__(self, op, *args, **attrs):
        d = get_op(op)
        outs = list(d.infer(list(args), attrs))
        conc = lambda t: Concrete(tuple(t.shape), t.dtype)  # noqa: E731
        part = d.cost([conc(a) for a in args], [conc(o) for o in outs], attrs, self.ctx)
        self.total = self.total + part
        outs = [TensorType(o.shape, o.dtype) for o in outs]  # fresh objects: identity marks intermediates
        self.alive += outs
        if part.bytes == 0 and args:  # a view of its first operand
            for o in outs:
                self.root[id(o)] = self._root(args[0])
        else:
            self.reads += sum(conc(a).nbytes for a in args if self._root(a) not in self.external)
            for o in outs:
                self.written[id(o)] = conc(o).nbytes
        return outs[0] if len(outs) == 1 else tuple(outs)

    def bytes(self, results) -> int:
        """Bytes moved by the fused op whose recipe returned ``results``: the parts' sum without the
        intermediates' traffic (a part's output that is a result of the whole is still written)."""
        kept = {self._root(r) for r in _tuple(results)}
        inner = self.reads + sum(b for i, b in self.written.items() if i not in kept)
        return max(self.total.bytes - inner, 0)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


RECIPES: dict = {}  # fused op name -> its recipe, for analyses that split a fused cost by part


def fused_op(name: str, operands, attrs=(), state_io=(), cache_format: str | None = None, launches: int = 1):
    """Register a recipe ``fn(k, *inputs, **attrs)`` as the fused op ``name``."""

    def deco(recipe):
        def infer(ins, attrs):
            return list(_tuple(recipe(_Types(), *ins, **attrs)))

        def ref(*args, **attrs):
            return recipe(_Tensors(), *args, **attrs)

        def cost(ins, outs, attrs, ctx):
            types = [TensorType(c.shape, c.dtype) for c in ins]
            k = _Costs(ctx, types)
            moved = k.bytes(recipe(k, *types, **attrs))
            return Cost(k.total.flops, moved)

        OPS[name] = make_opdef(name, infer, ref, cost, operands, attrs, state_io, (recipe.__doc__ or "").strip(),
                               launches, True, cache_format)
        RECIPES[name] = recipe
        return recipe

    return deco


# ---- mHC ----------------------------------------------------------------------------------

_HC = ("fn:weight", "base:weight", "scale:weight", "norm_w:weight")
_HC_ATTRS = ("n:int", "eps:float", "hc_eps:float", "iters:int")
_MIX = ("x", "y", "post", "comb")
_ROPE = ("rope_dim:int", "theta:float", "yarn:tuple?")


@fused_op("hc_pre", operands=("x", *_HC), attrs=_HC_ATTRS)
def hc_pre(k, x, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    """mHC pre-mix: RMS, mixing logits, sigmoid/softmax, Sinkhorn, collapse, then the sublayer's RMSNorm."""
    m = k("hc_logits", x, fn, eps=eps)
    pre, post, comb = k("hc_weights", m, base, scale, n=n, eps=hc_eps)
    comb = k("sinkhorn", comb, iters=iters, eps=hc_eps)
    h = k("rms_norm", k("hc_collapse", x, pre), norm_w, eps=eps)
    return h, post, comb


@fused_op("hc_post_pre", operands=(*_MIX, *_HC), attrs=_HC_ATTRS)
def hc_post_pre(k, x, y, post, comb, fn, base, scale, norm_w, *, n, eps, hc_eps, iters):
    """mHC post-mix into the residual streams, then the next sublayer's pre-mix on the new streams."""
    x1 = k("hc_expand_mix", x, y, post, comb)
    return (x1, *hc_pre(k, x1, fn, base, scale, norm_w, n=n, eps=eps, hc_eps=hc_eps, iters=iters))


@fused_op("hc_head", operands=(*_MIX, *_HC), attrs=("eps:float", "hc_eps:float"))
def hc_head(k, x, y, post, comb, fn, base, scale, norm_w, *, eps, hc_eps):
    """Last post-mix, the head's collapse (sigmoid weights, no Sinkhorn) and the final RMSNorm."""
    x1 = k("hc_expand_mix", x, y, post, comb)
    pre = k("hc_head_weights", k("hc_logits", x1, fn, eps=eps), base, scale, eps=hc_eps)
    return k("rms_norm", k("hc_collapse", x1, pre), norm_w, eps=eps)


# ---- projections with their norm / RoPE epilogues -----------------------------------------

@fused_op("linear_rms_norm", operands=("x", "w:weight/gemm", "norm_w:weight"), attrs=("eps:float",))
def linear_rms_norm(k, x, w, norm_w, *, eps):
    """GEMM with the RMSNorm of its output rows in the epilogue."""
    return k("rms_norm", k("linear", x, w), norm_w, eps=eps)


@fused_op("q_proj", operands=("x", "w:weight/gemm", "pos"), attrs=("shape:tuple", "eps:float", *_ROPE))
def q_proj(k, x, w, pos, *, shape, eps, rope_dim, theta, yarn=None):
    """Query GEMM with the per-head unweighted RMSNorm and RoPE in the epilogue."""
    q = k("rms_norm", k("reshape", k("linear", x, w), shape=shape), eps=eps)
    return k("rope", q, pos, rope_dim=rope_dim, theta=theta, yarn=yarn)


@fused_op("kv_proj", operands=("x", "w:weight/gemm", "norm_w:weight", "pos"), attrs=("eps:float", *_ROPE))
def kv_proj(k, x, w, norm_w, pos, *, eps, rope_dim, theta, yarn=None):
    """KV GEMM with RMSNorm and RoPE in the epilogue."""
    kv = k("rms_norm", k("linear", x, w), norm_w, eps=eps)
    return k("rope", kv, pos, rope_dim=rope_dim, theta=theta, yarn=yarn)


@fused_op("o_proj", operands=("o", "wa:weight/gemm", "wb:weight/gemm"),
          attrs=("shape:tuple", "groups:int", "out_shape:tuple"))
def o_proj(k, o, wa, wb, *, shape, groups, out_shape):
    """Grouped low-rank output projection: per-group GEMM, then the dense GEMM."""
    z = k("grouped_linear", k("reshape", o, shape=shape), wa, groups=groups)
    return k("linear", k("reshape", z, shape=out_shape), wb)


# ---- compressed attention -----------------------------------------------------------------

@fused_op("compressor", operands=("h", "wkv:weight/gemm", "wgate:weight/gemm", *COMPRESS_OPERANDS),
          attrs=COMPRESS_ATTRS, state_io=COMPRESS_STATES, cache_format="store")
def compressor(k, h, wkv, wgate, ape, norm_w, rows, pend_kv, pend_gate, pos, **attrs):
    """Both compressor projections, gated per-channel pooling, RMSNorm, RoPE and the cache append."""
    return k("compress", k("linear", h, wkv), k("linear", h, wgate), ape, norm_w, rows, pend_kv, pend_gate, pos,
             **attrs)


@fused_op("indexer", operands=("cq", "h", "wq:weight/gemm", "ww:weight/gemm", "keys:cache/indexer_keys", "pos"),
          attrs=("shape:tuple", *_ROPE, *INDEXER_ATTRS), cache_format="key_format")
def indexer(k, cq, h, wq, ww, keys, pos, *, shape, rope_dim, theta, yarn=None, **attrs):
    """Lightning indexer: query GEMM + RoPE, head weights, ReLU-weighted scores, causal mask, top-k."""
    q = k("rope", k("reshape", k("linear", cq, wq), shape=shape), pos, rope_dim=rope_dim, theta=theta, yarn=yarn)
    return k("indexer_topk", q, k("linear", h, ww), keys, pos, **attrs)


@fused_op("sparse_attention", operands=ATTENTION_OPERANDS, attrs=(*ATTENTION_ATTRS, *_ROPE),
          state_io=(("ring", 1), ("ring_pos", 2)), cache_format="kv_format")
def sparse_attention(k, q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, rope_dim, theta, yarn=None, **attrs):
    """Attention over window + compressed rows with the sink, the ring append, and the output de-rotation."""
    extra = [x for x in (rows, idx) if x is not None]
    o = k("attention", q, kv, ring, ring_pos, sinks, pos, *extra, **attrs)
    fmt = {a: attrs[a] for a in ("kv_format", "kv_rope_dim") if a in attrs}
    ring, ring_pos = k("window_append", ring, ring_pos, kv, pos, **fmt)
    return k("rope", o, pos, rope_dim=rope_dim, theta=theta, yarn=yarn, inverse=True), ring, ring_pos


# ---- MoE ----------------------------------------------------------------------------------

def _route_outputs(logits_t: TensorType, k: int, e: int):
    shape = (*logits_t.shape[:2], k)
    return [TensorType(shape, "i64"), TensorType(shape, "f32"), TensorType(shape, "i64"), TensorType((e + 1,), "i64")]


def _permutation(idx: torch.Tensor, e: int):
    """Assignments (token*k + slot) sorted by expert, and each expert's [start, end) offsets."""
    flat = idx.reshape(-1)
    perm = torch.sort(flat, stable=True).indices
    offsets = torch.zeros(e + 1, dtype=torch.int64, device=idx.device)
    offsets[1:] = torch.bincount(flat, minlength=e).cumsum(0)
    return perm.view(idx.shape), offsets


def _part(op, ins, out_shapes, attrs, ctx):
    return get_op(op).cost(ins, [Concrete(sh, dt) for sh, dt in out_shapes], attrs, ctx)


def _route_cost(ins, outs, a, ctx):
    h, w = ins[0], ins[1]
    logits = Concrete((*h.shape[:-1], w.shape[0]), "f32")
    route_ins = [logits, *ins[2:]] if a.get("hash") else [logits, ins[2]]
    route = get_op("moe_hash_route" if a.get("hash") else "moe_route").cost(route_ins, outs[:2], a, ctx)
    flops = _part("linear", [h, w], [(logits.shape, "f32")], {}, ctx).flops + route.flops
    return Cost(flops, sum(i.nbytes for i in ins) + sum(o.nbytes for o in outs))


def _route_infer(ins, a):
    h, w = ins[0], ins[1]
    same_dim(h.shape[-1], w.shape[1], "moe_route_fused: hidden vs router columns")
    k = ins[2].shape[1] if a.get("hash") else a["topk"]
    return _route_outputs(h, k, w.shape[0])


@register("moe_router", infer=_route_infer, cost=_route_cost,
          operands=("h", "w:weight/gemm", "table_or_bias:weight", "ids?"),
          attrs=("scaling:float", "hash:bool?", "topk:int?"), fused=True)
def moe_router(h, w, table_or_bias, ids=None, *, scaling, hash=False, topk=None):
    """Router GEMM, sqrt-softplus scores, selection (bias or hash table), renormalised weights, and the
    assignment permutation sorted by expert with per-expert offsets (the grouped GEMM's schedule)."""
    logits = get_op("linear").ref(h, w)
    if hash:
        idx, wts = get_op("moe_hash_route").ref(logits, table_or_bias, ids, scaling=scaling)
    else:
        idx, wts = get_op("moe_route").ref(logits, table_or_bias, topk=topk, scaling=scaling)
    return (idx, wts, *_permutation(idx, w.shape[0]))


def _ffn_infer(ins, a):
    h, idx, w, perm, offsets, w13, w2 = ins[:7]
    expect_int(perm, "moe_ffn permutation")
    same_dim(offsets.shape[0], w13.shape[0] + 1, "moe_ffn: offsets vs experts")
    get_op("moe_experts").infer([h, idx, w, w13, w2], a)
    if len(ins) == 10:
        same_dim(ins[7].shape[1], h.shape[2], "moe_ffn: shared gate columns")
    return [h]


def _ffn_cost(ins, outs, a, ctx):
    h, idx, w, perm, offsets, w13, w2 = ins[:7]
    c = get_op("moe_experts").cost([h, idx, w, w13, w2], outs, a, ctx)
    flops, extra = c.flops, 0
    if len(ins) == 10:  # the shared expert: two GEMMs, the activation, one GEMM, the sum
        sg, su, sd = ins[7:]
        mid = ((*h.shape[:-1], sg.shape[0]), h.dtype)
        flops += 2 * _part("linear", [h, sg], [mid], {}, ctx).flops
        flops += _part("swiglu", [Concrete(*mid)] * 2, [mid], a, ctx).flops
        flops += _part("linear", [Concrete(*mid), sd], [(h.shape, h.dtype)], {}, ctx).flops
        flops += _part("add", [h, h], [(h.shape, h.dtype)], {}, ctx).flops
        extra = sg.nbytes + su.nbytes + sd.nbytes
    return Cost(flops, c.bytes + extra + perm.nbytes)


@register("moe_ffn", infer=_ffn_infer, cost=_ffn_cost, operands=("h", "idx", "w", "perm", "offsets", "w13:weight/gemm",
          "w2:weight/gemm", "sg?:weight/gemm", "su?:weight/gemm", "sd?:weight/gemm"), attrs=("limit:float",),
          launches=2, fused=True)
def moe_ffn(h, idx, w, perm, offsets, w13, w2, sg=None, su=None, sd=None, *, limit):
    """Grouped GEMMs over the expert-sorted assignments (clamped SwiGLU fused into the first, the
    weighted combine and scatter-add into the second) with the shared expert riding along."""
    shape = h.shape
    flat = h.reshape(-1, shape[-1])
    k = idx.shape[-1]
    order = perm.reshape(-1)
    wflat = w.reshape(-1)
    out = torch.zeros_like(flat)
    starts = offsets.tolist()
    for e in range(len(starts) - 1):
        a, b = starts[e], starts[e + 1]
        if a == b:
            continue
        rows = order[a:b]
        tok = rows // k
        gate, up = weights.linear(flat[tok], w13[e]).chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)
        y = weights.linear(act, w2[e]) * wflat[rows, None].to(flat.dtype)
        out.index_add_(0, tok, y)
    if sg is not None:
        lin = get_op("linear").ref
        out = out + lin(get_op("swiglu").ref(lin(flat, sg), lin(flat, su), limit=limit), sd)
    return out.view(shape)
