"""Projections with their RMSNorm + RoPE epilogue: one C pass over the GEMM's output where the
C helpers are available, else the norm and the table-driven RoPE in PyTorch."""
from __future__ import annotations

from ...graph.ops.core import linear, reshape, rms_norm
from . import native
from .rope import rope_, rotations


def q_proj(x, w, pos, *, shape, eps, rope_dim, theta, yarn=None):
    y = reshape(linear(x, w), shape)  # a fresh tensor: the epilogue may work in place
    if native.norm_rope_supported(y, None):
        return native.norm_rope_(y, None, eps, rope_dim, rotations(pos, rope_dim, theta, yarn))
    return rope_(rms_norm(y, eps=eps), pos, rope_dim, theta, yarn)


def kv_proj(x, w, norm_w, pos, *, eps, rope_dim, theta, yarn=None):
    y = linear(x, w)
    if native.norm_rope_supported(y, norm_w):
        return native.norm_rope_(y, norm_w, eps, rope_dim, rotations(pos, rope_dim, theta, yarn))
    return rope_(rms_norm(y, norm_w, eps=eps), pos, rope_dim, theta, yarn)
