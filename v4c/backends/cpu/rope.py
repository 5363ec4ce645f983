"""RoPE with the rotations looked up in per-(dims, theta, YaRN) tables instead of recomputed per call.

The tables hold ``cos + i sin`` of exactly what ``rope_cos_sin`` computes, and a complex product
rounds each of its two products and their sum once, as the reference's real arithmetic does, so
a lookup is bit-identical to the reference. Tables grow by doubling (one build per session's
positions); the rows a call's positions pick are kept for the next op of the same call, which
reads the same ``pos`` tensor (a decode step rotates q, kv and outputs with them many times).
"""
from __future__ import annotations

import torch

from ...graph.ops.core import rope_cos_sin
from . import native
from .positions import bounds, version

_TABLES: dict = {}
_PICKED: dict = {}  # table key -> (pos, its version, rotations, conjugates or None)


def _table(key, need: int, device) -> torch.Tensor:
    table = _TABLES.get(key)
    if table is None or table.shape[0] < need:
        size = max(need, 2 * table.shape[0] if table is not None else 4096)
        cos, sin = rope_cos_sin(torch.arange(size, device=device), key[0], key[1], key[2])
        table = _TABLES[key] = torch.complex(cos, sin)
    return table


def _key(rope_dim: int, theta: float, yarn, device) -> tuple:
    return rope_dim, float(theta), tuple(yarn) if yarn else None, device


def rotations(pos: torch.Tensor, rope_dim: int, theta: float, yarn, inverse: bool = False) -> torch.Tensor:
    """``cos + i sin`` (``inverse``: ``cos - i sin``) at each position, ``[*pos.shape, rope_dim // 2]``."""
    key = _key(rope_dim, theta, yarn, pos.device)
    hit = _PICKED.get(key)
    if hit is None or hit[0] is not pos or hit[1] != version(pos):
        table = _table(key, bounds(pos)[1] + 1, pos.device)
        hit = _PICKED[key] = [pos, version(pos), table[pos.clamp_min(0)], None]
    if not inverse:
        return hit[2]
    if hit[3] is None:
        hit[3] = hit[2].conj().resolve_conj()
    return hit[3]


def rotations_at(positions: list[int], rope_dim: int, theta: float, yarn, device) -> torch.Tensor:
    """``cos + i sin`` at the host-known ``positions`` (non-negative), ``[len(positions), rope_dim // 2]``."""
    table = _table(_key(rope_dim, theta, yarn, device), max(positions) + 1, device)
    return table[torch.tensor(positions, device=device)]


def table(rope_dim: int, theta: float, yarn, device, need: int) -> torch.Tensor:
    """The complex rotations of positions 0 .. at least ``need - 1``, ``[P, rope_dim // 2]``."""
    return _table(_key(rope_dim, theta, yarn, device), need, device)


def cos_sin(pos: torch.Tensor, rope_dim: int, theta: float, yarn) -> tuple[torch.Tensor, torch.Tensor]:
    rot = rotations(pos, rope_dim, theta, yarn)
    return rot.real, rot.imag


def rope_(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, theta: float, yarn=None,
          inverse: bool = False) -> torch.Tensor:
    """RoPE in place on ``x`` (a tensor the caller owns): interleaved pairs of the last ``rope_dim``
    dims as complex numbers, times the rotation."""
    rot = rotations(pos, rope_dim, theta, yarn, inverse)
    if rope_dim and x.dim() in (3, 4) and rot.shape[:2] == x.shape[:2] and native.norm_rope_supported(x, None):
        return native.norm_rope_(x, None, 0.0, rope_dim, rot, norm=False)  # one C call, the same roundings
    if x.dim() == 4:
        rot = rot.unsqueeze(-2)
    tail = x[..., -rope_dim:]
    work = tail.float()  # half types: a copy; fp32: the slice itself, rotated where it lies
    if x.shape[-1] % 2 or not x.is_contiguous():  # a complex view needs even strides and offset
        work = work.contiguous()
    torch.view_as_complex(work.view(*work.shape[:-1], rope_dim // 2, 2)).mul_(rot)
    if work is not tail:
        tail.copy_(work)
    return x


def rope(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, theta: float, yarn=None,
         inverse: bool = False) -> torch.Tensor:
    """The ``rope`` op, on a copy of ``x``."""
    return rope_(x.clone(memory_format=torch.contiguous_format), pos, rope_dim, theta, yarn, inverse)
