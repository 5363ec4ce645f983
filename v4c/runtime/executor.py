"""Runs a verified graph node by node, each node with the implementation its backend bound it to."""
from __future__ import annotations

import math
from typing import Mapping

import torch

from ..backends import PHASES, Backend, Choice, calls, choose, phase_of
from ..backends.reference import REFERENCE
from ..graph.ir import Graph
from ..graph.registry import get_op
from ..graph.weights import bind_quantized
from .step_code import compile_step


class Executor:
    """A graph bound to its weights and to one implementation per node and phase (a decode step or a
    prefill: see ``backends.DECODE_TOKENS``); ``run`` executes one forward call, updating states in
    place."""

    def __init__(self, graph: Graph, params: Mapping[str, torch.Tensor], backend: Backend | None = None,
                 device: str = "cpu"):
        self.graph = graph
        self.params = bind_quantized(dict(graph.params), params)  # quantised weights joined with their scales
        self.backend = backend or REFERENCE
        # this model's own state of its implementations (weight re-layouts, imported kernels)
        self.context = ctx = self.backend.context()
        self.choices: dict[str, list[Choice]] = {}
        self.plans: dict[str, list] = {}
        made: dict = {}
        for phase in PHASES:
            choices, plan = [], []
            for i, call in enumerate(calls(graph, device, phase, self.params)):
                c = choose(self.backend, call)
                key = (i, id(c.impl))
                if key not in made:  # a node with one implementation for both phases is bound once
                    made[key] = c.impl.make(call, ctx)
                n = call.node
                plan.append((made[key], n.inputs, n.outputs, n.attr, get_op(n.op).state_io, n.op))
                choices.append(c)
            self.choices[phase], self.plans[phase] = choices, plan
        self.frees = _last_uses(graph)
        self._tokens_input = graph.inputs[0][0] if graph.inputs else None
        self._head = _lm_head_index(graph)
        # both phases' plans share the graph's dataflow: one straight-line function runs either (made for
        # the head found here; ``run`` remakes it if ``_head`` is changed)
        self._step = compile_step(graph, self.params, self.frees, self._head, _take)
        self._step_head = self._head

    def implementations(self) -> list[dict]:
        """Per node and phase: the backend and implementation bound, and why the others declined."""
        return [c.row() for phase in PHASES for c in self.choices[phase]]

    def run(self, inputs: Mapping[str, torch.Tensor], states: Mapping[str, torch.Tensor],
            phase: str | None = None, last: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One forward call. ``last`` ([B] token indices) asks for the logits (the first output) of one
        token per row only, [B, 1, vocab]: the LM head then runs on those tokens alone (a prefill
        needs the next token's logits, not every prompt position's); the other outputs are whole."""
        if phase is None:
            x = inputs.get(self._tokens_input)
            phase = phase_of(math.prod(x.shape[:2])) if x is not None and x.dim() >= 2 else "prefill"
        if self._step_head != self._head:
            self._step = compile_step(self.graph, self.params, self.frees, self._head, _take)
            self._step_head = self._head
        # the head's input is gathered for its call only (the value stays whole: a stream output)
        out = self._step(self.plans[phase], states, inputs, last)
        if last is not None and self._head is None:  # no separable head: every position's logits, then the rows'
            out[0] = _take(out[0], last)
        return out


def _take(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """``x[b, last[b]]`` for each row b of x [B, T, ...], as [B, 1, ...]."""
    idx = last.to(x.device, torch.int64).view(-1, 1, *([1] * (x.dim() - 2))).expand(-1, 1, *x.shape[2:])
    return x.gather(1, idx)


def _lm_head_index(graph: Graph) -> int | None:
    """The node computing the first output (the logits) when it is a per-token ``linear`` of one
    activation [B, T, H], so that it may run on some tokens alone; None otherwise."""
    if not graph.outputs:
        return None
    for k, n in enumerate(graph.nodes):
        if graph.outputs[0] in n.outputs:
            return k if n.op == "linear" and len(n.outputs) == 1 else None
    return None


def _last_uses(graph: Graph) -> list[list[str]]:
    """Per node, the intermediate values nothing after it reads (params, states, inputs and outputs
    are never released)."""
    keep = {n for n, _ in graph.params} | {n for n, _ in graph.states} | {n for n, _ in graph.inputs}
    keep |= set(graph.outputs)
    last = {}
    for i, node in enumerate(graph.nodes):
        for v in (*node.inputs, *node.outputs):  # an output never read dies where it is made
            last[v] = i
    frees = [[] for _ in graph.nodes]
    for v, i in last.items():
        if v not in keep:
            frees[i].append(v)
    return frees
