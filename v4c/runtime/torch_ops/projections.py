"""Projections whose RoPE epilogue reads the cached cos/sin tables."""
from __future__ import annotations

from ...graph.ops.core import linear, reshape, rms_norm
from .rope import rope_


def q_proj(x, w, pos, *, shape, eps, rope_dim, theta, yarn=None):
    return rope_(rms_norm(reshape(linear(x, w), shape), eps=eps), pos, rope_dim, theta, yarn)  # a fresh tensor


def kv_proj(x, w, norm_w, pos, *, eps, rope_dim, theta, yarn=None):
    return rope_(rms_norm(linear(x, w), norm_w, eps=eps), pos, rope_dim, theta, yarn)
