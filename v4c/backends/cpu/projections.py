"""Projections with their RMSNorm + RoPE epilogue: one C pass over the GEMM's output (``*_native``,
where the C helpers are built; ``lin``: the product, a decode call's C one from ``dense``), else the
norm and the table-driven RoPE in PyTorch."""
from __future__ import annotations

from ...graph.ops.core import linear, reshape, rms_norm
from . import native
from .rope import rope_, rotations


def q_proj_native(x, w, pos, *, shape, eps, rope_dim, theta, yarn=None, lin=linear, one_call=False):
    """``one_call`` (a decode call's plain product, ``lin`` = dense.gemv): the product and the epilogue in one
    C call (``linear_norm_rope``), one trip through Python instead of two."""
    rot = rotations(pos, rope_dim, theta, yarn)
    if one_call and x.dim() == 3 and len(shape) == 4 and not isinstance(shape[2], str):  # [B, T, heads, d]
        return native.linear_norm_rope(x, w, shape[2], None, eps, rope_dim, rot)
    y = reshape(lin(x, w), shape).contiguous()  # a fresh tensor: the epilogue works in place
    return native.norm_rope_(y, None, eps, rope_dim, rot)


def q_proj(x, w, pos, *, shape, eps, rope_dim, theta, yarn=None):
    y = reshape(linear(x, w), shape)
    return rope_(rms_norm(y, eps=eps), pos, rope_dim, theta, yarn)


def kv_proj_native(x, w, norm_w, pos, *, eps, rope_dim, theta, yarn=None, lin=linear, one_call=False):
    rot = rotations(pos, rope_dim, theta, yarn)
    if one_call:  # as q_proj_native's
        return native.linear_norm_rope(x, w, 0, norm_w, eps, rope_dim, rot)
    y = lin(x, w).contiguous()
    norm_w = norm_w if norm_w.is_contiguous() else norm_w.contiguous()
    return native.norm_rope_(y, norm_w, eps, rope_dim, rot)


def kv_proj(x, w, norm_w, pos, *, eps, rope_dim, theta, yarn=None):
    y = linear(x, w)
    return rope_(rms_norm(y, norm_w, eps=eps), pos, rope_dim, theta, yarn)
