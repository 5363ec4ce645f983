"""Tensors derived from a model's weights once, at load, and reused by every call: transposed views
(so a decode step's ``torch.mm`` needs no per-call ``t()`` / ``select``) and, within a byte budget,
concatenations of weights that one GEMM can read together.

One ``WeightViews`` belongs to one loaded model (the cpu backend makes it when the model's nodes
are bound), so two models in a process never share or evict each other's entries. The views
share the weight's storage; the concatenations are copies, counted against the budget.
"""
from __future__ import annotations

import threading

import torch

CONCAT_BUDGET = 256 << 20  # bytes of concatenated copies per model


def _view(w: torch.Tensor, offset: int, size, stride) -> torch.Tensor:
    return torch.empty(0, dtype=w.dtype, device=w.device).set_(w.untyped_storage(), offset, size, stride)


class WeightViews:
    """Re-layouts of one model's weights, keyed by the weight tensor (held here, as the model holds it)."""

    def __init__(self, budget: int = CONCAT_BUDGET):
        self.budget = budget
        self.concat_bytes = 0
        self._transposed: dict = {}  # id(w) -> (w, views)
        self._concats: dict = {}  # id(a) -> (a, b, cat((a, b)).T or None)
        self._lock = threading.Lock()  # sessions in several threads: one copy per pair, counted once

    def transposed(self, w: torch.Tensor):
        """``w.T`` for a 2-D ``[N, K]`` weight; for a stacked ``[E, N, K]`` one, the tuple of ``w[e].T``."""
        hit = self._transposed.get(id(w))
        if hit is not None and hit[0] is w:
            return hit[1]
        n, k = w.shape[-2:]
        sn, sk = w.stride()[-2:]
        if w.dim() == 2:
            views = _view(w, w.storage_offset(), (k, n), (sk, sn))
        elif w.dim() == 3:
            views = tuple(_view(w, w.storage_offset() + e * w.stride(0), (k, n), (sk, sn)) for e in range(w.shape[0]))
        else:
            raise ValueError(f"transposed: expected a 2-D or stacked 3-D weight, got shape {tuple(w.shape)}")
        self._transposed[id(w)] = (w, views)
        return views

    def rows_concat_t(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """``cat((a, b)).T`` of two ``[N_i, K]`` weights, made once per pair; None once the budget is
        spent (the copy doubles those weights' memory) or when ``a`` was paired with another ``b``."""
        hit = self._concats.get(id(a))
        if hit is None:
            with self._lock:
                hit = self._concats.get(id(a))
                if hit is None:
                    both = None
                    if self.concat_bytes + a.nbytes + b.nbytes <= self.budget:
                        both = torch.cat((a, b)).t()
                        self.concat_bytes += both.nbytes
                    hit = self._concats[id(a)] = (a, b, both)
        return hit[2] if hit[0] is a and hit[1] is b else None
