"""Facts about a call's positions that several ops of the same forward call need.

Every op of a call reads the same ``pos`` tensor; its bounds (and, for a decode-size call, its
values) are read to the host once per call instead of once per op. A tensor is known by its
identity and version counter; inference tensors (a Session's) have no version counter, so those
are trusted not to change in place while in use (a Session makes a new one for every call).
"""
from __future__ import annotations

import torch

SMALL = 64  # up to this many positions the values themselves come to the host (one call)
_LAST: list = [None]  # (pos, its version, lo, hi, values or None)


def version(t: torch.Tensor) -> int:
    """``t``'s in-place version counter (-1 for inference tensors, which have none)."""
    return -1 if t.is_inference() else t._version


def _facts(pos: torch.Tensor):
    last = _LAST[0]
    v = version(pos)
    if last is not None and last[0] is pos and last[1] == v:
        return last
    if pos.numel() == 0:
        facts = (pos, v, -1, -1, [])
    elif pos.numel() <= SMALL:
        vals = pos.reshape(-1).tolist()
        facts = (pos, v, min(vals), max(vals), vals)
    else:
        lo, hi = torch.aminmax(pos)
        facts = (pos, v, int(lo), int(hi), None)
    _LAST[0] = facts  # holding the tensor keeps its identity from being reused by another
    return facts


def bounds(pos: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of the positions (-1 for none)."""
    f = _facts(pos)
    return f[2], f[3]


def values(pos: torch.Tensor) -> list[int] | None:
    """The positions row-major as Python ints, for calls of at most ``SMALL`` tokens (else None)."""
    return _facts(pos)[4]
