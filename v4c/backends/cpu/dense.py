"""A decode step's dense projections through the C kernels (native/linear.c): ``linear`` itself, the
output projection's grouped + dense pair, and the product inside the fused ops that hold one
(``q_proj``, ``kv_proj``, ``linear_rms_norm``, ``compressor``, ``indexer``, ``moe_router``), which take it
as their ``lin`` argument.

A decode call's projection is one to sixteen token rows against a weight read once: the C kernel
streams each weight row once for every row of the call, where PyTorch's small-M GEMM (bf16
especially, on CPUs without AVX512-BF16) runs far below the memory's rate. The registry binds these
only for decode calls whose activations and weights are fp32 or bf16 of one dtype, on a CPU with one
of the kernels' instruction sets; results equal the GEMM's up to the order of the fp32 sums.
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
    """Per group the low-rank product (one C call for every group), then the dense one."""
    z = native.linear(reshape(o, shape).contiguous(), wa, groups)
    return gemv(reshape(z, out_shape), wb)


def linear_rms_norm(x, w, norm_w, *, eps):
    """The product, then the RMSNorm in place in C (norm_rope.c without RoPE): one call for what
    PyTorch does in three (widen, norm, round), each a dispatch that costs more than its 512 values."""
    norm_w = norm_w if norm_w.is_contiguous() else norm_w.contiguous()
    return native.norm_rope_(gemv(x, w), norm_w, eps, 0, None)
