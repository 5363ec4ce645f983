"""Decode steps on CUDA captured once into a CUDA graph and replayed.

The graph reads the token ids and positions from static input buffers and writes the
logits into a static output buffer; states and weights are already fixed buffers. A step
that cannot be captured (an op that synchronises with the host) falls back to running
eagerly, with a warning, for the rest of the session.
"""
from __future__ import annotations

import warnings

import torch


class StaticOutputStep:
    """The contract of a replayed step: every ``run`` writes the logits into one static buffer and
    returns that buffer, which the next ``run`` overwrites (so ``Session.forward`` hands the caller
    a copy). Here the step runs eagerly: how the CPU tests hold the session to that contract."""

    def __init__(self, executor, states: dict):
        self.executor, self.states, self.out = executor, states, None

    def run(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        y = self.executor.run({"ids": ids, "pos": pos}, self.states)[0]  # logits (an MTP artifact adds its streams)
        if self.out is None:
            self.out = torch.empty_like(y)
        return self.out.copy_(y)


class DecodeGraph:
    def __init__(self, executor, states: dict, batch: int, device: torch.device):
        self.executor, self.states = executor, states
        self.ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.graph = None
        self.out = None
        self.failed = False

    def run(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        if self.graph is None and not self.failed:
            self._capture()
        if self.graph is None:
            return self.executor.run({"ids": self.ids, "pos": self.pos}, self.states)[0]
        self.graph.replay()
        return self.out

    def _capture(self) -> None:
        # capturing replays every state update, so capture on copies and keep the real states
        saved = {k: v.clone() for k, v in self.states.items()}
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: Triton compiles kernels on first launch
                self.executor.run({"ids": self.ids, "pos": self.pos}, self.states)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.executor.run({"ids": self.ids, "pos": self.pos}, self.states)[0]
            self.graph = graph
        except Exception as e:  # an op synchronised with the host: decode eagerly from now on
            self.failed = True
            warnings.warn(f"decode step could not be captured into a CUDA graph ({type(e).__name__}: {e}); "
                          f"running it eagerly", RuntimeWarning)
        finally:
            for k, v in saved.items():
                self.states[k].copy_(v)
