"""Runs a verified graph node by node with the ops' reference implementations."""
from __future__ import annotations

from typing import Mapping

import torch

from ..graph.ir import Graph
from ..graph.registry import get_op
from ..graph.sites import site_id
from ..graph.weights import bind_quantized


class Executor:
    """A graph bound to its weights; ``run`` executes one forward call, updating states in place."""

    def __init__(self, graph: Graph, params: Mapping[str, torch.Tensor], impls: Mapping | None = None):
        """``impls`` (call site id or op -> callable) replaces ops' references, e.g. with the artifact's
        kernels; a node's site entry wins over its op's."""
        self.graph = graph
        self.params = bind_quantized(dict(graph.params), params)  # quantised weights joined with their scales
        self.plan = []
        impls = impls or {}
        types = graph.value_types()
        for node in graph.nodes:
            op = get_op(node.op)
            fn = impls.get(site_id(node, types)) if impls else None
            self.plan.append((fn or impls.get(node.op, op.ref), node.inputs, node.outputs, node.attr, op.state_io, node.op))
        self.frees = _last_uses(graph)

    def run(self, inputs: Mapping[str, torch.Tensor], states: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        env = {**self.params, **states, **inputs}
        for (ref, ins, outs, attrs, state_io, name), dead in zip(self.plan, self.frees):
            args = [env[i] for i in ins]
            res = ref(*args, **attrs)
            res = res if isinstance(res, tuple) else (res,)
            for ii, oi in state_io:  # states are updated in place: the buffers must not move
                if res[oi] is not args[ii]:
                    raise RuntimeError(f"op {name} returned a new tensor for state %{ins[ii]}")
            env.update(zip(outs, res))
            del args, res
            for v in dead:  # an activation is released after its last reader: the allocator reuses it
                del env[v]
        return [env[o] for o in self.graph.outputs]


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
