"""The MTP block at run time: its graph bound to its weights (the embedding and LM head are the main
model's own tensors), and the per-sequence state of its sliding window.

``MTPState.forward(ids, hidden, counts)`` appends entries to each row's MTP sequence as
``Session.forward`` appends tokens: entry ``p`` reads the main model's streams at position ``p`` and
the token at ``p + 1`` and runs at position ``p`` (``v4c/model/mtp.py``); rows past their
``counts[b]`` are padding, never written.
"""
from __future__ import annotations

import torch

from ..graph.analysis import planned_context
from ..graph.ir import Graph
from ..graph.types import DTYPES
from .executor import Executor
from .state_layout import state_layouts


class MTPBlock:
    """A loaded MTP graph ready to run (``Model.mtp``)."""

    def __init__(self, graph: Graph, params: dict[str, torch.Tensor], backend, device: torch.device):
        self.graph, self.device = graph, device
        self.executor = Executor(graph, params, backend, device.type)
        self.layouts = state_layouts(graph)  # for rewinding chained drafts

    def new_state(self, batch_size: int, max_context: int) -> "MTPState":
        return MTPState(self, batch_size, max_context)


class MTPState:
    """The MTP block's state buffers (its window ring) for ``batch_size`` sequences, and their lengths."""

    def __init__(self, block: MTPBlock, batch_size: int, max_context: int):
        self.block = block
        self.allocated = planned_context(max_context)
        bind = {"B": batch_size, "L": self.allocated}
        # the fill of a fresh Session: -1 marks an empty ring slot
        self.states = {n: torch.full(t.concrete(bind), -1 if t.dtype in ("i64", "i32") else 0, dtype=DTYPES[t.dtype],
                                     device=block.device) for n, t in block.graph.states}
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=block.device)
        self._hidden_dtype = DTYPES[dict(block.graph.inputs)["hidden"].dtype]

    def forward(self, ids: torch.Tensor, hidden: torch.Tensor, counts: torch.Tensor | None = None):
        """Append entries (``ids`` [B, T], ``hidden`` [B, T, n, D]); ``counts[b]``: how many of row ``b``'s
        are real (None: all). Returns float32 logits [B, T, vocab] and the block's streams [B, T, n, D]."""
        dev = self.block.device
        ids = ids.to(dev, torch.int64)
        t = ids.shape[1]
        steps = torch.arange(t, device=dev)[None, :]
        counts = torch.full((ids.shape[0],), t, device=dev) if counts is None else counts.to(dev, torch.int64)
        if bool((self.lengths + counts > self.allocated).any()):
            raise ValueError(f"the MTP state holds {self.allocated} entries per row; this call would pass it")
        pos = torch.where(steps < counts[:, None], self.lengths[:, None] + steps, torch.full_like(steps, -1))
        ids = ids.masked_fill(pos < 0, 0)
        logits, stream = self.block.executor.run(
            {"ids": ids, "pos": pos, "hidden": hidden.to(dev, self._hidden_dtype)}, self.states)
        self.lengths += counts
        return logits.float(), stream


def load_mtp(graph: Graph, params: dict[str, torch.Tensor], load_param, backend, device) -> MTPBlock:
    """``graph``'s block with its weights: the main model's tensors (``params``) where the graphs share a
    param, else ``load_param(name)``."""
    own = {n: params[n] if n in params else load_param(n) for n, _ in graph.params}
    return MTPBlock(graph, own, backend, device)
