"""The cpu backend: which fast path runs each op, and why the others decline.

Implementations are listed per op in order of preference; the first whose checker accepts a call
runs it, and an op none of them takes runs its reference. Checkers see only what is known when a
model is loaded (dtypes, cache formats, the instruction set, the phase, whether a weight is
quantised), so the choice is made once per node and phase and recorded.
"""
from __future__ import annotations

from functools import partial

import torch

from ...graph.types import DTYPES, QUANT_DTYPES
from .. import Backend, Call
from ..reference import REFERENCE
from . import attention, compressor, dense, linear_norm, mhc, moe, native, projections, rope, router, wide
from .weight_views import WeightViews

CPU = Backend("cpu", fallback=REFERENCE, context=WeightViews)

_FLOATS = ("f32", "bf16", "f16")  # what the C helpers take (fp16 widened by F16C / in C: no fp16 arithmetic)
_KINDS = ("sliding", "hca", "csa")  # what attention.c implements
_MAX_STREAMS = 8  # mhc.c's per-thread scratch


def _all(*checks):
    def check(call: Call) -> str | None:
        for c in checks:
            why = c(call)
            if why is not None:
                return why
        return None
    return check


def _on_cpu(call: Call) -> str | None:
    return None if call.device == "cpu" else f"the C helpers run on the CPU, not {call.device}"


def _library(call: Call) -> str | None:
    return None if native.library() is not None else f"the C helpers are not built ({native.why()})"


def _phase(name: str):
    def check(call: Call) -> str | None:
        return None if call.phase == name else f"made for {name} calls"
    return check


def _float(i: int, what: str):
    def check(call: Call) -> str | None:
        dt = call.dtype(i)
        return None if dt in _FLOATS else f"{what} is {dt} (the C helpers take {', '.join(_FLOATS)})"
    return check


def _same_dtype(ref: int, *others: int, what: str):
    def check(call: Call) -> str | None:
        bad = [call.dtype(i) for i in others if i < len(call.types) and call.dtype(i) != call.dtype(ref)]
        return f"{what} is {bad[0]}, not the activations' {call.dtype(ref)}" if bad else None
    return check


def _plain_cache(attr: str):
    def check(call: Call) -> str | None:
        fmt = call.attrs.get(attr)
        return None if fmt is None else f"the cache is stored as {fmt} (the C helpers read plain rows)"
    return check


def _native(*checks):
    return _all(_on_cpu, _library, *checks)


def _dots_isa(call: Call) -> str | None:
    """The C products' kernels (native/dots.c) for the activations' dtype on this CPU."""
    dt = call.dtype(0)
    if dt not in _FLOATS:
        return f"activations are {dt} (the C products take {', '.join(_FLOATS)})"
    if native.moe_decode_available(DTYPES[dt]):
        return None
    return "this CPU (or compiler) has neither AVX2 + FMA nor AVX-512F"


def _norm_weight(call: Call) -> str | None:
    """The compressor's C step normalises with norm_rope.c, which reads an fp32, bf16 or fp16 weight."""
    dt = call.dtype(4)
    return None if dt in _FLOATS else f"the norm weight is {dt} (the C norm reads {', '.join(_FLOATS)})"


def _route_table(call: Call) -> str | None:
    """The C selection (native/route.c) reads a hash table of int32 or int64 expert ids."""
    dt = call.dtype(2)
    if call.attrs.get("hash") and dt not in ("i32", "i64"):
        return f"the hash table is {dt} (the C router reads i32 or i64)"
    return None


def _contiguous(*weights: int):
    """The C products read weight rows as dense memory; a tensor-parallel rank's slice of a weight along
    its input dimension is a strided view of the memory-mapped checkpoint."""
    def check(call: Call) -> str | None:
        for i in weights:
            v = call.values[i] if i < len(call.values) else None
            if isinstance(v, torch.Tensor) and not v.is_contiguous():
                return f"operand {i} is a strided view (a rank's slice of a sharded weight)"
        return None
    return check


def _gemv(*weights: int):
    """A decode call's C product (``dense``): activations (operand 0) and ``weights`` fp32, bf16 or fp16 of
    one dtype, dense in memory, on a CPU with the kernels' instruction sets."""
    return _native(_phase("decode"), _same_dtype(0, *weights, what="a weight"), _contiguous(*weights), _dots_isa)


