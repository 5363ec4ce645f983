"""The reference backend: every op runs its PyTorch definition (``v4c/graph/ops``), the one the other
backends are tested against. It accepts every call, so it ends every other backend's fallback chain."""
from __future__ import annotations

from typing import Iterable

from ..graph.registry import OPS
from . import Backend, Impl, reference_impl


class _Reference(Backend):
    def candidates(self, op: str) -> Iterable[Impl]:
        if op in OPS:
            yield reference_impl(op)


REFERENCE = _Reference("reference")
