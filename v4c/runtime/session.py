"""A decoding session: preallocated per-sequence state and the forward call."""
from __future__ import annotations

import operator
import threading
from typing import TYPE_CHECKING

import torch

from ..errors import V4CError
from ..graph.analysis import STATE_KINDS, planned_context, state_kind
from ..graph.types import DTYPES
from .free_memory import available_memory, format_bytes
from .state_layout import fill_value

if TYPE_CHECKING:
    from .model import Model
    from .rewind import RewindPoint
    from .snapshot import Snapshot


def _last_only(logits: str) -> bool:
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' (every token's) or 'last' (each row's last token's), got {logits!r}")
    return logits == "last"


class SessionBrokenError(V4CError, RuntimeError):
    """A session whose state buffers an unfinished call left part-written; ``reset()`` makes it usable."""


class SessionMemoryError(V4CError, MemoryError):
    """A session whose state (the memory plan) would not fit in the memory free on its device."""


def _int(name: str, v) -> int:
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {v!r}") from None


class Session:
    """Holds the state buffers of ``batch_size`` sequences of up to ``max_context`` tokens.

    ``forward(ids)`` appends ``ids`` [B, T] to every sequence (a prefill, a prefill chunk
    or a T == 1 decode step) and returns float32 logits [B, T, vocab].  For rows of
    different lengths pass ``lengths`` [B]: row b takes only its first ``lengths[b]``
    tokens of this call (the rest is padding: its ids are never read, any value will do,
    and its logits are meaningless). ``logits="last"`` returns [B, 1, vocab] instead: each
    row's last token of the call (what a prefill needs to go on), and the LM head runs on
    those tokens alone.

    For serving, rows are used independently: ``forward_rows(a, b, ids)`` runs the rows
    ``a..b-1`` alone (``ids`` [b - a, T]; the other rows are neither read nor written, and
    the call costs only its own (b - a) x T token slots), and ``reset_rows(rows)`` empties
    some rows and leaves the others bit for bit as they were.

    A call that does not finish (an op's error, Ctrl-C, a signal, a timeout raised into it)
    has written part of the states in place; the session then refuses further calls with
    ``SessionBrokenError`` until ``reset()``, or until ``reset_rows`` has emptied the rows
    that call was running (``broken_rows``). A session is used by one thread at a time;
    sessions of one model can run in parallel threads.
    """

    def __init__(self, model: "Model", batch_size: int, max_context: int):
        batch_size, max_context = _int("batch_size", batch_size), _int("max_context", max_context)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        limit = model.config.max_position_embeddings
        if not 1 <= max_context <= limit:
            raise ValueError(f"max_context {max_context} is outside 1..{limit} (the model's max_position_embeddings)")
        self.model = model
        self.batch_size = batch_size
        self.max_context = max_context
        # every buffer is allocated here, once, for max_context rounded up to whole 256-token blocks;
        # nothing grows later: a call that would pass max_context is refused
        self.allocated_tokens = planned_context(max_context)
        bindings = {"B": batch_size, "L": self.allocated_tokens}
        # the memory plan, checked before anything is allocated: filling buffers larger than the free
        # memory gets the process OOM-killed (CPU) or fails deep in the allocator, not with this message
        need = sum(t.nbytes(bindings) for _, t in model.graph.states)
        free = available_memory(model.device)
        if free is not None and need > free:
            raise SessionMemoryError(
                f"a session of batch_size {batch_size} x max_context {max_context} needs {format_bytes(need)} of state "
                f"({format_bytes(need // batch_size)} per sequence), more than the {format_bytes(free)} available on "
                f"{model.device}; use a smaller batch_size or max_context")
        self._broken: str | None = None  # why the states cannot be trusted (None: they can)
        self._broken_rows: set[int] = set()  # the rows an unfinished call was running (empty when not broken)
        self._busy = threading.Lock()  # held by the call running: a second thread's call is refused
        self.states = {}
        for name, t in model.graph.states:
            dtype = DTYPES[t.dtype]  # empty: -1 in a ring's positions, 0 elsewhere (state_layout.fill_value)
            self.states[name] = torch.full(t.concrete(bindings), fill_value(dtype), dtype=dtype, device=model.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=model.device)
        self._longest = 0  # max(lengths), kept on the host
        self._state_layouts = None  # how each buffer is indexed by position (snapshot, restore), made on first use
        self.stream = None  # an MTP artifact's main-graph streams before hc_head, of the last call [B, T, n, D]
        self._graph = None
        if model.device.type == "cuda" and model.backend == "triton" and model.cuda_graphs:
            from .cuda_graphs import DecodeGraph
            self._graph = DecodeGraph(model.executor, self.states, batch_size, model.device)

    def reset(self) -> None:
        """Empties every sequence; also makes a session whose forward was interrupted usable again."""
        self._claim()
        try:
            self._broken = "reset() was interrupted"  # cleared only once every buffer is refilled
            self._broken_rows = set(range(self.batch_size))
            for t in self.states.values():
                t.fill_(fill_value(t))
            self.lengths.zero_()
            self._longest = 0
            self._broken, self._broken_rows = None, set()
        finally:
            self._busy.release()

    def _rows(self, rows) -> list[int]:
        """``rows`` (ints, a 1-d integer tensor or a range) as sorted distinct row indices, each checked."""
        if isinstance(rows, torch.Tensor):
            if rows.dim() > 1 or rows.is_floating_point() or rows.dtype == torch.bool:
                raise ValueError(f"rows must be row indices, got a {rows.dtype} tensor of shape {tuple(rows.shape)}")
            rows = rows.reshape(-1).tolist()
        elif isinstance(rows, (int, str, bytes)) or not hasattr(rows, "__iter__"):
            raise ValueError(f"rows must be a sequence of row indices, got {rows!r}")
        out = sorted({_int("row", r) for r in rows})
        bad = [r for r in out if not 0 <= r < self.batch_size]
        if bad:
            raise ValueError(f"rows {bad} are outside 0..{self.batch_size - 1} (this session's batch_size)")
        return out

    def reset_rows(self, rows) -> None:
        """Empties the sequences in ``rows`` (their states and lengths) and nothing else: every other row
        keeps its state bit for bit. Emptying every row a broken call was running (``broken_rows``)
        makes the session usable again."""
        rows = self._rows(rows)
        self._claim()
        try:
            if not rows:
                return
            was = self._broken
            self._broken = "reset_rows() was interrupted"
            self._broken_rows |= set(rows)
            idx = torch.tensor(rows, dtype=torch.int64, device=self.model.device)
            for t in self.states.values():
                t.index_fill_(0, idx, fill_value(t))
            self.lengths.index_fill_(0, idx, 0)
            self._longest = int(self.lengths.max())
            self._broken_rows -= set(rows)
            self._broken = None if not self._broken_rows else was
        finally:
            self._busy.release()

    def snapshot(self, row: int, blocks=()) -> "Snapshot":
        """A copy of sequence ``row``'s state at its current length, enough to continue it in an empty
        row of any session of this model (``restore``): per whole 256-token block its compressed rows
        and indexer keys, then the rest (``v4c.runtime.snapshot``). ``blocks``: ``Block`` objects (or
        None) already held for this very sequence's first blocks, used instead of copies (the prefix
        cache shares them between the snapshots of one prefix)."""
        from .snapshot import take
        (row,) = self._rows([row])
        self._claim()
        try:
            self._refuse_if_broken()
            return take(self.states, self._layouts(), row, int(self.lengths[row]), blocks)
        finally:
            self._busy.release()

    def restore(self, row: int, snapshot: "Snapshot") -> None:
        """Makes the empty row ``row`` (a fresh session's, or after ``reset_rows``) hold the sequence
        ``snapshot`` was taken of: every slot a later call reads is then bit for bit what the original row
        held, so the next calls give the original's logits. A snapshot of another model, cache format
        or a longer sequence than this session allows is refused (``ValueError``) before any write."""
        from .snapshot import check, put
        (row,) = self._rows([row])
        self._claim()
        try:
            self._refuse_if_broken()
            if int(self.lengths[row]) != 0:
                raise ValueError(f"row {row} holds {int(self.lengths[row])} tokens; restore needs an empty row "
                                 f"(reset_rows([{row}]) first)")
            layouts = self._layouts()
            check(snapshot, self.states, layouts)
            if snapshot.length > self.max_context:
                raise ValueError(f"a snapshot of {snapshot.length} tokens is beyond this session's max_context "
                                 f"{self.max_context}")
            self._broken, self._broken_rows = "restore() was interrupted", {row}
            put(self.states, layouts, row, snapshot)
            self.lengths[row] = snapshot.length
            self._longest = max(self._longest, snapshot.length)
            self._broken, self._broken_rows = None, set()
        finally:
            self._busy.release()

    def _layouts(self):
        if self._state_layouts is None:
            from .state_layout import state_layouts
            self._state_layouts = state_layouts(self.model.graph, self.states)
        return self._state_layouts

    def rewind_point(self, counts) -> "RewindPoint":
        """Copies of the state slots that a coming call appending ``counts[b]`` tokens to row ``b`` will
        write, for ``rewind`` to take some of those tokens back (``v4c.runtime.rewind``)."""
        from .rewind import RewindPoint
        return RewindPoint.take(self.states, self._layouts(), self.lengths,
                                torch.as_tensor(counts, dtype=torch.int64, device=self.model.device))

    def rewind(self, point: "RewindPoint", keep) -> None:
        """Keep only the first ``keep[b]`` tokens of row ``b`` of the call ``point`` was taken just before:
        every state buffer and length then equals, bit for bit, a session's that never saw the others
        (speculative decoding's rejected drafts)."""
        keep = torch.as_tensor(keep, dtype=torch.int64, device=self.model.device)
        self._claim()
        try:
            self._refuse_if_broken()
            if not torch.equal(self.lengths, point.start + point.counts):
                raise ValueError("rewind: the session is not where the rewind point's call left it")
            self._broken, self._broken_rows = "rewind() was interrupted", set(range(self.batch_size))
            self.lengths.copy_(point.restore(self.states, keep))
            self._longest = int(self.lengths.max())
            self._broken, self._broken_rows = None, set()
        finally:
            self._busy.release()

    @property
    def broken(self) -> str | None:
        """Why the session refuses calls until ``reset()`` (None when it is usable)."""
        return self._broken

    @property
    def broken_rows(self) -> list[int]:
        """The rows whose state an unfinished call left part-written: ``reset_rows`` of these (or
        ``reset()``) makes the session usable again. Empty when the session is usable."""
        return sorted(self._broken_rows)

    def _claim(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this session is already running a call in another thread; a session serves one "
                               "thread at a time (open one session per thread)")

    def memory(self) -> dict[str, int]:
        """Bytes of state held by the whole batch, by kind (window, compressed_rows, indexer_keys,
        compressor_state) and in total; per sequence it equals ``v4c inspect --json --context
        max_context``'s ``kv_cache.by_kind``."""
        out = dict.fromkeys(STATE_KINDS, 0)
        for name, t in self.states.items():
            out[state_kind(self.model.graph, name)] += t.numel() * t.element_size()
        out["total"] = sum(out.values())
        return out

    def _check(self, ids: torch.Tensor, lengths, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Each row's token count for this call (over the row range ``rows``, all rows when None);
        a clear error for anything malformed. Rows in messages are the session's row numbers."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor [batch, tokens], got "
                             f"{getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
        lo, hi = rows if rows is not None else (0, self.batch_size)
        b, t = ids.shape
        if rows is None and b != self.batch_size:
            raise ValueError(f"ids has batch {b}, the session was created for batch {self.batch_size}")
        if rows is not None and b != hi - lo:
            raise ValueError(f"ids has batch {b}, the row range {lo}:{hi} holds {hi - lo} rows")
        if t < 1:
            raise ValueError("ids must hold at least one token")
        if lengths is None:
            n = torch.full((b,), t, dtype=torch.int64)
        else:
            n = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1).cpu()
            if n.shape[0] != b or bool((n < 0).any()) or bool((n > t).any()):
                raise ValueError(f"lengths must hold {b} values in 0..{t}, got {n.tolist()}")
        valid = torch.arange(t)[None, :] < n[:, None]
        vocab = self.model.config.vocab_size
        bad = valid & ((ids.cpu() < 0) | (ids.cpu() >= vocab))
        if bool(bad.any()):
            r, c = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"token id {int(ids[r, c])} at [{r}, {c}] is outside the vocabulary 0..{vocab - 1}")
        ends = self.lengths[lo:hi].cpu() + n
        if bool((ends > self.max_context).any()):
            row = int((ends > self.max_context).nonzero()[0])
            raise ValueError(f"row {lo + row} would reach {int(ends[row])} tokens, beyond this session's "
                             f"max_context {self.max_context}")
        return n.to(self.model.device)

    def _plain(self, ids, rows: int | None = None) -> bool:
        """The common call, all of ``ids`` appended to every row, checked in a few host reads (a decode
        step is ~100 ops in all: ``_check``'s two dozen small ones would be a measurable share);
        anything else goes through ``_check`` and its errors. ``_longest`` bounds every row's length."""
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.dtype in (torch.int64, torch.int32)
                and ids.shape[0] == (self.batch_size if rows is None else rows) and ids.shape[1] >= 1):
            return False
        lo, hi = (int(v) for v in torch.aminmax(ids))
        return lo >= 0 and hi < self.model.config.vocab_size and self._longest + ids.shape[1] <= self.max_context

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, lengths=None, logits: str = "all") -> torch.Tensor:
        self._claim()
        try:
            self._refuse_if_broken()
            return self._forward(ids, lengths, None, _last_only(logits))
        finally:
            self._busy.release()

    __call__ = forward

    @torch.inference_mode()
    def forward_rows(self, a: int, b: int, ids: torch.Tensor, lengths=None, logits: str = "all") -> torch.Tensor:
        """``forward`` on the rows ``a..b-1`` alone: ``ids`` [b - a, T] (and ``lengths`` [b - a]) are
        appended to those rows, which may each be at its own position; returns float32 logits
        [b - a, T, vocab]. The other rows are neither read nor written. The states of the range are
        views of the session's buffers (rows are the outermost dimension), updated in place.
        ``logits="last"``: [b - a, 1, vocab], each row's last token of the call. A call
        that does not finish leaves the rows it was appending to part-written (``broken_rows``: those
        of ``a..b-1`` with a length > 0; a padding row is never written)."""
        a, b = _int("a", a), _int("b", b)
        if not 0 <= a < b <= self.batch_size:
            raise ValueError(f"row range {a}:{b} is not a non-empty range within 0:{self.batch_size}")
        self._claim()
        try:
            self._refuse_if_broken()
            return self._forward(ids, lengths, (a, b), _last_only(logits))
        finally:
            self._busy.release()

    def _refuse_if_broken(self) -> None:
        if self._broken is not None:
            rows = self.broken_rows
            part = (f" (or reset_rows({rows}), the rows it was running)"
                    if rows and len(rows) < self.batch_size else "")
            raise SessionBrokenError(f"this session's state is incomplete ({self._broken}), so its logits "
                                     f"would be wrong; call reset(){part} to start its sequences again")

    def _forward(self, ids: torch.Tensor, lengths, rows: tuple[int, int] | None = None,
                 last_only: bool = False) -> torch.Tensor:
        whole = rows is None or rows == (0, self.batch_size)
        lo, hi = (0, self.batch_size) if rows is None else rows
        n = (None if lengths is None and self._plain(ids, hi - lo)
             else self._check(ids, lengths, rows))
        dev = self.model.device
        ids = ids.to(dev, torch.int64)
        t = ids.shape[1]
        # a row range runs on views of the buffers: slicing the outermost (row) dimension of a contiguous
        # tensor is itself contiguous, and the ops' in-place updates land in the session's buffers
        states = self.states if whole else {k: v[lo:hi] for k, v in self.states.items()}
        lens = self.lengths if whole else self.lengths[lo:hi]
        if n is None:  # every row appends all t tokens
            pos = lens[:, None] + torch.arange(t, device=dev)[None, :]
        else:
            steps = torch.arange(t, device=dev)[None, :]
            pos = torch.where(steps < n[:, None], lens[:, None] + steps, torch.full_like(steps, -1))
            ids = ids.masked_fill(pos < 0, 0)  # padding may hold any value (even past the vocabulary): never read
        # from here the ops update the states in place; a call stopped part-way (an error, Ctrl-C, a signal)
        # leaves some written and lengths not, so the mark is set first and cleared only once all is done
        self._broken = "a forward call did not finish"
        self._broken_rows = set(range(lo, hi))
        try:
            if self._graph is not None and whole and t == 1 and lengths is None:
                # a captured CUDA graph, replayed: its output is a static buffer the next replay rewrites,
                # so the caller gets a copy (float() alone returns that very buffer for an f32 model)
                logits = self._graph.run(ids, pos).to(torch.float32, copy=True)
                self.stream = None  # a replayed step keeps only the logits
            else:
                last = None
                if last_only and t > 1:  # (one token a row: its logits are the last already)
                    last = (torch.full((ids.shape[0],), t - 1, device=dev) if n is None
                            else (n.to(dev) - 1).clamp(min=0))  # (a padding row: any index will do)
                logits, *stream = self.model.executor.run({"ids": ids, "pos": pos}, states, last=last)
                self.stream = stream[0] if stream else None
            lens += t if n is None else n
            if whole:
                self._longest = self._longest + t if n is None else int(self.lengths.max())
            else:
                self._longest = int(self.lengths.max())
        except BaseException as e:
            self._broken = f"a forward call was interrupted by {type(e).__name__}" + (f": {e}" if str(e) else "")
            if n is not None:  # a padding row (length 0: positions -1) is never written, so it stays intact
                self._broken_rows = {lo + int(r) for r in torch.nonzero(n.cpu() > 0).reshape(-1)} or self._broken_rows
            raise
        self._broken, self._broken_rows = None, set()
        return logits.float()