def _quant_isa(call: Call) -> str | None:
    """The C products with quantised weights (native/quant.c) on this CPU."""
    return None if native.quant_available() else "this CPU (or compiler) has no AVX2 + FMA (the quantised kernels')"


def _qweights(*weights: int):
    """At least one of ``weights`` quantised (all plain: the plain C products take the call), each either
    quantised or of the activations' dtype."""
    def check(call: Call) -> str | None:
        idx = [i for i in weights if i < len(call.types)]
        if not call.quantized(*idx):
            return "no quantised weight (the plain C products take such calls)"
        bad = [call.dtype(i) for i in idx if call.dtype(i) not in QUANT_DTYPES and call.dtype(i) != call.dtype(0)]
        return f"a weight is {bad[0]}, neither quantised nor the activations' {call.dtype(0)}" if bad else None
    return check


def _q_contiguous(*weights: int):
    """``_contiguous`` for quantised weights too (their data and their scales)."""
    def check(call: Call) -> str | None:
        for i in weights:
            v = call.values[i] if i < len(call.values) else None
            parts = (v.data, v.scale) if hasattr(v, "fmt") else (v,)
            if any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in parts):
                return f"operand {i} is a strided view (a rank's slice of a sharded weight)"
        return None
    return check


def _qgemv(*weights: int):
    """A C product with quantised weights (``dense.qgemv``): activations fp32, bf16 or fp16, each weight quantised
    (FP8 / MXFP4) or of the activations' dtype, dense in memory, on AVX2 + FMA. Prefill calls too: the
    PyTorch path dequantises the whole weight per call (4x slower at 64 rows here, 1.1-1.5x at 256)."""
    return _native(_float(0, "the activations' dtype"), _qweights(*weights), _q_contiguous(*weights),
                   _quant_isa)


def _wide(*weights: int):
    """A bf16 / fp16 prefill call's products widened to fp32 (``wide``): activations and ``weights`` of one
    of those dtypes."""
    def half(call: Call) -> str | None:
        return None if call.dtype(0) in ("bf16", "f16") else f"activations are {call.dtype(0)} (fp32 GEMMs already)"

    return _all(_on_cpu, _phase("prefill"), half, _same_dtype(0, *weights, what="a weight"), _slow_half_gemm)


def _slow_half_gemm(call: Call) -> str | None:
    """bf16 (fp16) activations on a CPU with bf16 (fp16) arithmetic: PyTorch's GEMMs, not the widened or C
    products."""
    dt = call.dtype(0)
    f = wide.native_half(DTYPES[dt]) if dt in ("bf16", "f16") else None
    return None if f is None else f"this CPU has {f}: PyTorch's {dt} GEMM is the faster one"


# ---- attention: q, kv, ring, ring_pos, sinks, pos, rows, idx -------------------------------

def _kind(call: Call) -> str | None:
    return None if call.attrs.get("kind") in _KINDS else f"kind {call.attrs.get('kind')!r}"


CPU.add("indexer", "native-decode", _all(_gemv(2, 3), _same_dtype(0, 1, what="h")))(
    attention.fused_indexer(attention.indexer_topk_c, lin=dense.gemv, one_call=True))
CPU.add("indexer", "native-quant", _all(_qgemv(2, 3), _phase("decode"), _same_dtype(0, 1, what="h")))(
    attention.fused_indexer(attention.indexer_topk_c, lin=dense.qgemv))
CPU.add("indexer", "native-quant-prefill", _all(_qgemv(2, 3), _phase("prefill"), _same_dtype(0, 1, what="h")))(
    attention.fused_indexer(attention.indexer_topk, lin=dense.qgemv))


