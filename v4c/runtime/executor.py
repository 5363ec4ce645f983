"""Runs a verified graph node by node with the ops' reference implementations."""
from __future__ import annotations

from typing import Mapping

import torch

from ..graph.ir import Graph
from ..graph.registry import get_op
from ..graph.weights import bind_quantized


class Executor:
    """A graph bound to its weights; ``run`` executes one forward call, updating states in place."""

    def __init__(self, graph: Graph, params: Mapping[str, torch.Tensor], impls: Mapping | None = None):
        """``impls`` (op -> callable) replaces ops' references, e.g. with the artifact's kernels."""
        self.graph = graph
        self.params = bind_quantized(dict(graph.params), params)  # quantised weights joined with their scales
        self.plan = []
        impls = impls or {}
        for node in graph.nodes:
            op = get_op(node.op)
            self.plan.append((impls.get(node.op, op.ref), node.inputs, node.outputs, node.attr, op.state_io, node.op))

    def run(self, inputs: Mapping[str, torch.Tensor], states: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        env = {**self.params, **states, **inputs}
        for ref, ins, outs, attrs, state_io, name in self.plan:
            args = [env[i] for i in ins]
            res = ref(*args, **attrs)
            res = res if isinstance(res, tuple) else (res,)
            for ii, oi in state_io:  # states are updated in place: the buffers must not move
                if res[oi] is not args[ii]:
                    raise RuntimeError(f"op {name} returned a new tensor for state %{ins[ii]}")
            env.update(zip(outs, res))
        return [env[o] for o in self.graph.outputs]
