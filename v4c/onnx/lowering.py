"""The registry of lowerings: IR op -> standard ONNX nodes.

A lowering is ``fn(e, ins, outs, types, **attrs)``: ``ins`` are the IR inputs as ``Val``,
``outs`` the names its outputs must get, ``types`` their IR types. Fused ops have no lowering
of their own; they become ``ai.v4c`` functions whose bodies trace their recipes (functions.py).
"""
from __future__ import annotations

from typing import Callable

from ..errors import V4CError
from ..graph.registry import get_op
from .emit import Emitter, Val

LOWER: dict[str, Callable] = {}


def lowers(op: str):
    def deco(fn):
        LOWER[op] = fn
        return fn
    return deco


def lower(e: Emitter, op: str, ins: list[Val], outs: list[str], attrs: dict) -> list[Val]:
    """Emit ``op`` on ``ins`` into ``e`` with outputs named ``outs``; returns them typed."""
    from . import lower_attention, lower_core, lower_mhc, lower_moe  # noqa: F401  (fill LOWER)
    if op not in LOWER:
        raise V4CError(f"export-onnx: op {op!r} has no ONNX lowering")
    types = list(get_op(op).infer([v.type for v in ins], attrs))
    LOWER[op](e, ins, outs, types, **attrs)
    return [Val(n, t) for n, t in zip(outs, types)]