def _plain_keys(call: Call) -> str | None:
    """The C attention reads plain rows (a packed fp8 row is not one): the ring and the compressed rows in the
    cache's dtype (its plain format's, else the activations'), this call's rows in the activations' or that one
    (they are converted to it first, as the cache will hold them); the queries may be of another float dtype
    (an fp32 or fp16 model over a bf16 cache)."""
    fmt = call.attrs.get("kv_format")
    if fmt is not None and fmt not in _FLOATS:
        return f"the cache is stored as {fmt} (the C helpers read plain rows)"
    keys = fmt or call.dtype(0)
    bad = [call.dtype(i) for i in (2, 6) if i < len(call.types) and call.dtype(i) != keys]
    if bad:
        return f"a cache is {bad[0]}, not the activations' {call.dtype(0)}" if fmt is None else \
            f"a cache is {bad[0]}, not its format's {fmt}"
    return None if call.dtype(1) in (call.dtype(0), keys) else \
        f"kv is {call.dtype(1)}, neither the activations' {call.dtype(0)} nor the cache's {keys}"


_attention_native = _native(_kind, _float(0, "q"), _plain_keys)
CPU.add("attention", "native", _attention_native)(attention.attend_native)
CPU.add("attention", "decode", _phase("decode"))(attention.attend_decode)
CPU.add("attention", "blocked")(attention.attend)
CPU.add("sparse_attention", "native", _attention_native)(attention.fused(attention.attend_native))
CPU.add("sparse_attention", "decode", _phase("decode"))(attention.fused(attention.attend_decode))
CPU.add("sparse_attention", "blocked")(attention.fused(attention.attend))


def _bf16_pairs(*operands: int):
    """bf16 ``operands`` on a CPU whose C kernels multiply bf16 pairs (AVX512-BF16: native/attention_bf16.c)."""
    def check(call: Call) -> str | None:
        bad = [call.dtype(i) for i in operands if call.dtype(i) != "bf16"]
        if bad:
            return f"an operand is {bad[0]} (the C scoring beats PyTorch's GEMMs with bf16 pairs only)"
        return None if "avx512bf16" in native.dot_isas(torch.bfloat16) else "this CPU (or compiler) has no AVX512-BF16"
    return check


CPU.add("indexer_topk", "decode", _phase("decode"))(attention.indexer_topk_decode)
CPU.add("indexer_topk", "native-prefill", _native(_plain_cache("key_format"), _bf16_pairs(0, 1, 2)))(
    attention.indexer_topk_c_prefill)
CPU.add("indexer_topk", "blocked")(attention.indexer_topk)
CPU.add("indexer", "native-prefill", _native(_phase("prefill"), _plain_cache("key_format"), _bf16_pairs(0, 1, 4)))(
    attention.fused_indexer(attention.indexer_topk_c_prefill))
CPU.add("indexer", "wide-prefill", _all(_wide(2, 3), _same_dtype(0, 1, what="h")))(
    attention.fused_indexer(attention.indexer_topk, lin=wide.linear))
CPU.add("indexer", "decode", _phase("decode"))(attention.fused_indexer(attention.indexer_topk_decode))
CPU.add("indexer", "blocked")(attention.fused_indexer(attention.indexer_topk))

# ---- mHC: x (, y, post, comb), fn, base, scale, norm_w ---------------------------------------


def _streams(call: Call) -> str | None:
    n = call.types[0].shape[2]
    return None if isinstance(n, int) and n <= _MAX_STREAMS else f"{n} streams (the C helpers take at most " \
                                                                        f"{_MAX_STREAMS})"


CPU.add("hc_pre", "native", _native(_float(0, "x"), _streams))(mhc.hc_pre_native)
CPU.add("hc_pre", "small", _phase("decode"))(mhc.hc_pre_small)
CPU.add("hc_pre", "streamed")(mhc.hc_pre_streamed)
for _op in ("hc_post_pre", "hc_head"):
    CPU.add(_op, "native", _native(_float(0, "x"), _same_dtype(0, 1, what="y"), _streams))(
        getattr(mhc, f"{_op}_native"))
CPU.add("hc_post_pre", "small", _phase("decode"))(mhc.hc_post_pre_small)
CPU.add("hc_post_pre", "streamed")(mhc.hc_post_pre_streamed)
CPU.add("hc_head", "streamed", _phase("prefill"))(mhc.hc_head_streamed)  # a decode step: the reference's few ops

# ---- MoE: h, idx, w, perm, offsets, w13, w2 (, sg, su, sd) ----------------------------------


def _plain_weights(*which: int):
    def check(call: Call) -> str | None:
        idx = [i for i in which if i < len(call.types)]
        if call.quantized(*idx):
            return "quantised expert weights"
        return _same_dtype(0, *idx, what="an expert weight")(call)
    return check


