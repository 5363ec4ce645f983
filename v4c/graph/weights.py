"""Weight products with possibly quantised weights: the one place the reference runtime multiplies by a weight.

A quantised param (IR dtype ``f8e4m3`` or ``mxfp4``) reaches the ops as a ``QuantizedWeight``: its data
and UE8M0 scales exactly as the checkpoint stores them. ``linear`` / ``grouped_linear`` do what the
official inference does around an FP8/FP4 GEMM: quantise the activation per 1x128 block along K to
e4m3 with power-of-two scales, multiply by the weight dequantised tile by tile (a tile of rows at a
time, so no full-precision copy of the weight ever exists), and accumulate in fp32. Unquantised
weights take the plain path, unchanged.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import GraphError
from .types import QUANT_DTYPES, TensorType
from .weight_formats import (FORMATS, MXFP4_BLOCK, dequantize_act_fp8, dequantize_mxfp4, quantize_act_fp8,
                             ue8m0_to_float)

TILE_ROWS = 1024  # output rows dequantised at once (a multiple of the 128-row FP8 block)


def scale_name(weight: str) -> str:
    """The graph param holding a quantised weight's scales (transformers' spelling)."""
    return f"{weight}_scale_inv"


class QuantizedWeight:
    """A quantised weight of logical shape ``[..., N, K]``: ``data`` and ``scale`` as stored in the checkpoint."""

    __slots__ = ("fmt", "data", "scale")

    def __init__(self, fmt: str, data: torch.Tensor, scale: torch.Tensor):
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r} (known: {sorted(FORMATS)})")
        f = FORMATS[fmt]
        if data.dtype != f.storage:
            raise ValueError(f"{fmt} data must be {f.storage}, got {data.dtype}")
        shape = (*data.shape[:-1], data.shape[-1] * f.pack)
        if tuple(scale.shape) != f.scale_shape(shape):
            raise ValueError(f"{fmt} weight {tuple(shape)}: scale has shape {tuple(scale.shape)}, "
                             f"expected {f.scale_shape(shape)}")
        self.fmt, self.data, self.scale = fmt, data, scale

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * FORMATS[self.fmt].pack))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, e: int) -> "QuantizedWeight":
        """Expert ``e`` of a stacked ``[E, N, K]`` weight."""
        return QuantizedWeight(self.fmt, self.data[e], self.scale[e])

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.fmt, self.data.to(device), self.scale.to(device))

    def dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        """float32 rows ``[r0, r1)`` of a 2-D weight, exact."""
        if self.data.dim() != 2:
            raise ValueError(f"dequantize_rows needs a 2-D weight, got {tuple(self.shape)} (index the expert first)")
        if self.fmt == "mxfp4":  # scales are per row: slice both
            return dequantize_mxfp4(self.data[r0:r1], self.scale[r0:r1])
        br, bk = FORMATS[self.fmt].block
        b0 = r0 // br
        s = ue8m0_to_float(self.scale[b0:-(-r1 // br)]).repeat_interleave(br, 0)[r0 - b0 * br:r1 - b0 * br]
        k = self.data.shape[1]
        return self.data[r0:r1].to(torch.float32) * s.repeat_interleave(bk, 1)[:, :k]

    def dequantize(self) -> torch.Tensor:
        """The whole weight in float32 (for tests and tools; the products never build it)."""
        if self.data.dim() > 2:
            return torch.stack([self[e].dequantize() for e in range(self.data.shape[0])])
        return self.dequantize_rows(0, self.data.shape[0])

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.fmt}, shape={tuple(self.shape)})"


def _quantised_act(x: torch.Tensor) -> torch.Tensor:
    """The values an FP8 GEMM multiplies: ``x`` rounded to e4m3 with per-1x128 UE8M0 scales (fp32, exact)."""
    return dequantize_act_fp8(*quantize_act_fp8(x))


def _tiled(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    n = w.shape[0]
    outs = [F.linear(x, w.dequantize_rows(r0, min(r0 + TILE_ROWS, n))) for r0 in range(0, n, TILE_ROWS)]
    return torch.cat(outs, dim=-1) if len(outs) != 1 else outs[0]


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """``x @ w.T`` for ``x [..., K]`` and a weight ``[N, K]`` (a tensor or a QuantizedWeight); result in x's dtype."""
    if not isinstance(w, QuantizedWeight):
        return F.linear(x, w.to(x.dtype))
    return _tiled(_quantised_act(x), w).to(x.dtype)


def grouped_linear(x: torch.Tensor, w, groups: int) -> torch.Tensor:
    """Block-diagonal product: group g of ``x [B, T, G, K]`` times rows [g*R, (g+1)*R) of ``w [G*R, K]``."""
    if not isinstance(w, QuantizedWeight):
        wg = w.to(x.dtype).view(groups, -1, w.shape[1])
        return torch.einsum("btgk,grk->btgr", x, wg)
    xq = _quantised_act(x)
    r = w.shape[0] // groups
    outs = [F.linear(xq[:, :, g], w.dequantize_rows(g * r, (g + 1) * r)) for g in range(groups)]
    return torch.stack(outs, dim=2).to(x.dtype)


def bind_quantized(param_types: Mapping[str, TensorType], params: Mapping[str, torch.Tensor]) -> dict:
    """Params as the ops take them: each quantised weight joined with its scale param into a QuantizedWeight
    (the scale params themselves are dropped: no op reads them directly)."""
    out = dict(params)
    for name, t in param_types.items():
        if t.dtype not in QUANT_DTYPES or isinstance(out.get(name), QuantizedWeight) or name not in out:
            continue
        sname = scale_name(name)
        if sname not in out:
            raise GraphError(f"param %{name} is {t.dtype} but its scale %{sname} was not given")
        out[name] = QuantizedWeight(t.dtype, out[name], out.pop(sname))
    return out


__all__ = ["QuantizedWeight", "linear", "grouped_linear", "bind_quantized", "scale_name", "TILE_ROWS",
           "MXFP4_BLOCK"]
