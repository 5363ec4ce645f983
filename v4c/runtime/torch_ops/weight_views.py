"""Tensors derived from a weight once and reused by every call: transposed views (so a decode step's
``torch.mm`` needs no per-call ``t()`` / ``select``) and, within a byte budget, concatenations of
weights that one GEMM can read together.

The caches are keyed by the weight's identity and an entry goes when its weight does. The views
share the weight's storage but not the tensor: a view made by indexing would hold the weight
itself through its base and keep the entry (and the weight) alive forever.
"""
from __future__ import annotations

import threading
import weakref

import torch

CONCAT_BUDGET = 256 << 20  # bytes of cached concatenated copies, all weights together


class PerWeight:
    """A dict keyed by a tensor's identity (a WeakKeyDictionary would compare tensors with ``==``,
    which is elementwise); ``on_drop(value)`` runs when the tensor dies."""

    def __init__(self, on_drop=None):
        self._d: dict = {}
        self._on_drop = on_drop

    def get(self, t: torch.Tensor):
        hit = self._d.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def __setitem__(self, t: torch.Tensor, value) -> None:
        key, d, on_drop = id(t), self._d, self._on_drop

        def drop(_):
            gone = d.pop(key, None)
            if gone is not None and on_drop is not None:
                on_drop(gone[1])

        d[key] = (weakref.ref(t, drop), value)

    def __len__(self) -> int:
        return len(self._d)


def _view(w: torch.Tensor, offset: int, size, stride) -> torch.Tensor:
    return torch.empty(0, dtype=w.dtype, device=w.device).set_(w.untyped_storage(), offset, size, stride)


_transposed = PerWeight()


def transposed(w: torch.Tensor):
    """``w.T`` for a 2-D ``[N, K]`` weight; for a stacked ``[E, N, K]`` one, the tuple of ``w[e].T``."""
    hit = _transposed.get(w)
    if hit is None:
        n, k = w.shape[-2:]
        sn, sk = w.stride()[-2:]
        if w.dim() == 2:
            hit = _view(w, w.storage_offset(), (k, n), (sk, sn))
        elif w.dim() == 3:
            hit = tuple(_view(w, w.storage_offset() + e * w.stride(0), (k, n), (sk, sn)) for e in range(w.shape[0]))
        else:
            raise ValueError(f"transposed: expected a 2-D or stacked 3-D weight, got shape {tuple(w.shape)}")
        _transposed[w] = hit
    return hit


_concat_bytes = [0]


def _release(value) -> None:
    _concat_bytes[0] -= value[1].nbytes


_concats = PerWeight(_release)
_concat_lock = threading.Lock()


def rows_concat_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``cat((a, b)).T`` of two ``[N_i, K]`` weights, made once per pair; None once the budget is spent
    (the copy doubles those weights' memory) or when ``a`` was already paired with another ``b``."""
    hit = _concats.get(a)
    if hit is not None:
        return hit[1] if hit[0]() is b else None
    # sessions in other threads may ask for the same pair at once: one copy, counted once (a budget
    # over-counted by a lost race would refuse later pairs and change which path they take)
    with _concat_lock:
        hit = _concats.get(a)
        if hit is not None:
            return hit[1] if hit[0]() is b else None
        if _concat_bytes[0] + a.nbytes + b.nbytes > CONCAT_BUDGET:
            return None
        both_t = torch.cat((a, b)).t()
        _concat_bytes[0] += both_t.nbytes
        _concats[a] = (weakref.ref(b), both_t)
        return both_t