def _moe(fn):
    """Bound with the model's weight views, the re-layouts made now rather than on a first call."""
    def bind(call: Call, views: WeightViews):
        ws = [v for v in call.values[5:] if v is not None]
        if ws and all(isinstance(w, torch.Tensor) for w in ws):
            moe.prepare(views, *ws)
        return partial(fn, views=views)
    return bind


CPU.add("moe_ffn", "native-decode", _native(_phase("decode"), _plain_weights(5, 6, 7, 8, 9), _dots_isa))(
    moe.moe_native)


def _quant_experts(call: Call) -> str | None:
    """Routed experts quantised (both of one format); the shared expert, if any, all quantised in one format
    or all of the activations' dtype."""
    routed = {call.dtype(5), call.dtype(6)}
    if len(routed) != 1 or not routed <= QUANT_DTYPES:
        return f"routed expert weights are {'/'.join(sorted(map(str, routed)))} (this path takes f8e4m3 or mxfp4)"
    shared = {call.dtype(i) for i in (7, 8, 9) if i < len(call.types)}
    if len(shared) > 1 or not shared <= QUANT_DTYPES | {call.dtype(0)}:
        return (f"shared expert weights are {'/'.join(sorted(map(str, shared)))} (one quantised format, or the "
                f"activations' {call.dtype(0)})")
    return None


# prefill calls too: one expert at a time through weights.linear is 10-40x slower at 64-256 tokens here
CPU.add("moe_ffn", "native-quant", _native(_float(0, "h"), _quant_experts,
                                            _q_contiguous(5, 6, 7, 8, 9), _quant_isa))(moe.moe_native_q)
CPU.add("moe_ffn", "decode", _all(_phase("decode"), _plain_weights(5, 6, 7, 8, 9)), bind=_moe(moe.moe_decode))(
    moe.moe_decode)


def _avx512_bf16(call: Call) -> str | None:
    """bf16 activations on a CPU whose bf16 arithmetic is AVX512-BF16 (measured there); AMX's tiles, which
    PyTorch's GEMMs use where a CPU has them, are several times its multiply-adds a cycle and not measured."""
    if call.dtype(0) != "bf16":
        return f"activations are {call.dtype(0)} (this path is bf16's)"
    have = wide.native_bf16()
    return None if have == "avx512_bf16" else f"this CPU's bf16 arithmetic is {have or 'none'}, not avx512_bf16"


_moe_c_prefill = _native(_phase("prefill"), _plain_weights(5, 6, 7, 8, 9), _dots_isa, _slow_half_gemm)
# a bf16 prefill on AVX512-BF16: the C kernel for its small calls, PyTorch's bf16 GEMMs for the long ones
CPU.add("moe_ffn", "native-bf16-prefill", _native(_phase("prefill"), _plain_weights(5, 6, 7, 8, 9), _dots_isa,
                                                   _avx512_bf16), bind=_moe(moe.moe_prefill_bf16))(moe.moe_prefill_bf16)
_moe_c_wide = partial(moe.moe_prefill, mm=wide.expert_mm, lin=wide.linear)  # beyond the C kernel's share
CPU.add("moe_ffn", "native-wide-prefill", _all(_moe_c_prefill, _wide(5, 6)), bind=_moe(_moe_c_wide))(_moe_c_wide)
CPU.add("moe_ffn", "native-prefill", _moe_c_prefill, bind=_moe(moe.moe_prefill))(moe.moe_prefill)
_moe_wide = partial(moe.moe_grouped, mm=wide.expert_mm, lin=wide.linear)
CPU.add("moe_ffn", "wide-prefill", _all(_wide(5, 6), _plain_weights(5, 6, 7, 8, 9)), bind=_moe(_moe_wide))(_moe_wide)
CPU.add("moe_ffn", "grouped", _plain_weights(5, 6), bind=_moe(moe.moe_grouped))(moe.moe_grouped)
CPU.add("moe_ffn", "per-expert")(moe.moe_per_expert)

# ---- projections and the rest ----------------------------------------------------------------

