"""RoPE with cos/sin looked up in per-(dims, theta, YaRN) tables instead of recomputed per call.

The tables hold exactly what ``rope_cos_sin`` computes (same fp32 products, same cos/sin), so a
lookup is bit-identical to the reference; they grow by doubling, so a session's positions cost
one build each.
"""
from __future__ import annotations

import torch

from ...graph.ops.core import apply_rope, rope_cos_sin

_TABLES: dict = {}


def cos_sin(pos: torch.Tensor, rope_dim: int, theta: float, yarn) -> tuple[torch.Tensor, torch.Tensor]:
    key = (rope_dim, float(theta), tuple(yarn) if yarn else None, pos.device)
    need = int(pos.max()) + 1 if pos.numel() else 1
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] < need:
        size = max(need, 2 * table[0].shape[0] if table is not None else 4096)
        table = rope_cos_sin(torch.arange(size, device=pos.device), rope_dim, theta, yarn)
        _TABLES[key] = table
    p = pos.clamp_min(0)
    return table[0][p], table[1][p]


def rope(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, theta: float, yarn=None,
         inverse: bool = False) -> torch.Tensor:
    cos, sin = cos_sin(pos, rope_dim, theta, yarn)
    return apply_rope(x, cos, -sin if inverse else sin)
