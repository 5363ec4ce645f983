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

if TYPE_CHECKING:
    from .model import Model


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
    and its logits are meaningless).

    A call that does not finish (an op's error, Ctrl-C, a signal, a timeout raised into it)
    has written part of the states in place; the session then refuses further calls with
    ``SessionBrokenError`` until ``reset()``. A session is used by one thread at a time;
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
        self._busy = threading.Lock()  # held by the call running: a second thread's call is refused
        self.states = {}
        for name, t in model.graph.states:
            fill = -1 if t.dtype in ("i64", "i32") else 0  # -1 marks an empty ring slot
            self.states[name] = torch.full(t.concrete(bindings), fill, dtype=DTYPES[t.dtype], device=model.device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=model.device)
        self._longest = 0  # max(lengths), kept on the host
        self._graph = None
        if model.device.type == "cuda" and model.backend == "triton" and model.cuda_graphs:
            from .cuda_graphs import DecodeGraph
            self._graph = DecodeGraph(model.executor, self.states, batch_size, model.device)

    def reset(self) -> None:
        """Empties every sequence; also makes a session whose forward was interrupted usable again."""
        self._claim()
        try:
            self._broken = "reset() was interrupted"  # cleared only once every buffer is refilled
            for t in self.states.values():
                t.fill_(-1 if not t.is_floating_point() else 0)
            self.lengths.zero_()
            self._longest = 0
            self._broken = None
        finally:
            self._busy.release()

    @property
    def broken(self) -> str | None:
        """Why the session refuses calls until ``reset()`` (None when it is usable)."""
        return self._broken

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

    def _check(self, ids: torch.Tensor, lengths) -> torch.Tensor:
        """Each row's token count for this call; a clear error for anything malformed."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor [batch, tokens], got "
                             f"{getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
        b, t = ids.shape
        if b != self.batch_size:
            raise ValueError(f"ids has batch {b}, the session was created for batch {self.batch_size}")
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
        ends = self.lengths.cpu() + n
        if bool((ends > self.max_context).any()):
            row = int((ends > self.max_context).nonzero()[0])
            raise ValueError(f"row {row} would reach {int(ends[row])} tokens, beyond this session's max_context "
                             f"{self.max_context}")
        return n.to(self.model.device)

    def _plain(self, ids) -> bool:
        """The common call, all of ``ids`` appended to every row, checked in a few host reads (a decode
        step is ~100 ops in all: ``_check``'s two dozen small ones would be a measurable share);
        anything else goes through ``_check`` and its errors."""
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.dtype in (torch.int64, torch.int32)
                and ids.shape[0] == self.batch_size and ids.shape[1] >= 1):
            return False
        lo, hi = (int(v) for v in torch.aminmax(ids))
        return lo >= 0 and hi < self.model.config.vocab_size and self._longest + ids.shape[1] <= self.max_context

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, lengths=None) -> torch.Tensor:
        self._claim()
        try:
            if self._broken is not None:
                raise SessionBrokenError(f"this session's state is incomplete ({self._broken}), so its logits "
                                         f"would be wrong; call reset() to start its sequences again")
            return self._forward(ids, lengths)
        finally:
            self._busy.release()

    def _forward(self, ids: torch.Tensor, lengths) -> torch.Tensor:
        n = None if lengths is None and self._plain(ids) else self._check(ids, lengths)
        dev = self.model.device
        ids = ids.to(dev, torch.int64)
        t = ids.shape[1]
        if n is None:  # every row appends all t tokens
            pos = self.lengths[:, None] + torch.arange(t, device=dev)[None, :]
        else:
            steps = torch.arange(t, device=dev)[None, :]
            pos = torch.where(steps < n[:, None], self.lengths[:, None] + steps, torch.full_like(steps, -1))
            ids = ids.masked_fill(pos < 0, 0)  # padding may hold any value (even past the vocabulary): never read
        # from here the ops update the states in place; a call stopped part-way (an error, Ctrl-C, a signal)
        # leaves some written and lengths not, so the mark is set first and cleared only once all is done
        self._broken = "a forward call did not finish"
        try:
            if self._graph is not None and ids.shape[1] == 1 and lengths is None:
                # a captured CUDA graph, replayed: its output is a static buffer the next replay rewrites,
                # so the caller gets a copy (float() alone returns that very buffer for an f32 model)
                logits = self._graph.run(ids, pos).to(torch.float32, copy=True)
            else:
                (logits,) = self.model.executor.run({"ids": ids, "pos": pos}, self.states)
            self.lengths += t if n is None else n
            self._longest = self._longest + t if n is None else int(self.lengths.max())
        except BaseException as e:
            self._broken = f"a forward call was interrupted by {type(e).__name__}" + (f": {e}" if str(e) else "")
            raise
        self._broken = None
        return logits.float()

    __call__ = forward

