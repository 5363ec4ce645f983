"""How each state buffer of a session is indexed by token position, for code that copies or rewinds
one sequence's state (prefix snapshots, speculative decoding's rewind).

Every state buffer is ``[B, S, ...]``: rows (sequences) outermost, then a slot dimension that is one of
two kinds:

- a **ring** of ``S`` slots, where the token at position ``p`` lands in slot ``p % S`` (the sliding
  window's KV and its positions; the compressors' pending, not yet pooled, projections);
- **rows** of a compressed sequence (``S = L / ratio``), where row ``r`` is written once, when the token
  at position ``(r + 1) * ratio - 1`` completes its window; a sequence of ``n`` tokens holds rows
  ``0 .. n // ratio - 1`` and the rest stay at their fill value.

Not every slot of a ring is read again: the window attends to the last ``ring`` tokens, but a
compressor pools only the tokens of its unfinished window (and, when its windows overlap, the complete
window before it), so its older slots are stale. ``live_positions`` says which positions' slots a
later call can read: what a copy of the sequence needs.

The buffers of an empty row hold their fill value: -1 for integer buffers (an empty ring slot), 0 else.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph.analysis import _grows_with_context, state_kind


@dataclass(frozen=True)
class StateLayout:
    name: str
    kind: str  # signature.STATE_KINDS: window, compressed_rows, indexer_keys, compressor_state
    ratio: int | None  # rows: row r holds tokens r*ratio .. (r+1)*ratio-1 (None for a ring)
    ring: int | None  # ring: slots, token p in slot p % ring (None for rows)
    pool: int | None = None  # a compressor's pending ring: the ratio of the compressor that pools it

    def live_rows(self, length: int) -> int:
        """The slots a sequence of ``length`` tokens has written: complete rows, or filled ring slots."""
        if self.ratio is not None:
            return length // self.ratio
        return min(length, self.ring)

    def slot(self, position: int) -> int | None:
        """The slot that the token at ``position`` writes: its ring slot, or, for rows, the row it
        completes (None when that token completes no row)."""
        if self.ring is not None:
            return position % self.ring
        return (position + 1) // self.ratio - 1 if (position + 1) % self.ratio == 0 else None

    def live_positions(self, length: int) -> range:
        """For a ring: the positions whose slots a sequence of ``length`` tokens may still read (the
        other slots hold stale tokens or the fill value): the last ``ring`` tokens for the window; for
        a compressor's pending slots, the tokens since its last complete window plus, when the ring
        holds more than one window (CSA's overlap), the windows before it that the ring keeps."""
        if self.ring is None:
            raise ValueError(f"state %{self.name} holds compressed rows, not a ring")
        if self.pool is None:
            start = length - self.ring
        else:
            start = length - length % self.pool - (self.ring - self.pool)
        return range(max(0, start), length)


def fill_value(t) -> int:
    """What an empty slot of ``t`` (a tensor or a torch dtype) holds: -1 in the signed integer buffers (an
    empty ring slot's position), 0 in the others (float values, and the bytes of fp8 / fp4 storage)."""
    dtype = t if isinstance(t, torch.dtype) else t.dtype
    return -1 if dtype in (torch.int64, torch.int32) else 0


def _pooling_ratios(graph) -> dict[str, int]:
    """State name -> the ``ratio`` attribute of the op that takes it (the compressors: ``compress`` and
    the fused ``compressor``), which is how long a pending window is."""
    out = {}
    for node in graph.nodes:
        ratio = node.attr.get("ratio")
        if isinstance(ratio, int):
            for i in node.inputs:
                out.setdefault(i, ratio)
    return out


def state_layouts(graph, states: dict[str, torch.Tensor] | None = None) -> dict[str, StateLayout]:
    """Each state buffer's layout, from the graph's declarations (ring sizes from ``states``' shapes
    where given, else from the declared shapes, which are fixed for rings)."""
    out = {}
    ratios = _pooling_ratios(graph)
    for name, t in graph.states:
        m = _grows_with_context(t.shape)
        if m is not None:
            out[name] = StateLayout(name, state_kind(graph, name), ratio=m, ring=None)
        else:
            size = states[name].shape[1] if states is not None else t.shape[1]
            if not isinstance(size, int):
                raise ValueError(f"state %{name}: ring dimension {size!r} is not a fixed size")
            kind = state_kind(graph, name)
            # a pending ring whose compressor is not found is treated as a window: its last `ring`
            # positions, every slot it has, which is always enough
            pool = ratios.get(name) if kind == "compressor_state" else None
            out[name] = StateLayout(name, kind, ratio=None, ring=size, pool=pool)
    return out
