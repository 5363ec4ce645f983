"""Dense building blocks: embedding, linear maps, norms, RoPE, elementwise ops."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..registry import (Cost, expect, expect_float, expect_int, expect_rank, io_bytes_cost, register,
                        same_dim)
from .. import weights
from ..types import TensorType


def _embedding_infer(ins, a):
    ids, table = ins
    expect_int(ids, "embedding ids")
    expect_rank(ids, 2, "embedding ids")
    expect_rank(table, 2, "embedding table")
    return [TensorType((*ids.shape, table.shape[1]), a.get("dtype", table.dtype))]


@register("embedding", infer=_embedding_infer, operands=("ids", "table:weight"), attrs=("dtype:str?",),
          cost=lambda i, o, a, c: Cost(0, i[0].nbytes + 2 * o[0].nbytes))
def embedding(ids, table, dtype=None):
    """Row lookup ``table[ids]``; padding ids (< 0) read row 0."""
    return F.embedding(ids.clamp_min(0), table)


def _linear_infer(ins, a):
    x, w = ins
    expect_float(x, "linear input")
    expect_rank(w, 2, "linear weight")
    same_dim(x.shape[-1], w.shape[1], "linear: input features vs weight columns")
    return [TensorType((*x.shape[:-1], w.shape[0]), x.dtype)]


def _linear_cost(ins, outs, a, ctx):
    x, w = ins
    m = x.numel // x.shape[-1]
    return Cost(2 * m * w.shape[0] * w.shape[1], x.nbytes + w.nbytes + outs[0].nbytes)


@register("linear", infer=_linear_infer, cost=_linear_cost, operands=("x", "w:weight/gemm"))
def linear(x, w):
    """``x @ w.T`` (weights stored [out, in], as in the checkpoint; quantised ones as in ``weights.linear``)."""
    return weights.linear(x, w)


def _rms_infer(ins, a):
    x = ins[0]
    expect_float(x, "rms_norm input")
    if len(ins) == 2:
        expect_rank(ins[1], 1, "rms_norm weight")
        same_dim(x.shape[-1], ins[1].shape[0], "rms_norm: features vs weight")
    return [x]


@register("rms_norm", infer=_rms_infer, cost=io_bytes_cost(4), operands=("x", "w?:weight"), attrs=("eps:float?",))
def rms_norm(x, w=None, eps=1e-6):
    """RMSNorm over the last dim, in fp32; without a weight it is unweighted."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = w.float() * y
    return y.to(x.dtype)


def _reshape_infer(ins, a):
    x = ins[0]
    shape = tuple(a["shape"])
    lead = sum(isinstance(d, str) for d in shape)
    ok = all(isinstance(d, str) for d in shape[:lead]) and all(isinstance(d, int) for d in shape[lead:])
    # the symbolic dims stand for the input's leading dims (which cost functions see as ints)
    ok = ok and all(s == d or isinstance(d, int) for s, d in zip(shape[:lead], x.shape[:lead]))
    expect(ok and x.rank >= lead, f"reshape {x} -> {list(shape)}: symbolic dims must be the input's leading dims, "
                                  f"in order")
    expect(math.prod(x.shape[lead:]) == math.prod(shape[lead:]), f"reshape {x} -> {list(shape)}: element count differs")
    return [TensorType((*x.shape[:lead], *shape[lead:]), x.dtype)]


@register("reshape", infer=_reshape_infer, cost=lambda i, o, a, c: Cost(0, 0), operands=("x",), attrs=("shape:tuple",),
          launches=0)
def reshape(x, shape):
    """View with new trailing dims (leading symbolic dims are kept)."""
    lead = sum(isinstance(d, str) for d in shape)
    return x.reshape(*x.shape[:lead], *shape[lead:])


def _same_infer(ins, a):
    expect(ins[0] == ins[1], f"{ins[0]} vs {ins[1]}: operand types differ")
    return [ins[0]]