CPU.add("linear", "native-decode", _gemv(1))(dense.linear)
CPU.add("linear", "native-quant", _qgemv(1))(dense.qgemv)
CPU.add("linear", "wide-prefill", _wide(1))(wide.linear)
CPU.add("o_proj", "native-decode", _gemv(1, 2))(dense.o_proj)
CPU.add("o_proj", "native-quant", _qgemv(1, 2))(dense.q_o_proj)
CPU.add("o_proj", "wide-prefill", _wide(1, 2))(wide.o_proj)
CPU.add("q_proj", "native-decode", _gemv(1))(partial(projections.q_proj_native, lin=dense.gemv, one_call=True))
CPU.add("q_proj", "native-quant", _qgemv(1))(partial(projections.q_proj_native, lin=dense.qgemv))
CPU.add("q_proj", "wide-prefill", _all(_wide(1), _library))(partial(projections.q_proj_native, lin=wide.linear))
CPU.add("q_proj", "native", _native(_float(0, "x")))(projections.q_proj_native)
CPU.add("q_proj", "torch")(projections.q_proj)
CPU.add("kv_proj", "native-decode", _all(_gemv(1), _float(2, "norm_w")))(
    partial(projections.kv_proj_native, lin=dense.gemv, one_call=True))
CPU.add("kv_proj", "native-quant", _all(_qgemv(1), _float(2, "norm_w")))(
    partial(projections.kv_proj_native, lin=dense.qgemv))
CPU.add("kv_proj", "wide-prefill", _all(_wide(1), _library, _float(2, "norm_w")))(
    partial(projections.kv_proj_native, lin=wide.linear))
CPU.add("kv_proj", "native", _native(_float(0, "x"), _float(2, "norm_w")))(projections.kv_proj_native)
CPU.add("kv_proj", "torch")(projections.kv_proj)
CPU.add("linear_rms_norm", "native-decode", _all(_gemv(1), _float(2, "norm_w")))(dense.linear_rms_norm)
CPU.add("linear_rms_norm", "native-quant", _all(_qgemv(1), _float(2, "norm_w")))(dense.q_linear_rms_norm)
CPU.add("linear_rms_norm", "wide-prefill", _wide(1))(wide.linear_rms_norm)
CPU.add("linear_rms_norm", "torch")(linear_norm.linear_rms_norm)
CPU.add("moe_router", "native-decode", _all(_gemv(1), _route_table))(router.moe_router_step)
CPU.add("moe_router", "native-quant", _all(_qgemv(1), _phase("decode"), _route_table))(
    partial(router.moe_router_c, lin=dense.qgemv))
CPU.add("moe_router", "native-quant-prefill", _qgemv(1))(partial(router.moe_router, lin=dense.qgemv))
CPU.add("moe_router", "wide-prefill", _wide(1))(partial(router.moe_router, lin=wide.linear))
CPU.add("moe_router", "torch")(router.moe_router)
CPU.add("rope", "torch")(rope.rope)


def _fp32_pending(call: Call) -> str | None:
    bad = [call.dtype(i) for i in (6, 7) if call.dtype(i) != "f32"]
    return f"pending slots are {bad[0]} (this path pools exactly what fp32 slots hold)" if bad else None


CPU.add("compressor", "native-decode", _all(_gemv(1, 2), _fp32_pending, _norm_weight))(
    partial(compressor.compressor_c, lin=dense.gemv, one_call=True))
CPU.add("compressor", "native-quant", _all(_qgemv(1, 2), _phase("decode"), _fp32_pending, _norm_weight))(
    partial(compressor.compressor_c, lin=dense.qgemv))
CPU.add("compressor", "native-quant-prefill", _all(_qgemv(1, 2), _fp32_pending))(
    partial(compressor.compressor_prefill, lin=dense.qgemv))
CPU.add("compressor", "decode", _all(_phase("decode"), _fp32_pending))(compressor.compressor)
CPU.add("compressor", "native-wide-prefill", _all(_wide(1, 2), _library, _fp32_pending))(
    partial(compressor.compressor_prefill, lin=wide.linear))
CPU.add("compressor", "wide-prefill", _wide(1, 2))(partial(compressor.compressor, lin=wide.linear))
CPU.add("compressor", "native-prefill", _native(_phase("prefill"), _float(0, "h"), _fp32_pending))(
    compressor.compressor_prefill)
