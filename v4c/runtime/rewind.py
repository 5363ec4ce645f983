"""Taking back the last tokens of a call, exactly: what speculative decoding needs after a verify step
whose drafts were only partly accepted.

Before a call that appends ``counts[b]`` tokens to row ``b`` (positions ``start[b] ..``), ``RewindPoint``
copies every state slot those tokens will write (``state_layout.py``): the ring slots of their positions
(window KV and positions, compressors' pending projections) and the compressed rows / indexer keys they
complete. ``restore(keep)`` puts the copies back for the tokens past the first ``keep[b]`` of each row,
which leaves every buffer bit for bit as a session that never saw those tokens holds it: a rejected
token's ring slot gets its earlier value back, a row it completed gets its unwritten value back.

That needs the call's tokens to write distinct slots, so a ring must hold at least as many slots as
one call appends (the real V4 rings hold 128 window rows and 8 or 128 pending slots; a verify step
appends at most 4 tokens): a shorter ring is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .state_layout import StateLayout


def _slots(layout: StateLayout, pos: torch.Tensor) -> torch.Tensor:
    """The slot each position writes in a buffer of ``layout`` (-1: none; ``pos`` < 0 is padding)."""
    if layout.ring is not None:
        s = pos % layout.ring
    else:
        s = torch.where((pos + 1) % layout.ratio == 0, (pos + 1) // layout.ratio - 1, torch.full_like(pos, -1))
    return s.masked_fill(pos < 0, -1)


@dataclass
class RewindPoint:
    start: torch.Tensor  # [B] each row's length before the call
    counts: torch.Tensor  # [B] tokens the call appends to each row
    slots: dict  # (ring, ratio) -> [B, t]: the slot each of the call's tokens writes (-1: none)
    saved: list  # (state name, its (ring, ratio), copies [B, t, ...] of those slots before the call)

    @classmethod
    def take(cls, states: dict[str, torch.Tensor], layouts: dict[str, StateLayout], start: torch.Tensor,
             counts: torch.Tensor) -> "RewindPoint":
        start, counts = start.clone(), counts.to(start.device, torch.int64)
        t = int(counts.max()) if counts.numel() else 0
        steps = torch.arange(t, device=start.device)
        pos = torch.where(steps[None, :] < counts[:, None], start[:, None] + steps[None, :], -1)
        rows = torch.arange(start.shape[0], device=start.device)[:, None]
        by_layout: dict = {}  # buffers indexed alike share their slot computation
        saved = []
        for name, layout in layouts.items():
            if layout.ring is not None and layout.ring < t:
                raise ValueError(f"state %{name} is a ring of {layout.ring} slots, fewer than the {t} tokens of one "
                                 f"call: taking them back would need slots they overwrote")
            key = (layout.ring, layout.ratio)
            if key not in by_layout:
                by_layout[key] = _slots(layout, pos)
            saved.append((name, key, states[name][rows, by_layout[key].clamp(min=0)]))  # advanced indexing: a copy
        return cls(start, counts, by_layout, saved)

    def restore(self, states: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
        """Undo, in place, every token of the call past the first ``keep[b]`` of row ``b``; returns the
        rows' lengths afterwards."""
        keep = keep.to(self.start.device, torch.int64)
        if bool(((keep < 0) | (keep > self.counts)).any()):
            raise ValueError(f"keep must hold, per row, 0..the tokens the call appended ({self.counts.tolist()}), "
                             f"got {keep.tolist()}")
        if self.saved and bool((keep < self.counts).any()):
            t = next(iter(self.slots.values())).shape[1]
            undo = torch.arange(t, device=keep.device)[None, :] >= keep[:, None]
            where = {}
            for key, slots in self.slots.items():
                b, j = (undo & (slots >= 0)).nonzero(as_tuple=True)
                where[key] = (b, j, slots[b, j])
            for name, key, copies in self.saved:
                b, j, s = where[key]
                if b.numel():
                    states[name][b, s] = copies[b, j]
        return self.start + keep
