"""A decode step's dense projections through the C kernels (native/linear.c): ``linear`` itself, the
output projection's grouped + dense pair, and the product inside the fused ops that hold one
(``q_proj``, ``kv_proj``, ``linear_rms_norm``, ``compressor``, ``indexer``, ``moe_router``), which take it
as their ``lin`` argument.

A decode call's projection is one to sixteen token rows against a weight read once: the C kernel
streams each weight row once for every row of the call, where PyTorch's small-M GEMM (bf16
especially, on CPUs without AVX512-BF16) runs far below the memory's rate. The registry binds these
only for decode calls whose activations and weights are fp32, bf16 or fp16 of one dtype, on a CPU with one
of the kernels' instruction sets; results equal the GEMM's up to the order of the fp32 sums.

``qgemv`` and the ``q_*`` variants take the release's quantised weights (FP8 128x128 blocks, MXFP4) as
stored (native/quant.c): the registry binds them to decode calls with such weights, where the reference
path would dequantise every weight tile per call.
"""
from __future__ import annotations

from ...graph.ops.core import reshape
from . import native


def gemv(x, w):
    """``x @ w.T`` for a decode call's rows."""
    return native.linear(x if x.is_contiguous() else x.contiguous(), w)


def linear(x, w):
    return gemv(x, w)


def o_proj(o, wa, wb, *, shape, groups, out_shape):
    """Per group the low-rank product, then the dense one: one C call for both (``o_proj_step``, which also
    views the heads ``[..., H, D]`` as ``[..., groups, K]`` when ``shape`` is that view)."""
    lead = sum(isinstance(d, str) for d in out_shape)  # (``reshape``'s rule: symbolic leading dims are kept)
    if not (sum(isinstance(d, str) for d in shape) == lead and len(shape) == lead + 2 and shape[lead] == groups
            and o.is_contiguous()):
        o = reshape(o, shape).contiguous()
    return native.o_proj_step(o, wa, groups, wb, lead, list(out_shape[lead:]))


def qgemv(x, w):
    """``gemv`` where ``w`` may be a quantised weight (FP8 / MXFP4: native/quant.c, as ``weights.linear``
    computes it); a plain one takes ``gemv``."""
    if getattr(w, "fmt", None) is None:
        return gemv(x, w)
    return native.qlinear(x if x.is_contiguous() else x.contiguous(), w)


def q_o_proj(o, wa, wb, *, shape, groups, out_shape):
    """``o_proj`` with either weight possibly quantised."""
    x = reshape(o, shape).contiguous()
    z = native.qlinear(x, wa, groups) if getattr(wa, "fmt", None) else native.linear(x, wa, groups)
    return qgemv(reshape(z, out_shape), wb)


def q_linear_rms_norm(x, w, norm_w, *, eps):
    norm_w = norm_w if norm_w.is_contiguous() else norm_w.contiguous()
    return native.norm_rope_(qgemv(x, w), norm_w, eps, 0, None)


def linear_rms_norm(x, w, norm_w, *, eps):
    """The product, then the RMSNorm in place in C (norm_rope.c without RoPE), in one C call
    (``linear_norm_rope``) for what PyTorch does in four (product, widen, norm, round), each a dispatch
    that costs more than its 512 values."""
    return native.linear_norm_rope(x, w, 0, norm_w, eps, 0, None)
