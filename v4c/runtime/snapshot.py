"""A copy of one sequence's decode state, enough to continue it in another row or another process.

A sequence of ``length`` tokens is resumable from (architecture B.1): the compressed rows and
indexer keys it has completed, the window ring's last tokens, and the compressors' pending slots
(the tokens of the unfinished window; CSA also the window before, for its overlap). A snapshot holds
exactly those, split so that most of the bytes can be shared:

- ``blocks``: per whole 256-token block (the unit in which sessions plan their buffers and the
  prefix cache keys its entries), the rows that block's tokens completed. A block depends only on
  the tokens up to its end, so every snapshot of a sequence that starts with those tokens can hold
  the same ``Block`` object: the prefix cache passes the ones it has (``reuse``) and only new ones
  are copied.
- ``tail``: the rows of the last, partial block, and for each ring the slots still live at
  ``length`` (``StateLayout.live_positions``), oldest first. At a block boundary of V4-Flash this is
  the window (128 tokens) and CSA's previous window; HCA's pending window is empty there.

Restoring into an empty row writes those slots and nothing else: every slot a later call can read
is then bit for bit the original's; stale ring slots (never read again) stay at their fill value.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from ..graph.analysis import BLOCK_TOKENS
from .state_layout import StateLayout, state_layouts


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass(frozen=True, eq=False)
class Block:
    """The rows that the ``i``-th 256-token block of a sequence completed, per rows buffer (its rows
    ``i * 256 // ratio`` to ``(i + 1) * 256 // ratio - 1``). Never written after it is made."""
    rows: Mapping[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.rows)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """One sequence at ``length`` tokens (``Session.snapshot``; ``Session.restore`` continues it)."""
    length: int
    blocks: tuple[Block, ...]  # length // 256 of them
    tail: Mapping[str, torch.Tensor]

    @property
    def tail_nbytes(self) -> int:
        return _nbytes(self.tail)

    @property
    def nbytes(self) -> int:
        """Bytes held, shared blocks counted once per snapshot."""
        return self.tail_nbytes + sum(b.nbytes for b in self.blocks)


def block_rows(layout: StateLayout, block: int, block_tokens: int = BLOCK_TOKENS) -> range:
    """The rows of a rows buffer that block ``block`` completes (rows complete at their last token)."""
    return range(block * block_tokens // layout.ratio, (block + 1) * block_tokens // layout.ratio)


def _tail_slots(layout: StateLayout, length: int, block_tokens: int) -> tuple[range | list[int], bool]:
    """Where the tail's entries of ``layout`` live in the buffer: (rows, True) or (ring slots, False)."""
    if layout.ratio is not None:
        return range(length // block_tokens * block_tokens // layout.ratio, length // layout.ratio), True
    return [p % layout.ring for p in layout.live_positions(length)], False


def _rows(buf: torch.Tensor, r: range) -> torch.Tensor:
    return buf[r.start:r.stop]


def take(states: dict[str, torch.Tensor], layouts: dict[str, StateLayout], row: int, length: int,
         reuse: Sequence[Block | None] = ()) -> Snapshot:
    """Copies row ``row`` (holding ``length`` tokens) out of ``states``; ``reuse[i]``, where given, stands
    for block ``i`` (the caller vouches that it holds this very prefix's rows)."""
    rows = [lay for lay in layouts.values() if lay.ratio is not None]
    blocks = []
    for i in range(length // BLOCK_TOKENS):
        b = reuse[i] if i < len(reuse) else None
        if b is None:
            b = Block(MappingProxyType({lay.name: _rows(states[lay.name][row], block_rows(lay, i)).clone()
                                        for lay in rows}))
        blocks.append(b)
    tail = {}
    for lay in layouts.values():
        where, contiguous = _tail_slots(lay, length, BLOCK_TOKENS)
        buf = states[lay.name][row]
        if contiguous:
            tail[lay.name] = _rows(buf, where).clone()
        else:  # index_select copies
            tail[lay.name] = buf.index_select(0, torch.tensor(where, dtype=torch.int64, device=buf.device))
    return Snapshot(length, tuple(blocks), MappingProxyType(tail))


def check(snap: Snapshot, states: dict[str, torch.Tensor], layouts: dict[str, StateLayout]) -> None:
    """A ``ValueError`` naming the first way ``snap`` does not fit these buffers (another model, another
    cache format, a longer sequence than they hold), before anything is written."""
    if not isinstance(snap, Snapshot):
        raise ValueError(f"expected a Snapshot, got {type(snap).__name__}")
    if len(snap.blocks) != snap.length // BLOCK_TOKENS:
        raise ValueError(f"snapshot of {snap.length} tokens holds {len(snap.blocks)} blocks, "
                         f"not {snap.length // BLOCK_TOKENS}")
    extra = sorted(set(snap.tail) - set(layouts))
    if extra:
        raise ValueError(f"the snapshot holds state %{extra[0]}, which this model does not have: it was taken "
                         f"from another model")

    def fits(name: str, t, n: int, what: str) -> None:
        buf = states[name]
        want = (n, *buf.shape[2:])
        if not isinstance(t, torch.Tensor) or t.dtype != buf.dtype or tuple(t.shape) != want:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"snapshot {what} of state %{name} is {got}; this session's buffer needs "
                             f"{buf.dtype} {want} (another model or cache format?)")

    for lay in layouts.values():
        if lay.ratio is not None and snap.length // lay.ratio > states[lay.name].shape[1]:
            raise ValueError(f"a snapshot of {snap.length} tokens does not fit this session's "
                             f"{states[lay.name].shape[1] * lay.ratio} allocated tokens")
        if lay.name not in snap.tail:
            raise ValueError(f"the snapshot lacks state %{lay.name}: it was taken from another model")
        fits(lay.name, snap.tail[lay.name], len(_tail_slots(lay, snap.length, BLOCK_TOKENS)[0]), "tail")
        if lay.ratio is not None:
            for i, b in enumerate(snap.blocks):
                if lay.name not in b.rows:
                    raise ValueError(f"snapshot block {i} lacks state %{lay.name}: it was taken from another model")
                fits(lay.name, b.rows[lay.name], len(block_rows(lay, i)), f"block {i}")


def put(states: dict[str, torch.Tensor], layouts: dict[str, StateLayout], row: int, snap: Snapshot) -> None:
    """Writes ``snap`` into row ``row`` of ``states``, an empty row (``check`` it first)."""
    for lay in layouts.values():
        buf = states[lay.name][row]
        if lay.ratio is not None:
            for i, b in enumerate(snap.blocks):
                _rows(buf, block_rows(lay, i)).copy_(b.rows[lay.name])
        where, contiguous = _tail_slots(lay, snap.length, BLOCK_TOKENS)
        if contiguous:
            _rows(buf, where).copy_(snap.tail[lay.name])
        elif where:
            idx = torch.tensor(where, dtype=torch.int64, device=buf.device)
            buf.index_copy_(0, idx, snap.tail[lay.name].to(buf.device))


def snapshot_footprint(graph, context: int) -> dict:
    """What the prefix cache holds for one sequence, from the graph alone (``v4c inspect --json
    --context N``'s ``context_cache``): ``block_bytes``, the rows one 256-token block completes;
    ``boundary_state_bytes``, the live ring slots at a block boundary past the window; their sum,
    ``snapshot_bytes_per_block``, is what a cached boundary adds (``bytes_per_token`` = / 256);
    ``prefix_bytes``: every block of ``context`` tokens (rounded down to whole blocks) and one
    boundary's rings, the cost of keeping just the longest boundary."""
    from ..graph.types import DTYPES, eval_dim
    lays = state_layouts(graph)
    block, state = 0, 0
    at = max(BLOCK_TOKENS, -(-max(lay.ring or 0 for lay in lays.values()) // BLOCK_TOKENS) * BLOCK_TOKENS)
    for name, t in graph.states:
        lay = lays[name]
        slot = DTYPES[t.dtype].itemsize
        for d in t.shape[2:]:
            slot *= eval_dim(d, {"B": 1, "L": BLOCK_TOKENS})
        if lay.ratio is not None:
            block += len(block_rows(lay, 0)) * slot
        else:
            state += len(lay.live_positions(at)) * slot
    blocks = context // BLOCK_TOKENS
    return {"block_tokens": BLOCK_TOKENS, "block_bytes": block, "boundary_state_bytes": state,
            "snapshot_bytes_per_block": block + state, "bytes_per_token": (block + state) / BLOCK_TOKENS,
            "prefix_bytes": blocks * block + state, "prefix_tokens": blocks * BLOCK_TOKENS}