@register("add", infer=_same_infer, cost=io_bytes_cost(1), operands=("a", "b"))
def add(a, b):
    """Elementwise sum."""
    return a + b


@register("swiglu", infer=_same_infer, cost=io_bytes_cost(6), operands=("gate", "up"), attrs=("limit:float",))
def swiglu(gate, up, limit):
    """Clamped SwiGLU: ``silu(min(gate, limit)) * clip(up, -limit, limit)``."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def _grouped_infer(ins, a):
    x, w = ins
    g = a["groups"]
    expect_rank(x, 4, "grouped_linear input")
    same_dim(x.shape[2], g, "grouped_linear: group dim vs groups")
    same_dim(x.shape[3], w.shape[1], "grouped_linear: features vs weight columns")
    expect(w.shape[0] % g == 0, f"grouped_linear: weight rows {w.shape[0]} not divisible by {g} groups")
    return [TensorType((*x.shape[:3], w.shape[0] // g), x.dtype)]


def _grouped_cost(ins, outs, a, ctx):
    x, w = ins
    m = x.numel // (x.shape[2] * x.shape[3])
    return Cost(2 * m * w.shape[0] * w.shape[1], x.nbytes + w.nbytes + outs[0].nbytes)


@register("grouped_linear", infer=_grouped_infer, cost=_grouped_cost, operands=("x", "w:weight/gemm"),
          attrs=("groups:int",))
def grouped_linear(x, w, groups):
    """Block-diagonal projection: group g of ``x`` times rows [g*R, (g+1)*R) of ``w``."""
    return weights.grouped_linear(x, w, groups)


# ---- RoPE -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def rope_inv_freq(rope_dim: int, theta: float, yarn: tuple | None) -> torch.Tensor:
    """Per-pair inverse frequencies; ``yarn`` = (factor, original_len, beta_fast, beta_slow)."""
    inv = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn is None:
        return inv
    factor, orig, beta_fast, beta_slow = yarn

    def corr(rot):  # the pair index whose wavelength makes `rot` turns over `orig` tokens
        return rope_dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp 0 keeps the original frequency, ramp 1 divides it by `factor`
    return inv / factor * ramp + inv * (1 - ramp)


def _rope_infer(ins, a):
    x, pos = ins
    expect_float(x, "rope input")
    expect_int(pos, "rope positions")
    expect(x.rank in (3, 4), f"rope: input must be [B,T,d] or [B,T,H,d], got {x}")
    same_dim(x.shape[0], pos.shape[0], "rope: batch")
    same_dim(x.shape[1], pos.shape[1], "rope: tokens")
    r = a["rope_dim"]
    expect(r % 2 == 0 and isinstance(x.shape[-1], int) and r <= x.shape[-1], f"rope: rope_dim {r} vs {x}")
    return [x]


def rope_cos_sin(pos: torch.Tensor, rope_dim: int, theta: float, yarn) -> tuple[torch.Tensor, torch.Tensor]:
    inv = rope_inv_freq(rope_dim, float(theta), tuple(yarn) if yarn else None).to(pos.device)
    freqs = pos.clamp_min(0).float()[..., None] * inv
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last ``2*cos.shape[-1]`` dims of ``x``."""
    r = 2 * cos.shape[-1]
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    tail = x[..., -r:].float()
    x1, x2 = tail[..., 0::2], tail[..., 1::2]
    rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rot.to(x.dtype)], dim=-1)


@register("rope", infer=_rope_infer, cost=io_bytes_cost(3), operands=("x", "pos"),
          attrs=("rope_dim:int", "theta:float", "yarn:tuple?", "inverse:bool?"))
def rope(x, pos, rope_dim, theta, yarn=None, inverse=False):
    """Interleaved RoPE on the last ``rope_dim`` dims at ``pos`` (``inverse``: rotate by -pos)."""
    cos, sin = rope_cos_sin(pos, rope_dim, theta, yarn)
    return apply_rope(x, cos, -sin if inverse else sin)
